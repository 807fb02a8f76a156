/* loadgen.c — load and latency for smime-agent, for bench/run.
 *
 *   loadgen sign --socket PATH --clients N --seconds S [--key SEL]
 *                [--in FILE | --size BYTES] [--format F] [--detached]
 *                [--probe] [--save FILE]
 *      N threads, each with its own libsmime-agent handle (one connection,
 *      kept), sign the same message over and over for S seconds. Prints
 *      operations per second and the latency percentiles of one request.
 *      --probe adds one more client that signs one message every 10 ms
 *      while the N others saturate the agent, and reports its latencies
 *      apart (the "single sign under load" figure). --save writes the first
 *      result to FILE so that the caller can verify it.
 *
 *   loadgen decrypt --socket PATH --clients N --seconds S --in FILE
 *                [--key SEL] [--probe] [--save FILE]
 *      The same with smime_agent_decrypt() of the encrypted message FILE
 *      (DER, PEM or S/MIME, detected by the agent).
 *
 *   loadgen exec --runs N [--in FILE] -- COMMAND [ARG...]
 *      Runs COMMAND N times, one after the other, stdin from FILE (else
 *      /dev/null), stdout to /dev/null, and reports the wall-clock latency
 *      of each whole process (fork to exit). Any non-zero exit fails.
 *
 * Output: one line of key=value pairs on stdout. Errors: on stderr, and a
 * non-zero exit status.
 *
 * Must never: be installed; it is a measuring tool.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "benchutil.h"
#include "smime-agent.h"

struct run {
        const char *socket;
        bool decrypt;                   /* else sign */
        struct smime_agent_sign_options sign;
        struct smime_agent_decrypt_options dec;
        const uint8_t *msg;
        size_t msg_len;
        const char *save;
        double seconds;
        pthread_barrier_t start;
        atomic_bool stop;
        atomic_int errors;
};

struct client {
        struct run *r;
        pthread_t thread;
        struct smime_agent *a;
        bool probe;
        bool save;
        struct lat lat;
        unsigned long ops;
};

/* CPU time of this process (all threads), user + system. */
static double cpu_s(void)
{
        struct rusage ru;

        getrusage(RUSAGE_SELF, &ru);
        return (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
               ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) / 1e6;
}

static int memfd_with(const uint8_t *p, size_t n)
{
        int fd = memfd_create("loadgen-in", MFD_CLOEXEC);
        size_t off = 0;

        if (fd < 0)
                return -1;
        while (off < n) {
                ssize_t k = write(fd, p + off, n - off);

                if (k < 0) {
                        close(fd);
                        return -1;
                }
                off += (size_t)k;
        }
        return fd;
}

static void fail_once(struct run *r, struct client *c, const char *what)
{
        /* Report the first few; count them all. */
        if (atomic_fetch_add(&r->errors, 1) < 5)
                fprintf(stderr, "loadgen: %s: %s (%s)\n", what,
                        c->a ? smime_agent_error_message(c->a) : smime_agent_connect_error(),
                        c->a ? smime_agent_error_name(c->a) : "CONNECT");
}

static int op_once(struct client *c, int in, int out)
{
        if (lseek(in, 0, SEEK_SET) < 0)
                return -1;
        if (c->r->decrypt)
                return smime_agent_decrypt(c->a, &c->r->dec, in, out, NULL);
        return smime_agent_sign(c->a, &c->r->sign, in, out);
}

