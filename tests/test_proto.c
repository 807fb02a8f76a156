/* test_proto.c — unit tests of proto/: framing, field encoding, limits,
 * malformed input, peer failures, and a randomized robustness test.
 *
 * Plain C, no framework: every check prints one line, the last line is
 * "test_proto: N passed, M failed", and the exit status is non-zero if any
 * check failed. Large frames are written by a forked child so that a frame
 * bigger than the socket buffer cannot deadlock the test against itself.
 * Set PROTO_FUZZ_SEED to replay the randomized test with another seed.
 */
#include "proto.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

/* Compares integer results and shows both on failure. */
#define CHECK_EQ(got, want, what) do {                                          \
                long long g_ = (long long) (got), w_ = (long long) (want);      \
                check(g_ == w_, __FILE__, __LINE__, "%s: %lld (want %lld)",     \
                      (what), g_, w_);                                          \
        } while (0)

static void die(const char *what) {
        perror(what);
        exit(2);
}

/* ---- Helpers ------------------------------------------------------------- */

/* A reader or writer that would wait for a peer that never comes fails with
 * -EAGAIN instead of hanging the test. */
static void set_timeouts(int fd, int seconds) {
        struct timeval tv = { .tv_sec = seconds };

        if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
                die("setsockopt");
}

static void make_pair(int sv[2]) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
                die("socketpair");
        set_timeouts(sv[0], 10);
        set_timeouts(sv[1], 10);
}

static void close_pair(int sv[2]) {
        if (sv[0] >= 0)
                close(sv[0]);
        if (sv[1] >= 0)
                close(sv[1]);
        sv[0] = sv[1] = -1;
}

static void write_raw(int fd, const void *p, size_t n) {
        const uint8_t *b = p;

        while (n > 0) {
                ssize_t k = write(fd, b, n);

                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        die("write");
                }
                b += k;
                n -= (size_t) k;
        }
}

/* Bytes written by hand, to build frames the builder would refuse. */
struct bytes {
        uint8_t *p;
        size_t len, cap;
};

static void b_put(struct bytes *b, const void *p, size_t n) {
        if (b->len + n > b->cap) {
                size_t cap = b->cap ? b->cap : 64;

                while (cap < b->len + n)
                        cap *= 2;
                b->p = realloc(b->p, cap);
                if (!b->p)
                        die("realloc");
                b->cap = cap;
        }
        if (n > 0)
                memcpy(b->p + b->len, p, n);
        b->len += n;
}

static void b_u8(struct bytes *b, uint8_t v) {
        b_put(b, &v, 1);
}

static void b_u16(struct bytes *b, uint16_t v) {
        uint8_t x[2] = { (uint8_t) (v >> 8), (uint8_t) v };

        b_put(b, x, 2);
}

static void b_u32(struct bytes *b, uint32_t v) {
        uint8_t x[4] = { (uint8_t) (v >> 24), (uint8_t) (v >> 16), (uint8_t) (v >> 8), (uint8_t) v };

        b_put(b, x, 4);
}

/* A field header claiming len, whatever follows. */
static void b_hdr(struct bytes *b, uint16_t tag, uint32_t len) {
        b_u16(b, tag);
        b_u32(b, len);
}

static void b_field(struct bytes *b, uint16_t tag, const void *p, size_t n) {
        b_hdr(b, tag, (uint32_t) n);
        b_put(b, p, n);
}

static void b_uint(struct bytes *b, uint16_t tag, uint64_t v) {
        b_hdr(b, tag, 8);
        b_u32(b, (uint32_t) (v >> 32));
        b_u32(b, (uint32_t) v);
}

static void b_free(struct bytes *b) {
        free(b->p);
        memset(b, 0, sizeof(*b));
}

/* A whole frame around a payload. */
static void b_frame(struct bytes *out, uint8_t type, const struct bytes *payload) {
        b_u32(out, (uint32_t) (payload->len + 1));
        b_u8(out, type);
        b_put(out, payload->p, payload->len);
}

/* Runs fn(fd) in a child so that the parent can read while it writes. */
typedef int (*writer_fn)(int fd, void *arg);

static pid_t start_writer(int sv[2], writer_fn fn, void *arg) {
        pid_t pid;

        fflush(stdout);
        pid = fork();
        if (pid < 0)
                die("fork");
        if (pid == 0) {
                int r;

                if (sv[0] >= 0)
                        close(sv[0]);
                r = fn(sv[1], arg);
                close(sv[1]);
                _exit(r < 0 ? (-r & 0x7f) : 0);
        }
        return pid;
}

/* The writer's result: 0, -errno, or -1000 - signal if it was killed. */
static int finish_writer(pid_t pid) {
        int status;

        while (waitpid(pid, &status, 0) < 0)
                if (errno != EINTR)
                        die("waitpid");
        if (WIFSIGNALED(status))
                return -1000 - WTERMSIG(status);
        return -WEXITSTATUS(status);
}

static int writer_msg(int fd, void *arg) {
        return proto_write_msg(fd, arg);
}

struct chunk {
        const void *p;
        size_t n;
};

static int writer_data(int fd, void *arg) {
        struct chunk *c = arg;

        return proto_write_data(fd, c->p, c->n);
}

static bool all_zero(const uint8_t *p, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (p[i])
                        return false;
        return true;
}

