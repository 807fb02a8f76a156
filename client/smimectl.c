/* smimectl — the command-line client of smime-agent.
 *
 * Must never: do cryptography or touch PKCS#11 (the agent does), echo a
 * PIN, or leave a partial --out file behind after a failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "smime-agent.h"

enum { EXIT_AGENT_ERROR = 1, EXIT_USAGE = 2, EXIT_NO_AGENT = 3, EXIT_LOCAL = 4 };
/* verify: the signature is bad or the content altered / intact but not trusted. */
enum { EXIT_BAD_SIGNATURE = 5, EXIT_UNTRUSTED = 6 };

static const char *socket_opt;
static char temp_path[PATH_MAX];        /* removed by the signal handler too */

static void usage(FILE *f)
{
        fprintf(f,
                "Usage: smimectl [-s|--socket PATH] COMMAND [OPTIONS]\n\n"
                "Commands:\n"
                "  keys      list the identities on the tokens\n"
                "  status    show the agent, its PKCS#11 modules and tokens\n"
                "  sign      sign a message (stdin to stdout by default)\n"
                "            -k, --key URI|EMAIL      -d, --detached\n"
                "            -f, --format der|pem|smime (default smime)\n"
                "            -g, --digest sha256|sha384|sha512\n"
                "            -P, --pss   -N, --no-certs   -C, --chain\n"
                "            -i, --in FILE   -o, --out FILE\n"
                "            -e, --encrypt -r EMAIL|FINGERPRINT|CERTFILE ... [--no-self] [-q]:\n"
                "                sign, then encrypt the signed message (--format is then the\n"
                "                encrypted message's)\n"
                "  decrypt   decrypt an S/MIME, PEM or DER message (stdin to stdout by default)\n"
                "            -k, --key URI|EMAIL (only this key)   -f, --format der|pem|smime\n"
                "            -i, --in FILE   -o, --out FILE   -v, --verbose\n"
                "  login     log in to tokens ahead of time (asks for their PINs)\n"
                "            -t, --token URI|EMAIL (default: every token that needs a login)\n"
                "  lock      log out of every token at once (or: -t, --token URI|EMAIL)\n"
                "  verify    verify a signed message (S/MIME, CMS DER or PEM)\n"
                "            -i, --in FILE   -c, --content FILE (--in is then the detached signature)\n"
                "            -o, --out FILE|- (the verified content)   -F, --from ADDR\n"
                "  encrypt   encrypt a message (stdin to stdout by default)\n"
                "            -r, --recipient EMAIL|FINGERPRINT|CERTFILE (repeat)   -n, --no-self\n"
                "            -k, --key URI|EMAIL (your own certificate)   -f, --format der|pem|smime\n"
                "            -i, --in FILE   -o, --out FILE   -q, --quiet\n"
                "  certs     list the address book [EMAIL]\n"
                "  import    add certificates (or CRLs) from a signed message, a certificate, a CRL or a bundle [FILE]\n"
                "  trust     trust a certificate: FILE|FINGERPRINT\n"
                "  distrust  distrust a certificate: FILE|FINGERPRINT\n"
                "  untrust   forget a trust decision: FILE|FINGERPRINT\n\n"
                "The socket is also taken from $SMIME_AGENT_SOCKET.\n"
                "Exit status: 0 success, 1 the agent refused or failed the request, 2 usage,\n"
                "3 no agent to talk to, 4 a local failure during the request (input, output,\n"
                "connection lost); verify: 5 bad signature or altered content, 6 the signature\n"
                "is intact but the signer is not trusted (expired, untrusted, revoked, wrong\n"
                "sender...).\n");
}

static int ask_pin(const struct smime_agent_token *t, char *pin, size_t size, void *userdata)
{
        struct termios old, noecho;
        FILE *tty = userdata;
        int fd = fileno(tty);
        size_t n;

        if (t->pin_pad) {
                if (*t->key_label)
                        fprintf(tty, "Enter the PIN for key '%s' on token '%s' (%s, serial %s) on the reader's PIN pad\n",
                                t->key_label, t->label, t->manufacturer, t->serial);
                else
                        fprintf(tty, "Enter the PIN for token '%s' (%s, serial %s) on the reader's PIN pad\n", t->label,
                                t->manufacturer, t->serial);
                fflush(tty);
                return 0;
        }
        if (*t->key_label)
                fprintf(tty, "PIN for key '%s' on token '%s' (%s, serial %s; this key needs it for every use)",
                        t->key_label, t->label, t->manufacturer, t->serial);
        else
                fprintf(tty, "PIN for token '%s' (%s, serial %s)", t->label, t->manufacturer, t->serial);
        if (strcmp(t->pin_state, "final-try") == 0)
                fprintf(tty, " — FINAL TRY: a wrong PIN locks the token");
        else if (strcmp(t->pin_state, "count-low") == 0)
                fprintf(tty, " — a wrong PIN was entered before; few tries are left");
        fprintf(tty, ": ");
        fflush(tty);
        if (tcgetattr(fd, &old) < 0)
                return -1;
        noecho = old;
        noecho.c_lflag &= ~(tcflag_t)ECHO;
        noecho.c_lflag |= ECHONL;
        tcsetattr(fd, TCSAFLUSH, &noecho);
        if (!fgets(pin, (int)size, tty)) {
                tcsetattr(fd, TCSAFLUSH, &old);
                explicit_bzero(pin, size);
                return -1;
        }
        tcsetattr(fd, TCSAFLUSH, &old);
        n = strcspn(pin, "\r\n");
        pin[n] = '\0';
        return 0;
}

