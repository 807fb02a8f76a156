/* decrypt.c — the DECRYPT request: read an encrypted CMS message as it
 * streams in, find the recipient whose key is on a token, let the token
 * recover the content-encryption key, and stream the plaintext back.
 *
 * Why not CMS_decrypt(): it reads the whole message into memory. Here the
 * outer layers (ContentInfo, EnvelopedData or AuthEnvelopedData,
 * EncryptedContentInfo) are parsed with a small streaming BER reader; the
 * part before the ciphertext (version, originatorInfo, recipientInfos, the
 * content algorithm) is re-encoded as a CMS structure without content and
 * handed to OpenSSL, which decodes the RecipientInfos and, through the token
 * provider (keyprov_dec.c), recovers the content key and sets up the
 * content cipher. The ciphertext then streams through that cipher one chunk
 * at a time: memory stays bounded whatever the message size; only the
 * RecipientInfos (at most DECRYPT_MAX_HEADER bytes) are held whole.
 *
 * Plaintext leaves before the end of the message is seen, so the verdict on
 * the whole (CBC padding, the GCM tag that follows the ciphertext) comes at
 * the end: DONE when it holds, ERROR INTEGRITY when it does not, and the
 * client must then discard what it received (PROTOCOL.md).
 *
 * Input: DER/BER, PEM (-----BEGIN CMS/PKCS7-----), or an S/MIME entity
 * (application/pkcs7-mime, base64 or binary), detected from the first bytes.
 *
 * Must never: send DONE unless the content decrypted completely and
 * correctly; keep or log a content key; try a PIN the user did not give.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509v3.h>

#include "agent.h"
#include "identity.h"
#include "keyprov.h"
#include "log.h"
#include "stream.h"

#define DECRYPT_MAX_HEADER (16u * 1024u * 1024u)  /* recipientInfos & co: ~1 KiB per recipient */
#define DECRYPT_MAX_MIME_HEADER (64u * 1024u)
#define DECRYPT_CHUNK (64u * 1024u)
#define BER_MAX_DEPTH 16
#define LIST_IN_MESSAGE 20      /* recipients named in the error sentence; all go in RECIPIENT fields */

/* ---- Input: raw bytes or base64 ------------------------------------------ */

enum in_format { IN_AUTO, IN_DER, IN_PEM, IN_SMIME };

struct src {
        struct stream *st;
        bool b64;
        bool pem;               /* base64 ends at a "-----END" line */
        bool end;               /* no more decoded bytes */
        bool padded;            /* '=' seen: the base64 text is complete */
        uint32_t quad;
        int nq;
        uint64_t line;          /* base64: lines read, for messages */
        char text[8192];        /* base64: the current line */
        size_t tpos, tlen;
        char *err;              /* where a decoding error is described */
        size_t errsz;
};

static int b64_value(int ch)
{
        if (ch >= 'A' && ch <= 'Z')
                return ch - 'A';
        if (ch >= 'a' && ch <= 'z')
                return ch - 'a' + 26;
        if (ch >= '0' && ch <= '9')
                return ch - '0' + 52;
        if (ch == '+')
                return 62;
        if (ch == '/')
                return 63;
        return -1;
}

/* Decodes up to n bytes of base64 input. 0 at the end, <0 on failure. */
static ssize_t src_read_b64(struct src *s, uint8_t *out, size_t n)
{
        size_t got = 0;

        while (got + 3 <= n && !s->end) {
                if (s->tpos == s->tlen) {
                        ssize_t k = stream_gets(s->st, s->text, sizeof(s->text));

                        if (k < 0)
                                return k;
                        if (k == 0) {
                                s->end = true;
                                break;
                        }
                        if (k > 0 && s->text[k - 1] == '\n')
                                s->line++;
                        s->tpos = 0;
                        s->tlen = (size_t)k;
                        if (s->pem && strncmp(s->text, "-----END", 8) == 0) {
                                s->end = true;
                                break;
                        }
                }
                while (s->tpos < s->tlen && got + 3 <= n) {
                        int ch = (unsigned char)s->text[s->tpos++];
                        int v;

                        if (ch == '\n' || ch == '\r' || ch == ' ' || ch == '\t')
                                continue;
                        if (ch == '=') {
                                /* Padding: 2 or 3 characters of the last quantum carry 1 or 2 bytes. */
                                if (s->nq == 2)
                                        out[got++] = (uint8_t)(s->quad >> 4);
                                else if (s->nq == 3) {
                                        out[got++] = (uint8_t)(s->quad >> 10);
                                        out[got++] = (uint8_t)(s->quad >> 2);
                                } else if (s->nq != 0 || !s->padded) {
                                        snprintf(s->err, s->errsz, "misplaced '=' in the base64 text (line %llu)",
                                                 (unsigned long long)s->line + 1);
                                        return -EBADMSG;
                                }
                                s->nq = 0;
                                s->quad = 0;
                                s->padded = true;
                                continue;
                        }
                        v = b64_value(ch);
                        if (v < 0) {
                                snprintf(s->err, s->errsz, "invalid character 0x%02x in the base64 text (line %llu)",
                                         ch, (unsigned long long)s->line + 1);
                                return -EBADMSG;
                        }
                        if (s->padded) {
                                snprintf(s->err, s->errsz, "base64 text continues after its padding (line %llu)",
                                         (unsigned long long)s->line + 1);
                                return -EBADMSG;
                        }
                        s->quad = s->quad << 6 | (uint32_t)v;
                        if (++s->nq == 4) {
                                out[got++] = (uint8_t)(s->quad >> 16);
                                out[got++] = (uint8_t)(s->quad >> 8);
                                out[got++] = (uint8_t)s->quad;
                                s->nq = 0;
                                s->quad = 0;
                        }
                }
        }
        if (s->end && s->nq != 0 && got + 2 <= n) {
                /* Unpadded tail, as some encoders write it. */
                if (s->nq == 1) {
                        snprintf(s->err, s->errsz, "the base64 text ends in the middle of a byte");
                        return -EBADMSG;
                }
                if (s->nq == 2)
                        out[got++] = (uint8_t)(s->quad >> 4);
                else {
                        out[got++] = (uint8_t)(s->quad >> 10);
                        out[got++] = (uint8_t)(s->quad >> 2);
                }
                s->nq = 0;
        }
        return (ssize_t)got;
}

/* Decoded input. Base64 works in whole 3-byte quanta: n must be at least 3
 * (the BER reader always asks for its whole buffer). */
static ssize_t src_read(struct src *s, uint8_t *out, size_t n)
{
        if (!s->b64)
                return stream_read(s->st, out, n);
        if (n < 3)
                return -EINVAL;
        return src_read_b64(s, out, n);
}

/* ---- A streaming BER reader --------------------------------------------------- */

struct ber {
        struct src *src;
        uint8_t buf[16384];
        size_t pos, len;
        uint64_t off;           /* bytes of the DER/BER consumed */
        int io;                 /* the failure of the source, negative errno */
        char *err;
        size_t errsz;
};

struct tlv {
        uint8_t id;             /* identifier octet: class, constructed bit, tag */
        bool indef;
        uint64_t len;           /* definite length */
        uint64_t end;           /* offset just past the content (definite) */
        uint8_t hdr[10];
        size_t hdr_len;
};

#define ID_CONS 0x20
#define ID_EOC 0x00

