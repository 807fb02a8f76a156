/* test_pinentry.c — service/pinentry.c against a real child process: the
 * scripted pinentry stand-in (tests/softhsm/pinentry_standin.py), which
 * speaks Assuan as the GnuPG pinentries do and does what its control file
 * says (right PIN, %-escaped PIN, cancel, its own timeout, another error,
 * hang, no greeting, crash, exit, garbage), logging what it received. And
 * the real pinentry-curses when it is installed (on a pseudo-terminal).
 *
 * Checks: the result and its message for each behaviour; every child is
 * reaped (no zombie, nothing left running, waitpid finds no child at the
 * end); a hung pinentry is killed within timeout + grace; the child gets
 * only stdin, stdout and stderr and an empty signal mask, however the
 * caller's descriptors and mask look; a hang-up of the watched socket ends
 * the dialog; two dialogs never overlap, and one that stays open makes the
 * next caller give up with -EBUSY; the escaping helpers.
 *
 * Usage: test_pinentry STANDIN.py (ctest passes it).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
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

#include "check.h"
#include "pinentry.h"
#include "secret.h"

static const char *standin;
static char dir[] = "/tmp/test-pinentry-XXXXXX";
static char control[256], logpath[256];
static char env_control[300], env_log[300];
static char *child_env[] = { env_control, env_log, "PATH=/usr/bin:/bin", "SMIME_STANDIN_MARK=unit", NULL };

static double now(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void set_control(const char *mode, const char *pin_json, double delay)
{
        FILE *f = fopen(control, "w");

        if (!f) {
                perror(control);
                exit(2);
        }
        fprintf(f, "{\"mode\": \"%s\", \"pin\": %s, \"delay\": %g}\n", mode, pin_json, delay);
        fclose(f);
        unlink(logpath);
}

static char *read_log(void)
{
        static char buf[65536];
        FILE *f = fopen(logpath, "r");
        size_t n = 0;

        buf[0] = '\0';
        if (f) {
                n = fread(buf, 1, sizeof(buf) - 1, f);
                fclose(f);
        }
        buf[n] = '\0';
        return buf;
}

/* The pids the stand-in logged (START lines). */
static size_t logged_pids(pid_t *pids, size_t max)
{
        const char *l = read_log();
        size_t n = 0;

        for (const char *p = strstr(l, " START "); p && n < max; p = strstr(p + 1, " START ")) {
                const char *b = p;

                while (b > l && b[-1] != '\n')
                        b--;
                pids[n++] = (pid_t)atoi(b);
        }
        return n;
}

static bool process_gone(pid_t pid)
{
        return kill(pid, 0) < 0 && errno == ESRCH;
}

static struct pinentry_dialog dialog(unsigned timeout)
{
        return (struct pinentry_dialog){
                .program = standin,
                .envp = child_env,
                .timeout_sec = timeout,
                .title = "smime-agent test",
                .description = "Token \"t\" needs its PIN.\n100% sure: line two",
                .prompt = "PIN:",
                .owner = "the unit test",
                .watch_fd = -1,
        };
}

/* Runs one dialog in the given mode; returns the result, pin and why. */
static int run(const char *mode, const char *pin_json, unsigned timeout, struct secret *pin, char *why, size_t wn,
               double *took)
{
        struct pinentry_dialog d = dialog(timeout);
        double t0 = now();
        pid_t pids[4];
        int r;

        set_control(mode, pin_json, 0);
        why[0] = '\0';
        r = pinentry_getpin(&d, pin, why, wn);
        if (took)
                *took = now() - t0;
        for (size_t i = 0, n = logged_pids(pids, 4); i < n; i++)
                CHECK(process_gone(pids[i]), "%s: the stand-in (pid %d) is gone and reaped", mode, (int)pids[i]);
        return r;
}