static void *client_main(void *arg)
{
        struct client *c = arg;
        struct run *r = c->r;
        int in = memfd_with(r->msg, r->msg_len);
        int out = open(c->save ? r->save : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        bool started = false;

        if (in < 0 || out < 0) {
                perror("loadgen: memfd/open");
                atomic_fetch_add(&r->errors, 1);
                goto out;
        }
        /* One request before the clock: connection and agent paths warm,
         * and the result to verify. */
        if (op_once(c, in, out) < 0) {
                fail_once(r, c, r->decrypt ? "warm-up decrypt" : "warm-up sign");
                goto out;
        }
        if (c->save) {
                close(out);
                out = open("/dev/null", O_WRONLY | O_CLOEXEC);
        }
        pthread_barrier_wait(&r->start);
        started = true;
        while (!atomic_load_explicit(&r->stop, memory_order_relaxed)) {
                double t0 = now_s();

                if (op_once(c, in, out) < 0) {
                        fail_once(r, c, r->decrypt ? "decrypt" : "sign");
                        atomic_store(&r->stop, true);
                        break;
                }
                lat_add(&c->lat, now_s() - t0);
                c->ops++;
                if (c->probe) {
                        struct timespec ts = { 0, 10 * 1000 * 1000 };

                        nanosleep(&ts, NULL);
                }
        }
out:
        if (!started) {
                atomic_store(&r->stop, true);
                pthread_barrier_wait(&r->start);
        }
        if (in >= 0)
                close(in);
        if (out >= 0)
                close(out);
        return NULL;
}

static uint8_t *make_message(size_t size, size_t *len)
{
        static const char hdr[] = "From: bench@example.org\r\nTo: someone@example.org\r\nSubject: bench\r\n"
                                  "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n";
        uint8_t *p = malloc(size + sizeof(hdr));
        size_t n = 0;

        if (!p)
                return NULL;
        memcpy(p, hdr, sizeof(hdr) - 1);
        n = sizeof(hdr) - 1;
        for (unsigned line = 0; n < size; line++) {
                char buf[80];
                int k = snprintf(buf, sizeof(buf), "line %05u of the benchmark message, seventy-odd characters.\r\n",
                                 line);

                if (n + (size_t)k > size)
                        k = (int)(size - n);
                memcpy(p + n, buf, (size_t)k);
                n += (size_t)k;
        }
        *len = n;
        return p;
}

static uint8_t *read_file(const char *path, size_t *len)
{
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        uint8_t *p = NULL;
        size_t off = 0;

        if (fd < 0 || fstat(fd, &st) < 0)
                goto fail;
        p = malloc((size_t)st.st_size + 1);
        if (!p)
                goto fail;
        while (off < (size_t)st.st_size) {
                ssize_t k = read(fd, p + off, (size_t)st.st_size - off);

                if (k <= 0)
                        goto fail;
                off += (size_t)k;
        }
        close(fd);
        *len = off;
        return p;
fail:
        fprintf(stderr, "loadgen: cannot read %s: %s\n", path, strerror(errno));
        if (fd >= 0)
                close(fd);
        free(p);
        return NULL;
}

static void usage(void)
{
        fprintf(stderr, "usage: loadgen sign --socket PATH --clients N --seconds S [--key SEL] [--in FILE | --size N]\n"
                        "                    [--format der|pem|smime] [--detached] [--probe] [--save FILE]\n"
                        "       loadgen decrypt --socket PATH --clients N --seconds S --in FILE [--key SEL]\n"
                        "                    [--probe] [--save FILE]\n"
                        "       loadgen exec --runs N [--in FILE] -- COMMAND [ARG...]\n");
        exit(2);
}

static int cmd_run(int argc, char **argv, bool decrypt)
{
        static const struct option opts[] = {
                { "socket", required_argument, NULL, 'S' }, { "clients", required_argument, NULL, 'c' },
                { "seconds", required_argument, NULL, 's' }, { "key", required_argument, NULL, 'k' },
                { "in", required_argument, NULL, 'i' },     { "size", required_argument, NULL, 'z' },
                { "format", required_argument, NULL, 'f' }, { "detached", no_argument, NULL, 'd' },
                { "probe", no_argument, NULL, 'p' },        { "save", required_argument, NULL, 'o' },
                { NULL, 0, NULL, 0 },
        };
        struct run r = { .seconds = 3, .decrypt = decrypt };
        const char *in = NULL;
        size_t size = 4096;
        unsigned n = 1, total;
        bool probe = false;
        struct client *cl;
        uint8_t *msg;
        int c;

        while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
                switch (c) {
                case 'S': r.socket = optarg; break;
                case 'c': n = (unsigned)atoi(optarg); break;
                case 's': r.seconds = atof(optarg); break;
                case 'k': r.sign.key = r.dec.key = optarg; break;
                case 'i': in = optarg; break;
                case 'z': size = (size_t)atol(optarg); break;
                case 'f': r.sign.format = optarg; break;
                case 'd': r.sign.detached = 1; break;
                case 'p': probe = true; break;
                case 'o': r.save = optarg; break;
                default: usage();
                }
        }
        if (!r.socket || n < 1 || n > 1024 || r.seconds <= 0 || optind != argc || (decrypt && !in))
                usage();
        msg = in ? read_file(in, &r.msg_len) : make_message(size, &r.msg_len);
        if (!msg)
                return 1;
        r.msg = msg;

        total = n + probe;
        cl = calloc(total, sizeof(*cl));
        if (!cl)
                return 1;
        for (unsigned i = 0; i < total; i++) {
                struct smime_agent_options o = { .socket_path = r.socket, .software = "loadgen" };

                cl[i].r = &r;
                cl[i].probe = probe && i == n;
                cl[i].save = r.save && i == 0;
                if (smime_agent_connect(&o, &cl[i].a) < 0) {
                        fprintf(stderr, "loadgen: %s\n", smime_agent_connect_error());
                        return 1;
                }
        }
        pthread_barrier_init(&r.start, NULL, total + 1);
        for (unsigned i = 0; i < total; i++)
                if (pthread_create(&cl[i].thread, NULL, client_main, &cl[i]) != 0) {
                        fprintf(stderr, "loadgen: cannot start client thread %u\n", i);
                        return 1;
                }
        pthread_barrier_wait(&r.start);
        double t0 = now_s(), c0 = cpu_s();
        sleep_s(r.seconds, &r.stop);
        atomic_store(&r.stop, true);
        double elapsed = now_s() - t0;

        struct lat all = { 0 }, pr = { 0 };
        unsigned long ops = 0;

        for (unsigned i = 0; i < total; i++) {
                pthread_join(cl[i].thread, NULL);
                if (cl[i].probe) {
                        lat_merge(&pr, &cl[i].lat);
                } else {
                        ops += cl[i].ops;
                        lat_merge(&all, &cl[i].lat);
                }
        }
        int errors = atomic_load(&r.errors);
        double cpu = cpu_s() - c0;     /* includes the last requests' tails: a few per client */

        printf("mode=%s clients=%u ops=%lu seconds=%.3f ops_per_s=%.1f p50_ms=%.3f p99_ms=%.3f", decrypt ? "decrypt" : "sign", n, ops, elapsed,
               ops / elapsed, 1e3 * lat_pct(&all, 50), 1e3 * lat_pct(&all, 99));
        if (probe)
                printf(" probe_n=%zu probe_p50_ms=%.3f probe_p99_ms=%.3f", pr.n, 1e3 * lat_pct(&pr, 50),
                       1e3 * lat_pct(&pr, 99));
        printf(" client_cpu_us_per_op=%.1f errors=%d\n", ops ? 1e6 * cpu / ops : 0.0, errors);
        for (unsigned i = 0; i < total; i++) {
                smime_agent_close(cl[i].a);
                lat_free(&cl[i].lat);
        }
        lat_free(&all);
        lat_free(&pr);
        free(cl);
        free(msg);
        return errors || ops == 0 ? 1 : 0;
}