static int ber_fail(struct ber *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int ber_fail(struct ber *b, const char *fmt, ...)
{
        va_list ap;

        if (b->err[0])
                return -EBADMSG;        /* keep the first, most precise reason */
        va_start(ap, fmt);
        vsnprintf(b->err, b->errsz, fmt, ap);
        va_end(ap);
        return -EBADMSG;
}

static int ber_fill(struct ber *b)
{
        ssize_t k;

        if (b->pos < b->len)
                return 1;
        k = src_read(b->src, b->buf, sizeof(b->buf));
        if (k < 0) {
                b->io = (int)k;
                return (int)k;
        }
        b->pos = 0;
        b->len = (size_t)k;
        return k > 0;
}

static int ber_read(struct ber *b, uint8_t *p, size_t n)
{
        while (n > 0) {
                int r = ber_fill(b);
                size_t k;

                if (r < 0)
                        return r;
                if (r == 0)
                        return ber_fail(b, "the message ends early, at byte %llu (truncated?)",
                                        (unsigned long long)b->off);
                k = b->len - b->pos < n ? b->len - b->pos : n;
                if (p) {
                        memcpy(p, b->buf + b->pos, k);
                        p += k;
                }
                b->pos += k;
                b->off += k;
                n -= k;
        }
        return 0;
}

/* Up to n bytes of content, straight from the source when the buffer is
 * empty (large ciphertext chunks skip a copy). */
static ssize_t ber_read_some(struct ber *b, uint8_t *p, size_t n)
{
        size_t k;
        int r;

        if (b->pos == b->len && n >= sizeof(b->buf) && !b->src->b64) {
                ssize_t got = src_read(b->src, p, n);

                if (got < 0) {
                        b->io = (int)got;
                        return got;
                }
                if (got == 0)
                        return ber_fail(b, "the message ends early, at byte %llu (truncated?)", (unsigned long long)b->off);
                b->off += (uint64_t)got;
                return got;
        }
        r = ber_fill(b);
        if (r < 0)
                return r;
        if (r == 0)
                return ber_fail(b, "the message ends early, at byte %llu (truncated?)", (unsigned long long)b->off);
        k = b->len - b->pos < n ? b->len - b->pos : n;
        memcpy(p, b->buf + b->pos, k);
        b->pos += k;
        b->off += k;
        return (ssize_t)k;
}

static int ber_hdr(struct ber *b, struct tlv *t)
{
        uint8_t c;
        int r;

        memset(t, 0, sizeof(*t));
        if ((r = ber_read(b, &c, 1)) < 0)
                return r;
        t->id = c;
        t->hdr[t->hdr_len++] = c;
        if ((c & 0x1f) == 0x1f)
                return ber_fail(b, "unexpected high-numbered tag at byte %llu", (unsigned long long)b->off - 1);
        if ((r = ber_read(b, &c, 1)) < 0)
                return r;
        t->hdr[t->hdr_len++] = c;
        if (c == 0x80) {
                if (!(t->id & ID_CONS))
                        return ber_fail(b, "indefinite length on a primitive element at byte %llu",
                                        (unsigned long long)b->off - 2);
                t->indef = true;
        } else if (c & 0x80) {
                unsigned n = c & 0x7f;

                if (n > 8)
                        return ber_fail(b, "length of %u bytes at byte %llu", n, (unsigned long long)b->off - 1);
                for (unsigned i = 0; i < n; i++) {
                        if ((r = ber_read(b, &c, 1)) < 0)
                                return r;
                        t->hdr[t->hdr_len++] = c;
                        if (t->len >> 55)
                                return ber_fail(b, "length out of range at byte %llu", (unsigned long long)b->off);
                        t->len = t->len << 8 | c;
                }
        } else {
                t->len = c;
        }
        t->end = b->off + t->len;
        if (t->id == ID_EOC && (t->indef || t->len != 0))
                return ber_fail(b, "malformed end-of-contents at byte %llu", (unsigned long long)b->off - t->hdr_len);
        return 0;
}

struct buf {
        uint8_t *p;
        size_t len, cap, max;
};

static int buf_add(struct buf *d, const uint8_t *p, size_t n)
{
        if (!d)
                return 0;
        if (n > d->max - d->len)
                return -E2BIG;
        if (d->len + n > d->cap) {
                size_t cap = d->cap ? d->cap : 4096;
                uint8_t *q;

                while (cap < d->len + n)
                        cap *= 2;
                if (cap > d->max)
                        cap = d->max;
                q = realloc(d->p, cap);
                if (!q)
                        return -ENOMEM;
                d->p = q;
                d->cap = cap;
        }
        if (p)
                memcpy(d->p + d->len, p, n);
        d->len += n;
        return 0;
}

/* The content of an element whose header was read, appended to d (or
 * skipped when d is NULL), nested indefinite lengths included. */
static int ber_capture_content(struct ber *b, const struct tlv *t, struct buf *d, int depth)
{
        int r;

        if (depth > BER_MAX_DEPTH)
                return ber_fail(b, "elements nested too deeply at byte %llu", (unsigned long long)b->off);
        if (!t->indef) {
                uint64_t left = t->len;

                while (left > 0) {
                        uint8_t tmp[4096];
                        size_t k = left < sizeof(tmp) ? (size_t)left : sizeof(tmp);

                        if ((r = ber_read(b, tmp, k)) < 0)
                                return r;
                        if ((r = buf_add(d, tmp, k)) < 0)
                                return r;
                        left -= k;
                }
                return 0;
        }
        for (;;) {
                struct tlv c;

                if ((r = ber_hdr(b, &c)) < 0)
                        return r;
                if ((r = buf_add(d, c.hdr, c.hdr_len)) < 0)
                        return r;
                if (c.id == ID_EOC)
                        return 0;
                if ((r = ber_capture_content(b, &c, d, depth + 1)) < 0)
                        return r;
        }
}

static int ber_capture(struct ber *b, const struct tlv *t, struct buf *d)
{
        int r = buf_add(d, t->hdr, t->hdr_len);

        return r < 0 ? r : ber_capture_content(b, t, d, 0);
}

/* The end of a constructed element: EOC for indefinite lengths, the exact
 * offset for definite ones. */
static int ber_close(struct ber *b, const struct tlv *t, const char *what)
{
        if (t->indef) {
                struct tlv e;
                int r = ber_hdr(b, &e);

                if (r < 0)
                        return r;
                if (e.id != ID_EOC)
                        return ber_fail(b, "unexpected element 0x%02x at the end of the %s (byte %llu)", e.id, what,
                                        (unsigned long long)b->off - e.hdr_len);
                return 0;
        }
        if (b->off != t->end)
                return ber_fail(b, "the %s ends at byte %llu but its length says %llu", what,
                                (unsigned long long)b->off, (unsigned long long)t->end);
        return 0;
}

/* True when a constructed element has no more children: peeks at an EOC
 * (consuming it) for indefinite lengths. */
static int ber_at_end(struct ber *b, const struct tlv *t, struct tlv *next, bool *at_end)
{
        int r;

        if (!t->indef) {
                *at_end = b->off >= t->end;
                if (*at_end)
                        return 0;
                return ber_hdr(b, next);
        }
        if ((r = ber_hdr(b, next)) < 0)
                return r;
        *at_end = next->id == ID_EOC;
        return 0;
}

/* ---- DER output for the re-encoded header ------------------------------------ */

static size_t der_len_size(size_t n)
{
        size_t s = 1;

        if (n >= 0x80)
                for (size_t v = n; v; v >>= 8)
                        s++;
        return s;
}

static uint8_t *der_put_hdr(uint8_t *p, uint8_t id, size_t n)
{
        *p++ = id;
        if (n < 0x80) {
                *p++ = (uint8_t)n;
                return p;
        }
        size_t k = der_len_size(n) - 1;
        *p++ = (uint8_t)(0x80 | k);
        for (size_t i = k; i > 0; i--)
                *p++ = (uint8_t)(n >> (8 * (i - 1)));
        return p;
}

/* ---- The request ------------------------------------------------------------- */

static const uint8_t OID_ENVELOPED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03 };
static const uint8_t OID_AUTH_ENVELOPED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x10, 0x01, 0x17 };
static const uint8_t OID_SIGNED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02 };
static const uint8_t OID_ENCRYPTED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x06 };
static const uint8_t OID_COMPRESSED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x10, 0x01, 0x09 };

