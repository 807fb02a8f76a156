/* secret.h — the one kind of buffer that holds secrets (PINs). Locked in
 * memory where the system allows it, wiped on free. grep for "secret_" finds
 * every place a secret lives outside a wiped protocol frame. */
#ifndef SMIME_SECRET_H
#define SMIME_SECRET_H

#include <stddef.h>

struct secret {
        char *p;
        size_t len;
        size_t cap;
};

int secret_alloc(struct secret *s, size_t cap);
void secret_free(struct secret *s);
/* Reads a PIN from a file: the first line, without its line end. */
int secret_read_file(struct secret *s, const char *path);

#endif