/* Nothing is waiting to be read on fd. */
static bool nothing_pending(int fd) {
        uint8_t c;
        ssize_t k = recv(fd, &c, 1, MSG_DONTWAIT);

        return k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

/* ---- Names ---------------------------------------------------------------- */

static void test_names(void) {
        static const struct { uint32_t code; const char *name; } errors[] = {
                { PE_PROTOCOL, "PROTOCOL" }, { PE_TOO_LARGE, "TOO_LARGE" },
                { PE_VERSION, "VERSION" }, { PE_UNSUPPORTED, "UNSUPPORTED" },
                { PE_BUSY, "BUSY" }, { PE_INTERNAL, "INTERNAL" },
                { PE_CANCELLED, "CANCELLED" }, { PE_PERMISSION, "PERMISSION" },
                { PE_NO_KEY, "NO_KEY" }, { PE_AMBIGUOUS_KEY, "AMBIGUOUS_KEY" },
                { PE_NO_CERT, "NO_CERT" }, { PE_CERT_EXPIRED, "CERT_EXPIRED" },
                { PE_KEY_USAGE, "KEY_USAGE" }, { PE_MECHANISM, "MECHANISM" },
                { PE_NO_PRIVATE_KEY, "NO_PRIVATE_KEY" }, { PE_PIN_REQUIRED, "PIN_REQUIRED" },
                { PE_PIN_INCORRECT, "PIN_INCORRECT" }, { PE_PIN_LOCKED, "PIN_LOCKED" },
                { PE_TOKEN, "TOKEN" }, { PE_TOKEN_REMOVED, "TOKEN_REMOVED" },
                { PE_BAD_INPUT, "BAD_INPUT" }, { PE_RECIPIENT, "RECIPIENT" },
                { PE_NOT_FOUND, "NOT_FOUND" }, { PE_STORE, "STORE" },
        };
        static const struct { uint8_t type; const char *name; } types[] = {
                { PROTO_HELLO, "HELLO" }, { PROTO_STATUS, "STATUS" }, { PROTO_KEYS, "KEYS" },
                { PROTO_SIGN, "SIGN" }, { PROTO_DATA, "DATA" }, { PROTO_END, "END" },
                { PROTO_PIN, "PIN" }, { PROTO_CANCEL, "CANCEL" }, { PROTO_MORE, "MORE" },
                { PROTO_HELLO_OK, "HELLO_OK" }, { PROTO_STATUS_OK, "STATUS_OK" },
                { PROTO_KEY, "KEY" }, { PROTO_DONE, "DONE" }, { PROTO_NEED_PIN, "NEED_PIN" },
                { PROTO_READY, "READY" }, { PROTO_ERROR, "ERROR" },
                { PROTO_CERTS, "CERTS" }, { PROTO_IMPORT, "IMPORT" }, { PROTO_TRUST, "TRUST" },
                { PROTO_VERIFY, "VERIFY" }, { PROTO_ENCRYPT, "ENCRYPT" }, { PROTO_CERT, "CERT" },
                { PROTO_LOGIN, "LOGIN" }, { PROTO_LOCK, "LOCK" },
        };
        size_t bad = 0;

        for (size_t i = 0; i < sizeof(errors) / sizeof(errors[0]); i++)
                if (strcmp(proto_error_name(errors[i].code), errors[i].name) != 0) {
                        printf("     error %" PRIu32 " named %s\n", errors[i].code,
                               proto_error_name(errors[i].code));
                        bad++;
                }
        CHECK(bad == 0, "proto_error_name names all %zu codes as in the enum",
              sizeof(errors) / sizeof(errors[0]));

        bad = 0;
        for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
                if (strcmp(proto_type_name(types[i].type), types[i].name) != 0) {
                        printf("     type 0x%02x named %s\n", types[i].type,
                               proto_type_name(types[i].type));
                        bad++;
                }
        CHECK(bad == 0, "proto_type_name names all %zu types as in the enum",
              sizeof(types) / sizeof(types[0]));

        CHECK(strcmp(proto_error_name(0), "UNKNOWN") == 0 &&
              strcmp(proto_error_name(9), "UNKNOWN") == 0 &&
              strcmp(proto_error_name(UINT32_MAX), "UNKNOWN") == 0,
              "proto_error_name of 0, 9, 2^32-1 is UNKNOWN");
        CHECK(strcmp(proto_type_name(0x00), "UNKNOWN") == 0 &&
              strcmp(proto_type_name(0x4f), "UNKNOWN") == 0,
              "proto_type_name of 0x00, 0x4f is UNKNOWN");
}

/* ---- Round trip ------------------------------------------------------------ */

static const uint8_t opaque_bytes[] = { 0x00, 0x01, 0xff, 0x00, 0x7f };

static int build_everything(struct proto_msg *m) {
        int r = 0;

        r |= proto_msg_init(m, PROTO_STATUS_OK);
        r |= proto_put_uint(m, PT_VERSION, 0);
        r |= proto_put_uint(m, PT_KEY_COUNT, UINT64_MAX);
        r |= proto_put_uint(m, PT_BYTES_IN, UINT64_C(0x0102030405060708));
        r |= proto_put_string(m, PT_SOFTWARE, "smime-agent 0.1.0");
        r |= proto_put_string(m, PT_LABEL, "");
        r |= proto_put_string(m, PT_EMAIL, "a@example.org");
        r |= proto_put_string(m, PT_SUBJECT, "CN=Grüße \xe2\x9c\x93");
        r |= proto_put_string(m, PT_EMAIL, "b@example.org");
        r |= proto_put_bytes(m, 999, opaque_bytes, sizeof(opaque_bytes));
        r |= proto_put_bytes(m, 1000, NULL, 0);

        /* TOKEN > MODULE > MODULE > TOKEN: four levels, the maximum. */
        r |= proto_begin_group(m, PT_TOKEN);
        r |= proto_put_string(m, PT_TOKEN_LABEL, "tok1");
        r |= proto_begin_group(m, PT_MODULE);
        r |= proto_put_string(m, PT_MODULE_NAME, "softhsm2");
        r |= proto_begin_group(m, PT_MODULE);
        r |= proto_begin_group(m, PT_TOKEN);
        r |= proto_put_string(m, PT_URI, "deep");
        r |= proto_put_uint(m, PT_LOGGED_IN, 1);
        r |= proto_end_group(m);
        r |= proto_end_group(m);
        r |= proto_end_group(m);
        r |= proto_put_uint(m, PT_LOGIN_REQUIRED, 1);
        r |= proto_end_group(m);

        r |= proto_begin_group(m, PT_TOKEN);
        r |= proto_put_string(m, PT_TOKEN_LABEL, "tok2");
        r |= proto_end_group(m);
        r |= proto_begin_group(m, PT_MODULE);     /* an empty group */
        r |= proto_end_group(m);
        return r;
}

static void test_roundtrip(void) {
        struct proto_msg m;
        struct proto_frame f = { 0 };
        struct proto_iter it;
        struct proto_field fld;
        const uint8_t *g1, *g2, *g3, *g4, *v;
        size_t n1, n2, n3, n4, vn;
        uint64_t u = 0;
        char *s = NULL;
        int sv[2], r;
        unsigned emails = 0, tokens = 0, modules = 0;
        bool order_ok = true;

        CHECK_EQ(build_everything(&m), 0, "build a message with every field kind");
        CHECK_EQ(m.depth, 0, "all groups closed");

        make_pair(sv);
        CHECK_EQ(proto_write_msg(sv[1], &m), 0, "proto_write_msg over a socketpair");
        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "proto_read_frame reads it");
        CHECK_EQ(f.type, PROTO_STATUS_OK, "type STATUS_OK");
        CHECK_EQ(f.len, m.len - 5, "payload length = message length - prefix - type");
        CHECK(f.len == m.len - 5 && memcmp(f.body, m.buf + 5, f.len) == 0,
              "payload bytes identical to what was built");
        CHECK(f.body == f.raw + 1 && f.raw[0] == PROTO_STATUS_OK, "body points at raw + 1");
        CHECK(m.buf[0] == (uint8_t) ((m.len - 4) >> 24) && m.buf[1] == (uint8_t) ((m.len - 4) >> 16) &&
              m.buf[2] == (uint8_t) ((m.len - 4) >> 8) && m.buf[3] == (uint8_t) (m.len - 4),
              "length prefix is the body length, big-endian");

        CHECK(proto_get_uint(f.body, f.len, PT_VERSION, &u) == 0 && u == 0, "uint 0");
        CHECK(proto_get_uint(f.body, f.len, PT_KEY_COUNT, &u) == 0 && u == UINT64_MAX, "uint 2^64-1");
        CHECK(proto_get_uint(f.body, f.len, PT_BYTES_IN, &u) == 0 && u == UINT64_C(0x0102030405060708),
              "uint byte order");
        CHECK(proto_get_string(f.body, f.len, PT_SOFTWARE, &s) == 0 && strcmp(s, "smime-agent 0.1.0") == 0,
              "string");
        free(s);
        s = NULL;
        CHECK(proto_get_string(f.body, f.len, PT_LABEL, &s) == 0 && s && s[0] == '\0', "empty string");
        free(s);
        s = NULL;
        CHECK(proto_get_string(f.body, f.len, PT_SUBJECT, &s) == 0 &&
              strcmp(s, "CN=Grüße \xe2\x9c\x93") == 0, "UTF-8 string unchanged");
        free(s);
        s = NULL;
        CHECK(proto_get_string(f.body, f.len, PT_EMAIL, &s) == 0 && strcmp(s, "a@example.org") == 0,
              "repeated tag: lookup returns the first occurrence");
        free(s);
        s = NULL;
        CHECK(proto_get_raw(f.body, f.len, 999, &v, &vn) == 0 && vn == sizeof(opaque_bytes) &&
              memcmp(v, opaque_bytes, vn) == 0, "opaque bytes with NULs under an unknown tag");
        CHECK(proto_get_raw(f.body, f.len, 1000, &v, &vn) == 0 && vn == 0, "empty opaque value");
        CHECK_EQ(proto_get_string(f.body, f.len, 999, &s), -EPROTO, "opaque bytes with NUL as string");
        CHECK_EQ(proto_get_uint(f.body, f.len, PT_SOFTWARE, &u), -EPROTO, "string read as uint");
        CHECK_EQ(proto_get_uint(f.body, f.len, PT_PIN, &u), -ENOENT, "absent uint -> -ENOENT");
        CHECK_EQ(proto_get_string(f.body, f.len, PT_PIN, &s), -ENOENT, "absent string -> -ENOENT");
        CHECK_EQ(proto_get_raw(f.body, f.len, 4242, &v, &vn), -ENOENT, "absent raw -> -ENOENT");
        CHECK_EQ(proto_get_string(f.body, f.len, PT_URI, &s), -ENOENT,
                 "lookups do not descend into groups");

        /* Every occurrence, in order, through the iterator. */
        proto_iter_init(&it, f.body, f.len);
        while ((r = proto_iter_next(&it, &fld)) > 0) {
                if (fld.tag == PT_EMAIL) {
                        const char *want = emails == 0 ? "a@example.org" : "b@example.org";

                        if (proto_field_string(&fld, &s) != 0 || strcmp(s, want) != 0)
                                order_ok = false;
                        free(s);
                        s = NULL;
                        emails++;
                } else if (fld.tag == PT_TOKEN) {
                        const char *want = tokens == 0 ? "tok1" : "tok2";

                        if (proto_get_string(fld.val, fld.len, PT_TOKEN_LABEL, &s) != 0 ||
                            strcmp(s, want) != 0)
                                order_ok = false;
                        free(s);
                        s = NULL;
                        tokens++;
                } else if (fld.tag == PT_MODULE) {
                        if (fld.len != 0)
                                order_ok = false;
                        modules++;
                }
        }
        CHECK_EQ(r, 0, "iterator ends with 0");
        CHECK(emails == 2 && tokens == 2 && modules == 1 && order_ok,
              "iterator yields 2 EMAIL, 2 TOKEN, 1 empty MODULE in order");

        /* Down the nested groups. */
        r = proto_get_raw(f.body, f.len, PT_TOKEN, &g1, &n1);
        r = r ? r : proto_get_raw(g1, n1, PT_MODULE, &g2, &n2);
        r = r ? r : proto_get_raw(g2, n2, PT_MODULE, &g3, &n3);
        r = r ? r : proto_get_raw(g3, n3, PT_TOKEN, &g4, &n4);
        CHECK_EQ(r, 0, "four nested groups found");
        if (r == 0) {
                CHECK(proto_get_string(g4, n4, PT_URI, &s) == 0 && strcmp(s, "deep") == 0,
                      "string at depth 4");
                free(s);
                s = NULL;
                CHECK(proto_get_uint(g4, n4, PT_LOGGED_IN, &u) == 0 && u == 1, "uint at depth 4");
                CHECK(proto_get_uint(g1, n1, PT_LOGIN_REQUIRED, &u) == 0 && u == 1,
                      "field after a closed inner group belongs to the outer group");
                CHECK(proto_get_string(g2, n2, PT_MODULE_NAME, &s) == 0 && strcmp(s, "softhsm2") == 0,
                      "string at depth 2");
                free(s);
                s = NULL;
        }

        proto_frame_free(&f);
        CHECK(f.raw == NULL && f.cap == 0 && f.len == 0, "proto_frame_free empties the frame");
        proto_msg_free(&m);
        CHECK(m.buf == NULL && m.len == 0 && m.cap == 0, "proto_msg_free empties the message");
        close_pair(sv);
}