struct dec {
        struct conn *c;
        struct stream st;
        struct src src;
        struct ber ber;
        char why[1024];         /* parse or decode failure */
        char *key;              /* selector from the request */
        enum in_format format;
        bool auth;              /* AuthEnvelopedData */
        struct tlv ci, explicit0, env, eci, content;
        struct buf version, originator, rinfos, ctype, calg;
        bool has_originator;
        CMS_ContentInfo *cms;
        struct identity_set *set;
        const struct identity *used;
        char transport[96];
        char cipher[48];
        BIO *cbio;              /* OpenSSL's cipher BIO; we drive its context */
        EVP_CIPHER_CTX *cctx;
        uint8_t *in, *out;
};

static void openssl_error(char *buf, size_t n)
{
        unsigned long e = ERR_peek_last_error();
        const char *data = NULL;
        int flags = 0;

        ERR_peek_last_error_data(&data, &flags);
        if (e == 0)
                snprintf(buf, n, "unknown OpenSSL error");
        else if (data && (flags & ERR_TXT_STRING) && *data)
                snprintf(buf, n, "%s (%s)", ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "error", data);
        else
                ERR_error_string_n(e, buf, n);
        ERR_clear_error();
}

static int parse_opts(struct dec *d)
{
        struct conn *c = d->c;
        char *s = NULL;
        int r;

        d->format = IN_AUTO;
        if (proto_get_string(c->frame.body, c->frame.len, PT_KEY, &d->key) == -ENOMEM)
                return -ENOMEM;
        if (proto_get_string(c->frame.body, c->frame.len, PT_FORMAT, &s) == 0) {
                if (strcmp(s, "der") == 0)
                        d->format = IN_DER;
                else if (strcmp(s, "pem") == 0)
                        d->format = IN_PEM;
                else if (strcmp(s, "smime") == 0)
                        d->format = IN_SMIME;
                else if (strcmp(s, "auto") != 0) {
                        r = conn_error(c, PE_UNSUPPORTED, "unknown input format '%s'; use der, pem, smime or leave it out", s);
                        free(s);
                        return r < 0 ? r : 1;
                }
                free(s);
        }
        return 0;
}

/* A transport failure or a client that broke the protocol mid-stream. */
static int stream_failure(struct dec *d)
{
        struct stream *st = &d->st;

        if (st->err == -EPROTO || st->err == -EMSGSIZE) {
                conn_error(d->c, st->err == -EMSGSIZE ? PE_TOO_LARGE : PE_PROTOCOL,
                           st->err == -EMSGSIZE ? "a frame or DATA chunk is over the protocol limit"
                                                : "expected DATA or END during the content stream");
                return -1;
        }
        log_info("connection from pid %d closed during the content stream", (int)d->c->pid);
        return -1;
}

/* Answers a failure of the input side: the stream, the base64 or the BER. */
static int input_failure(struct dec *d, int r, const char *stage)
{
        if (d->st.err)
                return stream_failure(d);
        if (r == -E2BIG)
                r = conn_error(d->c, PE_TOO_LARGE, "the message's recipient information is over %u MiB; "
                               "this agent does not read such messages", DECRYPT_MAX_HEADER >> 20);
        else if (r == -ENOMEM)
                r = conn_error(d->c, PE_INTERNAL, "out of memory while reading the message");
        else
                r = conn_error(d->c, PE_BAD_INPUT, "%s: %s", stage, d->why[0] ? d->why : "malformed input");
        return r < 0 ? -1 : 1;
}

/* ---- S/MIME header block -------------------------------------------------------- */

/* Finds parameter `name` in a Content-Type value; copies it lowercased. */
static bool mime_param(const char *value, const char *name, char *out, size_t n)
{
        size_t nl = strlen(name);
        const char *p = value;

        while ((p = strchr(p, ';'))) {
                p++;
                while (*p == ' ' || *p == '\t')
                        p++;
                if (strncasecmp(p, name, nl) == 0) {
                        const char *v = p + nl;
                        size_t o = 0;

                        while (*v == ' ' || *v == '\t')
                                v++;
                        if (*v != '=')
                                continue;
                        v++;
                        while (*v == ' ' || *v == '\t')
                                v++;
                        bool quoted = *v == '"';
                        if (quoted)
                                v++;
                        while (*v && o + 1 < n && (quoted ? *v != '"' : (*v != ';' && *v != ' ' && *v != '\t')))
                                out[o++] = (char)tolower((unsigned char)*v++);
                        out[o] = '\0';
                        return true;
                }
        }
        return false;
}

/* Reads the header block of an S/MIME entity and checks it is an encrypted
 * one; leaves the stream at the body. Returns 0, 1 (answered), or <0. */
static int read_mime_header(struct dec *d)
{
        char line[8192], ctype[2048] = "", cte[128] = "";
        char *field = NULL;     /* which value continuation lines extend */
        size_t total = 0;
        bool any = false;
        int r;

        for (;;) {
                ssize_t k = stream_gets(&d->st, line, sizeof(line));
                size_t len;

                if (k < 0)
                        return stream_failure(d);
                if (k == 0)
                        break;
                total += (size_t)k;
                if (total > DECRYPT_MAX_MIME_HEADER) {
                        r = conn_error(d->c, PE_BAD_INPUT, "the S/MIME header block is longer than %u KiB; "
                                       "is this a MIME message?", DECRYPT_MAX_MIME_HEADER / 1024);
                        return r < 0 ? -1 : 1;
                }
                len = (size_t)k;
                bool complete = line[len - 1] == '\n';
                while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
                        line[--len] = '\0';
                if (len == 0 && complete)
                        break;  /* the blank line */
                if (line[0] == ' ' || line[0] == '\t') {
                        if (field && strlen(field) + len + 1 < (field == ctype ? sizeof(ctype) : sizeof(cte)))
                                strcat(field, line);
                        continue;
                }
                char *colon = strchr(line, ':');
                if (!colon) {
                        r = conn_error(d->c, PE_BAD_INPUT,
                                       "the input is neither DER, PEM nor a MIME entity (line \"%.60s\" is not a header "
                                       "field); give the encrypted message itself", line);
                        return r < 0 ? -1 : 1;
                }
                any = true;
                *colon = '\0';
                const char *v = colon + 1;
                while (*v == ' ' || *v == '\t')
                        v++;
                field = NULL;
                if (strcasecmp(line, "Content-Type") == 0) {
                        snprintf(ctype, sizeof(ctype), "%s", v);
                        field = ctype;
                } else if (strcasecmp(line, "Content-Transfer-Encoding") == 0) {
                        snprintf(cte, sizeof(cte), "%s", v);
                        field = cte;
                }
        }
        if (!any) {
                r = conn_error(d->c, PE_BAD_INPUT, "the input is empty; give an encrypted S/MIME message, or CMS in DER or PEM");
                return r < 0 ? -1 : 1;
        }

        char type[128] = "", smime_type[64] = "";
        size_t i = 0;
        while (ctype[i] && ctype[i] != ';' && ctype[i] != ' ' && ctype[i] != '\t' && i + 1 < sizeof(type)) {
                type[i] = (char)tolower((unsigned char)ctype[i]);
                i++;
        }
        type[i] = '\0';
        mime_param(ctype, "smime-type", smime_type, sizeof(smime_type));
        if (strcmp(type, "multipart/signed") == 0) {
                r = conn_error(d->c, PE_BAD_INPUT, "this message is signed (multipart/signed), not encrypted; "
                               "there is nothing to decrypt");
                return r < 0 ? -1 : 1;
        }
        if (strcmp(type, "application/pkcs7-mime") != 0 && strcmp(type, "application/x-pkcs7-mime") != 0) {
                r = conn_error(d->c, PE_BAD_INPUT,
                               "this is not an S/MIME encrypted message: its Content-Type is '%s', expected "
                               "application/pkcs7-mime; smime-type=enveloped-data", type[0] ? type : "(none, text/plain)");
                return r < 0 ? -1 : 1;
        }
        if (smime_type[0] && strcmp(smime_type, "enveloped-data") != 0 && strcmp(smime_type, "authenveloped-data") != 0) {
                r = conn_error(d->c, PE_BAD_INPUT, "this S/MIME message is smime-type=%s, not enveloped-data or "
                               "authEnveloped-data; %s", smime_type,
                               strcmp(smime_type, "signed-data") == 0 ? "it is signed, not encrypted"
                                                                      : "there is nothing to decrypt");
                return r < 0 ? -1 : 1;
        }
        for (char *p = cte; *p; p++)
                *p = (char)tolower((unsigned char)*p);
        for (size_t e = strlen(cte); e > 0 && (cte[e - 1] == ' ' || cte[e - 1] == '\t'); e--)
                cte[e - 1] = '\0';
        if (strcmp(cte, "base64") == 0) {
                d->src.b64 = true;
        } else if (cte[0] && strcmp(cte, "binary") != 0) {
                r = conn_error(d->c, PE_BAD_INPUT, "unsupported Content-Transfer-Encoding '%s' for an S/MIME message; "
                               "expected base64", cte);
                return r < 0 ? -1 : 1;
        } else if (!cte[0]) {
                /* Without a transfer encoding a 7bit body can only be base64. */
                d->src.b64 = true;
        }
        return 0;
}

