/* rawp11.c — the token's own limit: private-key operations per second
 * straight to a PKCS#11 module, with no agent, no CMS and no socket.
 *
 * A measuring tool, not part of the product: in the product only token/
 * calls C_* functions. This program opens the module itself (dlopen, as any
 * PKCS#11 application would), logs in once, and runs T threads, each on its
 * own session, each repeating one operation on the same private key:
 *
 *   rsa          C_SignInit + C_Sign, CKM_RSA_PKCS over a 51-byte SHA-256
 *                DigestInfo (what the agent hands the token for RSA-2048)
 *   ecdsa        C_SignInit + C_Sign, CKM_ECDSA over a 32-byte digest
 *   rsa-decrypt  C_DecryptInit + C_Decrypt, CKM_RSA_PKCS of a 32-byte
 *                content-encryption key wrapped by the public key
 *                (C_Encrypt on the token, once, before the clock starts)
 *
 * Prints one line of key=value pairs (ops, seconds, ops_per_s, the latency
 * of one operation: p50_ms, p99_ms, and the process's CPU time per
 * operation: cpu_us_per_op) for bench/run to read.
 *
 * Must never: print or log the PIN.
 */
#include <dlfcn.h>
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#include "benchutil.h"

enum op { OP_RSA, OP_ECDSA, OP_RSA_DECRYPT };

static const char *const op_name[] = {
        [OP_RSA] = "rsa", [OP_ECDSA] = "ecdsa", [OP_RSA_DECRYPT] = "rsa-decrypt",
};

struct bench {
        CK_FUNCTION_LIST *fl;
        CK_SLOT_ID slot;
        enum op op;
        CK_BYTE id[64];
        CK_ULONG id_len;
        CK_BYTE cipher[1024];   /* rsa-decrypt: the wrapped key */
        CK_ULONG cipher_len;
        double seconds;
        pthread_barrier_t start;
        atomic_bool stop;
};

struct worker {
        struct bench *b;
        pthread_t thread;
        CK_SESSION_HANDLE session;
        CK_OBJECT_HANDLE key;
        struct lat lat;
        unsigned long ops;
        CK_RV rv;
        const char *call;
};

/* SHA-256 DigestInfo prefix (RFC 8017, section 9.2, note 1) + a digest. */
static const CK_BYTE digest_info[51] = {
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
        0x00, 0x04, 0x20, 0x5e, 0x88, 0x48, 0x98, 0xda, 0x28, 0x04, 0x71, 0x51, 0xd0, 0xe5, 0x6f, 0x8d,
        0xc6, 0x29, 0x27, 0x73, 0x60, 0x3d, 0x0d, 0x6a, 0xab, 0xbd, 0xd6, 0x2a, 0x11, 0xef, 0x72, 0x1d,
        0x15, 0x42, 0xd8,
};

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
        va_list ap;

        fputs("rawp11: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        exit(1);
}

static CK_OBJECT_HANDLE find_key(struct bench *b, CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls)
{
        CK_ATTRIBUTE tmpl[] = {
                { CKA_CLASS, &cls, sizeof(cls) },
                { CKA_ID, b->id, b->id_len },
        };
        CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
        CK_ULONG n = 0;
        CK_RV rv;

        rv = b->fl->C_FindObjectsInit(s, tmpl, 2);
        if (rv != CKR_OK)
                die("C_FindObjectsInit: CKR 0x%lx", (unsigned long)rv);
        rv = b->fl->C_FindObjects(s, &h, 1, &n);
        b->fl->C_FindObjectsFinal(s);
        if (rv != CKR_OK)
                die("C_FindObjects: CKR 0x%lx", (unsigned long)rv);
        if (n == 0)
                die("no %s key with that CKA_ID on the token", cls == CKO_PRIVATE_KEY ? "private" : "public");
        return h;
}

/* One operation; CKR_OK or the failing call's rv (call names it). */
static CK_RV one_op(struct worker *w, const char **call)
{
        struct bench *b = w->b;
        CK_MECHANISM m = { b->op == OP_ECDSA ? CKM_ECDSA : CKM_RSA_PKCS, NULL, 0 };
        CK_BYTE out[1024];
        CK_ULONG len = sizeof(out);
        CK_RV rv;

        switch (b->op) {
        case OP_RSA:
        case OP_ECDSA:
                *call = "C_SignInit";
                rv = b->fl->C_SignInit(w->session, &m, w->key);
                if (rv != CKR_OK)
                        return rv;
                *call = "C_Sign";
                if (b->op == OP_RSA)
                        return b->fl->C_Sign(w->session, (CK_BYTE_PTR)digest_info, sizeof(digest_info), out, &len);
                return b->fl->C_Sign(w->session, (CK_BYTE_PTR)digest_info + 19, 32, out, &len);
        case OP_RSA_DECRYPT:
                *call = "C_DecryptInit";
                rv = b->fl->C_DecryptInit(w->session, &m, w->key);
                if (rv != CKR_OK)
                        return rv;
                *call = "C_Decrypt";
                rv = b->fl->C_Decrypt(w->session, b->cipher, b->cipher_len, out, &len);
                if (rv == CKR_OK && len != 32)
                        return CKR_GENERAL_ERROR;
                return rv;
        }
        return CKR_GENERAL_ERROR;
}

