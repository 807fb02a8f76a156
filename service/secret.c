/* secret.c — wiped, locked buffers for PINs. Must never log their content. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "secret.h"

int secret_alloc(struct secret *s, size_t cap)
{
        memset(s, 0, sizeof(*s));
        s->p = calloc(1, cap + 1);
        if (!s->p)
                return -ENOMEM;
        s->cap = cap;
        (void)mlock(s->p, cap + 1);     /* best effort: RLIMIT_MEMLOCK may forbid it */
        return 0;
}

void secret_free(struct secret *s)
{
        if (!s->p)
                return;
        explicit_bzero(s->p, s->cap + 1);
        munlock(s->p, s->cap + 1);
        free(s->p);
        memset(s, 0, sizeof(*s));
}

int secret_read_file(struct secret *s, const char *path)
{
        int fd, r;
        ssize_t n;

        r = secret_alloc(s, 256);
        if (r < 0)
                return r;
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
                r = -errno;
                secret_free(s);
                return r;
        }
        do
                n = read(fd, s->p, s->cap);
        while (n < 0 && errno == EINTR);
        r = n < 0 ? -errno : 0;
        close(fd);
        if (r < 0) {
                secret_free(s);
                return r;
        }
        s->len = (size_t)n;
        for (size_t i = 0; i < s->len; i++)
                if (s->p[i] == '\n' || s->p[i] == '\r') {
                        s->len = i;
                        break;
                }
        s->p[s->len] = '\0';
        return 0;
}
