/* proto.c — framing and field encoding of the smime-agent protocol.
 *
 * This is the only code that turns lengths received from a peer into memory
 * accesses. Every length is checked against the bytes that remain and against
 * the PROTO_MAX_* limits before it is used, and nothing is allocated on a
 * peer's word beyond PROTO_MAX_FRAME. PINs travel through these buffers, so
 * every buffer is wiped before it is freed or replaced by a larger one
 * (never realloc(), which may free the old block unwiped).
 *
 * It must never link OpenSSL or PKCS#11, never log, and never interpret a
 * message beyond its structure: what a message means is service/'s business.
 *
 * Error codes beyond those listed in proto.h:
 *   - the builder refuses, with a sticky -EPROTO, a put whose tag has a known
 *     kind that does not match (proto_put_uint(PT_SOFTWARE, ...)), bytes that
 *     would not validate (proto_put_bytes(PT_VERSION, p, 7)) and an
 *     unbalanced proto_end_group(): a writer must never emit a frame that its
 *     own reader would reject;
 *   - proto_write_msg() refuses a message with groups still open and a
 *     message of type DATA (use proto_write_data()) with -EPROTO;
 *   - proto_read_frame() passes on proto_validate()'s code, so a string or a
 *     nesting over its limit gives -EMSGSIZE (-> ERROR TOO_LARGE), anything
 *     else malformed -EPROTO (-> ERROR PROTOCOL);
 *   - I/O failures other than EOF come back as -errno (-EAGAIN when the fd
 *     has SO_RCVTIMEO/SO_SNDTIMEO and it expired).
 */
#include "proto.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define FRAME_HDR_LEN 4u                /* u32 body length */
#define FIELD_HDR_LEN 6u                /* u16 tag + u32 length */
#define UINT_LEN 8u
#define MSG_MAX_LEN (FRAME_HDR_LEN + PROTO_MAX_FRAME)   /* prefix + body */
#define MSG_INIT_CAP 256u
#define FRAME_INIT_CAP 256u

/* ---- Names --------------------------------------------------------------- */

const char *proto_error_name(uint32_t code) {
        switch (code) {
        case PE_PROTOCOL:       return "PROTOCOL";
        case PE_TOO_LARGE:      return "TOO_LARGE";
        case PE_VERSION:        return "VERSION";
        case PE_UNSUPPORTED:    return "UNSUPPORTED";
        case PE_BUSY:           return "BUSY";
        case PE_INTERNAL:       return "INTERNAL";
        case PE_CANCELLED:      return "CANCELLED";
        case PE_PERMISSION:     return "PERMISSION";
        case PE_NO_KEY:         return "NO_KEY";
        case PE_AMBIGUOUS_KEY:  return "AMBIGUOUS_KEY";
        case PE_NO_CERT:        return "NO_CERT";
        case PE_CERT_EXPIRED:   return "CERT_EXPIRED";
        case PE_KEY_USAGE:      return "KEY_USAGE";
        case PE_MECHANISM:      return "MECHANISM";
        case PE_NO_PRIVATE_KEY: return "NO_PRIVATE_KEY";
        case PE_PIN_REQUIRED:   return "PIN_REQUIRED";
        case PE_PIN_INCORRECT:  return "PIN_INCORRECT";
        case PE_PIN_LOCKED:     return "PIN_LOCKED";
        case PE_TOKEN:          return "TOKEN";
        case PE_TOKEN_REMOVED:  return "TOKEN_REMOVED";
        case PE_BAD_INPUT:      return "BAD_INPUT";
        case PE_NOT_RECIPIENT:  return "NOT_RECIPIENT";
        case PE_INTEGRITY:      return "INTEGRITY";
        case PE_DECRYPT_FAILED: return "DECRYPT_FAILED";
        case PE_RECIPIENT:      return "RECIPIENT";
        case PE_NOT_FOUND:      return "NOT_FOUND";
        case PE_STORE:          return "STORE";
        default:                return "UNKNOWN";
        }
}