static void *worker_main(void *arg)
{
        struct worker *w = arg;
        const char *call = "";
        CK_RV rv;

        /* A few operations before the clock starts: session and key warm. */
        for (int i = 0; i < 3; i++) {
                rv = one_op(w, &call);
                if (rv != CKR_OK)
                        goto fail;
        }
        pthread_barrier_wait(&w->b->start);
        while (!atomic_load_explicit(&w->b->stop, memory_order_relaxed)) {
                double t0 = now_s();

                rv = one_op(w, &call);
                if (rv != CKR_OK)
                        goto fail;
                lat_add(&w->lat, now_s() - t0);
                w->ops++;
        }
        return NULL;
fail:
        w->rv = rv;
        w->call = call;
        atomic_store(&w->b->stop, true);
        return NULL;
}

static int parse_hex(const char *s, CK_BYTE *out, size_t cap, CK_ULONG *len)
{
        size_t n = strlen(s);

        if (n == 0 || n % 2 || n / 2 > cap)
                return -EINVAL;
        for (size_t i = 0; i < n / 2; i++) {
                unsigned v;

                if (sscanf(s + 2 * i, "%2x", &v) != 1)
                        return -EINVAL;
                out[i] = (CK_BYTE)v;
        }
        *len = n / 2;
        return 0;
}

static CK_SLOT_ID find_slot(CK_FUNCTION_LIST *fl, const char *label)
{
        CK_SLOT_ID slots[64];
        CK_ULONG n = 64;
        CK_RV rv = fl->C_GetSlotList(CK_TRUE, slots, &n);

        if (rv != CKR_OK)
                die("C_GetSlotList: CKR 0x%lx", (unsigned long)rv);
        for (CK_ULONG i = 0; i < n; i++) {
                CK_TOKEN_INFO ti;
                char l[33];
                size_t k = 32;

                if (fl->C_GetTokenInfo(slots[i], &ti) != CKR_OK)
                        continue;
                memcpy(l, ti.label, 32);
                while (k > 0 && l[k - 1] == ' ')
                        k--;
                l[k] = '\0';
                if (strcmp(l, label) == 0)
                        return slots[i];
        }
        die("no token labelled '%s'", label);
}