/* The exact bytes of HELLO and HELLO_OK, as in PROTOCOL.md's worked example;
 * written to a pipe, so write() stands in for send() (ENOTSOCK). */
static void test_hello_bytes(void) {
        static const uint8_t hello[] = {
                0x00, 0x00, 0x00, 0x31,                                 /* body length 49 */
                0x01,                                                   /* HELLO */
                0x00, 0x01, 0x00, 0x00, 0x00, 0x08,                     /* VERSION, 8 */
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,         /* 1 */
                0x00, 0x02, 0x00, 0x00, 0x00, 0x0e,                     /* SOFTWARE, 14 */
                's', 'm', 'i', 'm', 'e', 'c', 't', 'l', ' ', '0', '.', '1', '.', '0',
                0x00, 0x03, 0x00, 0x00, 0x00, 0x08,                     /* INTERACTIVE, 8 */
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,         /* 1 */
        };
        static const uint8_t hello_ok[] = {
                0x00, 0x00, 0x00, 0x26,                                 /* body length 38 */
                0x81,                                                   /* HELLO_OK */
                0x00, 0x01, 0x00, 0x00, 0x00, 0x08,                     /* VERSION, 8 */
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
                0x00, 0x02, 0x00, 0x00, 0x00, 0x11,                     /* SOFTWARE, 17 */
                's', 'm', 'i', 'm', 'e', '-', 'a', 'g', 'e', 'n', 't', ' ', '0', '.', '1', '.', '0',
        };
        struct proto_msg m;
        struct proto_frame f = { 0 };
        uint8_t got[128];
        int p[2];
        ssize_t k;
        uint64_t u = 0;

        if (pipe(p) < 0)
                die("pipe");

        proto_msg_init(&m, PROTO_HELLO);
        proto_put_uint(&m, PT_VERSION, PROTO_VERSION);
        proto_put_string(&m, PT_SOFTWARE, "smimectl 0.1.0");
        proto_put_uint(&m, PT_INTERACTIVE, 1);
        CHECK_EQ(proto_write_msg(p[1], &m), 0, "HELLO written to a pipe (write() fallback)");
        proto_msg_free(&m);
        k = read(p[0], got, sizeof(got));
        CHECK(k == (ssize_t) sizeof(hello) && memcmp(got, hello, sizeof(hello)) == 0,
              "HELLO bytes match the PROTOCOL.md example");

        proto_msg_init(&m, PROTO_HELLO_OK);
        proto_put_uint(&m, PT_VERSION, PROTO_VERSION);
        proto_put_string(&m, PT_SOFTWARE, "smime-agent 0.1.0");
        CHECK_EQ(proto_write_msg(p[1], &m), 0, "HELLO_OK written to a pipe");
        proto_msg_free(&m);
        k = read(p[0], got, sizeof(got));
        CHECK(k == (ssize_t) sizeof(hello_ok) && memcmp(got, hello_ok, sizeof(hello_ok)) == 0,
              "HELLO_OK bytes match the PROTOCOL.md example");

        /* And the example's bytes parse back. */
        write_raw(p[1], hello, sizeof(hello));
        CHECK_EQ(proto_read_frame(p[0], &f), 1, "example HELLO parses from a pipe");
        CHECK(f.type == PROTO_HELLO && proto_get_uint(f.body, f.len, PT_INTERACTIVE, &u) == 0 && u == 1,
              "example HELLO has INTERACTIVE=1");
        proto_frame_free(&f);
        close(p[0]);
        close(p[1]);
}

static void test_empty_and_error(void) {
        struct proto_frame f = { 0 };
        char *s = NULL;
        uint64_t u = 0;
        int sv[2];

        make_pair(sv);
        CHECK_EQ(proto_write_empty(sv[1], PROTO_END), 0, "proto_write_empty(END)");
        CHECK(proto_read_frame(sv[0], &f) == 1 && f.type == PROTO_END && f.len == 0,
              "END arrives with an empty payload");

        CHECK_EQ(proto_write_error(sv[1], PE_PIN_INCORRECT, "wrong PIN for token \"alice\""), 0,
                 "proto_write_error");
        CHECK(proto_read_frame(sv[0], &f) == 1 && f.type == PROTO_ERROR, "ERROR arrives");
        CHECK(proto_get_uint(f.body, f.len, PT_CODE, &u) == 0 && u == PE_PIN_INCORRECT,
              "ERROR.CODE = PIN_INCORRECT");
        CHECK(proto_get_string(f.body, f.len, PT_MESSAGE, &s) == 0 &&
              strcmp(s, "wrong PIN for token \"alice\"") == 0, "ERROR.MESSAGE");
        free(s);
        s = NULL;

        CHECK_EQ(proto_write_error(sv[1], PE_BUSY, NULL), 0, "proto_write_error without message");
        CHECK(proto_read_frame(sv[0], &f) == 1 && f.type == PROTO_ERROR &&
              proto_get_uint(f.body, f.len, PT_CODE, &u) == 0 && u == PE_BUSY, "ERROR BUSY arrives");
        CHECK_EQ(proto_get_string(f.body, f.len, PT_MESSAGE, &s), -ENOENT, "no MESSAGE field");
        proto_frame_free(&f);
        close_pair(sv);
}

/* An over-long error message is cut at PROTO_MAX_STRING, backing off to the
 * start of a split UTF-8 character, rather than not being sent at all. */
struct long_error {
        const char *msg;
};

static int writer_error(int fd, void *arg) {
        return proto_write_error(fd, PE_INTERNAL, ((struct long_error *) arg)->msg);
}