static int connect_agent(struct smime_agent **a, FILE **tty)
{
        struct smime_agent_options o = { .socket_path = socket_opt, .software = "smimectl" };

        *tty = fopen("/dev/tty", "r+e");
        if (*tty) {
                o.pin = ask_pin;
                o.pin_userdata = *tty;
        }
        if (smime_agent_connect(&o, a) < 0) {
                fprintf(stderr, "smimectl: %s\n", smime_agent_connect_error());
                if (*tty)
                        fclose(*tty);
                *tty = NULL;
                return EXIT_NO_AGENT;
        }
        return 0;
}

static int agent_failed(struct smime_agent *a, const char *what)
{
        fprintf(stderr, "smimectl: %s failed: %s [%s]\n", what, smime_agent_error_message(a), smime_agent_error_name(a));
        return smime_agent_error_code(a) ? EXIT_AGENT_ERROR : EXIT_LOCAL;
}

static void fmt_date(long long t, char *buf, size_t n)
{
        time_t tt = (time_t)t;
        struct tm tm;

        gmtime_r(&tt, &tm);
        strftime(buf, n, "%Y-%m-%d", &tm);
}

static int print_key(const struct smime_agent_identity *id, void *userdata)
{
        char nb[16], na[16];

        printf("%s%s\n", id->n_emails ? id->emails[0] : id->label, id->is_default ? "  (default)" : "");
        for (size_t i = 1; i < id->n_emails; i++)
                printf("  also:     %s\n", id->emails[i]);
        printf("  key:      %s%s%s", id->key_type, *id->curve ? " " : "", id->curve);
        if (id->bits)
                printf(" %u bits", id->bits);
        printf("\n  usage:    %s%s%s\n", id->can_sign ? "sign" : "", id->can_sign && id->can_decrypt ? ", " : "",
               id->can_decrypt ? "decrypt" : (id->can_sign ? "" : "none"));
        if (*id->subject) {
                fmt_date(id->not_before, nb, sizeof(nb));
                fmt_date(id->not_after, na, sizeof(na));
                printf("  subject:  %s\n  issuer:   %s\n  valid:    %s to %s\n", id->subject, id->issuer, nb, na);
        }
        printf("  token:    %s\n  uri:      %s\n  status:   %s\n\n", id->token_label, id->uri, id->status);
        return 0;
}

/* keys and status: no options, one call, print what comes back. */
static int run_listing(int argc, const char *what, int (*call)(struct smime_agent *a))
{
        struct smime_agent *a;
        FILE *tty;
        int r;

        if (argc > 1) {
                usage(stderr);
                return EXIT_USAGE;
        }
        if ((r = connect_agent(&a, &tty)))
                return r;
        r = call(a) < 0 ? agent_failed(a, what) : 0;
        smime_agent_close(a);
        if (tty)
                fclose(tty);
        return r;
}

static int list_keys(struct smime_agent *a)
{
        return smime_agent_keys(a, print_key, NULL);
}

static void print_agent(const char *sw, unsigned long long n, void *u)
{
        printf("agent:   %s\nsocket:  %s\nkeys:    %llu\n", sw, smime_agent_socket_path(u), n);
}

static void print_module(const struct smime_agent_module *m, void *u)
{
        printf("module:  %s (%s, %s)%s%s\n", m->name, m->library, m->manufacturer,
               m->hotplug[0] ? ", hot-plug: " : "",
               strcmp(m->hotplug, "events") == 0 ? "slot events" : strcmp(m->hotplug, "poll") == 0 ? "polled" : m->hotplug);
}

static void fmt_time(long long t, char *buf, size_t n)
{
        time_t tt = (time_t)t;
        struct tm tm;

        localtime_r(&tt, &tm);
        strftime(buf, n, "%Y-%m-%d %H:%M:%S", &tm);
}

/* "until 2024-05-01 12:00:00 (in 598 s)" */
static void fmt_expiry(long long t, char *buf, size_t n)
{
        char when[32];
        long long left = t - (long long)time(NULL);

        fmt_time(t, when, sizeof(when));
        snprintf(buf, n, "%s (in %lld s)", when, left > 0 ? left : 0);
}

static void print_token(const struct smime_agent_token_status *t, void *u)
{
        char e[64], s[64], d[64];

        printf("token:   %s (%s %s, serial %s) in %s\n", t->token.label, t->token.manufacturer, t->token.model,
               t->token.serial, t->module);
        if (*t->state && strcmp(t->state, "present") != 0)
                printf("         %s\n", strcmp(t->state, "removed") == 0
                                              ? "REMOVED: insert it again; the agent takes it back by itself"
                                              : "UNRESPONSIVE: its module did not answer in time; requests fail "
                                                "until it does");
        printf("         login %s, %s, PIN %s%s\n", t->login_required ? "required" : "not required",
               t->logged_in ? "logged in" : "not logged in", t->token.pin_state,
               t->protected_auth ? ", PIN pad" : "");
        if (t->logged_in && t->login_expires) {
                fmt_expiry(t->login_expires, e, sizeof(e));
                fmt_expiry(t->sign_expires, s, sizeof(s));
                fmt_expiry(t->decrypt_expires, d, sizeof(d));
                printf("         cached login expires %s\n", e);
                if (t->sign_expires != t->login_expires || t->decrypt_expires != t->login_expires)
                        printf("           for signing %s, for decryption %s\n", s, d);
        }
        if (*t->login_policy)
                printf("         PIN cache: %s\n", t->login_policy);
        printf("         %s\n", t->token.uri);
}