static void usage(void)
{
        fprintf(stderr,
                "usage: rawp11 --module PATH --token LABEL --pin-file FILE --id HEX\n"
                "              --op rsa|ecdsa|rsa-decrypt [--threads N] [--seconds S]\n");
        exit(2);
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                { "module", required_argument, NULL, 'm' },
                { "token", required_argument, NULL, 't' },
                { "pin-file", required_argument, NULL, 'p' },
                { "id", required_argument, NULL, 'i' },
                { "op", required_argument, NULL, 'o' },
                { "threads", required_argument, NULL, 'n' },
                { "seconds", required_argument, NULL, 's' },
                { NULL, 0, NULL, 0 },
        };
        const char *module = NULL, *label = NULL, *pin_file = NULL, *id = NULL, *opname = NULL;
        struct bench b = { .seconds = 3 };
        unsigned threads = 1;
        CK_C_INITIALIZE_ARGS init = { .flags = CKF_OS_LOCKING_OK };
        CK_C_GetFunctionList get_fl;
        struct worker *w;
        char pin[256];
        FILE *f;
        void *dl;
        CK_RV rv;
        int c;

        while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
                switch (c) {
                case 'm': module = optarg; break;
                case 't': label = optarg; break;
                case 'p': pin_file = optarg; break;
                case 'i': id = optarg; break;
                case 'o': opname = optarg; break;
                case 'n': threads = (unsigned)atoi(optarg); break;
                case 's': b.seconds = atof(optarg); break;
                default: usage();
                }
        }
        if (!module || !label || !pin_file || !id || !opname || threads < 1 || threads > 256 || b.seconds <= 0)
                usage();
        if (parse_hex(id, b.id, sizeof(b.id), &b.id_len) < 0)
                die("--id must be the CKA_ID in hex, e.g. 01");
        for (b.op = OP_RSA; b.op <= OP_RSA_DECRYPT && strcmp(op_name[b.op], opname) != 0; b.op++)
                ;
        if (b.op > OP_RSA_DECRYPT)
                die("unknown --op '%s'; use rsa, ecdsa or rsa-decrypt", opname);

        f = fopen(pin_file, "r");
        if (!f || !fgets(pin, sizeof(pin), f))
                die("cannot read the PIN file %s", pin_file);
        fclose(f);
        pin[strcspn(pin, "\r\n")] = '\0';

        dl = dlopen(module, RTLD_NOW | RTLD_LOCAL);
        if (!dl)
                die("cannot load %s: %s", module, dlerror());
        *(void **)&get_fl = dlsym(dl, "C_GetFunctionList");
        if (!get_fl || get_fl(&b.fl) != CKR_OK)
                die("%s has no usable C_GetFunctionList", module);
        rv = b.fl->C_Initialize(&init);
        if (rv != CKR_OK)
                die("C_Initialize: CKR 0x%lx", (unsigned long)rv);
        b.slot = find_slot(b.fl, label);

        w = calloc(threads, sizeof(*w));
        if (!w)
                die("out of memory");
        for (unsigned i = 0; i < threads; i++) {
                w[i].b = &b;
                rv = b.fl->C_OpenSession(b.slot, CKF_SERIAL_SESSION, NULL, NULL, &w[i].session);
                if (rv != CKR_OK)
                        die("C_OpenSession: CKR 0x%lx", (unsigned long)rv);
                if (i == 0) {
                        /* Login is per application: once is for all sessions. */
                        rv = b.fl->C_Login(w[0].session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
                        explicit_bzero(pin, sizeof(pin));
                        if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
                                die("C_Login: CKR 0x%lx", (unsigned long)rv);
                }
                w[i].key = find_key(&b, w[i].session, CKO_PRIVATE_KEY);
        }
        if (b.op == OP_RSA_DECRYPT) {
                CK_MECHANISM m = { CKM_RSA_PKCS, NULL, 0 };
                CK_OBJECT_HANDLE pub = find_key(&b, w[0].session, CKO_PUBLIC_KEY);
                CK_BYTE cek[32];

                for (size_t i = 0; i < sizeof(cek); i++)
                        cek[i] = (CK_BYTE)(i * 7 + 1);
                b.cipher_len = sizeof(b.cipher);
                rv = b.fl->C_EncryptInit(w[0].session, &m, pub);
                if (rv == CKR_OK)
                        rv = b.fl->C_Encrypt(w[0].session, cek, sizeof(cek), b.cipher, &b.cipher_len);
                if (rv != CKR_OK)
                        die("wrapping a test key with C_Encrypt: CKR 0x%lx", (unsigned long)rv);
        }

        pthread_barrier_init(&b.start, NULL, threads + 1);
        for (unsigned i = 0; i < threads; i++)
                if (pthread_create(&w[i].thread, NULL, worker_main, &w[i]) != 0)
                        die("cannot start a thread");
        pthread_barrier_wait(&b.start);
        struct rusage ru0, ru1;
        getrusage(RUSAGE_SELF, &ru0);
        double t0 = now_s();
        sleep_s(b.seconds, &b.stop);
        atomic_store(&b.stop, true);
        double elapsed = now_s() - t0;

        unsigned long ops = 0;
        struct lat all = { 0 };
        int failed = 0;

        for (unsigned i = 0; i < threads; i++)
                pthread_join(w[i].thread, NULL);
        getrusage(RUSAGE_SELF, &ru1);
        double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec + ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                     (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec + ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
        for (unsigned i = 0; i < threads; i++) {
                if (w[i].rv != CKR_OK) {
                        fprintf(stderr, "rawp11: %s failed: CKR 0x%lx\n", w[i].call, (unsigned long)w[i].rv);
                        failed = 1;
                }
                ops += w[i].ops;
                lat_merge(&all, &w[i].lat);
        }
        if (!failed)
                printf("op=%s threads=%u ops=%lu seconds=%.3f ops_per_s=%.1f p50_ms=%.3f p99_ms=%.3f cpu_us_per_op=%.1f\n",
                       op_name[b.op], threads, ops, elapsed, ops / elapsed, 1e3 * lat_pct(&all, 50),
                       1e3 * lat_pct(&all, 99), ops ? 1e6 * cpu / ops : 0.0);
        for (unsigned i = 0; i < threads; i++) {
                b.fl->C_CloseSession(w[i].session);
                lat_free(&w[i].lat);
        }
        lat_free(&all);
        b.fl->C_Finalize(NULL);
        free(w);
        /* No dlclose: SoftHSM leaves thread-local state behind at unload. */
        return failed;
}