static void test_long_error(void) {
        size_t n = PROTO_MAX_STRING + 100;
        char *msg = malloc(n + 1), *s = NULL;
        struct long_error le = { msg };
        struct proto_frame f = { 0 };
        int sv[2];
        pid_t pid;

        if (!msg)
                die("malloc");
        memset(msg, 'a', n);
        msg[n] = '\0';
        /* "é" (c3 a9) straddles the limit: its second byte would be byte 65537. */
        msg[PROTO_MAX_STRING - 1] = (char) 0xc3;
        msg[PROTO_MAX_STRING] = (char) 0xa9;

        make_pair(sv);
        pid = start_writer(sv, writer_error, &le);
        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "ERROR with an over-long message is sent");
        CHECK_EQ(finish_writer(pid), 0, "writer succeeded");
        CHECK(proto_get_string(f.body, f.len, PT_MESSAGE, &s) == 0 &&
              strlen(s) == PROTO_MAX_STRING - 1 && s[PROTO_MAX_STRING - 2] == 'a',
              "message cut before the split UTF-8 character");
        free(s);
        free(msg);
        proto_frame_free(&f);
        close_pair(sv);
}

/* ---- Builder refusals ------------------------------------------------------ */

static void test_builder_refusals(void) {
        struct proto_msg m;
        static const uint8_t seven[7] = { 0 };
        int sv[2];

        make_pair(sv);

        proto_msg_init(&m, PROTO_HELLO);
        CHECK_EQ(proto_put_uint(&m, PT_SOFTWARE, 1), -EPROTO, "put_uint on a string tag");
        CHECK_EQ(proto_put_string(&m, PT_SOFTWARE, "x"), -EPROTO, "error is sticky: next put returns it");
        CHECK_EQ(proto_msg_error(&m), -EPROTO, "proto_msg_error reports it");
        CHECK_EQ(proto_write_msg(sv[1], &m), -EPROTO, "proto_write_msg refuses a failed message");
        CHECK(nothing_pending(sv[0]), "and writes nothing");
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_HELLO);
        CHECK_EQ(proto_put_string(&m, PT_VERSION, "1"), -EPROTO, "put_string on a uint tag");
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_HELLO);
        CHECK_EQ(proto_put_bytes(&m, PT_VERSION, seven, sizeof(seven)), -EPROTO,
                 "put_bytes of 7 bytes on a uint tag");
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_PIN);
        CHECK_EQ(proto_put_bytes(&m, PT_PIN, "12\0" "34", 5), -EPROTO, "put_bytes of a PIN with a NUL");
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_STATUS_OK);
        CHECK_EQ(proto_begin_group(&m, PT_URI), -EPROTO, "begin_group on a string tag");
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_STATUS_OK);
        CHECK_EQ(proto_put_bytes(&m, PT_TOKEN, "\x00\x01\x00", 3), -EPROTO,
                 "put_bytes of a malformed group value");
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_STATUS_OK);
        CHECK_EQ(proto_end_group(&m), -EPROTO, "end_group with no open group");
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_STATUS_OK);
        proto_begin_group(&m, PT_TOKEN);
        CHECK_EQ(proto_msg_error(&m), 0, "an open group is not an error by itself");
        CHECK_EQ(proto_write_msg(sv[1], &m), -EPROTO, "proto_write_msg refuses open groups");
        CHECK(nothing_pending(sv[0]), "and writes nothing");
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_DATA);
        proto_put_bytes(&m, 999, "x", 1);
        CHECK_EQ(proto_write_msg(sv[1], &m), -EPROTO, "proto_write_msg refuses type DATA");
        proto_msg_free(&m);

        CHECK_EQ(proto_write_data(sv[1], "", 0), -EMSGSIZE, "proto_write_data of 0 bytes");
        CHECK_EQ(proto_write_data(sv[1], "x", PROTO_MAX_CHUNK + 1), -EMSGSIZE,
                 "proto_write_data of PROTO_MAX_CHUNK + 1 bytes (nothing read from p)");
        CHECK_EQ(proto_write_empty(sv[1], PROTO_DATA), -EMSGSIZE, "proto_write_empty(DATA)");
        CHECK(nothing_pending(sv[0]), "none of these wrote anything");

        proto_msg_init(&m, PROTO_KEY);
        CHECK_EQ(proto_put_bytes(&m, 999, "x", SIZE_MAX), -EMSGSIZE,
                 "put_bytes of SIZE_MAX bytes: no overflow, nothing read");
        proto_msg_free(&m);

        close_pair(sv);
}

/* ---- Limits -------------------------------------------------------------- */

static void test_string_limit(void) {
        char *big = malloc(PROTO_MAX_STRING + 2);
        struct proto_msg m;
        struct proto_frame f = { 0 };
        struct bytes pl = { 0 }, fr = { 0 };
        char *s = NULL;
        int sv[2];
        pid_t pid;

        if (!big)
                die("malloc");
        memset(big, 'x', PROTO_MAX_STRING + 1);
        big[PROTO_MAX_STRING + 1] = '\0';

        /* Exactly at the limit. */
        big[PROTO_MAX_STRING] = '\0';
        proto_msg_init(&m, PROTO_HELLO);
        CHECK_EQ(proto_put_string(&m, PT_SOFTWARE, big), 0, "string of PROTO_MAX_STRING bytes: put ok");
        make_pair(sv);
        pid = start_writer(sv, writer_msg, &m);
        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "... and read ok");
        CHECK_EQ(finish_writer(pid), 0, "... writer ok");
        CHECK(proto_get_string(f.body, f.len, PT_SOFTWARE, &s) == 0 && strlen(s) == PROTO_MAX_STRING,
              "... and proto_get_string returns all of it");
        free(s);
        s = NULL;
        proto_msg_free(&m);
        close_pair(sv);

        /* One over. */
        big[PROTO_MAX_STRING] = 'x';
        proto_msg_init(&m, PROTO_HELLO);
        CHECK_EQ(proto_put_string(&m, PT_SOFTWARE, big), -EMSGSIZE,
                 "string of PROTO_MAX_STRING + 1 bytes: put -> -EMSGSIZE");
        CHECK_EQ(proto_put_uint(&m, PT_VERSION, 1), -EMSGSIZE, "... sticky for the next put");
        make_pair(sv);
        CHECK_EQ(proto_write_msg(sv[1], &m), -EMSGSIZE, "... and proto_write_msg refuses it");
        close_pair(sv);
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_HELLO);
        CHECK_EQ(proto_put_bytes(&m, PT_SOFTWARE, big, PROTO_MAX_STRING + 1), -EMSGSIZE,
                 "put_bytes on a string tag respects PROTO_MAX_STRING");
        proto_msg_free(&m);
        proto_msg_init(&m, PROTO_HELLO);
        CHECK_EQ(proto_put_bytes(&m, 999, big, PROTO_MAX_STRING + 1), 0,
                 "an unknown tag is opaque: no string limit");
        proto_msg_free(&m);

        b_field(&pl, PT_SOFTWARE, big, PROTO_MAX_STRING);
        CHECK_EQ(proto_validate(pl.p, pl.len), 0, "validate: string of PROTO_MAX_STRING bytes");
        b_free(&pl);
        b_field(&pl, PT_SOFTWARE, big, PROTO_MAX_STRING + 1);
        CHECK_EQ(proto_validate(pl.p, pl.len), -EMSGSIZE, "validate: string of PROTO_MAX_STRING + 1 -> -EMSGSIZE");
        CHECK_EQ(proto_get_string(pl.p, pl.len, PT_SOFTWARE, &s), -EMSGSIZE,
                 "proto_get_string of it -> -EMSGSIZE");

        b_frame(&fr, PROTO_HELLO, &pl);
        make_pair(sv);
        write_raw(sv[1], fr.p, fr.len);
        CHECK_EQ(proto_read_frame(sv[0], &f), -EMSGSIZE, "reader: frame with an over-long string -> -EMSGSIZE");
        CHECK(f.len == 0 && all_zero(f.raw, f.cap), "... and the rejected frame is wiped");
        close_pair(sv);
        b_free(&fr);
        b_free(&pl);

        /* The same inside a group. */
        b_hdr(&pl, PT_TOKEN, (uint32_t) (6 + PROTO_MAX_STRING + 1));
        b_field(&pl, PT_TOKEN_LABEL, big, PROTO_MAX_STRING + 1);
        CHECK_EQ(proto_validate(pl.p, pl.len), -EMSGSIZE, "validate: over-long string inside a group");
        b_free(&pl);

        proto_frame_free(&f);
        free(big);
}