/* Chooses DER, PEM or S/MIME from the first bytes and sets up the source. */
static int setup_input(struct dec *d)
{
        uint8_t head[64];
        size_t n = 0;
        int r;

        d->src.st = &d->st;
        d->src.err = d->why;
        d->src.errsz = sizeof(d->why);

        while (n < sizeof(head)) {
                ssize_t k = stream_read(&d->st, head + n, sizeof(head) - n);

                if (k < 0)
                        return stream_failure(d);
                if (k == 0)
                        break;
                n += (size_t)k;
        }
        if (n == 0) {
                r = conn_error(d->c, PE_BAD_INPUT, "the input is empty; give an encrypted S/MIME message, or CMS in DER or PEM");
                return r < 0 ? -1 : 1;
        }
        if (stream_unread(&d->st, head, n) < 0) {
                r = conn_error(d->c, PE_INTERNAL, "out of memory");
                return r < 0 ? -1 : 1;
        }
        if (d->format == IN_AUTO) {
                size_t i = 0;

                while (i < n && (head[i] == '\n' || head[i] == '\r' || head[i] == ' ' || head[i] == '\t'))
                        i++;
                if (head[0] == 0x30 && n > 1 && (head[1] & 0x80))
                        d->format = IN_DER;
                else if (n - i >= 11 && memcmp(head + i, "-----BEGIN ", 11) == 0)
                        d->format = IN_PEM;
                else
                        d->format = IN_SMIME;
        }
        switch (d->format) {
        case IN_DER:
                return 0;
        case IN_PEM:
                for (;;) {
                        char line[256];
                        ssize_t k = stream_gets(&d->st, line, sizeof(line));

                        if (k < 0)
                                return stream_failure(d);
                        if (k == 0) {
                                r = conn_error(d->c, PE_BAD_INPUT, "no -----BEGIN line in the PEM input");
                                return r < 0 ? -1 : 1;
                        }
                        if (strncmp(line, "-----BEGIN ", 11) == 0) {
                                if (!strstr(line, "CMS-----") && !strstr(line, "PKCS7-----")) {
                                        r = conn_error(d->c, PE_BAD_INPUT, "the PEM block is '%.*s', expected CMS or PKCS7",
                                                       (int)strcspn(line, "\r\n"), line);
                                        return r < 0 ? -1 : 1;
                                }
                                break;
                        }
                }
                d->src.b64 = true;
                d->src.pem = true;
                return 0;
        case IN_SMIME:
        default:
                return read_mime_header(d);
        }
}

/* ---- Parsing up to the ciphertext ------------------------------------------------ */

static int expect(struct ber *b, const struct tlv *t, uint8_t id, const char *what)
{
        if (t->id != id)
                return ber_fail(b, "expected %s at byte %llu, found element 0x%02x", what,
                                (unsigned long long)b->off - t->hdr_len, t->id);
        return 0;
}

static int parse_header(struct dec *d)
{
        struct ber *b = &d->ber;
        struct tlv t;
        uint8_t oid[32];
        int r;

        if ((r = ber_hdr(b, &d->ci)) < 0 || (r = expect(b, &d->ci, 0x30, "a CMS ContentInfo (SEQUENCE)")) < 0)
                return r;
        if ((r = ber_hdr(b, &t)) < 0 || (r = expect(b, &t, 0x06, "the content type (OBJECT IDENTIFIER)")) < 0)
                return r;
        if (t.len > sizeof(oid))
                return ber_fail(b, "content type identifier of %llu bytes", (unsigned long long)t.len);
        if ((r = ber_read(b, oid, (size_t)t.len)) < 0)
                return r;
#define OID_IS(o) (t.len == sizeof(o) && memcmp(oid, o, sizeof(o)) == 0)
        if (OID_IS(OID_ENVELOPED))
                d->auth = false;
        else if (OID_IS(OID_AUTH_ENVELOPED))
                d->auth = true;
        else if (OID_IS(OID_SIGNED))
                return ber_fail(b, "this message is signed (CMS SignedData), not encrypted; there is nothing to decrypt");
        else if (OID_IS(OID_ENCRYPTED))
                return ber_fail(b, "this is CMS EncryptedData (a symmetric key known in advance, no recipients); "
                                "only EnvelopedData and AuthEnvelopedData are decrypted with token keys");
        else if (OID_IS(OID_COMPRESSED))
                return ber_fail(b, "this is CMS CompressedData, not an encrypted message");
        else
                return ber_fail(b, "the CMS content type is not EnvelopedData or AuthEnvelopedData");
#undef OID_IS
        if ((r = ber_hdr(b, &d->explicit0)) < 0 || (r = expect(b, &d->explicit0, 0xa0, "the [0] content")) < 0)
                return r;
        if ((r = ber_hdr(b, &d->env)) < 0 ||
            (r = expect(b, &d->env, 0x30, d->auth ? "AuthEnvelopedData" : "EnvelopedData")) < 0)
                return r;
        if ((r = ber_hdr(b, &t)) < 0 || (r = expect(b, &t, 0x02, "the version (INTEGER)")) < 0 ||
            (r = ber_capture(b, &t, &d->version)) < 0)
                return r;
        if ((r = ber_hdr(b, &t)) < 0)
                return r;
        if (t.id == 0xa0) {
                d->has_originator = true;
                if ((r = ber_capture(b, &t, &d->originator)) < 0 || (r = ber_hdr(b, &t)) < 0)
                        return r;
        }
        if ((r = expect(b, &t, 0x31, "the recipientInfos (SET)")) < 0 || (r = ber_capture(b, &t, &d->rinfos)) < 0)
                return r;
        if ((r = ber_hdr(b, &d->eci)) < 0 || (r = expect(b, &d->eci, 0x30, "the EncryptedContentInfo")) < 0)
                return r;
        if ((r = ber_hdr(b, &t)) < 0 || (r = expect(b, &t, 0x06, "the encrypted content's type")) < 0 ||
            (r = ber_capture(b, &t, &d->ctype)) < 0)
                return r;
        if ((r = ber_hdr(b, &t)) < 0 || (r = expect(b, &t, 0x30, "the content encryption algorithm")) < 0 ||
            (r = ber_capture(b, &t, &d->calg)) < 0)
                return r;

        bool at_end;
        if ((r = ber_at_end(b, &d->eci, &d->content, &at_end)) < 0)
                return r;
        if (at_end)
                return ber_fail(b, "the encrypted content is not in the message (detached); "
                                "this agent decrypts messages that carry their content");
        if (d->content.id != 0x80 && d->content.id != 0xa0)
                return ber_fail(b, "expected the encrypted content ([0]) at byte %llu, found element 0x%02x",
                                (unsigned long long)b->off - d->content.hdr_len, d->content.id);
        return 0;
}