const char *proto_type_name(uint8_t type) {
        switch (type) {
        case PROTO_HELLO:       return "HELLO";
        case PROTO_STATUS:      return "STATUS";
        case PROTO_KEYS:        return "KEYS";
        case PROTO_CERTS:       return "CERTS";
        case PROTO_IMPORT:      return "IMPORT";
        case PROTO_TRUST:       return "TRUST";
        case PROTO_VERIFY:      return "VERIFY";
        case PROTO_ENCRYPT:     return "ENCRYPT";
        case PROTO_CERT:        return "CERT";
        case PROTO_SIGN:        return "SIGN";
        case PROTO_DECRYPT:     return "DECRYPT";
        case PROTO_LOGIN:       return "LOGIN";
        case PROTO_LOCK:        return "LOCK";
        case PROTO_DATA:        return "DATA";
        case PROTO_END:         return "END";
        case PROTO_MORE:        return "MORE";
        case PROTO_PIN:         return "PIN";
        case PROTO_CANCEL:      return "CANCEL";
        case PROTO_HELLO_OK:    return "HELLO_OK";
        case PROTO_STATUS_OK:   return "STATUS_OK";
        case PROTO_KEY:         return "KEY";
        case PROTO_DONE:        return "DONE";
        case PROTO_NEED_PIN:    return "NEED_PIN";
        case PROTO_READY:       return "READY";
        case PROTO_ERROR:       return "ERROR";
        default:                return "UNKNOWN";
        }
}

/* ---- Byte order ---------------------------------------------------------- */

static void put_be16(uint8_t *p, uint16_t v) {
        p[0] = (uint8_t) (v >> 8);
        p[1] = (uint8_t) v;
}

static void put_be32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) (v >> 24);
        p[1] = (uint8_t) (v >> 16);
        p[2] = (uint8_t) (v >> 8);
        p[3] = (uint8_t) v;
}

static void put_be64(uint8_t *p, uint64_t v) {
        put_be32(p, (uint32_t) (v >> 32));
        put_be32(p + 4, (uint32_t) v);
}

static uint16_t get_be16(const uint8_t *p) {
        return (uint16_t) ((unsigned) p[0] << 8 | p[1]);
}

static uint32_t get_be32(const uint8_t *p) {
        return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
}

static uint64_t get_be64(const uint8_t *p) {
        return (uint64_t) get_be32(p) << 32 | get_be32(p + 4);
}

/* ---- Field kinds --------------------------------------------------------- */

enum field_kind {
        KIND_OPAQUE,            /* unknown tag: any bytes */
        KIND_UINT,              /* exactly 8 bytes, big-endian */
        KIND_STRING,            /* no NUL, at most PROTO_MAX_STRING bytes */
        KIND_GROUP,             /* a field sequence, one level deeper */
};

/* The tag table of proto.h; PROTOCOL.md lists the same kinds. */
static enum field_kind tag_kind(uint16_t tag) {
        switch (tag) {
        case PT_VERSION:
        case PT_INTERACTIVE:
        case PT_DETACHED:
        case PT_NO_CERTS:
        case PT_CHAIN:
        case PT_PSS:
        case PT_CODE:
        case PT_KEY_BITS:
        case PT_NOT_BEFORE:
        case PT_NOT_AFTER:
        case PT_USABLE:
        case PT_DEFAULT:
        case PT_LOGIN_REQUIRED:
        case PT_LOGGED_IN:
        case PT_PROTECTED_AUTH:
        case PT_KEY_COUNT:
        case PT_BYTES_IN:
        case PT_BYTES_OUT:
        case PT_ADDED:
        case PT_SIGNING_TIME:
        case PT_NO_SELF:
        case PT_COUNT:
        case PT_CRL_COUNT:
        case PT_NO_CONTENT:
        case PT_AUTHENTICATED:
        case PT_LOGIN_EXPIRES:
        case PT_SIGN_EXPIRES:
        case PT_DECRYPT_EXPIRES:
        case PT_LOGGED_OUT:
        case PT_PIN_PAD_NOTICE:
                return KIND_UINT;

        case PT_SOFTWARE:
        case PT_KEY:
        case PT_FORMAT:
        case PT_DIGEST:
        case PT_MESSAGE:
        case PT_PIN:
        case PT_CONTEXT_KEY:
        case PT_SESSION_ENV:
        case PT_URI:
        case PT_LABEL:
        case PT_SUBJECT:
        case PT_ISSUER:
        case PT_SERIAL:
        case PT_EMAIL:
        case PT_KEY_TYPE:
        case PT_USAGE:
        case PT_STATUS_TEXT:
        case PT_CURVE:
        case PT_MANUFACTURER:
        case PT_MODEL:
        case PT_TOKEN_SERIAL:
        case PT_MODULE_NAME:
        case PT_PIN_STATE:
        case PT_TOKEN_LABEL:
        case PT_LIBRARY:
        case PT_PATH:
        case PT_FINGERPRINT:
        case PT_TRUST:
        case PT_SOURCE:
        case PT_CAPS:
        case PT_PROBLEM:
        case PT_VERDICT:
        case PT_SIG_ALG:
        case PT_CHAIN_SUBJECT:
        case PT_HINT:
        case PT_FROM:
        case PT_SUMMARY:
        case PT_TRUST_PATH:
        case PT_CIPHER:
        case PT_RECIPIENT:
        case PT_KEY_TRANSPORT:
        case PT_LOGIN_POLICY:
        case PT_TOKEN_STATE:
        case PT_HOTPLUG:
                return KIND_STRING;

        case PT_TOKEN:
        case PT_MODULE:
        case PT_SIGNER:
        case PT_RECIPIENT_INFO:
        case PT_FAILED:
                return KIND_GROUP;

        default:
                return KIND_OPAQUE;
        }
}