static void test_frame_limit(void) {
        const size_t fill = PROTO_MAX_FRAME - 1 - 6;    /* one field fills the frame */
        uint8_t *big = malloc(fill + 1);
        struct proto_msg m;
        struct proto_frame f = { 0 };
        int sv[2];
        pid_t pid;

        if (!big)
                die("malloc");
        for (size_t i = 0; i < fill + 1; i++)
                big[i] = (uint8_t) (i * 7);

        proto_msg_init(&m, PROTO_KEY);
        CHECK_EQ(proto_put_bytes(&m, 999, big, fill), 0, "message body of exactly PROTO_MAX_FRAME bytes");
        CHECK_EQ(m.len, 4 + PROTO_MAX_FRAME, "... is PROTO_MAX_FRAME + 4 bytes with its prefix");
        CHECK(m.cap <= 4 + PROTO_MAX_FRAME, "... and the buffer never grew past that");

        make_pair(sv);
        pid = start_writer(sv, writer_msg, &m);
        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "reader accepts a frame of PROTO_MAX_FRAME");
        CHECK_EQ(finish_writer(pid), 0, "... writer ok");
        CHECK(f.len == PROTO_MAX_FRAME - 1 && f.cap <= PROTO_MAX_FRAME &&
              memcmp(f.body + 6, big, fill) == 0, "... with every byte intact");
        close_pair(sv);
        proto_msg_free(&m);

        proto_msg_init(&m, PROTO_KEY);
        CHECK_EQ(proto_put_bytes(&m, 999, big, fill + 1), -EMSGSIZE,
                 "a field making the body PROTO_MAX_FRAME + 1 -> -EMSGSIZE");
        proto_msg_free(&m);
        proto_msg_init(&m, PROTO_KEY);
        proto_put_bytes(&m, 999, big, fill);
        CHECK_EQ(proto_put_bytes(&m, 1000, NULL, 0), -EMSGSIZE,
                 "an empty field after a full body -> -EMSGSIZE");
        proto_msg_free(&m);

        proto_frame_free(&f);
        free(big);
}

/* A frame header the reader must refuse before allocating or reading the
 * body: only the header (and maybe the type) is sent and the connection left
 * open, so a reader that waits for the body gets -EAGAIN from the timeout. */
static void check_refused_header(const uint8_t *hdr, size_t n, const char *what) {
        struct proto_frame f = { 0 };
        int sv[2];

        make_pair(sv);
        set_timeouts(sv[0], 2);
        write_raw(sv[1], hdr, n);
        CHECK_EQ(proto_read_frame(sv[0], &f), -EMSGSIZE, what);
        CHECK(f.raw == NULL && f.cap == 0, "... nothing allocated");
        proto_frame_free(&f);
        close_pair(sv);
}

static void test_header_limits(void) {
        const uint32_t over = PROTO_MAX_FRAME + 1;
        const uint32_t data_over = PROTO_MAX_CHUNK + 2;
        const uint8_t frame_over[] = { over >> 24, over >> 16 & 0xff, over >> 8 & 0xff, over & 0xff };
        const uint8_t frame_max[] = { 0xff, 0xff, 0xff, 0xff };
        const uint8_t zero[] = { 0, 0, 0, 0 };
        const uint8_t data_empty[] = { 0, 0, 0, 1, PROTO_DATA };
        const uint8_t chunk_over[] = { data_over >> 24, data_over >> 16 & 0xff, data_over >> 8 & 0xff,
                                       data_over & 0xff, PROTO_DATA };

        check_refused_header(frame_over, sizeof(frame_over),
                             "header of PROTO_MAX_FRAME + 1 -> -EMSGSIZE without reading the body");
        check_refused_header(frame_max, sizeof(frame_max), "header of 2^32-1 -> -EMSGSIZE");
        check_refused_header(zero, sizeof(zero), "zero-length frame -> -EMSGSIZE");
        check_refused_header(data_empty, sizeof(data_empty), "empty DATA -> -EMSGSIZE");
        check_refused_header(chunk_over, sizeof(chunk_over),
                             "DATA of PROTO_MAX_CHUNK + 1 -> -EMSGSIZE without reading the payload");
}

static void test_data(void) {
        uint8_t *chunk = malloc(PROTO_MAX_CHUNK);
        struct chunk c = { chunk, PROTO_MAX_CHUNK };
        struct proto_frame f = { 0 };
        int sv[2];
        pid_t pid;

        if (!chunk)
                die("malloc");
        for (size_t i = 0; i < PROTO_MAX_CHUNK; i++)
                chunk[i] = (uint8_t) (i ^ (i >> 8));

        make_pair(sv);
        pid = start_writer(sv, writer_data, &c);
        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "DATA of PROTO_MAX_CHUNK bytes is read");
        CHECK_EQ(finish_writer(pid), 0, "... writer ok");
        CHECK(f.type == PROTO_DATA && f.len == PROTO_MAX_CHUNK && memcmp(f.body, chunk, f.len) == 0,
              "... every byte intact");

        CHECK_EQ(proto_write_data(sv[1], "\0", 1), 0, "DATA of 1 byte (a NUL) is written");
        CHECK(proto_read_frame(sv[0], &f) == 1 && f.type == PROTO_DATA && f.len == 1 && f.body[0] == 0,
              "... and read: DATA payloads are raw, not fields");
        close_pair(sv);
        proto_frame_free(&f);
        free(chunk);
}

static void test_depth(void) {
        struct proto_msg m;
        struct bytes pl = { 0 }, fr = { 0 };
        struct proto_frame f = { 0 };
        int sv[2];
        unsigned i;

        proto_msg_init(&m, PROTO_STATUS_OK);
        for (i = 0; i < PROTO_MAX_DEPTH; i++)
                if (proto_begin_group(&m, PT_TOKEN) != 0)
                        break;
        CHECK_EQ(i, PROTO_MAX_DEPTH, "PROTO_MAX_DEPTH nested groups can be opened");
        CHECK_EQ(proto_begin_group(&m, PT_MODULE), -EMSGSIZE, "one more -> -EMSGSIZE");
        CHECK_EQ(proto_end_group(&m), -EMSGSIZE, "... sticky");
        proto_msg_free(&m);

        /* Hand-built: TOKEN inside TOKEN ... levels deep, a string innermost. */
        for (unsigned levels = PROTO_MAX_DEPTH; levels <= PROTO_MAX_DEPTH + 1; levels++) {
                b_free(&pl);
                for (i = 0; i < levels; i++)
                        b_hdr(&pl, PT_TOKEN, (uint32_t) (6 * (levels - i) + 1));
                b_field(&pl, PT_URI, "u", 1);
                if (levels == PROTO_MAX_DEPTH)
                        CHECK_EQ(proto_validate(pl.p, pl.len), 0, "validate: groups nested PROTO_MAX_DEPTH deep");
                else
                        CHECK_EQ(proto_validate(pl.p, pl.len), -EMSGSIZE,
                                 "validate: groups nested PROTO_MAX_DEPTH + 1 deep -> -EMSGSIZE");
        }

        b_frame(&fr, PROTO_STATUS_OK, &pl);
        make_pair(sv);
        write_raw(sv[1], fr.p, fr.len);
        CHECK_EQ(proto_read_frame(sv[0], &f), -EMSGSIZE, "reader: nesting over PROTO_MAX_DEPTH -> -EMSGSIZE");
        close_pair(sv);
        b_free(&fr);

        /* The same bytes under an unknown tag are opaque and not descended. */
        pl.p[0] = 0x03;
        pl.p[1] = 0xe7;         /* tag 999 */
        CHECK_EQ(proto_validate(pl.p, pl.len), 0, "unknown tag with deep-looking content is opaque");

        /* put_bytes of a prebuilt group value counts the levels it adds. */
        proto_msg_init(&m, PROTO_STATUS_OK);
        CHECK_EQ(proto_put_bytes(&m, PT_TOKEN, pl.p + 6, pl.len - 6), -EMSGSIZE,
                 "put_bytes of a group value nested too deep -> -EMSGSIZE");
        proto_msg_free(&m);
        b_free(&pl);

        proto_msg_init(&m, PROTO_STATUS_OK);
        b_hdr(&pl, PT_MODULE, 6 + 1);
        b_field(&pl, PT_URI, "u", 1);
        CHECK_EQ(proto_put_bytes(&m, PT_TOKEN, pl.p, pl.len), 0, "put_bytes of a valid group value");
        proto_msg_free(&m);
        b_free(&pl);
        proto_frame_free(&f);
}

