/* pinentry.c — a PIN dialog through a pinentry program (pinentry.h).
 *
 * A hand-written Assuan client, not libassuan: a PIN dialog needs a dozen
 * lines of the protocol (the greeting, OPTION, SET*, GETPIN with its D
 * lines, OK/ERR, S and # lines, BYE), and writing them here keeps the one
 * place a PIN passes through short enough to audit, lets every byte of it
 * live in a locked, wiped buffer, and keeps the child handling (a socket
 * pair, posix_spawn, a deadline on every read and write, kill and reap)
 * under the agent's control in a multi-threaded process.
 *
 * Must never: log or copy the PIN outside struct secret; block without a
 * deadline; return with the child still running or not reaped.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pinentry.h"

#define LINE_MAX_BYTES 1000u    /* Assuan's limit for one line, without its LF */
#define RECV_CAP (2 * LINE_MAX_BYTES + 16)
#define EXIT_WAIT_MS 1000       /* after BYE, how long the program may take to exit */

/* libgpg-error codes in ERR lines (the source is in the top byte). */
#define GPG_ERR_TIMEOUT 62u
#define GPG_ERR_CANCELED 99u
#define GPG_ERR_NOT_CONFIRMED 114u
#define GPG_ERR_FULLY_CANCELED 198u

struct session {
        const struct pinentry_dialog *d;
        pid_t pid;                      /* 0 once reaped */
        int fd;                         /* our end of the socket pair */
        struct secret in;               /* bytes received: may hold the PIN */
        size_t have;                    /* bytes in in.p */
        size_t used;                    /* bytes of the current line, LF included */
        long long deadline;             /* CLOCK_MONOTONIC, ms */
        bool orderly;                   /* GETPIN was answered: the program may exit by itself */
        unsigned err_code;              /* the last ERR line */
        char err_text[256];
        char *why;
        size_t wn;
};