/* The header as a CMS ContentInfo without content, for OpenSSL to decode. */
static int build_cms(struct dec *d)
{
        const uint8_t *oid = d->auth ? OID_AUTH_ENVELOPED : OID_ENVELOPED;
        size_t oid_len = d->auth ? sizeof(OID_AUTH_ENVELOPED) : sizeof(OID_ENVELOPED);
        size_t eci = d->ctype.len + d->calg.len;
        size_t eci_tlv = 1 + der_len_size(eci) + eci;
        size_t env = d->version.len + d->originator.len + d->rinfos.len + eci_tlv + (d->auth ? 2 : 0);
        size_t env_tlv = 1 + der_len_size(env) + env;
        size_t ex_tlv = 1 + der_len_size(env_tlv) + env_tlv;
        size_t ci = 2 + oid_len + ex_tlv;
        size_t total = 1 + der_len_size(ci) + ci;
        uint8_t *der = malloc(total), *p = der;
        const unsigned char *q;

        if (!der)
                return -ENOMEM;
        p = der_put_hdr(p, 0x30, ci);
        p = der_put_hdr(p, 0x06, oid_len);
        memcpy(p, oid, oid_len);
        p += oid_len;
        p = der_put_hdr(p, 0xa0, env_tlv);
        p = der_put_hdr(p, 0x30, env);
        memcpy(p, d->version.p, d->version.len);
        p += d->version.len;
        if (d->originator.len) {
                memcpy(p, d->originator.p, d->originator.len);
                p += d->originator.len;
        }
        memcpy(p, d->rinfos.p, d->rinfos.len);
        p += d->rinfos.len;
        p = der_put_hdr(p, 0x30, eci);
        memcpy(p, d->ctype.p, d->ctype.len);
        p += d->ctype.len;
        memcpy(p, d->calg.p, d->calg.len);
        p += d->calg.len;
        if (d->auth) {
                /* The real MAC follows the ciphertext; set on the cipher
                 * context once it has been read. */
                *p++ = 0x04;
                *p++ = 0x00;
        }

        d->cms = CMS_ContentInfo_new_ex(NULL, KEYPROV_PROPQ);
        q = der;
        if (!d->cms || !d2i_CMS_ContentInfo(&d->cms, &q, (long)total)) {
                free(der);
                return -EBADMSG;
        }
        free(der);
        return 0;
}

/* ---- Recipients ---------------------------------------------------------------- */

static void hex(char *out, size_t n, const unsigned char *p, size_t len, char sep)
{
        size_t o = 0;

        out[0] = '\0';
        for (size_t i = 0; i < len && o + 4 < n; i++) {
                if (sep && i)
                        out[o++] = sep;
                o += (size_t)snprintf(out + o, n - o, "%02x", p[i]);
        }
}

static void describe_rid(char *out, size_t n, ASN1_OCTET_STRING *keyid, X509_NAME *issuer, ASN1_INTEGER *sno)
{
        if (keyid) {
                char h[3 * 64];

                hex(h, sizeof(h), ASN1_STRING_get0_data(keyid), (size_t)ASN1_STRING_length(keyid), ':');
                snprintf(out, n, "subject key identifier %s", h);
        } else if (issuer && sno) {
                char name[384] = "", serial[96] = "";
                BIGNUM *bn = ASN1_INTEGER_to_BN(sno, NULL);
                char *sh = bn ? BN_bn2hex(bn) : NULL;

                X509_NAME_oneline(issuer, name, sizeof(name));
                snprintf(serial, sizeof(serial), "%s", sh ? sh : "?");
                OPENSSL_free(sh);
                BN_free(bn);
                snprintf(out, n, "issuer %s, serial %s", name, serial);
        } else {
                snprintf(out, n, "an unnamed recipient");
        }
}

/* One line per recipient (per key for key agreement): how, and to whom. */
static char **list_recipients(STACK_OF(CMS_RecipientInfo) *ris, size_t *count)
{
        size_t cap = 16, n = 0;
        char **v = malloc(cap * sizeof(*v));

        for (int i = 0; v && i < sk_CMS_RecipientInfo_num(ris); i++) {
                CMS_RecipientInfo *ri = sk_CMS_RecipientInfo_value(ris, i);
                char line[600], id[512];
                ASN1_OCTET_STRING *keyid = NULL;
                X509_NAME *issuer = NULL;
                ASN1_INTEGER *sno = NULL;
                int type = CMS_RecipientInfo_type(ri);
                int nrek = 1;

                if (type == CMS_RECIPINFO_AGREE)
                        nrek = sk_CMS_RecipientEncryptedKey_num(CMS_RecipientInfo_kari_get0_reks(ri));
                for (int j = 0; j < nrek; j++) {
                        switch (type) {
                        case CMS_RECIPINFO_TRANS:
                                CMS_RecipientInfo_ktri_get0_signer_id(ri, &keyid, &issuer, &sno);
                                describe_rid(id, sizeof(id), keyid, issuer, sno);
                                snprintf(line, sizeof(line), "RSA key transport to %s", id);
                                break;
                        case CMS_RECIPINFO_AGREE: {
                                CMS_RecipientEncryptedKey *rek =
                                        sk_CMS_RecipientEncryptedKey_value(CMS_RecipientInfo_kari_get0_reks(ri), j);

                                CMS_RecipientEncryptedKey_get0_id(rek, &keyid, NULL, NULL, &issuer, &sno);
                                describe_rid(id, sizeof(id), keyid, issuer, sno);
                                snprintf(line, sizeof(line), "key agreement (ECDH) with %s", id);
                                break;
                        }
                        case CMS_RECIPINFO_KEK:
                                snprintf(line, sizeof(line), "a previously shared key (KEKRecipientInfo)");
                                break;
                        case CMS_RECIPINFO_PASS:
                                snprintf(line, sizeof(line), "a password (PasswordRecipientInfo)");
                                break;
                        default:
                                snprintf(line, sizeof(line), "an unknown kind of recipient");
                                break;
                        }
                        if (n == cap) {
                                char **w = realloc(v, 2 * cap * sizeof(*v));

                                if (!w)
                                        goto fail;
                                v = w;
                                cap *= 2;
                        }
                        if (!(v[n] = strdup(line)))
                                goto fail;
                        n++;
                }
        }
        *count = n;
        return v;
fail:
        while (n > 0)
                free(v[--n]);
        free(v);
        *count = 0;
        return NULL;
}

static void free_list(char **v, size_t n)
{
        while (n > 0)
                free(v[--n]);
        free(v);
}

/* The "you are not a recipient" answer: the sentence names the first
 * recipients, RECIPIENT fields carry all of them. */