/* ---- Malformed payloads ---------------------------------------------------- */

static void test_malformed(void) {
        struct bytes pl = { 0 };
        struct proto_iter it;
        struct proto_field fld;
        uint64_t u = 0;
        char *s = NULL;
        static const uint8_t seven[7] = { 1, 2, 3, 4, 5, 6, 7 };
        static const uint8_t nine[9] = { 0 };

        CHECK_EQ(proto_validate(NULL, 0), 0, "empty payload is valid");

        b_hdr(&pl, PT_VERSION, 9);
        b_put(&pl, nine, 8);
        CHECK_EQ(proto_validate(pl.p, pl.len), -EPROTO, "field length past the end -> -EPROTO");
        proto_iter_init(&it, pl.p, pl.len);
        CHECK_EQ(proto_iter_next(&it, &fld), -EPROTO, "iterator -> -EPROTO");
        CHECK_EQ(proto_iter_next(&it, &fld), -EPROTO, "... and again -EPROTO, not a field");
        CHECK_EQ(proto_get_uint(pl.p, pl.len, PT_VERSION, &u), -EPROTO, "lookup -> -EPROTO");
        b_free(&pl);

        b_hdr(&pl, 999, UINT32_MAX);
        CHECK_EQ(proto_validate(pl.p, pl.len), -EPROTO, "field length 2^32-1 -> -EPROTO");
        b_free(&pl);

        b_uint(&pl, PT_VERSION, 1);
        b_put(&pl, "\x00\x02\x00\x00\x00", 5);
        CHECK_EQ(proto_validate(pl.p, pl.len), -EPROTO, "truncated field header -> -EPROTO");
        CHECK(proto_get_uint(pl.p, pl.len, PT_VERSION, &u) == 0 && u == 1,
              "a lookup stops at the first occurrence, before the damage");
        CHECK_EQ(proto_get_string(pl.p, pl.len, PT_SOFTWARE, &s), -EPROTO,
                 "a lookup that reaches the damage -> -EPROTO");
        b_free(&pl);

        b_field(&pl, PT_VERSION, seven, sizeof(seven));
        CHECK_EQ(proto_validate(pl.p, pl.len), -EPROTO, "uint of 7 bytes -> -EPROTO");
        CHECK_EQ(proto_get_uint(pl.p, pl.len, PT_VERSION, &u), -EPROTO, "proto_get_uint of 7 bytes -> -EPROTO");
        b_free(&pl);

        b_field(&pl, PT_BYTES_OUT, nine, sizeof(nine));
        CHECK_EQ(proto_validate(pl.p, pl.len), -EPROTO, "uint of 9 bytes -> -EPROTO");
        b_free(&pl);

        b_field(&pl, PT_SOFTWARE, "ab\0cd", 5);
        CHECK_EQ(proto_validate(pl.p, pl.len), -EPROTO, "NUL inside a string -> -EPROTO");
        CHECK_EQ(proto_get_string(pl.p, pl.len, PT_SOFTWARE, &s), -EPROTO, "proto_get_string -> -EPROTO");
        b_free(&pl);

        b_field(&pl, PT_PIN, "1234\0", 5);
        CHECK_EQ(proto_validate(pl.p, pl.len), -EPROTO, "PIN is a string: trailing NUL -> -EPROTO");
        b_free(&pl);

        b_hdr(&pl, PT_TOKEN, 6 + 7);
        b_field(&pl, PT_LOGGED_IN, seven, sizeof(seven));
        CHECK_EQ(proto_validate(pl.p, pl.len), -EPROTO, "bad uint inside a group -> -EPROTO");
        b_free(&pl);

        /* The inner field claims more than its group holds, though the
         * payload has the bytes: a group is its own bounded buffer. */
        b_hdr(&pl, PT_MODULE, 6 + 2);
        b_hdr(&pl, PT_LIBRARY, 4);
        b_put(&pl, "ab", 2);
        b_field(&pl, 999, "cd", 2);
        CHECK_EQ(proto_validate(pl.p, pl.len), -EPROTO, "inner field past the end of its group -> -EPROTO");
        b_free(&pl);

        b_field(&pl, 999, seven, sizeof(seven));
        b_field(&pl, 4242, "a\0b", 3);
        CHECK_EQ(proto_validate(pl.p, pl.len), 0, "unknown tags accept any bytes");
        b_free(&pl);
}

/* ---- Reader: EOF, truncation, malformed frames, buffer reuse ---------------- */

static void test_reader_eof(void) {
        struct proto_frame f = { 0 };
        int sv[2];

        make_pair(sv);
        close(sv[1]);
        sv[1] = -1;
        CHECK_EQ(proto_read_frame(sv[0], &f), 0, "clean EOF -> 0");
        close_pair(sv);

        make_pair(sv);
        proto_write_empty(sv[1], PROTO_STATUS);
        close(sv[1]);
        sv[1] = -1;
        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "a frame, then ...");
        CHECK_EQ(proto_read_frame(sv[0], &f), 0, "... clean EOF at the frame boundary -> 0");
        close_pair(sv);

        make_pair(sv);
        write_raw(sv[1], "\x00\x00", 2);
        close(sv[1]);
        sv[1] = -1;
        CHECK_EQ(proto_read_frame(sv[0], &f), -ECONNRESET, "EOF inside the length -> -ECONNRESET");
        close_pair(sv);

        make_pair(sv);
        write_raw(sv[1], "\x00\x00\x00\x0a", 4);
        close(sv[1]);
        sv[1] = -1;
        CHECK_EQ(proto_read_frame(sv[0], &f), -ECONNRESET, "EOF before the type -> -ECONNRESET");
        close_pair(sv);

        make_pair(sv);
        write_raw(sv[1], "\x00\x00\x00\x0a\x30\x00\x1e", 7);
        close(sv[1]);
        sv[1] = -1;
        CHECK_EQ(proto_read_frame(sv[0], &f), -ECONNRESET, "truncated frame then EOF -> -ECONNRESET");
        CHECK(f.len == 0 && (f.raw == NULL || all_zero(f.raw, f.cap)), "... and the partial frame is wiped");
        close_pair(sv);
        proto_frame_free(&f);
}

static void test_reader_malformed(void) {
        struct bytes pl = { 0 }, fr = { 0 };
        struct proto_frame f = { 0 };
        int sv[2];

        b_field(&pl, PT_PIN, "12\0" "34", 5);
        b_frame(&fr, PROTO_PIN, &pl);
        b_free(&pl);
        make_pair(sv);
        write_raw(sv[1], fr.p, fr.len);
        proto_write_empty(sv[1], PROTO_CANCEL);
        CHECK_EQ(proto_read_frame(sv[0], &f), -EPROTO, "reader: malformed payload -> -EPROTO");
        CHECK(f.type == PROTO_PIN && f.len == 0, "... f->type says which message, len is 0");
        CHECK(f.raw && all_zero(f.raw, f.cap), "... and its bytes are wiped");
        CHECK(proto_read_frame(sv[0], &f) == 1 && f.type == PROTO_CANCEL,
              "the whole bad frame was consumed: the next frame reads");
        close_pair(sv);
        b_free(&fr);
        proto_frame_free(&f);

        CHECK_EQ(proto_read_frame(-1, &f), -EBADF, "reader on a bad fd -> -EBADF");
        CHECK_EQ(proto_write_empty(-1, PROTO_END), -EBADF, "writer on a bad fd -> -EBADF");
}