static int show_status(struct smime_agent *a)
{
        static const struct smime_agent_status_fns fns = { print_agent, print_module, print_token };

        return smime_agent_status(a, &fns, a);
}

/* login and lock: [-t|--token SEL] */
static int cmd_tokens(int argc, char **argv, bool login)
{
        static const struct option opts[] = {
                { "token", required_argument, NULL, 't' },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        static const struct smime_agent_status_fns fns = { NULL, NULL, print_token };
        const char *sel = NULL;
        struct smime_agent *a;
        unsigned n = 0;
        FILE *tty;
        int ch, r;

        optind = 1;
        while ((ch = getopt_long(argc, argv, "t:h", opts, NULL)) != -1) {
                switch (ch) {
                case 't': sel = optarg; break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return EXIT_USAGE;
                }
        }
        if (optind != argc) {
                usage(stderr);
                return EXIT_USAGE;
        }
        if ((r = connect_agent(&a, &tty)))
                return r;
        if (login)
                r = smime_agent_login(a, sel, &fns, a) < 0 ? agent_failed(a, "login") : 0;
        else if (smime_agent_lock(a, sel, &n, &fns, a) < 0)
                r = agent_failed(a, "lock");
        else
                printf("logged out of %u token(s)\n", n);
        smime_agent_close(a);
        if (tty)
                fclose(tty);
        return r;
}

static void on_signal(int sig)
{
        if (temp_path[0])
                unlink(temp_path);
        signal(sig, SIG_DFL);
        raise(sig);
}

/* --out FILE: write to a temporary file beside it and rename at the end,
 * so a failure never leaves a partial result under the real name. */
static int open_output(const char *path)
{
        mode_t mask = umask(0);
        int fd;

        umask(mask);
        if (snprintf(temp_path, sizeof(temp_path), "%s.XXXXXX", path) >= (int)sizeof(temp_path))
                return -ENAMETOOLONG;
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
        signal(SIGHUP, on_signal);
        fd = mkostemp(temp_path, O_CLOEXEC);
        if (fd < 0) {
                temp_path[0] = '\0';
                return -errno;
        }
        fchmod(fd, 0666 & ~mask);
        return fd;
}

/* --out FILE: finish the temporary file and give it its name. */
static int finish_output(const char *out_path, int *out_fd)
{
        if (!out_path || *out_fd == STDOUT_FILENO)
                return 0;
        if (fsync(*out_fd) < 0 || close(*out_fd) < 0 || rename(temp_path, out_path) < 0) {
                fprintf(stderr, "smimectl: cannot write %s: %s\n", out_path, strerror(errno));
                *out_fd = -1;
                return EXIT_LOCAL;
        }
        *out_fd = -1;
        temp_path[0] = '\0';
        return 0;
}

/* --out FILE: a failure leaves nothing under its name, nor a temporary file. */
static void drop_output(const char *out_path, int *out_fd)
{
        if (out_path && *out_fd >= 0 && *out_fd != STDOUT_FILENO)
                close(*out_fd);
        *out_fd = -1;
        if (temp_path[0]) {
                unlink(temp_path);
                temp_path[0] = '\0';
        }
}

typedef int (*stream_fn)(struct smime_agent *a, void *ctx, int in_fd, int out_fd);

struct decrypt_ctx {
        struct smime_agent_decrypt_options opts;
        struct smime_agent_decrypt_result res;
};

/* One streaming request: input from in_path or stdin, output to out_path
 * (through a temporary file renamed at the end) or stdout. */
static int run_stream(const char *in_path, const char *out_path, const char *what, stream_fn fn, void *ctx)
{
        struct smime_agent *a = NULL;
        FILE *tty = NULL;
        int in_fd = STDIN_FILENO, out_fd = STDOUT_FILENO, r;

        if (in_path && (in_fd = open(in_path, O_RDONLY | O_CLOEXEC)) < 0) {
                fprintf(stderr, "smimectl: cannot open %s: %s\n", in_path, strerror(errno));
                return EXIT_USAGE;
        }
        if ((r = connect_agent(&a, &tty)))
                goto out;
        if (out_path && (out_fd = open_output(out_path)) < 0) {
                fprintf(stderr, "smimectl: cannot create a file beside %s: %s\n", out_path, strerror(-out_fd));
                r = EXIT_USAGE;
                goto out;
        }
        if (fn(a, ctx, in_fd, out_fd) < 0) {
                r = agent_failed(a, what);
                if (!out_path && smime_agent_error_code(a) == SMIME_AGENT_E_INTEGRITY)
                        fprintf(stderr, "smimectl: the output written so far is NOT trustworthy; discard it\n");
        } else {
                r = finish_output(out_path, &out_fd);
        }
out:
        drop_output(out_path, &out_fd);
        if (in_path && in_fd >= 0)
                close(in_fd);
        smime_agent_close(a);
        if (tty)
                fclose(tty);
        return r;
}


static int do_sign(struct smime_agent *a, void *ctx, int in_fd, int out_fd)
{
        return smime_agent_sign(a, ctx, in_fd, out_fd);
}

struct sign_encrypt {
        const char **rargs;     /* -r values, as given */
        size_t n;
        bool no_self, quiet;
        const char *format;     /* of the encrypted output */
};
static int run_sign_encrypt(const char *in_path, const char *out_path, const struct smime_agent_sign_options *so,
                            const struct sign_encrypt *se);

static int cmd_sign(int argc, char **argv)
{
        static const struct option opts[] = {
                { "key", required_argument, NULL, 'k' },
                { "detached", no_argument, NULL, 'd' },
                { "format", required_argument, NULL, 'f' },
                { "digest", required_argument, NULL, 'g' },
                { "pss", no_argument, NULL, 'P' },
                { "no-certs", no_argument, NULL, 'N' },
                { "chain", no_argument, NULL, 'C' },
                { "in", required_argument, NULL, 'i' },
                { "out", required_argument, NULL, 'o' },
                { "encrypt", no_argument, NULL, 'e' },
                { "recipient", required_argument, NULL, 'r' },
                { "no-self", no_argument, NULL, 'n' },
                { "quiet", no_argument, NULL, 'q' },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        struct smime_agent_sign_options so = { 0 };
        const char *in_path = NULL, *out_path = NULL;
        struct sign_encrypt se = { 0 };
        bool encrypt = false;
        int ch, r;

        se.rargs = calloc((size_t)argc + 1, sizeof(*se.rargs));
        if (!se.rargs) {
                fprintf(stderr, "smimectl: out of memory\n");
                return EXIT_LOCAL;
        }
        optind = 1;
        while ((ch = getopt_long(argc, argv, "k:df:g:PNCi:o:er:nqh", opts, NULL)) != -1) {
                switch (ch) {
                case 'k': so.key = optarg; break;
                case 'd': so.detached = 1; break;
                case 'f': so.format = optarg; break;
                case 'g': so.digest = optarg; break;
                case 'P': so.pss = 1; break;
                case 'N': so.no_certs = 1; break;
                case 'C': so.chain = 1; break;
                case 'i': in_path = optarg; break;
                case 'o': out_path = optarg; break;
                case 'e': encrypt = true; break;
                case 'r': se.rargs[se.n++] = optarg; break;
                case 'n': se.no_self = true; break;
                case 'q': se.quiet = true; break;
                case 'h': usage(stdout); free(se.rargs); return 0;
                default: usage(stderr); free(se.rargs); return EXIT_USAGE;
                }
        }
        r = EXIT_USAGE;
        if (optind != argc) {
                usage(stderr);
        } else if (so.format && strcmp(so.format, "der") && strcmp(so.format, "pem") && strcmp(so.format, "smime")) {
                fprintf(stderr, "smimectl: --format must be der, pem or smime\n");
        } else if (!encrypt && (se.n || se.no_self)) {
                fprintf(stderr, "smimectl: -r and --no-self go with --encrypt\n");
        } else if (encrypt && se.n == 0) {
                fprintf(stderr, "smimectl: sign --encrypt needs at least one -r EMAIL|FINGERPRINT|CERTFILE\n");
        } else if (encrypt) {
                /* Signed as S/MIME inside; --format is the encrypted message's. */
                se.format = so.format;
                so.format = "smime";
                r = run_sign_encrypt(in_path, out_path, &so, &se);
        } else {
                r = run_stream(in_path, out_path, "signing", do_sign, &so);
        }
        free(se.rargs);
        return r;
}

static int do_decrypt(struct smime_agent *a, void *ctx, int in_fd, int out_fd)
{
        struct decrypt_ctx *dc = ctx;

        return smime_agent_decrypt(a, &dc->opts, in_fd, out_fd, &dc->res);
}

static int cmd_decrypt(int argc, char **argv)
{
        static const struct option opts[] = {
                { "key", required_argument, NULL, 'k' },
                { "format", required_argument, NULL, 'f' },
                { "in", required_argument, NULL, 'i' },
                { "out", required_argument, NULL, 'o' },
                { "verbose", no_argument, NULL, 'v' },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        struct decrypt_ctx dc = { 0 };
        const char *in_path = NULL, *out_path = NULL;
        bool verbose = false;
        int ch, r;

        optind = 1;
        while ((ch = getopt_long(argc, argv, "k:f:i:o:vh", opts, NULL)) != -1) {
                switch (ch) {
                case 'k': dc.opts.key = optarg; break;
                case 'f': dc.opts.format = optarg; break;
                case 'i': in_path = optarg; break;
                case 'o': out_path = optarg; break;
                case 'v': verbose = true; break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return EXIT_USAGE;
                }
        }
        if (optind != argc) {
                usage(stderr);
                return EXIT_USAGE;
        }
        if (dc.opts.format && strcmp(dc.opts.format, "der") && strcmp(dc.opts.format, "pem") &&
            strcmp(dc.opts.format, "smime")) {
                fprintf(stderr, "smimectl: --format must be der, pem or smime\n");
                return EXIT_USAGE;
        }
        r = run_stream(in_path, out_path, "decrypting", do_decrypt, &dc);
        if (r == 0 && verbose)
                fprintf(stderr, "smimectl: decrypted with %s (%s)\n  content cipher %s, key %s, %s\n", dc.res.subject,
                        dc.res.key_uri, dc.res.cipher, dc.res.key_transport,
                        dc.res.authenticated ? "content authenticated (AEAD)"
                                             : "content not integrity-protected (CBC; only the padding was checked)");
        return r;
}

/* ---- address book, verify, encrypt ------------------------------------ */

#define MAX_FILE (1000u * 1000u)        /* a certificate or a detached signature: fits in one frame */

/* Reads a small file (certificate, detached signature) whole. */
static int read_small_file(const char *path, int fd, uint8_t **out, size_t *len)
{
        size_t cap = 65536, n = 0;
        uint8_t *buf = malloc(cap);
        int own = fd < 0;

        if (own && (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
                free(buf);
                return -errno;
        }
        for (;;) {
                ssize_t k;

                if (n == cap) {
                        uint8_t *nb = cap >= MAX_FILE ? NULL : realloc(buf, cap * 4);

                        if (!nb) {
                                free(buf);
                                if (own)
                                        close(fd);
                                return -EFBIG;
                        }
                        buf = nb;
                        cap *= 4;
                }
                if (!buf)
                        return -ENOMEM;
                k = read(fd, buf + n, cap - n);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0) {
                        int e = errno;

                        if (own)
                                close(fd);
                        if (k < 0) {
                                free(buf);
                                return -e;
                        }
                        break;
                }
                n += (size_t)k;
        }
        if (n > MAX_FILE) {
                free(buf);
                return -EFBIG;
        }
        *out = buf;
        *len = n;
        return 0;
}

static void print_list(const char *label, const char *const *v, size_t n, const char *none)
{
        printf("  %-12s", label);
        for (size_t i = 0; i < n; i++)
                printf("%s%s", i ? ", " : "", v[i]);
        printf("%s\n", n ? "" : none);
}

static int print_cert(const struct smime_agent_cert *c, void *userdata)
{
        char nb[16], na[16], ad[16];

        fmt_date(c->not_before, nb, sizeof(nb));
        fmt_date(c->not_after, na, sizeof(na));
        fmt_date(c->added, ad, sizeof(ad));
        printf("%s\n", c->n_emails ? c->emails[0] : c->subject);
        for (size_t i = 1; i < c->n_emails; i++)
                printf("  also:       %s\n", c->emails[i]);
        printf("  fingerprint %s\n  subject     %s\n  issuer      %s\n  valid       %s to %s\n", c->fingerprint,
               c->subject, c->issuer, nb, na);
        printf("  key         %s%s%s", c->key_type, *c->curve ? " " : "", c->curve);
        if (c->bits)
                printf(" %u bits", c->bits);
        printf("\n  usage       %s%s%s\n", c->can_sign ? "sign" : "", c->can_sign && c->can_encrypt ? ", " : "",
               c->can_encrypt ? "encrypt" : (c->can_sign ? "" : "none"));
        printf("  trust       %s (your decision), %s\n", c->trust, c->trust_path);
        print_list("caps", c->caps, c->n_caps, c->caps_known ? "none of ours" : "unknown (no signed message seen)");
        printf("  source      %s on %s\n", c->source, ad);
        if (c->n_problems)
                print_list("problems", c->problems, c->n_problems, "");
        printf("  status      %s\n\n", c->status);
        return 0;
}

static int with_agent(int (*fn)(struct smime_agent *a, void *u), void *u, const char *what)
{
        struct smime_agent *a;
        FILE *tty;
        int r;

        if ((r = connect_agent(&a, &tty)))
                return r;
        r = fn(a, u) < 0 ? agent_failed(a, what) : 0;
        smime_agent_close(a);
        if (tty)
                fclose(tty);
        return r;
}

static int do_certs(struct smime_agent *a, void *u)
{
        return smime_agent_certs(a, u, print_cert, NULL);
}

static int cmd_certs(int argc, char **argv)
{
        if (argc > 2 || (argc == 2 && argv[1][0] == '-')) {
                usage(stderr);
                return EXIT_USAGE;
        }
        return with_agent(do_certs, argc == 2 ? argv[1] : NULL, "listing the address book");
}

struct import_args {
        int fd;
        unsigned long long added, crls;
};

static int do_import(struct smime_agent *a, void *u)
{
        struct import_args *ia = u;

        return smime_agent_import_crls(a, ia->fd, print_cert, NULL, &ia->added, &ia->crls);
}

static int cmd_import(int argc, char **argv)
{
        struct import_args ia = { STDIN_FILENO, 0, 0 };
        const char *path = NULL;
        int r;

        if (argc == 2 && argv[1][0] != '-')
                path = argv[1];
        else if (argc == 3 && (strcmp(argv[1], "--in") == 0 || strcmp(argv[1], "-i") == 0))
                path = argv[2];
        else if (argc != 1) {
                usage(stderr);
                return EXIT_USAGE;
        }
        if (path && (ia.fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
                fprintf(stderr, "smimectl: cannot open %s: %s\n", path, strerror(errno));
                return EXIT_USAGE;
        }
        r = with_agent(do_import, &ia, "importing");
        if (r == 0 && ia.crls)
                fprintf(stderr, "smimectl: %llu new certificate(s) added to the address book, %llu CRL(s) stored\n",
                        ia.added, ia.crls);
        else if (r == 0)
                fprintf(stderr, "smimectl: %llu new certificate(s) added to the address book\n", ia.added);
        if (path)
                close(ia.fd);
        return r;
}

struct trust_args {
        const char *decision;
        const char *fp;
        uint8_t *cert;
        size_t len;
};

static int do_trust(struct smime_agent *a, void *u)
{
        struct trust_args *t = u;

        return smime_agent_trust(a, t->fp, t->cert, t->len, t->decision, print_cert, NULL);
}

static int cmd_trust(int argc, char **argv, const char *decision)
{
        struct trust_args t = { .decision = decision };
        int r;

        if (argc != 2 || argv[1][0] == '-') {
                usage(stderr);
                return EXIT_USAGE;
        }
        if (access(argv[1], F_OK) == 0) {
                r = read_small_file(argv[1], -1, &t.cert, &t.len);
                if (r < 0) {
                        fprintf(stderr, "smimectl: cannot read %s: %s\n", argv[1], strerror(-r));
                        return EXIT_USAGE;
                }
        } else {
                t.fp = argv[1];
        }
        r = with_agent(do_trust, &t, "recording the trust decision");
        free(t.cert);
        return r;
}

struct verify_out {
        FILE *f;
        int exit;
        int bad;
};

static void fmt_datetime(long long t, char *buf, size_t n)
{
        time_t tt = (time_t)t;
        struct tm tm;

        gmtime_r(&tt, &tm);
        strftime(buf, n, "%Y-%m-%d %H:%M:%S UTC", &tm);
}

static void print_verify(const struct smime_agent_verify_result *r, void *userdata)
{
        struct verify_out *vo = userdata;
        FILE *f = vo->f;

        fprintf(f, "verdict: %s\nsummary: %s\n", r->verdict, r->summary);
        if (*r->from)
                fprintf(f, "from: %s\n", r->from);
        for (size_t i = 0; i < r->n_signers; i++) {
                const struct smime_agent_signer *s = &r->signers[i];
                char when[40];

                fprintf(f, "signer: %s\n", *s->subject ? s->subject : "(certificate unknown)");
                for (size_t k = 0; k < s->n_emails; k++)
                        fprintf(f, "  email: %s\n", s->emails[k]);
                if (*s->fingerprint)
                        fprintf(f, "  fingerprint: %s\n", s->fingerprint);
                if (s->signing_time) {
                        fmt_datetime(s->signing_time, when, sizeof(when));
                        fprintf(f, "  signed: %s\n", when);
                }
                fprintf(f, "  algorithm: %s %s\n  trust: %s\n", s->sig_alg, s->digest, s->trust_path);
                for (size_t k = 0; k < s->n_chain; k++)
                        fprintf(f, "  chain: %s\n", s->chain[k]);
                for (size_t k = 0; k < s->n_problems; k++)
                        fprintf(f, "  problem: %s\n", s->problems[k]);
                for (size_t k = 0; k < s->n_caps; k++)
                        fprintf(f, "  capability: %s\n", s->caps[k]);
                fprintf(f, "  status: %s\n", s->status);
        }
        for (size_t i = 0; i < r->n_hints; i++)
                fprintf(f, "hint: %s\n", r->hints[i]);
        vo->bad = strcmp(r->verdict, "bad") == 0;
        vo->exit = strcmp(r->verdict, "good") == 0 ? 0 : vo->bad ? EXIT_BAD_SIGNATURE : EXIT_UNTRUSTED;
}

static int cmd_verify(int argc, char **argv)
{
        static const struct option opts[] = {
                { "in", required_argument, NULL, 'i' },
                { "content", required_argument, NULL, 'c' },
                { "out", required_argument, NULL, 'o' },
                { "from", required_argument, NULL, 'F' },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        struct smime_agent_verify_options vo = { 0 };
        struct verify_out res = { stdout, EXIT_AGENT_ERROR, 0 };
        const char *in_path = NULL, *content_path = NULL, *out_path = NULL;
        struct smime_agent *a = NULL;
        uint8_t *sig = NULL;
        size_t sig_len = 0;
        FILE *tty = NULL;
        int in_fd = STDIN_FILENO, out_fd = -1, ch, r;

        optind = 1;
        while ((ch = getopt_long(argc, argv, "i:c:o:F:h", opts, NULL)) != -1) {
                switch (ch) {
                case 'i': in_path = optarg; break;
                case 'c': content_path = optarg; break;
                case 'o': out_path = optarg; break;
                case 'F': vo.from = optarg; break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return EXIT_USAGE;
                }
        }
        if (optind != argc) {
                usage(stderr);
                return EXIT_USAGE;
        }
        if (content_path) {
                /* The signature travels in the request; the content streams. */
                r = read_small_file(in_path, in_path ? -1 : STDIN_FILENO, &sig, &sig_len);
                if (r < 0) {
                        fprintf(stderr, "smimectl: cannot read the signature %s: %s\n", in_path ? in_path : "(stdin)",
                                r == -EFBIG ? "over 1 MB; a detached signature is much smaller" : strerror(-r));
                        return EXIT_USAGE;
                }
                vo.signature = sig;
                vo.signature_len = sig_len;
                in_path = content_path;
        }
        if (in_path && (in_fd = open(in_path, O_RDONLY | O_CLOEXEC)) < 0) {
                fprintf(stderr, "smimectl: cannot open %s: %s\n", in_path, strerror(errno));
                free(sig);
                return EXIT_USAGE;
        }
        if ((r = connect_agent(&a, &tty)))
                goto out;
        if (!out_path) {
                vo.no_content = 1;
        } else if (strcmp(out_path, "-") == 0) {
                out_fd = STDOUT_FILENO;
                res.f = stderr;
                out_path = NULL;
        } else if ((out_fd = open_output(out_path)) < 0) {
                fprintf(stderr, "smimectl: cannot create a file beside %s: %s\n", out_path, strerror(-out_fd));
                r = EXIT_USAGE;
                goto out;
        }
        if (smime_agent_verify(a, &vo, in_fd, out_fd, print_verify, &res) < 0) {
                r = agent_failed(a, "verification");
                drop_output(out_path, &out_fd);
        } else {
                r = res.exit;
                if (res.bad)
                        drop_output(out_path, &out_fd);
                else if (finish_output(out_path, &out_fd))
                        r = EXIT_LOCAL;
        }
out:
        drop_output(out_path, &out_fd);
        if (in_path && in_fd >= 0)
                close(in_fd);
        free(sig);
        smime_agent_close(a);
        if (tty)
                fclose(tty);
        return r;
}

static void print_choice(const struct smime_agent_encryption *e, void *userdata)
{
        if (userdata)
                return;         /* --quiet */
        fprintf(stderr, "smimectl: encrypting with %s for %zu recipient(s):\n", e->description, e->n_recipients);
        for (size_t i = 0; i < e->n_recipients; i++) {
                const struct smime_agent_recipient *r = &e->recipients[i];
                char na[16];

                fmt_date(r->not_after, na, sizeof(na));
                fprintf(stderr, "  %s: %s, certificate %s (valid until %s, from the %s, SHA-256 %.16s...)\n", r->name,
                        r->key_transport, r->subject, na, r->source, r->fingerprint);
        }
}

/* -r VALUE: a readable file is a certificate; anything else names one. */
static int add_recipient(const char *arg, const char **names, size_t *n_names, struct smime_agent_blob *certs,
                         size_t *n_certs)
{
        if (access(arg, F_OK) == 0 || strchr(arg, '/')) {
                uint8_t *p;
                size_t n;
                int e = read_small_file(arg, -1, &p, &n);

                if (e < 0) {
                        fprintf(stderr, "smimectl: cannot read the certificate %s: %s\n", arg, strerror(-e));
                        return -1;
                }
                certs[(*n_certs)++] = (struct smime_agent_blob){ p, n };
        } else {
                names[(*n_names)++] = arg;
        }
        return 0;
}

struct encrypt_ctx {
        const struct smime_agent_encrypt_options *opts;
        bool quiet;
};

static int do_encrypt(struct smime_agent *a, void *ctx, int in_fd, int out_fd)
{
        const struct encrypt_ctx *ec = ctx;

        return smime_agent_encrypt(a, ec->opts, in_fd, out_fd, print_choice, ec->quiet ? (void *)1 : NULL);
}

static int cmd_encrypt(int argc, char **argv)
{
        static const struct option opts[] = {
                { "recipient", required_argument, NULL, 'r' },
                { "no-self", no_argument, NULL, 'n' },
                { "key", required_argument, NULL, 'k' },
                { "format", required_argument, NULL, 'f' },
                { "in", required_argument, NULL, 'i' },
                { "out", required_argument, NULL, 'o' },
                { "quiet", no_argument, NULL, 'q' },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        struct smime_agent_encrypt_options eo = { 0 };
        struct encrypt_ctx ec = { .opts = &eo };
        const char **names = calloc((size_t)argc + 1, sizeof(*names));
        struct smime_agent_blob *certs = calloc((size_t)argc + 1, sizeof(*certs));
        const char *in_path = NULL, *out_path = NULL;
        int ch, r = EXIT_USAGE;

        if (!names || !certs) {
                fprintf(stderr, "smimectl: out of memory\n");
                free(names);
                free(certs);
                return EXIT_LOCAL;
        }
        optind = 1;
        while ((ch = getopt_long(argc, argv, "r:nk:f:i:o:qh", opts, NULL)) != -1) {
                switch (ch) {
                case 'r':
                        if (add_recipient(optarg, names, &eo.n_recipients, certs, &eo.n_certs) < 0)
                                goto out;
                        break;
                case 'n': eo.no_self = 1; break;
                case 'k': eo.key = optarg; break;
                case 'f': eo.format = optarg; break;
                case 'i': in_path = optarg; break;
                case 'o': out_path = optarg; break;
                case 'q': ec.quiet = true; break;
                case 'h': usage(stdout); r = 0; goto out;
                default: usage(stderr); goto out;
                }
        }
        if (optind != argc || eo.n_recipients + eo.n_certs == 0) {
                if (optind == argc)
                        fprintf(stderr, "smimectl: encrypt needs at least one -r EMAIL|FINGERPRINT|CERTFILE\n");
                usage(stderr);
                goto out;
        }
        if (eo.format && strcmp(eo.format, "der") && strcmp(eo.format, "pem") && strcmp(eo.format, "smime")) {
                fprintf(stderr, "smimectl: --format must be der, pem or smime\n");
                goto out;
        }
        eo.recipients = names;
        eo.certs = certs;
        r = run_stream(in_path, out_path, "encryption", do_encrypt, &ec);
out:
        for (size_t i = 0; i < eo.n_certs; i++)
                free((void *)certs[i].data);
        free(certs);
        free(names);
        return r;
}

/* sign --encrypt: two requests on two connections, chained through a pipe
 * in this process (the signed message never lands anywhere): a thread
 * signs the input into the pipe while this one encrypts from it. Each side
 * stops the other when it fails, so a failed signature can never come out
 * encrypted as if it were whole. */
struct signer {
        struct smime_agent *a, *enc;
        const struct smime_agent_sign_options *so;
        int in_fd, pipe_w;
        int rc;
};

static void *sign_thread(void *arg)
{
        struct signer *s = arg;

        s->rc = smime_agent_sign(s->a, s->so, s->in_fd, s->pipe_w);
        if (s->rc < 0)
                smime_agent_abort(s->enc);      /* before the EOF below: encrypt must not finish */
        close(s->pipe_w);
        return NULL;
}

static int run_sign_encrypt(const char *in_path, const char *out_path, const struct smime_agent_sign_options *so,
                            const struct sign_encrypt *se)
{
        struct smime_agent_encrypt_options eo = { .no_self = se->no_self, .format = se->format, .key = so->key };
        const char **names = calloc(se->n + 1, sizeof(*names));
        struct smime_agent_blob *certs = calloc(se->n + 1, sizeof(*certs));
        struct smime_agent *sa = NULL, *ea = NULL;
        FILE *stty = NULL, *etty = NULL;
        struct signer s = { .so = so, .in_fd = STDIN_FILENO, .pipe_w = -1 };
        int p[2] = { -1, -1 }, out_fd = STDOUT_FILENO, r = EXIT_USAGE, er;
        pthread_t th;
        bool started = false;

        if (!names || !certs) {
                fprintf(stderr, "smimectl: out of memory\n");
                r = EXIT_LOCAL;
                goto out;
        }
        for (size_t i = 0; i < se->n; i++)
                if (add_recipient(se->rargs[i], names, &eo.n_recipients, certs, &eo.n_certs) < 0)
                        goto out;
        eo.recipients = names;
        eo.certs = certs;
        if (in_path && (s.in_fd = open(in_path, O_RDONLY | O_CLOEXEC)) < 0) {
                fprintf(stderr, "smimectl: cannot open %s: %s\n", in_path, strerror(errno));
                goto out;
        }
        if ((r = connect_agent(&sa, &stty)) || (r = connect_agent(&ea, &etty)))
                goto out;
        if (out_path && (out_fd = open_output(out_path)) < 0) {
                fprintf(stderr, "smimectl: cannot create a file beside %s: %s\n", out_path, strerror(-out_fd));
                r = EXIT_USAGE;
                goto out;
        }
        /* The encrypt side may stop reading (a recipient refused): the
         * signer then gets EPIPE, not a fatal signal. */
        signal(SIGPIPE, SIG_IGN);
        if (pipe2(p, O_CLOEXEC) < 0) {
                fprintf(stderr, "smimectl: pipe: %s\n", strerror(errno));
                r = EXIT_LOCAL;
                goto out;
        }
        s.a = sa;
        s.enc = ea;
        s.pipe_w = p[1];
        p[1] = -1;
        if (pthread_create(&th, NULL, sign_thread, &s) != 0) {
                close(s.pipe_w);
                fprintf(stderr, "smimectl: cannot start a thread\n");
                r = EXIT_LOCAL;
                goto out;
        }
        started = true;
        er = smime_agent_encrypt(ea, &eo, p[0], out_fd, print_choice, se->quiet ? (void *)1 : NULL);
        if (er < 0)
                smime_agent_abort(sa);  /* the signer stops at its next read or write */
        close(p[0]);
        p[0] = -1;
        pthread_join(th, NULL);
        started = false;
        /* The side that failed first reports: an agent's ERROR beats the
         * broken pipe or connection it caused on the other side. */
        if (s.rc < 0 && (smime_agent_error_code(sa) || er == 0 || !smime_agent_error_code(ea))) {
                r = agent_failed(sa, "signing");
                drop_output(out_path, &out_fd);
        } else if (er < 0) {
                r = agent_failed(ea, "encryption");
                drop_output(out_path, &out_fd);
        } else {
                r = finish_output(out_path, &out_fd);
        }
out:
        if (started)
                pthread_join(th, NULL);
        if (p[0] >= 0)
                close(p[0]);
        if (out_path)
                drop_output(out_path, &out_fd);
        if (in_path && s.in_fd >= 0)
                close(s.in_fd);
        for (size_t i = 0; certs && i < eo.n_certs; i++)
                free((void *)certs[i].data);
        free(certs);
        free(names);
        smime_agent_close(sa);
        smime_agent_close(ea);
        if (stty)
                fclose(stty);
        if (etty)
                fclose(etty);
        return r;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                { "socket", required_argument, NULL, 's' },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },
                { NULL, 0, NULL, 0 },
        };
        int ch;

        /* Options before the command only; the command parses its own. */
        while ((ch = getopt_long(argc, argv, "+s:hV", opts, NULL)) != -1) {
                switch (ch) {
                case 's': socket_opt = optarg; break;
                case 'h': usage(stdout); return 0;
                case 'V': printf("smimectl %s\n", SMIME_VERSION); return 0;
                default: usage(stderr); return EXIT_USAGE;
                }
        }
        if (optind >= argc) {
                usage(stderr);
                return EXIT_USAGE;
        }
        argc -= optind;
        argv += optind;
        if (strcmp(argv[0], "keys") == 0)
                return run_listing(argc, "listing keys", list_keys);
        if (strcmp(argv[0], "status") == 0)
                return run_listing(argc, "status", show_status);
        if (strcmp(argv[0], "sign") == 0)
                return cmd_sign(argc, argv);
        if (strcmp(argv[0], "decrypt") == 0)
                return cmd_decrypt(argc, argv);
        if (strcmp(argv[0], "verify") == 0)
                return cmd_verify(argc, argv);
        if (strcmp(argv[0], "encrypt") == 0)
                return cmd_encrypt(argc, argv);
        if (strcmp(argv[0], "certs") == 0)
                return cmd_certs(argc, argv);
        if (strcmp(argv[0], "import") == 0)
                return cmd_import(argc, argv);
        if (strcmp(argv[0], "trust") == 0)
                return cmd_trust(argc, argv, "trusted");
        if (strcmp(argv[0], "distrust") == 0)
                return cmd_trust(argc, argv, "distrusted");
        if (strcmp(argv[0], "untrust") == 0)
                return cmd_trust(argc, argv, "none");
        if (strcmp(argv[0], "login") == 0)
                return cmd_tokens(argc, argv, true);
        if (strcmp(argv[0], "lock") == 0)
                return cmd_tokens(argc, argv, false);
        fprintf(stderr, "smimectl: unknown command '%s'\n", argv[0]);
        usage(stderr);
        return EXIT_USAGE;
}