static int answer_not_recipient(struct dec *d, const char *restriction)
{
        STACK_OF(CMS_RecipientInfo) *ris = CMS_get0_RecipientInfos(d->cms);
        size_t n = 0, o = 0;
        char **v = list_recipients(ris, &n);
        char msg[8192];
        struct proto_msg m;
        int r;

        o = (size_t)snprintf(msg, sizeof(msg), "%s: the message is encrypted for %zu recipient%s: ",
                             restriction ? restriction : "none of your tokens holds a key for this message", n,
                             n == 1 ? "" : "s");
        for (size_t i = 0; i < n && i < LIST_IN_MESSAGE && o < sizeof(msg); i++)
                o += (size_t)snprintf(msg + o, sizeof(msg) - o, "%s%s", i ? "; " : "", v[i]);
        if (n > LIST_IN_MESSAGE && o < sizeof(msg))
                o += (size_t)snprintf(msg + o, sizeof(msg) - o, "; and %zu more", n - LIST_IN_MESSAGE);
        if (o < sizeof(msg))
                snprintf(msg + o, sizeof(msg) - o, ". Insert the token holding one of these keys, or ask the sender "
                         "to encrypt to your current certificate");

        proto_msg_init(&m, PROTO_ERROR);
        proto_put_uint(&m, PT_CODE, PE_NOT_RECIPIENT);
        proto_put_string(&m, PT_MESSAGE, msg);
        for (size_t i = 0; i < n; i++)
                proto_put_string(&m, PT_RECIPIENT, v[i]);
        r = proto_msg_error(&m) ? conn_error(d->c, PE_NOT_RECIPIENT, "%s", msg) : proto_write_msg(d->c->fd, &m);
        proto_msg_free(&m);
        log_info("request from pid %d: NOT_RECIPIENT: %s", (int)d->c->pid, msg);
        free_list(v, n);
        return r < 0 ? -1 : 1;
}

static bool id_selected(const struct identity *id, const char *sel, struct token_uri *uri)
{
        if (!sel)
                return true;
        if (uri)
                return token_key_match_uri(id->tk, uri);
        for (size_t i = 0; i < id->n_emails; i++)
                if (strcasecmp(id->emails[i], sel) == 0)
                        return true;
        return false;
}

struct cand {
        CMS_RecipientInfo *ri;
        CMS_RecipientEncryptedKey *rek;         /* key agreement */
        const struct identity *id;
};

static size_t find_candidates(struct dec *d, struct token_uri *uri, struct cand **out)
{
        STACK_OF(CMS_RecipientInfo) *ris = CMS_get0_RecipientInfos(d->cms);
        struct cand *v = NULL;
        size_t n = 0, cap = 0;

        for (int i = 0; i < sk_CMS_RecipientInfo_num(ris); i++) {
                CMS_RecipientInfo *ri = sk_CMS_RecipientInfo_value(ris, i);
                int type = CMS_RecipientInfo_type(ri);
                STACK_OF(CMS_RecipientEncryptedKey) *reks = NULL;
                int nrek = 1;

                if (type == CMS_RECIPINFO_AGREE) {
                        reks = CMS_RecipientInfo_kari_get0_reks(ri);
                        nrek = sk_CMS_RecipientEncryptedKey_num(reks);
                } else if (type != CMS_RECIPINFO_TRANS) {
                        continue;
                }
                for (int j = 0; j < nrek; j++) {
                        CMS_RecipientEncryptedKey *rek = reks ? sk_CMS_RecipientEncryptedKey_value(reks, j) : NULL;

                        for (size_t k = 0; k < d->set->n; k++) {
                                const struct identity *id = &d->set->ids[k];
                                int cmp;

                                if (!id->cert || !id_selected(id, d->key, uri))
                                        continue;
                                cmp = rek ? CMS_RecipientEncryptedKey_cert_cmp(rek, id->cert)
                                          : CMS_RecipientInfo_ktri_cert_cmp(ri, id->cert);
                                if (cmp != 0)
                                        continue;
                                if (n == cap) {
                                        struct cand *w = realloc(v, (cap ? 2 * cap : 4) * sizeof(*v));

                                        if (!w) {
                                                free(v);
                                                *out = NULL;
                                                return 0;
                                        }
                                        v = w;
                                        cap = cap ? 2 * cap : 4;
                                }
                                v[n++] = (struct cand){ ri, rek, id };
                        }
                }
        }
        ERR_clear_error();
        *out = v;
        return n;
}