static void test_reuse_and_wipe(void) {
        struct proto_msg m;
        struct proto_frame f = { 0 };
        uint8_t *raw;
        size_t cap;
        char *s = NULL;
        int sv[2];

        make_pair(sv);
        proto_msg_init(&m, PROTO_PIN);
        proto_put_string(&m, PT_PIN, "135792468");
        proto_write_msg(sv[1], &m);
        proto_write_msg(sv[1], &m);
        proto_msg_free(&m);
        proto_write_empty(sv[1], PROTO_KEYS);
        proto_write_data(sv[1], "0123456789", 10);

        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "PIN frame read");
        CHECK(proto_get_string(f.body, f.len, PT_PIN, &s) == 0 && strcmp(s, "135792468") == 0, "PIN value");
        explicit_bzero(s, strlen(s));
        free(s);
        raw = f.raw;
        cap = f.cap;
        proto_frame_wipe(&f);
        CHECK(f.raw == raw && f.cap == cap && f.len == 0 && all_zero(f.raw, f.cap),
              "proto_frame_wipe zeroes the buffer and keeps it");

        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "second PIN frame read");
        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "KEYS read without wiping first");
        CHECK(f.type == PROTO_KEYS && f.len == 0 && all_zero(f.raw + 1, 6 + 9),
              "reading the next frame wiped the previous PIN");
        CHECK(f.raw == raw && f.cap == cap, "buffer reused");
        CHECK(proto_read_frame(sv[0], &f) == 1 && f.type == PROTO_DATA && f.len == 10 &&
              memcmp(f.body, "0123456789", 10) == 0 && f.raw == raw, "DATA read into the same buffer");

        proto_frame_free(&f);
        close_pair(sv);
}

/* ---- A vanished peer ----------------------------------------------------- */

static int writer_to_closed_peer(int fd, void *arg) {
        struct proto_msg m;
        int r, bad = 0;

        (void) arg;
        signal(SIGPIPE, SIG_DFL);       /* what a careless caller would have */
        proto_msg_init(&m, PROTO_HELLO);
        proto_put_uint(&m, PT_VERSION, 1);
        r = proto_write_msg(fd, &m);
        bad |= r != -EPIPE;
        proto_msg_free(&m);
        bad |= proto_write_data(fd, "abc", 3) != -EPIPE;
        bad |= proto_write_empty(fd, PROTO_END) != -EPIPE;
        bad |= proto_write_error(fd, PE_INTERNAL, "x") != -EPIPE;
        return bad ? -EINVAL : 0;
}

static void test_epipe(void) {
        int sv[2];
        pid_t pid;
        int r;

        make_pair(sv);
        close(sv[0]);           /* the peer is gone before anything is written */
        sv[0] = -1;
        pid = start_writer(sv, writer_to_closed_peer, NULL);
        r = finish_writer(pid);
        CHECK(r != -1000 - SIGPIPE, "writer to a closed peer is not killed by SIGPIPE");
        CHECK_EQ(r, 0, "write_msg, write_data, write_empty, write_error all return -EPIPE");
        close_pair(sv);
}

/* ---- Signals: EINTR and short reads/writes ------------------------------- */

static volatile sig_atomic_t interrupted;

static void on_signal(int sig) {
        (void) sig;
        interrupted++;
}

static const uint8_t slow_frame[] = { 0x00, 0x00, 0x00, 0x0f, PROTO_HELLO,
                                      0x00, 0x01, 0x00, 0x00, 0x00, 0x08, 0, 0, 0, 0, 0, 0, 0, 0x01 };

/* Interrupts the parent while it waits in read(), and sends the frame in
 * pieces across the interruptions. */
static int writer_slow(int fd, void *arg) {
        pid_t parent = getppid();

        (void) arg;
        usleep(100 * 1000);
        kill(parent, SIGUSR1);
        usleep(50 * 1000);
        write_raw(fd, slow_frame, 3);                   /* inside the length */
        usleep(50 * 1000);
        kill(parent, SIGUSR1);
        usleep(50 * 1000);
        write_raw(fd, slow_frame + 3, 5);               /* inside the payload */
        usleep(50 * 1000);
        kill(parent, SIGUSR1);
        usleep(50 * 1000);
        write_raw(fd, slow_frame + 8, sizeof(slow_frame) - 8);
        return 0;
}

static uint8_t pattern(size_t i) {
        return (uint8_t) (i * 13 + (i >> 11));
}

/* Lets the parent's send() fill the socket buffer and block, interrupts it,
 * then reads and checks the whole DATA frame. */
static int reader_slow(int fd, void *arg) {
        struct proto_frame f = { 0 };
        size_t want = *(size_t *) arg;
        int r;

        set_timeouts(fd, 5);
        usleep(100 * 1000);
        kill(getppid(), SIGUSR1);       /* send() returns a short count */
        usleep(50 * 1000);
        kill(getppid(), SIGUSR1);       /* send() of the rest fails with EINTR */
        usleep(50 * 1000);
        r = proto_read_frame(fd, &f);
        if (r != 1)
                return r < 0 ? r : -EIO;
        if (f.type != PROTO_DATA || f.len != want)
                return -EBADMSG;
        for (size_t i = 0; i < f.len; i++)
                if (f.body[i] != pattern(i))
                        return -EBADMSG;
        proto_frame_free(&f);
        return 0;
}

static void test_eintr(void) {
        struct sigaction sa = { .sa_handler = on_signal }, old;
        struct proto_frame f = { 0 };
        size_t n = PROTO_MAX_CHUNK;
        uint8_t *chunk = malloc(n);
        uint64_t u = 0;
        int sv[2], swapped[2];
        pid_t pid;

        if (!chunk)
                die("malloc");
        for (size_t i = 0; i < n; i++)
                chunk[i] = pattern(i);

        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;        /* no SA_RESTART: blocking calls fail with EINTR */
        sigaction(SIGUSR1, &sa, &old);

        make_pair(sv);
        set_timeouts(sv[0], 5);
        interrupted = 0;
        pid = start_writer(sv, writer_slow, NULL);
        CHECK_EQ(proto_read_frame(sv[0], &f), 1, "read across EINTR and a frame in three pieces");
        CHECK_EQ(finish_writer(pid), 0, "... writer ok");
        CHECK(interrupted == 3, "... the read was interrupted 3 times (%d)", (int) interrupted);
        CHECK(f.type == PROTO_HELLO && proto_get_uint(f.body, f.len, PT_VERSION, &u) == 0 && u == 1,
              "... and the frame is intact");
        close_pair(sv);

        make_pair(sv);
        swapped[0] = sv[1];
        swapped[1] = sv[0];
        interrupted = 0;
        pid = start_writer(swapped, reader_slow, &n);
        CHECK_EQ(proto_write_data(sv[1], chunk, n), 0,
                 "a DATA frame larger than the socket buffer is written across EINTR");
        CHECK(interrupted == 2, "... the write was interrupted twice (%d)", (int) interrupted);
        CHECK_EQ(finish_writer(pid), 0, "... and the peer read every byte intact");
        close_pair(sv);

        sigaction(SIGUSR1, &old, NULL);
        proto_frame_free(&f);
        free(chunk);
}

/* ---- Randomized ------------------------------------------------------------ */

static uint64_t rng_state;

static uint64_t rnd(void) {
        uint64_t x = rng_state;

        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        return rng_state = x;
}

static size_t rnd_below(size_t n) {
        return n ? (size_t) (rnd() % n) : 0;
}

static const uint16_t fuzz_tags[] = {
        PT_VERSION, PT_SOFTWARE, PT_PIN, PT_EMAIL, PT_CODE, PT_MESSAGE, PT_KEY_BITS,
        PT_TOKEN, PT_MODULE, PT_TOKEN_LABEL, PT_BYTES_OUT, 999, 0, 65535,
};