static int validate_seq(const uint8_t *p, size_t n, unsigned depth);

/* Checks one field value of the given kind found in a sequence at nesting
 * level depth (0 = the payload itself). */
static int check_value(enum field_kind kind, const uint8_t *p, size_t n, unsigned depth) {
        switch (kind) {
        case KIND_UINT:
                return n == UINT_LEN ? 0 : -EPROTO;
        case KIND_STRING:
                if (n > PROTO_MAX_STRING)
                        return -EMSGSIZE;
                return n > 0 && memchr(p, 0, n) ? -EPROTO : 0;
        case KIND_GROUP:
                if (depth >= PROTO_MAX_DEPTH)
                        return -EMSGSIZE;
                return validate_seq(p, n, depth + 1);
        case KIND_OPAQUE:
        default:
                return 0;
        }
}

/* Recursion is bounded by PROTO_MAX_DEPTH through check_value(). */
static int validate_seq(const uint8_t *p, size_t n, unsigned depth) {
        struct proto_iter it;
        struct proto_field f;
        int r;

        proto_iter_init(&it, p, n);
        while ((r = proto_iter_next(&it, &f)) > 0) {
                r = check_value(tag_kind(f.tag), f.val, f.len, depth);
                if (r < 0)
                        return r;
        }
        return r;
}

int proto_validate(const uint8_t *p, size_t n) {
        return validate_seq(p, n, 0);
}

/* ---- Reading fields ------------------------------------------------------ */

void proto_iter_init(struct proto_iter *it, const uint8_t *p, size_t n) {
        it->p = p;
        it->left = n;
}

/* On -EPROTO the iterator does not move, so asking again gives -EPROTO again. */
int proto_iter_next(struct proto_iter *it, struct proto_field *f) {
        size_t rest;
        uint32_t len;

        if (it->left == 0)
                return 0;
        if (it->left < FIELD_HDR_LEN)
                return -EPROTO;
        len = get_be32(it->p + 2);
        rest = it->left - FIELD_HDR_LEN;
        if (len > rest)
                return -EPROTO;

        f->tag = get_be16(it->p);
        f->val = it->p + FIELD_HDR_LEN;
        f->len = len;
        it->p += FIELD_HDR_LEN + (size_t) len;
        it->left = rest - len;
        return 1;
}

static int find_field(const uint8_t *p, size_t n, uint16_t tag, struct proto_field *f) {
        struct proto_iter it;
        int r;

        proto_iter_init(&it, p, n);
        while ((r = proto_iter_next(&it, f)) > 0)
                if (f->tag == tag)
                        return 0;
        return r < 0 ? r : -ENOENT;
}