static long long now_ms(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int fail(struct session *s, int r, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct session *s, int r, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(s->why, s->wn, fmt, ap);
        va_end(ap);
        return r;
}

/* ---- Escaping ------------------------------------------------------------ */

static bool needs_escape(unsigned char c)
{
        return c == '%' || c < 0x20 || c == 0x7f;
}

size_t pinentry_escape(const char *in, char *out, size_t n)
{
        static const char hex[] = "0123456789ABCDEF";
        size_t o = 0, boundary = 0;

        if (n == 0)
                return 0;
        for (size_t i = 0; in[i]; i++) {
                unsigned char c = (unsigned char)in[i];
                size_t need = needs_escape(c) ? 3 : 1;

                if ((c & 0xc0) != 0x80)
                        boundary = o;   /* a character starts here */
                if (o + need + 1 > n) {
                        if ((c & 0xc0) == 0x80)
                                o = boundary;   /* do not cut a UTF-8 sequence */
                        break;
                }
                if (need == 3) {
                        out[o++] = '%';
                        out[o++] = hex[c >> 4];
                        out[o++] = hex[c & 15];
                } else {
                        out[o++] = (char)c;
                }
        }
        out[o] = '\0';
        return o;
}

static int hex_value(char c)
{
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

int pinentry_unescape_append(const char *data, size_t len, struct secret *pin)
{
        for (size_t i = 0; i < len; i++) {
                int c = (unsigned char)data[i];

                if (c == '%') {
                        int hi = i + 2 < len ? hex_value(data[i + 1]) : -1;
                        int lo = hi >= 0 ? hex_value(data[i + 2]) : -1;

                        if (lo < 0)
                                return -EPROTO;
                        c = hi << 4 | lo;
                        i += 2;
                }
                if (pin->len >= pin->cap)
                        return -EMSGSIZE;
                pin->p[pin->len++] = (char)c;
        }
        pin->p[pin->len] = '\0';
        return 0;
}

/* Text from the program (an ERR message) made safe to show: printable
 * ASCII and UTF-8 bytes only, at most n - 1 of them. */
static void printable(const char *in, char *out, size_t n)
{
        size_t o = 0;

        for (; *in && o + 1 < n; in++)
                out[o++] = (unsigned char)*in < 0x20 || *in == 0x7f ? '?' : *in;
        out[o] = '\0';
}

/* ---- The child ----------------------------------------------------------- */

static int spawn(struct session *s)
{
        const struct pinentry_dialog *d = s->d;
        char *const argv[] = { (char *)d->program, NULL };
        posix_spawn_file_actions_t fa;
        posix_spawnattr_t attr;
        sigset_t none, dfl;
        int sv[2], r;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                return fail(s, -errno, "cannot make a socket pair for the pinentry: %s", strerror(errno));
        posix_spawn_file_actions_init(&fa);
        posix_spawnattr_init(&attr);
        sigemptyset(&none);
        sigemptyset(&dfl);
        /* The agent ignores SIGPIPE and blocks SIGTERM/SIGINT/SIGHUP in its
         * threads; an exec keeps both, so reset them for the child. */
        sigaddset(&dfl, SIGPIPE);
        sigaddset(&dfl, SIGTERM);
        sigaddset(&dfl, SIGINT);
        sigaddset(&dfl, SIGHUP);
        sigaddset(&dfl, SIGQUIT);
        sigaddset(&dfl, SIGCHLD);
        posix_spawnattr_setsigmask(&attr, &none);
        posix_spawnattr_setsigdefault(&attr, &dfl);
        posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
        /* dup2 clears close-on-exec on 0 and 1; 2 stays the agent's stderr;
         * everything else is closed, whoever opened it without O_CLOEXEC
         * (a PKCS#11 module, say). */
        posix_spawn_file_actions_adddup2(&fa, sv[1], STDIN_FILENO);
        posix_spawn_file_actions_adddup2(&fa, sv[1], STDOUT_FILENO);
        posix_spawn_file_actions_addclosefrom_np(&fa, 3);
        r = posix_spawn(&s->pid, d->program, &fa, &attr, argv, d->envp);
        posix_spawn_file_actions_destroy(&fa);
        posix_spawnattr_destroy(&attr);
        close(sv[1]);
        if (r != 0) {
                s->pid = 0;
                close(sv[0]);
                return fail(s, -r, "cannot run the pinentry program %s: %s", d->program, strerror(r));
        }
        s->fd = sv[0];
        if (fcntl(s->fd, F_SETFL, O_NONBLOCK) < 0)
                return fail(s, -errno, "cannot set up the pinentry's socket: %s", strerror(errno));
        return 0;
}

/* Waits for the child to exit for at most ms; then asks it to stop
 * (SIGTERM: a curses pinentry may restore its terminal) and kills it
 * (SIGKILL) when it has not within TERM_WAIT_MS. Fills status with how it
 * ended on its own (for messages; "" when it had to be stopped). Never
 * returns with the child unreaped. */
#define TERM_WAIT_MS 200

static void reap(struct session *s, int ms, char *status, size_t n)
{
        long long until = now_ms() + ms;
        int st = 0, sig = 0;
        pid_t r;

        if (n)
                status[0] = '\0';
        if (s->pid <= 0)
                return;
        for (;;) {
                r = waitpid(s->pid, &st, WNOHANG);
                if (r == s->pid || (r < 0 && errno != EINTR))
                        break;
                if (r == 0 && now_ms() >= until) {
                        if (sig == SIGKILL) {
                                do
                                        r = waitpid(s->pid, &st, 0);
                                while (r < 0 && errno == EINTR);
                                break;
                        }
                        sig = sig ? SIGKILL : SIGTERM;
                        kill(s->pid, sig);
                        until = now_ms() + TERM_WAIT_MS;
                }
                if (r == 0)
                        usleep(5 * 1000);
        }
        if (n && r == s->pid && !sig) {
                if (WIFEXITED(st))
                        snprintf(status, n, "exited with status %d", WEXITSTATUS(st));
                else if (WIFSIGNALED(st))
                        snprintf(status, n, "was killed by signal %d (SIG%s)", WTERMSIG(st),
                                 sigabbrev_np(WTERMSIG(st)) ? sigabbrev_np(WTERMSIG(st)) : "?");
        }
        s->pid = 0;
}

/* ---- Lines ---------------------------------------------------------------- */

/* 0 when fd is ready for events, -ETIMEDOUT, or -ECONNRESET when the
 * watched client socket hung up. */
static int wait_ready(struct session *s, short events)
{
        struct pollfd p[2] = { { .fd = s->fd, .events = events }, { .fd = s->d->watch_fd, .events = POLLRDHUP } };
        nfds_t np = s->d->watch_fd >= 0 ? 2 : 1;

        for (;;) {
                long long left = s->deadline - now_ms();
                int r;

                if (left <= 0)
                        return -ETIMEDOUT;
                r = poll(p, np, left > 1000000 ? 1000000 : (int)left);
                if (r < 0 && errno == EINTR)
                        continue;
                if (r < 0)
                        return -errno;
                if (np == 2 && p[1].revents & (POLLRDHUP | POLLHUP | POLLERR))
                        return -ECONNRESET;
                if (p[0].revents)
                        return 0;
        }
}

static int io_failure(struct session *s, int r, const char *doing)
{
        char status[128];

        if (r == -ETIMEDOUT)
                return fail(s, r, "the pinentry program %s did not answer within %u s (%s); it was stopped",
                            s->d->program, s->d->timeout_sec + PINENTRY_GRACE_SEC, doing);
        if (r == -ECONNRESET)
                return fail(s, r, "the client went away while the PIN dialog was open; the dialog was closed");
        reap(s, 200, status, sizeof(status));
        return fail(s, -EPROTO, "the pinentry program %s %s while %s", s->d->program,
                    status[0] ? status : "closed its output", doing);
}

/* Sends "cmd[ arg]\n"; arg is escaped. Commands never carry the PIN. */
static int send_cmd(struct session *s, const char *cmd, const char *arg)
{
        char line[LINE_MAX_BYTES + 2];
        size_t len = (size_t)snprintf(line, sizeof(line), "%s%s", cmd, arg ? " " : "");

        if (arg)
                len += pinentry_escape(arg, line + len, LINE_MAX_BYTES + 1 - len);
        line[len++] = '\n';
        for (size_t off = 0; off < len;) {
                ssize_t n = send(s->fd, line + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
                int r;

                if (n > 0) {
                        off += (size_t)n;
                        continue;
                }
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno != EAGAIN)
                        return io_failure(s, -errno, cmd);
                r = wait_ready(s, POLLOUT);
                if (r < 0)
                        return io_failure(s, r, cmd);
        }
        return 0;
}

/* The next line, NUL-terminated in place at s->in.p (LF removed). */
static int read_line(struct session *s, const char *doing)
{
        for (;;) {
                char *lf = memchr(s->in.p, '\n', s->have);
                ssize_t n;
                int r;

                if (lf) {
                        *lf = '\0';
                        s->used = (size_t)(lf - s->in.p) + 1;
                        return 0;
                }
                if (s->have > LINE_MAX_BYTES)
                        return fail(s, -EPROTO, "the pinentry program %s sent a line longer than Assuan's %u bytes "
                                    "while %s", s->d->program, LINE_MAX_BYTES, doing);
                n = recv(s->fd, s->in.p + s->have, s->in.cap - s->have, MSG_DONTWAIT);
                if (n > 0) {
                        s->have += (size_t)n;
                        continue;
                }
                if (n == 0)
                        return io_failure(s, -EPIPE, doing);
                if (errno == EINTR)
                        continue;
                if (errno != EAGAIN)
                        return io_failure(s, -errno, doing);
                r = wait_ready(s, POLLIN);
                if (r < 0)
                        return io_failure(s, r, doing);
        }
}

/* Drops the current line and wipes the bytes it occupied. */
static void consume_line(struct session *s)
{
        memmove(s->in.p, s->in.p + s->used, s->have - s->used);
        s->have -= s->used;
        explicit_bzero(s->in.p + s->have, s->used);
        s->used = 0;
}

/* Sends cmd (NULL: reads the greeting) and reads its answer: 0 for OK, 1
 * for ERR (err_code, err_text), negative when the dialogue broke. D lines
 * go to data (only GETPIN expects them). */
static int transact(struct session *s, const char *cmd, const char *arg, struct secret *data)
{
        const char *doing = cmd ? cmd : "starting";
        int r;

        if (cmd) {
                r = send_cmd(s, cmd, arg);
                if (r < 0)
                        return r;
        }
        for (;;) {
                const char *l;

                r = read_line(s, doing);
                if (r < 0)
                        return r;
                l = s->in.p;
                if (strcmp(l, "OK") == 0 || strncmp(l, "OK ", 3) == 0) {
                        consume_line(s);
                        return 0;
                }
                if (strncmp(l, "ERR ", 4) == 0) {
                        char *end;
                        unsigned long code = strtoul(l + 4, &end, 10);

                        s->err_code = (unsigned)code;
                        while (*end == ' ')
                                end++;
                        printable(end, s->err_text, sizeof(s->err_text));
                        consume_line(s);
                        return 1;
                }
                if (strncmp(l, "D ", 2) == 0 && data) {
                        r = pinentry_unescape_append(l + 2, s->used - 3, data);
                        consume_line(s);
                        if (r == -EMSGSIZE)
                                return fail(s, -EPROTO, "the pinentry program %s returned a PIN longer than %u bytes",
                                            s->d->program, PINENTRY_MAX_PIN);
                        if (r < 0)
                                return fail(s, -EPROTO, "the pinentry program %s sent a malformed %%-escape in its "
                                            "D line", s->d->program);
                        continue;
                }
                if (l[0] == '#' || strcmp(l, "S") == 0 || strncmp(l, "S ", 2) == 0) {
                        consume_line(s);        /* comments and status lines */
                        continue;
                }
                if (strncmp(l, "INQUIRE ", 8) == 0) {
                        /* Nothing we send asks for one: decline it. */
                        consume_line(s);
                        r = send_cmd(s, "CAN", NULL);
                        if (r < 0)
                                return r;
                        continue;
                }
                /* Never quoted: whatever it is, it might hold the PIN. */
                consume_line(s);
                return fail(s, -EPROTO, "the pinentry program %s answered %s with something that is not Assuan; is "
                            "it a pinentry?", s->d->program, doing);
        }
}

/* An OPTION only when its value can be sent as it is (no escaping is
 * defined for OPTION values). An old pinentry may not know it: ERR is fine. */
static int send_option(struct session *s, const char *name, const char *value)
{
        char line[LINE_MAX_BYTES];
        int n;

        if (!value || !*value)
                return 0;
        for (const char *p = value; *p; p++)
                if (needs_escape((unsigned char)*p) || *p == ' ')
                        return 0;
        n = snprintf(line, sizeof(line), "%s=%s", name, value);
        if (n < 0 || (size_t)n >= sizeof(line) - 8)
                return 0;
        n = transact(s, "OPTION", line, NULL);
        return n < 0 ? n : 0;
}

static int dialogue(struct session *s, struct secret *pin)
{
        const struct pinentry_dialog *d = s->d;
        char num[16];
        int r;

        r = transact(s, NULL, NULL, NULL);
        if (r != 0)
                return r < 0 ? r : fail(s, -EPROTO, "the pinentry program %s did not start: ERR %u %s", d->program,
                                        s->err_code, s->err_text);
        if ((r = send_option(s, "ttyname", d->ttyname)) < 0 || (r = send_option(s, "ttytype", d->ttytype)) < 0 ||
            (r = send_option(s, "lc-ctype", d->lc_ctype)) < 0 ||
            (r = send_option(s, "lc-messages", d->lc_messages)) < 0)
                return r;
        /* An old pinentry without SETTIMEOUT still gets killed at the deadline. */
        snprintf(num, sizeof(num), "%u", d->timeout_sec);
        r = transact(s, "SETTIMEOUT", num, NULL);
        if (r >= 0 && d->title)
                r = transact(s, "SETTITLE", d->title, NULL);
        if (r < 0)
                return r;
        /* The description says who asks and for what: no dialog without it. */
        r = transact(s, "SETDESC", d->description ? d->description : "", NULL);
        if (r == 0 && d->prompt)
                r = transact(s, "SETPROMPT", d->prompt, NULL);
        if (r != 0)
                return r < 0 ? r : fail(s, -EPROTO, "the pinentry program %s refused the dialog's text: ERR %u %s",
                                        d->program, s->err_code, s->err_text);
        r = transact(s, "GETPIN", NULL, pin);
        if (r < 0)
                return r;
        /* The dialog is over and the program still talks: let it exit by
         * itself (BYE, then end of file), whatever the answer was. */
        {
                unsigned err_code = s->err_code;
                char err_text[sizeof(s->err_text)];
                long long bye_deadline = now_ms() + EXIT_WAIT_MS;

                memcpy(err_text, s->err_text, sizeof(err_text));
                s->orderly = true;
                if (bye_deadline < s->deadline)
                        s->deadline = bye_deadline;
                (void)transact(s, "BYE", NULL, NULL);
                s->err_code = err_code;
                memcpy(s->err_text, err_text, sizeof(err_text));
        }
        if (r == 1) {
                unsigned code = s->err_code & 0xffffu;

                if (code == GPG_ERR_CANCELED || code == GPG_ERR_FULLY_CANCELED || code == GPG_ERR_NOT_CONFIRMED)
                        return fail(s, -ECANCELED, "the PIN dialog was cancelled (%s)", s->err_text);
                if (code == GPG_ERR_TIMEOUT)
                        return fail(s, -ETIMEDOUT, "no PIN was entered in the dialog within %u s (pinentry-timeout)",
                                    d->timeout_sec);
                return fail(s, -EPROTO, "the pinentry program %s failed: ERR %u %s", d->program, s->err_code,
                            s->err_text);
        }
        return 0;
}

/* ---- One dialog at a time -------------------------------------------------- */

static pthread_mutex_t dialog_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t owner_lock = PTHREAD_MUTEX_INITIALIZER;
static char dialog_owner[256];

int pinentry_getpin(const struct pinentry_dialog *d, struct secret *pin, char *why, size_t wn)
{
        struct session s = { .d = d, .fd = -1, .why = why, .wn = wn };
        long long budget = (long long)(d->timeout_sec + PINENTRY_GRACE_SEC) * 1000;
        struct timespec until;
        int r;

        memset(pin, 0, sizeof(*pin));
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += (time_t)(d->timeout_sec + PINENTRY_GRACE_SEC);
        r = pthread_mutex_clocklock(&dialog_lock, CLOCK_MONOTONIC, &until);
        if (r != 0) {
                pthread_mutex_lock(&owner_lock);
                snprintf(why, wn, "another PIN dialog (%s) stayed open for %u s; answer or cancel it and try again",
                         dialog_owner, d->timeout_sec + PINENTRY_GRACE_SEC);
                pthread_mutex_unlock(&owner_lock);
                return r == ETIMEDOUT ? -EBUSY : -r;
        }
        pthread_mutex_lock(&owner_lock);
        snprintf(dialog_owner, sizeof(dialog_owner), "%s", d->owner ? d->owner : "for another request");
        pthread_mutex_unlock(&owner_lock);

        s.deadline = now_ms() + budget;
        r = secret_alloc(&s.in, RECV_CAP);
        if (r == 0)
                r = secret_alloc(pin, PINENTRY_MAX_PIN);
        if (r < 0)
                r = fail(&s, -ENOMEM, "out of memory for the PIN dialog");
        if (r == 0)
                r = spawn(&s);
        if (r == 0)
                r = dialogue(&s, pin);
        if (s.fd >= 0)
                close(s.fd);    /* a pinentry still reading sees end of file */
        reap(&s, s.orderly ? EXIT_WAIT_MS : 0, NULL, 0);
        secret_free(&s.in);
        if (r < 0)
                secret_free(pin);
        pthread_mutex_unlock(&dialog_lock);
        return r;
}

/* ---- Configuration -------------------------------------------------------- */

static int check_program(const char *path, char *why, size_t wn)
{
        struct stat st;

        if (stat(path, &st) < 0) {
                int e = errno;

                snprintf(why, wn, "pinentry program %s: %s", path, strerror(e));
                return -e;
        }
        if (!S_ISREG(st.st_mode) || access(path, X_OK) < 0) {
                snprintf(why, wn, "pinentry program %s is not an executable file", path);
                return -EACCES;
        }
        return 0;
}

int pinentry_resolve(const char *name, char **path, char *why, size_t wn)
{
        const char *dirs = getenv("PATH");
        int r;

        *path = NULL;
        if (!*name) {
                snprintf(why, wn, "pinentry needs a program, e.g. pinentry = /usr/bin/pinentry-gnome3");
                return -EINVAL;
        }
        if (strchr(name, '/')) {
                if (name[0] != '/') {
                        snprintf(why, wn, "pinentry program %s: give an absolute path or a name found in $PATH", name);
                        return -EINVAL;
                }
                r = check_program(name, why, wn);
                if (r < 0)
                        return r;
                *path = strdup(name);
                return *path ? 0 : -ENOMEM;
        }
        if (!dirs || !*dirs)
                dirs = "/usr/local/bin:/usr/bin:/bin";
        for (const char *p = dirs; *p;) {
                size_t len = strcspn(p, ":");
                char cand[4096], ignored[256];

                if (len > 0 && p[0] == '/' &&
                    (size_t)snprintf(cand, sizeof(cand), "%.*s/%s", (int)len, p, name) < sizeof(cand) &&
                    check_program(cand, ignored, sizeof(ignored)) == 0) {
                        *path = strdup(cand);
                        return *path ? 0 : -ENOMEM;
                }
                p += len;
                if (*p == ':')
                        p++;
        }
        snprintf(why, wn, "pinentry program '%s' is not in $PATH (%s); install it (apt-get install pinentry-gnome3, "
                 "pinentry-curses...) or give its absolute path", name, dirs);
        return -ENOENT;
}