/* A random, valid field sequence. */
static void fuzz_build(struct proto_msg *m, unsigned depth) {
        size_t nfields = rnd_below(6);

        for (size_t i = 0; i < nfields; i++) {
                uint16_t tag = fuzz_tags[rnd_below(sizeof(fuzz_tags) / sizeof(fuzz_tags[0]))];
                char s[24];
                size_t n = rnd_below(sizeof(s) - 1);

                switch (tag) {
                case PT_VERSION: case PT_CODE: case PT_KEY_BITS: case PT_BYTES_OUT:
                        proto_put_uint(m, tag, rnd());
                        break;
                case PT_TOKEN: case PT_MODULE:
                        if (depth < PROTO_MAX_DEPTH) {
                                proto_begin_group(m, tag);
                                fuzz_build(m, depth + 1);
                                proto_end_group(m);
                        }
                        break;
                default:
                        for (size_t j = 0; j < n; j++)
                                s[j] = (char) (1 + rnd_below(255));
                        s[n] = '\0';
                        proto_put_string(m, tag, s);
                        break;
                }
        }
}

/* Walks a payload the way the agent would; returns false on a result
 * outside the documented set or inconsistent with proto_validate(). */
static bool fuzz_walk(const uint8_t *p, size_t n, bool valid, unsigned depth) {
        struct proto_iter it;
        struct proto_field f;
        uint64_t u;
        char *s;
        int r;

        proto_iter_init(&it, p, n);
        while ((r = proto_iter_next(&it, &f)) > 0) {
                if (f.val < p || f.len > n || f.val + f.len > p + n)
                        return false;   /* a field outside its buffer */
                switch (f.tag) {
                case PT_VERSION: case PT_CODE: case PT_KEY_BITS: case PT_BYTES_OUT:
                        r = proto_field_uint(&f, &u);
                        if (valid ? r != 0 : r != 0 && r != -EPROTO)
                                return false;
                        break;
                case PT_TOKEN: case PT_MODULE:
                        if (depth < PROTO_MAX_DEPTH && !fuzz_walk(f.val, f.len, valid, depth + 1))
                                return false;
                        break;
                case PT_SOFTWARE: case PT_PIN: case PT_EMAIL: case PT_MESSAGE: case PT_TOKEN_LABEL:
                        s = NULL;
                        r = proto_field_string(&f, &s);
                        if (valid ? r != 0 : r != 0 && r != -EPROTO && r != -EMSGSIZE)
                                return false;
                        if (r == 0 && strlen(s) != f.len)
                                return false;
                        free(s);
                        break;
                default:        /* opaque, or a kind this walk does not ask for */
                        break;
                }
        }
        return valid ? r == 0 : r == 0 || r == -EPROTO;
}

static void mutate(uint8_t *p, size_t *n, size_t cap) {
        size_t k = 1 + rnd_below(4);

        for (size_t i = 0; i < k; i++) {
                switch (rnd_below(5)) {
                case 0:         /* flip a byte */
                        if (*n)
                                p[rnd_below(*n)] ^= (uint8_t) (1 + rnd_below(255));
                        break;
                case 1:         /* truncate */
                        *n = rnd_below(*n + 1);
                        break;
                case 2:         /* append random bytes */
                        while (*n < cap && rnd_below(8))
                                p[(*n)++] = (uint8_t) rnd();
                        break;
                case 3:         /* set a byte to a boundary value */
                        if (*n) {
                                static const uint8_t v[] = { 0x00, 0x01, 0x06, 0x07, 0x08, 0x09, 0x7f, 0x80, 0xff };

                                p[rnd_below(*n)] = v[rnd_below(sizeof(v))];
                        }
                        break;
                default:        /* a byte of zero, often a NUL in a string */
                        if (*n)
                                p[rnd_below(*n)] = 0;
                        break;
                }
        }
}

static void test_fuzz_validate(unsigned rounds) {
        unsigned bad_build = 0, bad = 0, accepted = 0;

        for (unsigned i = 0; i < rounds; i++) {
                struct proto_msg m;
                uint8_t *in;
                size_t n, cap;
                int r;

                proto_msg_init(&m, PROTO_STATUS_OK);
                fuzz_build(&m, 0);
                if (m.err || proto_validate(m.buf + 5, m.len - 5) != 0 ||
                    !fuzz_walk(m.buf + 5, m.len - 5, true, 0))
                        bad_build++;

                /* An exact-size copy, so that ASan sees any read past the end. */
                cap = m.len - 5 + 64;
                in = malloc(cap);
                if (!in)
                        die("malloc");
                if (rnd_below(4) == 0) {
                        n = rnd_below(cap);
                        for (size_t j = 0; j < n; j++)
                                in[j] = (uint8_t) rnd();
                } else {
                        n = m.len - 5;
                        memcpy(in, m.buf + 5, n);
                        mutate(in, &n, cap);
                }
                proto_msg_free(&m);

                {
                        uint8_t *exact = malloc(n ? n : 1);

                        if (!exact)
                                die("malloc");
                        memcpy(exact, in, n);
                        free(in);
                        in = exact;
                }

                r = proto_validate(in, n);
                if (r != 0 && r != -EPROTO && r != -EMSGSIZE)
                        bad++;
                else if (!fuzz_walk(in, n, r == 0, 0))
                        bad++;
                accepted += r == 0;
                free(in);
        }
        CHECK_EQ(bad_build, 0, "randomized: every built message validates and walks");
        CHECK(bad == 0, "randomized: %u mutated/random payloads, validate+walk results all in the "
              "documented set (%u accepted)", rounds, accepted);
}

static void test_fuzz_reader(unsigned rounds) {
        unsigned bad = 0, frames = 0;

        for (unsigned i = 0; i < rounds; i++) {
                struct proto_frame f = { 0 };
                struct proto_msg m;
                uint8_t in[4096];
                size_t n;
                int sv[2], r;

                proto_msg_init(&m, rnd_below(2) ? PROTO_STATUS_OK : (uint8_t) rnd());
                fuzz_build(&m, 0);
                if (m.len <= sizeof(in) / 2) {
                        /* A valid frame, maybe a DATA-like one, then damage. */
                        memcpy(in, m.buf, m.len);
                        n = m.len;
                        in[0] = in[1] = 0;
                        in[2] = (uint8_t) ((n - 4) >> 8);
                        in[3] = (uint8_t) (n - 4);
                        if (rnd_below(3) == 0)
                                in[4] = PROTO_DATA;
                        if (rnd_below(4))
                                mutate(in, &n, sizeof(in));
                } else {
                        n = rnd_below(64);
                        for (size_t j = 0; j < n; j++)
                                in[j] = (uint8_t) rnd();
                }
                proto_msg_free(&m);

                make_pair(sv);
                write_raw(sv[1], in, n);
                shutdown(sv[1], SHUT_WR);
                for (unsigned k = 0; k < 64; k++) {
                        r = proto_read_frame(sv[0], &f);
                        if (r == 1) {
                                frames++;
                                if (f.type == PROTO_DATA ? f.len == 0 || f.len > PROTO_MAX_CHUNK
                                                         : proto_validate(f.body, f.len) != 0)
                                        bad++;
                                if (f.body != f.raw + 1 || f.len + 1 > f.cap)
                                        bad++;
                                continue;
                        }
                        if (r != 0 && r != -EPROTO && r != -EMSGSIZE && r != -ECONNRESET)
                                bad++;
                        break;
                }
                proto_frame_free(&f);
                close_pair(sv);
        }
        CHECK(bad == 0, "randomized: %u byte streams through proto_read_frame, results all in the "
              "documented set (%u frames accepted)", rounds, frames);
}

int main(void) {
        const char *seed = getenv("PROTO_FUZZ_SEED");

        alarm(100);     /* a hang is a failure, not a stuck CI job */
        setvbuf(stdout, NULL, _IOLBF, 0);

        test_names();
        test_roundtrip();
        test_hello_bytes();
        test_empty_and_error();
        test_long_error();
        test_builder_refusals();
        test_string_limit();
        test_frame_limit();
        test_header_limits();
        test_data();
        test_depth();
        test_malformed();
        test_reader_eof();
        test_reader_malformed();
        test_reuse_and_wipe();
        test_epipe();
        test_eintr();

        rng_state = seed ? strtoull(seed, NULL, 0) : UINT64_C(0x5eed5eed12345678);
        if (rng_state == 0)
                rng_state = 1;
        printf("     randomized tests, PROTO_FUZZ_SEED=0x%" PRIx64 "\n", rng_state);
        test_fuzz_validate(4000);
        test_fuzz_reader(2000);

        printf("test_proto: %u passed, %u failed\n", passed, failed);
        return failed ? 1 : 0;
}