int proto_field_uint(const struct proto_field *f, uint64_t *out) {
        if (f->len != UINT_LEN)
                return -EPROTO;
        *out = get_be64(f->val);
        return 0;
}

int proto_field_string(const struct proto_field *f, char **out) {
        char *s;
        int r;

        r = check_value(KIND_STRING, f->val, f->len, 0);
        if (r < 0)
                return r;
        s = malloc(f->len + 1);
        if (!s)
                return -ENOMEM;
        if (f->len > 0)
                memcpy(s, f->val, f->len);
        s[f->len] = '\0';
        *out = s;
        return 0;
}

int proto_get_uint(const uint8_t *p, size_t n, uint16_t tag, uint64_t *out) {
        struct proto_field f;
        int r;

        r = find_field(p, n, tag, &f);
        if (r < 0)
                return r;
        return proto_field_uint(&f, out);
}

int proto_get_string(const uint8_t *p, size_t n, uint16_t tag, char **out) {
        struct proto_field f;
        int r;

        r = find_field(p, n, tag, &f);
        if (r < 0)
                return r;
        return proto_field_string(&f, out);
}

int proto_get_raw(const uint8_t *p, size_t n, uint16_t tag, const uint8_t **val, size_t *len) {
        struct proto_field f;
        int r;

        r = find_field(p, n, tag, &f);
        if (r < 0)
                return r;
        *val = f.val;
        *len = f.len;
        return 0;
}

/* ---- Building a message -------------------------------------------------- */

static int msg_fail(struct proto_msg *m, int r) {
        if (m->err == 0)
                m->err = r;
        return m->err;
}

/* Makes room for add more bytes; the frame may never exceed PROTO_MAX_FRAME.
 * Invariant: m->len <= MSG_MAX_LEN, so the subtraction cannot wrap. */
static int msg_reserve(struct proto_msg *m, size_t add) {
        size_t need, cap;
        uint8_t *nbuf;

        if (add > MSG_MAX_LEN - m->len)
                return -EMSGSIZE;
        need = m->len + add;
        if (need <= m->cap)
                return 0;

        cap = m->cap > 0 ? m->cap : MSG_INIT_CAP;
        while (cap < need)
                cap = cap > MSG_MAX_LEN / 2 ? MSG_MAX_LEN : cap * 2;

        nbuf = malloc(cap);
        if (!nbuf)
                return -ENOMEM;
        if (m->buf) {
                memcpy(nbuf, m->buf, m->len);
                explicit_bzero(m->buf, m->cap);
                free(m->buf);
        }
        m->buf = nbuf;
        m->cap = cap;
        return 0;
}

/* Appends a field whose value has already been checked against its kind. */
static int msg_put_field(struct proto_msg *m, uint16_t tag, const void *p, size_t n) {
        int r;

        if (m->err)
                return m->err;
        if (n > MSG_MAX_LEN - FIELD_HDR_LEN)
                return msg_fail(m, -EMSGSIZE);
        r = msg_reserve(m, FIELD_HDR_LEN + n);
        if (r < 0)
                return msg_fail(m, r);

        put_be16(m->buf + m->len, tag);
        put_be32(m->buf + m->len + 2, (uint32_t) n);
        if (n > 0)
                memcpy(m->buf + m->len + FIELD_HDR_LEN, p, n);
        m->len += FIELD_HDR_LEN + n;
        return 0;
}

int proto_msg_init(struct proto_msg *m, uint8_t type) {
        memset(m, 0, sizeof(*m));
        m->buf = malloc(MSG_INIT_CAP);
        if (!m->buf) {
                m->err = -ENOMEM;
                return -ENOMEM;
        }
        m->cap = MSG_INIT_CAP;
        memset(m->buf, 0, FRAME_HDR_LEN);     /* filled in by proto_write_msg() */
        m->buf[FRAME_HDR_LEN] = type;
        m->len = FRAME_HDR_LEN + 1;
        return 0;
}

void proto_msg_free(struct proto_msg *m) {
        if (m->buf) {
                explicit_bzero(m->buf, m->cap);
                free(m->buf);
        }
        memset(m, 0, sizeof(*m));
}