static void test_right_pin(void)
{
        /* %, space, +, a UTF-8 character, and CR/LF: every byte comes back. */
        static const char want[] = "a%b c+\xc3\xa9\r\nz";
        struct secret pin;
        char why[1024];
        int r;

        r = run("pin", "\"a%b c+\\u00e9\\r\\nz\"", 10, &pin, why, sizeof(why), NULL);
        CHECK(r == 0 && pin.len == sizeof(want) - 1 && memcmp(pin.p, want, pin.len) == 0 && pin.p[pin.len] == '\0',
              "pin: the PIN with %%, CR and LF escaped comes back byte for byte (r=%d, %s)", r, why);
        secret_free(&pin);
        {
                const char *l = read_log();

                CHECK(strstr(l, "SETDESC Token \"t\" needs its PIN.\\n100% sure: line two\n") != NULL,
                      "SETDESC arrives %%-escaped and decodes to the text with its newline");
                CHECK(strstr(l, "SETTIMEOUT 10\n") && strstr(l, "SETPROMPT PIN:\n") && strstr(l, "SETTITLE smime"),
                      "SETTIMEOUT, SETPROMPT and SETTITLE were sent");
                CHECK(strstr(l, " BYE\n") && strstr(l, " END "), "the dialogue ends with BYE");
                CHECK(!strstr(l, "SETKEYINFO") && !strstr(l, "allow-external-password-cache"),
                      "nothing lets the pinentry offer to store the PIN");
                CHECK(!strstr(l, "a%b"), "the log of the stand-in never holds the PIN (it logs commands only)");
        }
        r = run("escaped", "\"a%b c+\\u00e9\\r\\nz\"", 10, &pin, why, sizeof(why), NULL);
        CHECK(r == 0 && pin.len == sizeof(want) - 1 && memcmp(pin.p, want, pin.len) == 0,
              "escaped: every byte %%-escaped, over two D lines, with an S line between (r=%d, %s)", r, why);
        secret_free(&pin);
        {
                double took;

                r = run("stubborn", "\"1234\"", 10, &pin, why, sizeof(why), &took);
                CHECK(r == 0 && pin.len == 4 && took < 3.5 && strstr(read_log(), "IGNORING-TERM"),
                      "stubborn: a pinentry that never answers BYE and ignores SIGTERM still gives its PIN, "
                      "and is killed (r=%d in %.1f s)", r, took);
                secret_free(&pin);
        }
        r = run("empty", "\"\"", 10, &pin, why, sizeof(why), NULL);
        CHECK(r == 0 && pin.len == 0 && pin.p, "empty: OK without D is an empty PIN (r=%d)", r);
        secret_free(&pin);
}

static void test_failures(void)
{
        static const struct {
                const char *mode;
                int want;
                const char *in_why;
        } cases[] = {
                { "cancel", -ECANCELED, "cancelled" },
                { "timeout", -ETIMEDOUT, "no PIN was entered" },
                { "error", -EPROTO, "ERR 83918950 No such device" },
                { "crash", -EPROTO, "killed by signal 9 (SIGKILL)" },
                { "exit", -EPROTO, "exited with status 3" },
                { "garbage", -EPROTO, "not Assuan" },
        };

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct secret pin;
                char why[1024];
                double took;
                int r = run(cases[i].mode, "\"1234\"", 10, &pin, why, sizeof(why), &took);

                CHECK(r == cases[i].want && strstr(why, cases[i].in_why) && !pin.p && took < 5,
                      "%s: %d in %.1f s, \"%s\"", cases[i].mode, r, took, why);
                CHECK(cases[i].want == -ECANCELED || cases[i].want == -ETIMEDOUT || strstr(why, standin),
                      "%s: the message names the program", cases[i].mode);
                if (cases[i].want == -ECANCELED || cases[i].want == -ETIMEDOUT || strcmp(cases[i].mode, "error") == 0)
                        CHECK(strstr(read_log(), " BYE\n") && strstr(read_log(), " END "),
                              "%s: an answered GETPIN, even an ERR, ends with BYE (the program exits by itself)",
                              cases[i].mode);
        }
}