static int cmd_exec(int argc, char **argv)
{
        static const struct option opts[] = {
                { "runs", required_argument, NULL, 'n' },
                { "in", required_argument, NULL, 'i' },
                { NULL, 0, NULL, 0 },
        };
        const char *in = "/dev/null";
        struct lat l = { 0 };
        double sum = 0;
        int runs = 10, c;

        while ((c = getopt_long(argc, argv, "+", opts, NULL)) != -1) {
                switch (c) {
                case 'n': runs = atoi(optarg); break;
                case 'i': in = optarg; break;
                default: usage();
                }
        }
        if (runs < 1 || optind >= argc)
                usage();
        for (int i = 0; i < runs; i++) {
                double t0 = now_s();
                pid_t pid = fork();
                int status;

                if (pid < 0) {
                        perror("loadgen: fork");
                        return 1;
                }
                if (pid == 0) {
                        int fi = open(in, O_RDONLY), fo = open("/dev/null", O_WRONLY);

                        if (fi < 0 || fo < 0 || dup2(fi, 0) < 0 || dup2(fo, 1) < 0)
                                _exit(126);
                        execvp(argv[optind], argv + optind);
                        _exit(127);
                }
                if (waitpid(pid, &status, 0) < 0) {
                        perror("loadgen: waitpid");
                        return 1;
                }
                double dt = now_s() - t0;

                if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                        fprintf(stderr, "loadgen: %s failed on run %d (status 0x%x)\n", argv[optind], i + 1, status);
                        return 1;
                }
                lat_add(&l, dt);
                sum += dt;
        }
        double mean = sum / runs;
        double p50 = lat_pct(&l, 50), p99 = lat_pct(&l, 99);

        printf("mode=exec runs=%d p50_ms=%.3f p99_ms=%.3f mean_ms=%.3f min_ms=%.3f\n", runs, 1e3 * p50, 1e3 * p99,
               1e3 * mean, 1e3 * l.v[0]);
        lat_free(&l);
        return 0;
}

int main(int argc, char **argv)
{
        if (argc < 2)
                usage();
        if (strcmp(argv[1], "sign") == 0)
                return cmd_run(argc - 1, argv + 1, false);
        if (strcmp(argv[1], "decrypt") == 0)
                return cmd_run(argc - 1, argv + 1, true);
        if (strcmp(argv[1], "exec") == 0)
                return cmd_exec(argc - 1, argv + 1);
        usage();
}