int proto_put_uint(struct proto_msg *m, uint16_t tag, uint64_t v) {
        uint8_t be[UINT_LEN];
        enum field_kind kind = tag_kind(tag);

        if (m->err)
                return m->err;
        if (kind != KIND_UINT && kind != KIND_OPAQUE)
                return msg_fail(m, -EPROTO);
        put_be64(be, v);
        return msg_put_field(m, tag, be, sizeof(be));
}

int proto_put_string(struct proto_msg *m, uint16_t tag, const char *s) {
        enum field_kind kind = tag_kind(tag);
        size_t n;

        assert(s);
        if (m->err)
                return m->err;
        if (kind != KIND_STRING && kind != KIND_OPAQUE)
                return msg_fail(m, -EPROTO);
        /* Never scan further than the limit plus one byte. */
        n = strnlen(s, PROTO_MAX_STRING + 1);
        if (n > PROTO_MAX_STRING)
                return msg_fail(m, -EMSGSIZE);
        return msg_put_field(m, tag, s, n);
}

int proto_put_bytes(struct proto_msg *m, uint16_t tag, const void *p, size_t n) {
        int r;

        assert(p || n == 0);
        if (m->err)
                return m->err;
        /* Size first, so a huge n is refused before its bytes are scanned. */
        if (n > MSG_MAX_LEN - FIELD_HDR_LEN)
                return msg_fail(m, -EMSGSIZE);
        r = check_value(tag_kind(tag), p, n, m->depth);
        if (r < 0)
                return msg_fail(m, r);
        return msg_put_field(m, tag, p, n);
}

int proto_begin_group(struct proto_msg *m, uint16_t tag) {
        enum field_kind kind = tag_kind(tag);
        size_t off;
        int r;

        if (m->err)
                return m->err;
        if (kind != KIND_GROUP && kind != KIND_OPAQUE)
                return msg_fail(m, -EPROTO);
        if (m->depth >= PROTO_MAX_DEPTH)
                return msg_fail(m, -EMSGSIZE);

        off = m->len;
        r = msg_put_field(m, tag, NULL, 0);     /* length patched by proto_end_group() */
        if (r < 0)
                return r;
        m->groups[m->depth++] = off;
        return 0;
}

int proto_end_group(struct proto_msg *m) {
        size_t off;

        if (m->err)
                return m->err;
        if (m->depth == 0)
                return msg_fail(m, -EPROTO);

        off = m->groups[--m->depth];
        /* Bounded by PROTO_MAX_FRAME, so it fits the u32. */
        put_be32(m->buf + off + 2, (uint32_t) (m->len - off - FIELD_HDR_LEN));
        return 0;
}

/* ---- Socket I/O ---------------------------------------------------------- */

/* Writes all of iov. send()/sendmsg() with MSG_NOSIGNAL turns a vanished
 * peer into EPIPE instead of SIGPIPE; on something that is not a socket (a
 * pipe in a test, a file) it falls back to writev(). */
static int write_iov(int fd, struct iovec *iov, int cnt) {
        bool not_socket = false;

        while (cnt > 0) {
                ssize_t k;
                size_t done;

                if (iov->iov_len == 0) {
                        iov++;
                        cnt--;
                        continue;
                }

                if (!not_socket) {
                        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t) cnt };

                        k = sendmsg(fd, &mh, MSG_NOSIGNAL);
                        if (k < 0 && errno == ENOTSOCK) {
                                not_socket = true;
                                continue;
                        }
                } else
                        k = writev(fd, iov, cnt);

                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        return -EIO;

                done = (size_t) k;
                while (cnt > 0 && done >= iov->iov_len) {
                        done -= iov->iov_len;
                        iov++;
                        cnt--;
                }
                if (cnt > 0) {
                        iov->iov_base = (uint8_t *) iov->iov_base + done;
                        iov->iov_len -= done;
                }
        }
        return 0;
}

static int write_all(int fd, const void *p, size_t n) {
        struct iovec iov = { .iov_base = (void *) p, .iov_len = n };

        return write_iov(fd, &iov, 1);
}

/* Reads up to n bytes: returns how many (fewer than n only at EOF) or -errno.
 * n never exceeds PROTO_MAX_FRAME, so the count fits an int. */