static void test_hang(void)
{
        for (int i = 0; i < 2; i++) {
                const char *mode = i ? "silent" : "hang";
                struct secret pin;
                char why[1024];
                double took;
                int r = run(mode, "\"1234\"", 1, &pin, why, sizeof(why), &took);

                CHECK(r == -ETIMEDOUT && strstr(why, "did not answer within 3 s") && strstr(why, "stopped"),
                      "%s: -ETIMEDOUT, \"%s\"", mode, why);
                CHECK(took >= 2.9 && took < 4.5, "%s: given up after timeout + grace (%.2f s, want 3)", mode, took);
        }
}

static void test_missing_program(void)
{
        struct pinentry_dialog d = dialog(5);
        char why[1024], *path = NULL, noexec[300];
        struct secret pin;
        int r;

        d.program = "/nonexistent/pinentry";
        r = pinentry_getpin(&d, &pin, why, sizeof(why));
        CHECK(r == -ENOENT && strstr(why, "/nonexistent/pinentry"), "missing program at use: %d \"%s\"", r, why);
        r = pinentry_resolve("/nonexistent/pinentry", &path, why, sizeof(why));
        CHECK(r == -ENOENT && !path && strstr(why, "No such file"), "missing program at load: \"%s\"", why);
        snprintf(noexec, sizeof(noexec), "%s/not-executable", dir);
        close(open(noexec, O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
        r = pinentry_resolve(noexec, &path, why, sizeof(why));
        CHECK(r == -EACCES && strstr(why, "not an executable"), "non-executable program: \"%s\"", why);
        r = pinentry_resolve("relative/pinentry", &path, why, sizeof(why));
        CHECK(r == -EINVAL, "a relative path is refused: \"%s\"", why);
        r = pinentry_resolve("sh", &path, why, sizeof(why));
        CHECK(r == 0 && path && path[0] == '/' && strstr(path, "/sh"), "a bare name is found in $PATH: %s",
              path ? path : "(none)");
        free(path);
        r = pinentry_resolve("no-such-pinentry-xyz", &path, why, sizeof(why));
        CHECK(r == -ENOENT && strstr(why, "not in $PATH"), "a name not in $PATH: \"%s\"", why);
}

/* The child must not inherit the caller's descriptors or signal mask. */
static void test_child_hygiene(void)
{
        int leak = open("/dev/null", O_RDONLY);        /* no O_CLOEXEC on purpose */
        sigset_t block, old;
        struct secret pin;
        char why[1024];
        const char *l, *fds;
        int r;

        sigemptyset(&block);
        sigaddset(&block, SIGTERM);
        sigaddset(&block, SIGHUP);
        pthread_sigmask(SIG_BLOCK, &block, &old);
        r = run("pin", "\"1234\"", 10, &pin, why, sizeof(why), NULL);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        secret_free(&pin);
        close(leak);
        l = read_log();
        fds = strstr(l, "fds=");
        CHECK(r == 0 && fds && strncmp(fds, "fds=0:socket:[", 14) == 0 && strstr(fds, ",1:socket:[") &&
              !strstr(fds, ",3:") && !strstr(fds, "/dev/null"),
              "the child has only 0 and 1 (a socket) and 2: %.120s", fds ? fds : l);
        CHECK(strstr(l, "sigblk=0000000000000000") != NULL, "the child's signal mask is empty");
        CHECK(strstr(l, "SMIME_STANDIN_MARK=unit") != NULL, "the child gets the environment it is given");
}

static void *close_later(void *arg)
{
        usleep(500 * 1000);
        close(*(int *)arg);
        return NULL;
}

static void test_watch_fd(void)
{
        struct pinentry_dialog d = dialog(30);
        struct secret pin;
        char why[1024];
        pthread_t th;
        double t0;
        pid_t pids[2];
        int sv[2], r;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                return;
        set_control("hang", "\"1234\"", 0);
        d.watch_fd = sv[0];
        t0 = now();
        pthread_create(&th, NULL, close_later, &sv[1]);
        r = pinentry_getpin(&d, &pin, why, sizeof(why));
        pthread_join(th, NULL);
        CHECK(r == -ECONNRESET && now() - t0 < 3, "a hang-up of the client ends the dialog at once (%d in %.1f s)",
              r, now() - t0);
        CHECK(logged_pids(pids, 2) == 1 && process_gone(pids[0]), "and the pinentry is killed and reaped");
        close(sv[0]);
}

struct racer {
        double delay;
        unsigned timeout;
        int r;
        char why[1024];
};

static void *race(void *arg)
{
        struct racer *x = arg;
        struct pinentry_dialog d = dialog(x->timeout);
        struct secret pin;

        x->r = pinentry_getpin(&d, &pin, x->why, sizeof(x->why));
        secret_free(&pin);
        return NULL;
}

/* [start, answered] of each dialog, from the log. */
static size_t intervals(double (*iv)[2], size_t max)
{
        const char *l = read_log(), *p = l;
        size_t n = 0;

        while ((p = strstr(p, " START t=")) && n < max) {
                iv[n][0] = atof(p + 9);
                p = strstr(p, " ANSWERED t=");
                if (!p)
                        break;
                iv[n][1] = atof(p + 12);
                n++;
        }
        return n;
}

static void test_one_at_a_time(void)
{
        struct racer a = { .timeout = 10 }, b = { .timeout = 10 };
        pthread_t ta, tb;
        double iv[2][2];

        set_control("pin", "\"1234\"", 0.7);
        pthread_create(&ta, NULL, race, &a);
        pthread_create(&tb, NULL, race, &b);
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        CHECK(a.r == 0 && b.r == 0, "two dialogs at once both succeed (%d, %d)", a.r, b.r);
        CHECK(intervals(iv, 2) == 2 && (iv[0][1] <= iv[1][0] || iv[1][1] <= iv[0][0]),
              "one after the other, never both open");

        /* One that hangs (3 s + 2 s grace) and one that may wait 1 + 2 s. */
        a = (struct racer){ .timeout = 3 };
        b = (struct racer){ .timeout = 1 };
        set_control("hang", "\"1234\"", 0);
        pthread_create(&ta, NULL, race, &a);
        usleep(300 * 1000);
        pthread_create(&tb, NULL, race, &b);
        pthread_join(tb, NULL);
        pthread_join(ta, NULL);
        CHECK(b.r == -EBUSY && strstr(b.why, "another PIN dialog (the unit test)"), "the waiter gives up: %d \"%s\"",
              b.r, b.why);
        CHECK(a.r == -ETIMEDOUT, "the hung one times out (%d)", a.r);
}

static void test_escaping(void)
{
        char out[64];
        struct secret s;

        pinentry_escape("a%b\nc\r\x01", out, sizeof(out));
        CHECK(strcmp(out, "a%25b%0Ac%0D%01") == 0, "escape: %%, LF, CR, controls (%s)", out);
        /* "é" is 2 bytes: 4 bytes of room take "x" and one "é", never half of the second. */
        CHECK(pinentry_escape("x\xc3\xa9\xc3\xa9", out, 5) == 3 && strcmp(out, "x\xc3\xa9") == 0,
              "truncation never cuts a UTF-8 character");
        CHECK(pinentry_escape("ab%", out, 5) == 2 && strcmp(out, "ab") == 0, "nor an escape");
        secret_alloc(&s, 4);
        CHECK(pinentry_unescape_append("%4", 2, &s) == -EPROTO, "a short escape is malformed");
        CHECK(pinentry_unescape_append("%zz", 3, &s) == -EPROTO, "a non-hex escape is malformed");
        s.len = 0;
        CHECK(pinentry_unescape_append("%41b%63d", 8, &s) == 0 && s.len == 4 && memcmp(s.p, "Abcd", 4) == 0,
              "%%41b%%63d decodes to Abcd");
        CHECK(pinentry_unescape_append("e", 1, &s) == -EMSGSIZE, "a PIN over the buffer is refused");
        secret_free(&s);
}

/* The real pinentry-curses, on a pseudo-terminal we type into. */
static void test_real_pinentry_curses(void)
{
        static const char prog[] = "/usr/bin/pinentry-curses";
        struct pinentry_dialog d = dialog(20);
        struct secret pin;
        char why[1024], screen[16384];
        size_t have = 0;
        int master, r = -1;
        bool typed = false;
        pid_t kid;
        int pfd[2];

        if (access(prog, X_OK) < 0) {
                printf("skip - %s is not installed\n", prog);
                return;
        }
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 || pipe2(pfd, O_CLOEXEC) < 0) {
                CHECK(false, "a pseudo-terminal for pinentry-curses");
                return;
        }
        d.program = prog;
        d.ttyname = ptsname(master);
        d.ttytype = "xterm";
        d.lc_ctype = "C.UTF-8";
        /* The dialog runs in a child process of ours, so that this thread can
         * type into the terminal meanwhile. */
        kid = fork();
        if (kid == 0) {
                int rr = pinentry_getpin(&d, &pin, why, sizeof(why));
                char ok = rr == 0 && pin.len == 5 && memcmp(pin.p, "12%4 ", 5) == 0;

                if (write(pfd[1], &ok, 1) < 0)
                        _exit(3);
                _exit(0);
        }
        close(pfd[1]);
        for (double t0 = now(); now() - t0 < 15;) {
                struct timeval tv = { 0, 100000 };
                fd_set fs;

                FD_ZERO(&fs);
                FD_SET(master, &fs);
                FD_SET(pfd[0], &fs);
                if (select((master > pfd[0] ? master : pfd[0]) + 1, &fs, NULL, NULL, &tv) <= 0)
                        continue;
                if (FD_ISSET(master, &fs)) {
                        ssize_t n = read(master, screen + have, sizeof(screen) - 1 - have);

                        if (n > 0)
                                have += (size_t)n;
                        screen[have] = '\0';
                        if (!typed && strstr(screen, "PIN:")) {
                                usleep(300 * 1000);
                                typed = write(master, "12%4 \r", 6) == 6;
                        }
                }
                if (FD_ISSET(pfd[0], &fs)) {
                        char ok = 0;

                        r = read(pfd[0], &ok, 1) == 1 && ok ? 0 : 1;
                        break;
                }
        }
        waitpid(kid, NULL, 0);
        close(pfd[0]);
        close(master);
        CHECK(typed && r == 0, "pinentry-curses on a pty: the typed PIN comes back (typed %d, r %d)", typed, r);
        CHECK(strstr(screen, "100% sure") != NULL, "and its screen showed the description");
}

int main(int argc, char **argv)
{
        pid_t none;

        setvbuf(stdout, NULL, _IOLBF, 0);
        if (argc != 2) {
                fprintf(stderr, "usage: test_pinentry PINENTRY_STANDIN\n");
                return 2;
        }
        standin = argv[1];
        if (!mkdtemp(dir)) {
                perror("mkdtemp");
                return 2;
        }
        snprintf(control, sizeof(control), "%s/control.json", dir);
        snprintf(logpath, sizeof(logpath), "%s/standin.log", dir);
        snprintf(env_control, sizeof(env_control), "PINENTRY_STANDIN_CONTROL=%s", control);
        snprintf(env_log, sizeof(env_log), "PINENTRY_STANDIN_LOG=%s", logpath);

        test_escaping();
        test_right_pin();
        test_failures();
        test_hang();
        test_missing_program();
        test_child_hygiene();
        test_watch_fd();
        test_one_at_a_time();
        test_real_pinentry_curses();

        none = waitpid(-1, NULL, WNOHANG);
        CHECK(none < 0 && errno == ECHILD, "no child process is left, not even a zombie");
        if (!getenv("SMIME_TEST_KEEP")) {
                char cmd[400];

                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
                if (system(cmd) != 0)
                        fprintf(stderr, "could not remove %s\n", dir);
        }
        printf("test_pinentry: %u passed, %u failed\n", passed, failed);
        return failed ? 1 : 0;
}