static void note(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(char *buf, size_t n, const char *fmt, ...)
{
        size_t o = strlen(buf);
        va_list ap;

        if (o + 3 >= n)
                return;
        if (o) {
                memcpy(buf + o, "; ", 3);
                o += 2;
        }
        va_start(ap, fmt);
        vsnprintf(buf + o, n - o, fmt, ap);
        va_end(ap);
}

static void describe_transport(struct dec *d, const struct cand *c)
{
        X509_ALGOR *alg = NULL;
        const ASN1_OBJECT *obj = NULL;
        char name[80] = "?";

        if (c->rek)
                CMS_RecipientInfo_kari_get0_alg(c->ri, &alg, NULL);
        else
                CMS_RecipientInfo_ktri_get0_algs(c->ri, NULL, NULL, &alg);
        if (alg) {
                X509_ALGOR_get0(&obj, NULL, NULL, alg);
                OBJ_obj2txt(name, sizeof(name), obj, 0);
        }
        if (!c->rek && OBJ_obj2nid(obj) == NID_rsaEncryption)
                snprintf(d->transport, sizeof(d->transport), "rsa-pkcs1-v1.5");
        else if (!c->rek && OBJ_obj2nid(obj) == NID_rsaesOaep)
                snprintf(d->transport, sizeof(d->transport), "rsa-oaep");
        else
                snprintf(d->transport, sizeof(d->transport), "%s", name);
}

/* Recovers the content key through one candidate. 0 on success; otherwise
 * the reason is appended to why. */
static int try_candidate(struct dec *d, const struct cand *c, char *why, size_t n)
{
        const struct identity *id = c->id;
        EVP_PKEY *pkey = keyprov_pkey_new(id->tk, id->pub, false);
        int ok;

        if (!pkey) {
                note(why, n, "cannot use key '%s' (%s)", id->tk->label, id->key_type);
                return -1;
        }
        keyprov_clear_error();
        ERR_clear_error();
        if (c->rek) {
                ok = CMS_RecipientInfo_kari_set0_pkey_and_peer(c->ri, pkey, NULL) > 0 &&
                     CMS_RecipientInfo_kari_decrypt(d->cms, c->ri, c->rek) > 0;
                CMS_RecipientInfo_kari_set0_pkey_and_peer(c->ri, NULL, NULL);
                EVP_PKEY_free(pkey);
        } else {
                /* The RecipientInfo takes the key and frees it when it gets the next. */
                ok = CMS_RecipientInfo_set0_pkey(c->ri, pkey) > 0 && CMS_RecipientInfo_decrypt(d->cms, c->ri) > 0;
                CMS_RecipientInfo_set0_pkey(c->ri, NULL);
        }
        if (ok) {
                ERR_clear_error();
                describe_transport(d, c);
                return 0;
        }

        int terr = 0;
        const struct token_error *te = keyprov_last_error(&terr);
        if (te) {
                note(why, n, "key '%s' on token '%s' (%s): %s", id->tk->label, id->token_label, id->subject, te->message);
        } else {
                char msg[256];

                openssl_error(msg, sizeof(msg));
                note(why, n, "key '%s' on token '%s' (%s) could not recover the content key: %s", id->tk->label,
                     id->token_label, id->subject, msg);
        }
        return -1;
}

/* Finds a matching key, logs in as needed, and recovers the content key.
 * Returns 0, 1 (answered with an error), or <0 (connection lost). */
static int unlock_content_key(struct dec *d)
{
        struct agent *a = d->c->agent;
        struct token_uri *uri = NULL;
        struct token *logged[8];
        size_t n_logged = 0;
        char why[4096] = "";
        bool usage_only = true;
        int r = 1;

        if (d->key && strncmp(d->key, "pkcs11:", 7) == 0 && token_uri_parse(d->key, &uri) < 0) {
                r = conn_error(d->c, PE_UNSUPPORTED, "'%s' is not a valid PKCS#11 URI (RFC 7512)", d->key);
                return r < 0 ? -1 : 1;
        }

        for (int attempt = 0; attempt < 4; attempt++) {
                struct cand *cands = NULL;
                size_t nc;
                bool relogged = false;

                identity_set_unref(d->set);
                d->set = identity_set_get(a->store, a->cfg.default_key);
                if (!d->set) {
                        r = conn_error(d->c, PE_INTERNAL, "cannot read the keys of the tokens (out of memory?)");
                        r = r < 0 ? -1 : 1;
                        goto out;
                }
                nc = find_candidates(d, uri, &cands);
                if (nc == 0) {
                        char restriction[600];

                        if (d->key) {
                                snprintf(restriction, sizeof(restriction),
                                         "no key matching '%s' is a recipient of this message", d->key);
                        }
                        r = answer_not_recipient(d, d->key ? restriction : NULL);
                        free(cands);
                        goto out;
                }
                why[0] = '\0';
                usage_only = true;
                /* Keys usable without a PIN first: a logged-in token beats a prompt. */
                for (int pass = 0; pass < 2 && !relogged; pass++) {
                        for (size_t i = 0; i < nc; i++) {
                                const struct identity *id = cands[i].id;
                                struct token *t = id->tk->token;
                                bool needs = conn_needs_login(d->c, id->tk, POLICY_DECRYPT);

                                if ((pass == 0) == needs)
                                        continue;
                                if (!(cands[i].rek ? id->usage_agree : id->usage_encipher)) {
                                        note(why, sizeof(why), "certificate '%s' on token '%s' does not allow %s "
                                             "(keyUsage, or an extendedKeyUsage without emailProtection), so its "
                                             "key is not used to decrypt", id->subject,
                                             id->token_label, cands[i].rek ? "keyAgreement" : "keyEncipherment");
                                        continue;
                                }
                                usage_only = false;
                                if (needs) {
                                        bool again = false;

                                        for (size_t j = 0; j < n_logged; j++)
                                                again |= logged[j] == t;
                                        if (again) {
                                                note(why, sizeof(why), "token '%s' was logged out again right after "
                                                     "the login", id->token_label);
                                                continue;
                                        }
                                        r = conn_login_key(d->c, id->tk, POLICY_DECRYPT);
                                        if (r != 0) {
                                                free(cands);
                                                r = r < 0 ? -1 : 1;
                                                goto out;
                                        }
                                        if (n_logged < sizeof(logged) / sizeof(logged[0]))
                                                logged[n_logged++] = t;
                                        relogged = true;        /* new snapshot: private keys now visible */
                                        break;
                                }
                                if (!id->tk->has_private) {
                                        note(why, sizeof(why), "certificate '%s' is on token '%s', but no private key "
                                             "with the same CKA_ID is visible", id->subject, id->token_label);
                                        continue;
                                }
                                if (cands[i].rek ? !token_key_can_decrypt(id->tk, TOKEN_DEC_ECDH)
                                                 : !(token_key_can_decrypt(id->tk, TOKEN_DEC_RSA_PKCS) ||
                                                     token_key_can_decrypt(id->tk, TOKEN_DEC_RSA_OAEP) ||
                                                     token_key_can_decrypt(id->tk, TOKEN_DEC_RSA_X509))) {
                                        note(why, sizeof(why), "key '%s' on token '%s' may not be used for %s "
                                             "(its %s attribute is false, or the token lacks %s)", id->tk->label,
                                             id->token_label, cands[i].rek ? "key agreement" : "decryption",
                                             cands[i].rek ? "CKA_DERIVE" : "CKA_DECRYPT",
                                             cands[i].rek ? "CKM_ECDH1_DERIVE" : "CKM_RSA_PKCS");
                                        continue;
                                }
                                if (id->tk->always_authenticate) {
                                        note(why, sizeof(why), "key '%s' on token '%s' needs its PIN for every use "
                                             "(CKA_ALWAYS_AUTHENTICATE), which this agent version cannot do yet",
                                             id->tk->label, id->token_label);
                                        continue;
                                }
                                if (try_candidate(d, &cands[i], why, sizeof(why)) == 0) {
                                        d->used = id;
                                        free(cands);
                                        r = 0;
                                        goto out;
                                }
                        }
                }
                free(cands);
                if (!relogged)
                        break;
        }
        r = conn_error(d->c, usage_only ? PE_KEY_USAGE : PE_DECRYPT_FAILED, "cannot decrypt: %s",
                       why[0] ? why : "no usable key");
        r = r < 0 ? -1 : 1;
out:
        token_uri_free(uri);
        return r;
}

/* ---- Content ------------------------------------------------------------------------ */

static int feed(struct dec *d, const uint8_t *p, size_t n)
{
        int outl = 0;

        if (!EVP_DecryptUpdate(d->cctx, d->out, &outl, p, (int)n))
                return -EIO;
        return outl > 0 ? stream_write(&d->st, d->out, (size_t)outl) : 0;
}

static int stream_octets(struct dec *d, uint64_t len)
{
        while (len > 0) {
                size_t want = len < DECRYPT_CHUNK ? (size_t)len : DECRYPT_CHUNK;
                ssize_t k = ber_read_some(&d->ber, d->in, want);
                int r;

                if (k < 0)
                        return (int)k;
                if ((r = feed(d, d->in, (size_t)k)) < 0)
                        return r;
                len -= (uint64_t)k;
        }
        return 0;
}

/* The encrypted content: one primitive [0] or a constructed one made of
 * OCTET STRING segments (what streaming encoders write). */
static int stream_content(struct dec *d, const struct tlv *t, int depth)
{
        struct ber *b = &d->ber;

        if (!(t->id & ID_CONS))
                return stream_octets(d, t->len);
        if (depth > BER_MAX_DEPTH)
                return ber_fail(b, "encrypted content nested too deeply at byte %llu", (unsigned long long)b->off);
        for (;;) {
                struct tlv c;
                bool at_end;
                int r = ber_at_end(b, t, &c, &at_end);

                if (r < 0)
                        return r;
                if (at_end)
                        return 0;
                if (c.id == 0x04)
                        r = stream_octets(d, c.len);
                else if (c.id == 0x24)
                        r = stream_content(d, &c, depth + 1);
                else
                        r = ber_fail(b, "unexpected element 0x%02x inside the encrypted content at byte %llu", c.id,
                                     (unsigned long long)b->off - c.hdr_len);
                if (r < 0)
                        return r;
        }
}

/* After the content: the rest of the structure, the MAC of
 * AuthEnvelopedData. */
static int parse_trailer(struct dec *d, uint8_t *mac, size_t *mac_len)
{
        struct ber *b = &d->ber;
        struct tlv t;
        bool at_end;
        int r;

        if ((r = ber_close(b, &d->eci, "EncryptedContentInfo")) < 0)
                return r;
        if ((r = ber_at_end(b, &d->env, &t, &at_end)) < 0)
                return r;
        if (!d->auth) {
                if (!at_end) {
                        if (t.id != 0xa1)
                                return ber_fail(b, "unexpected element 0x%02x after the encrypted content", t.id);
                        /* unprotectedAttrs: nothing we act on. */
                        if ((r = ber_capture_content(b, &t, NULL, 0)) < 0 || (r = ber_close(b, &d->env, "EnvelopedData")) < 0)
                                return r;
                }
        } else {
                if (at_end)
                        return ber_fail(b, "the AuthEnvelopedData has no MAC (truncated?)");
                if (t.id == 0xa1)
                        return ber_fail(b, "the message has authenticated attributes, which this agent cannot check; "
                                        "its content is not accepted");
                if (t.id != 0x04)
                        return ber_fail(b, "expected the MAC (OCTET STRING) after the encrypted content, found 0x%02x",
                                        t.id);
                if (t.len < 4 || t.len > 16)
                        return ber_fail(b, "MAC of %llu bytes; AES-GCM tags have 4 to 16", (unsigned long long)t.len);
                if ((r = ber_read(b, mac, (size_t)t.len)) < 0)
                        return r;
                *mac_len = (size_t)t.len;
                if ((r = ber_at_end(b, &d->env, &t, &at_end)) < 0)
                        return r;
                if (!at_end) {
                        if (t.id != 0xa2)
                                return ber_fail(b, "unexpected element 0x%02x after the MAC", t.id);
                        if ((r = ber_capture_content(b, &t, NULL, 0)) < 0 ||
                            (r = ber_close(b, &d->env, "AuthEnvelopedData")) < 0)
                                return r;
                }
        }
        if ((r = ber_close(b, &d->explicit0, "[0] content")) < 0 || (r = ber_close(b, &d->ci, "ContentInfo")) < 0)
                return r;
        return 0;
}

/* Input after the message (a trailing newline, a MIME epilogue) is read
 * and ignored so that the client's END arrives in order. */
static int drain(struct dec *d)
{
        for (;;) {
                ssize_t k = stream_read(&d->st, d->in, DECRYPT_CHUNK);

                if (k <= 0)
                        return (int)k;
        }
}

static void lower(char *s)
{
        for (; *s; s++)
                *s = (char)tolower((unsigned char)*s);
}

int decrypt_serve(struct conn *c)
{
        struct dec *d = calloc(1, sizeof(*d));
        uint8_t mac[16];
        size_t mac_len = 0;
        int outl = 0, r;

        if (!d)
                return conn_error(c, PE_INTERNAL, "out of memory") < 0 ? -1 : 0;
        d->c = c;
        stream_init(&d->st, c->fd);
        d->ber.src = &d->src;
        d->ber.err = d->why;
        d->ber.errsz = sizeof(d->why);
        d->version.max = d->originator.max = d->rinfos.max = d->ctype.max = d->calg.max = DECRYPT_MAX_HEADER;
        d->in = malloc(DECRYPT_CHUNK);
        d->out = malloc(DECRYPT_CHUNK + EVP_MAX_BLOCK_LENGTH);
        if (!d->in || !d->out) {
                r = conn_error(c, PE_INTERNAL, "out of memory");
                goto done;
        }

        r = parse_opts(d);
        if (r != 0)
                goto done;
        {
                struct proto_msg m;

                proto_msg_init(&m, PROTO_READY);
                r = proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
                if (r < 0)
                        goto done;
        }

        r = setup_input(d);
        if (r != 0)
                goto done;
        r = parse_header(d);
        if (r < 0) {
                r = input_failure(d, r, "cannot read the encrypted message");
                goto done;
        }
        r = build_cms(d);
        if (r < 0) {
                char msg[256];

                openssl_error(msg, sizeof(msg));
                r = conn_error(c, PE_BAD_INPUT, "cannot read the message's recipient information: %s", msg);
                goto done;
        }

        r = unlock_content_key(d);
        if (r != 0)
                goto done;

        d->cbio = CMS_dataInit(d->cms, NULL);
        if (!d->cbio) {
                /* Without content OpenSSL gives a null BIO as the source;
                 * older versions want one passed in. */
                BIO *null = BIO_new(BIO_s_null());

                d->cbio = null ? CMS_dataInit(d->cms, null) : NULL;
                if (!d->cbio)
                        BIO_free(null);
        }
        BIO *cb = d->cbio ? BIO_find_type(d->cbio, BIO_TYPE_CIPHER) : NULL;
        if (!cb || BIO_get_cipher_ctx(cb, &d->cctx) <= 0 || !d->cctx) {
                char msg[256];

                openssl_error(msg, sizeof(msg));
                r = conn_error(c, PE_UNSUPPORTED, "cannot set up the content cipher of the message: %s", msg);
                goto done;
        }
        snprintf(d->cipher, sizeof(d->cipher), "%s", EVP_CIPHER_get0_name(EVP_CIPHER_CTX_get0_cipher(d->cctx)));
        lower(d->cipher);

        r = stream_content(d, &d->content, 0);
        if (r == -EIO && !d->st.err) {
                r = conn_error(c, PE_INTERNAL, "the content cipher failed");
                goto done;
        }
        if (r == 0)
                r = parse_trailer(d, mac, &mac_len);
        if (r < 0) {
                r = input_failure(d, r, "the encrypted message is damaged; discard what was written so far");
                goto done;
        }
        if (drain(d) < 0) {
                r = stream_failure(d);
                goto done;
        }
        if (d->auth && EVP_CIPHER_CTX_ctrl(d->cctx, EVP_CTRL_AEAD_SET_TAG, (int)mac_len, mac) <= 0) {
                r = conn_error(c, PE_INTEGRITY, "the message's MAC does not fit its cipher %s; discard the output", d->cipher);
                goto done;
        }
        if (EVP_DecryptFinal_ex(d->cctx, d->out, &outl) <= 0) {
                ERR_clear_error();
                r = conn_error(c, PE_INTEGRITY, d->auth ? "the content failed authentication (%s tag mismatch): the message "
                                                          "was altered or damaged; discard the output"
                                                        : "the content does not decrypt to valid padding (%s): the message "
                                                          "is damaged or the content key is wrong; discard the output",
                               d->cipher);
                goto done;
        }
        if ((outl > 0 && stream_write(&d->st, d->out, (size_t)outl) < 0) || stream_flush(&d->st) < 0) {
                r = stream_failure(d);
                goto done;
        }
        {
                struct proto_msg m;

                proto_msg_init(&m, PROTO_DONE);
                proto_put_uint(&m, PT_BYTES_IN, d->st.bytes_in);
                proto_put_uint(&m, PT_BYTES_OUT, d->st.bytes_out);
                proto_put_string(&m, PT_URI, d->used->tk->uri);
                proto_put_string(&m, PT_SUBJECT, d->used->subject);
                proto_put_string(&m, PT_CIPHER, d->cipher);
                proto_put_string(&m, PT_KEY_TRANSPORT, d->transport);
                proto_put_uint(&m, PT_AUTHENTICATED, d->auth);
                r = proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
        }
        log_info("decrypted %llu bytes for uid %u pid %d with %s (%s, %s, %s)", (unsigned long long)d->st.bytes_out,
                 (unsigned)c->uid, (int)c->pid, d->used->tk->uri, d->used->subject, d->transport, d->cipher);
done:
        BIO_free_all(d->cbio);
        CMS_ContentInfo_free(d->cms);
        identity_set_unref(d->set);
        free(d->key);
        free(d->version.p);
        free(d->originator.p);
        free(d->rinfos.p);
        free(d->ctype.p);
        free(d->calg.p);
        free(d->in);
        if (d->out)
                OPENSSL_clear_free(d->out, DECRYPT_CHUNK + EVP_MAX_BLOCK_LENGTH);
        stream_done(&d->st);
        free(d);
        return r < 0 ? -1 : 0;
}