static int read_full(int fd, void *buf, size_t n) {
        size_t got = 0;

        assert(n <= PROTO_MAX_FRAME);
        while (got < n) {
                ssize_t k = read(fd, (uint8_t *) buf + got, n - got);

                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        break;
                got += (size_t) k;
        }
        return (int) got;
}

/* Gives f->raw at least need bytes. Old contents are not kept: the caller is
 * about to overwrite them. The new buffer starts zeroed, so that at any time
 * it holds nothing but the current frame and zeros. */
static int frame_reserve(struct proto_frame *f, size_t need) {
        size_t cap;
        uint8_t *nraw;

        assert(need <= PROTO_MAX_FRAME);
        if (f->raw && need <= f->cap)
                return 0;

        cap = f->cap > 0 ? f->cap : FRAME_INIT_CAP;
        while (cap < need)
                cap = cap > PROTO_MAX_FRAME / 2 ? PROTO_MAX_FRAME : cap * 2;

        nraw = calloc(1, cap);
        if (!nraw)
                return -ENOMEM;
        proto_frame_free(f);
        f->raw = nraw;
        f->cap = cap;
        return 0;
}

/* Wipes what the last frame left in the buffer (a PIN, say) and empties f. */
static void frame_reset(struct proto_frame *f) {
        if (f->raw) {
                size_t used = f->len < f->cap ? f->len + 1 : f->cap;

                explicit_bzero(f->raw, used);
        }
        f->type = 0;
        f->body = f->raw ? f->raw + 1 : NULL;
        f->len = 0;
}

void proto_frame_wipe(struct proto_frame *f) {
        if (f->raw)
                explicit_bzero(f->raw, f->cap);
        f->len = 0;
}

void proto_frame_free(struct proto_frame *f) {
        if (f->raw) {
                explicit_bzero(f->raw, f->cap);
                free(f->raw);
        }
        memset(f, 0, sizeof(*f));
}

/* After a negative return the stream is out of step (a body may be left
 * unread): the caller answers ERROR if it can and closes the connection.
 * On a validation error f->type still says which message was malformed. */
int proto_read_frame(int fd, struct proto_frame *f) {
        uint8_t hdr[FRAME_HDR_LEN + 1];
        uint8_t type;
        ssize_t k;
        uint32_t blen;
        size_t plen;
        int r;

        frame_reset(f);

        /* Length and type usually come in one read, a system call less per
         * frame; but the length is judged as soon as its 4 bytes are in. */
        do
                k = read(fd, hdr, sizeof(hdr));
        while (k < 0 && errno == EINTR);
        if (k < 0)
                return -errno;
        if (k == 0)
                return 0;
        if ((size_t) k < FRAME_HDR_LEN) {
                r = read_full(fd, hdr + k, FRAME_HDR_LEN - (size_t) k);
                if (r < 0)
                        return r;
                if ((size_t) r < FRAME_HDR_LEN - (size_t) k)
                        return -ECONNRESET;
                k = FRAME_HDR_LEN;
        }

        /* Limits before allocating or reading the body. */
        blen = get_be32(hdr);
        if (blen == 0 || blen > PROTO_MAX_FRAME)
                return -EMSGSIZE;
        if ((size_t) k == FRAME_HDR_LEN) {
                r = read_full(fd, hdr + FRAME_HDR_LEN, 1);
                if (r < 0)
                        return r;
                if (r == 0)
                        return -ECONNRESET;
        }
        type = hdr[FRAME_HDR_LEN];

        plen = (size_t) blen - 1;
        if (type == PROTO_DATA && (plen == 0 || plen > PROTO_MAX_CHUNK))
                return -EMSGSIZE;

        r = frame_reserve(f, blen);
        if (r < 0)
                return r;
        f->raw[0] = type;
        f->body = f->raw + 1;
        f->type = type;

        r = read_full(fd, f->body, plen);
        if (r < 0 || (size_t) r < plen) {
                explicit_bzero(f->raw, blen);
                return r < 0 ? r : -ECONNRESET;
        }

        if (type != PROTO_DATA) {
                r = proto_validate(f->body, plen);
                if (r < 0) {
                        explicit_bzero(f->raw, blen);
                        return r;
                }
        }
        f->len = plen;
        return 1;
}

