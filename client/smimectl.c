/* smimectl — the command-line client of smime-agent.
 *
 * Must never: do cryptography or touch PKCS#11 (the agent does), echo a
 * PIN, or leave a partial --out file behind after a failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "smime-agent.h"

enum { EXIT_AGENT_ERROR = 1, EXIT_USAGE = 2, EXIT_NO_AGENT = 3, EXIT_LOCAL = 4 };

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
                "  decrypt   decrypt an S/MIME, PEM or DER message (stdin to stdout by default)\n"
                "            -k, --key URI|EMAIL (only this key)   -f, --format der|pem|smime\n"
                "            -i, --in FILE   -o, --out FILE   -v, --verbose\n"
                "  login     log in to tokens ahead of time (asks for their PINs)\n"
                "            -t, --token URI|EMAIL (default: every token that needs a login)\n"
                "  lock      log out of every token at once (or: -t, --token URI|EMAIL)\n\n"
                "The socket is also taken from $SMIME_AGENT_SOCKET.\n"
                "Exit status: 0 success, 1 the agent refused or failed the request, 2 usage,\n"
                "3 no agent to talk to, 4 a local failure during the request (input, output,\n"
                "connection lost).\n");
}

static int ask_pin(const struct smime_agent_token *t, char *pin, size_t size, void *userdata)
{
        struct termios old, noecho;
        FILE *tty = userdata;
        int fd = fileno(tty);
        size_t n;

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
        printf("module:  %s (%s, %s)\n", m->name, m->library, m->manufacturer);
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
        } else if (out_path && (fsync(out_fd) < 0 || close(out_fd) < 0 || rename(temp_path, out_path) < 0)) {
                fprintf(stderr, "smimectl: cannot write %s: %s\n", out_path, strerror(errno));
                out_fd = -1;
                r = EXIT_AGENT_ERROR;
        } else {
                if (out_path) {
                        out_fd = -1;
                        temp_path[0] = '\0';
                }
                r = 0;
        }
out:
        if (out_path && out_fd >= 0)
                close(out_fd);
        if (temp_path[0]) {
                unlink(temp_path);
                temp_path[0] = '\0';
        }
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
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        struct smime_agent_sign_options so = { 0 };
        const char *in_path = NULL, *out_path = NULL;
        int ch;

        optind = 1;
        while ((ch = getopt_long(argc, argv, "k:df:g:PNCi:o:h", opts, NULL)) != -1) {
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
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return EXIT_USAGE;
                }
        }
        if (optind != argc) {
                usage(stderr);
                return EXIT_USAGE;
        }
        if (so.format && strcmp(so.format, "der") && strcmp(so.format, "pem") && strcmp(so.format, "smime")) {
                fprintf(stderr, "smimectl: --format must be der, pem or smime\n");
                return EXIT_USAGE;
        }
        return run_stream(in_path, out_path, "signing", do_sign, &so);
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
        if (strcmp(argv[0], "login") == 0)
                return cmd_tokens(argc, argv, true);
        if (strcmp(argv[0], "lock") == 0)
                return cmd_tokens(argc, argv, false);
        fprintf(stderr, "smimectl: unknown command '%s'\n", argv[0]);
        usage(stderr);
        return EXIT_USAGE;
}