/* A message ready to go: no error while building it, no group left open,
 * not DATA (proto_write_data() sends those); writes its length header. */
static int msg_seal(struct proto_msg *m) {
        if (m->err)
                return m->err;
        if (m->depth > 0)
                return -EPROTO;
        assert(m->buf && m->len > FRAME_HDR_LEN && m->len <= MSG_MAX_LEN);
        if (m->buf[FRAME_HDR_LEN] == PROTO_DATA)
                return -EPROTO;
        put_be32(m->buf, (uint32_t) (m->len - FRAME_HDR_LEN));
        return 0;
}

int proto_write_msg(int fd, struct proto_msg *m) {
        int r = msg_seal(m);

        return r < 0 ? r : write_all(fd, m->buf, m->len);
}

int proto_write_data(int fd, const void *p, size_t n) {
        uint8_t hdr[FRAME_HDR_LEN + 1];
        struct iovec iov[2];

        if (n == 0 || n > PROTO_MAX_CHUNK)
                return -EMSGSIZE;
        put_be32(hdr, (uint32_t) (n + 1));
        hdr[FRAME_HDR_LEN] = PROTO_DATA;

        iov[0] = (struct iovec) { .iov_base = hdr, .iov_len = sizeof(hdr) };
        iov[1] = (struct iovec) { .iov_base = (void *) p, .iov_len = n };
        return write_iov(fd, iov, 2);
}

int proto_write_empty(int fd, uint8_t type) {
        uint8_t frame[FRAME_HDR_LEN + 1];

        if (type == PROTO_DATA)         /* an empty DATA frame is invalid */
                return -EMSGSIZE;
        put_be32(frame, 1);
        frame[FRAME_HDR_LEN] = type;
        return write_all(fd, frame, sizeof(frame));
}

/* A message over PROTO_MAX_STRING is cut at a UTF-8 character boundary
 * rather than losing the whole error. */
int proto_write_error(int fd, uint32_t code, const char *message) {
        struct proto_msg m;
        int r;

        r = proto_msg_init(&m, PROTO_ERROR);
        if (r < 0)
                return r;
        proto_put_uint(&m, PT_CODE, code);
        if (message) {
                size_t n = strnlen(message, PROTO_MAX_STRING + 1);

                if (n > PROTO_MAX_STRING) {
                        n = PROTO_MAX_STRING;
                        while (n > 0 && ((unsigned char) message[n] & 0xc0) == 0x80)
                                n--;
                }
                proto_put_bytes(&m, PT_MESSAGE, message, n);
        }
        r = proto_write_msg(fd, &m);
        proto_msg_free(&m);
        return r;
}

/* DATA (when n > 0) and the frame in tail[] go out in one sendmsg, so the
 * peer wakes once for both. */
static int write_data_then(int fd, const void *p, size_t n, const void *tail, size_t tail_len) {
        uint8_t hdr[FRAME_HDR_LEN + 1];
        struct iovec iov[3];
        int cnt = 0;

        if (n > PROTO_MAX_CHUNK)
                return -EMSGSIZE;
        if (n > 0) {
                put_be32(hdr, (uint32_t) (n + 1));
                hdr[FRAME_HDR_LEN] = PROTO_DATA;
                iov[cnt++] = (struct iovec) { .iov_base = hdr, .iov_len = sizeof(hdr) };
                iov[cnt++] = (struct iovec) { .iov_base = (void *) p, .iov_len = n };
        }
        iov[cnt++] = (struct iovec) { .iov_base = (void *) tail, .iov_len = tail_len };
        return write_iov(fd, iov, cnt);
}

int proto_write_data_and_empty(int fd, const void *p, size_t n, uint8_t type) {
        uint8_t frame[FRAME_HDR_LEN + 1];

        if (type == PROTO_DATA)
                return -EPROTO;
        put_be32(frame, 1);
        frame[FRAME_HDR_LEN] = type;
        return write_data_then(fd, p, n, frame, sizeof(frame));
}

int proto_write_data_and_msg(int fd, const void *p, size_t n, struct proto_msg *m) {
        int r = msg_seal(m);

        return r < 0 ? r : write_data_then(fd, p, n, m->buf, m->len);
}
