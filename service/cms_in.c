/* cms_in.c — the encrypted message as it streams in (cms_in.h). */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/cms.h>
#include <openssl/err.h>

#include "cms_in.h"

#define BER_MAX_DEPTH 16

static int cms_fail(struct cms_in *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int cms_fail(struct cms_in *p, const char *fmt, ...)
{
        va_list ap;

        if (p->why[0])
                return -EBADMSG;        /* the first reason is the precise one */
        va_start(ap, fmt);
        vsnprintf(p->why, sizeof(p->why), fmt, ap);
        va_end(ap);
        return -EBADMSG;
}

/* ---- Input: raw bytes or base64 ------------------------------------------ */


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
static ssize_t src_read_b64(struct cms_in_src *s, uint8_t *out, size_t n)
{
        size_t got = 0;

        while (got + 3 <= n && !s->end) {
                if (s->tpos == s->tlen) {
                        ssize_t k = s->io->gets(s->io->ctx, s->text, sizeof(s->text));

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
static ssize_t src_read(struct cms_in_src *s, uint8_t *out, size_t n)
{
        if (!s->b64)
                return s->io->read(s->io->ctx, out, n);
        if (n < 3)
                return -EINVAL;
        return src_read_b64(s, out, n);
}

/* ---- A streaming BER reader --------------------------------------------------- */



#define ID_CONS 0x20
#define ID_EOC 0x00

static int ber_fail(struct cms_in_ber *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int ber_fail(struct cms_in_ber *b, const char *fmt, ...)
{
        va_list ap;

        if (b->err[0])
                return -EBADMSG;        /* keep the first, most precise reason */
        va_start(ap, fmt);
        vsnprintf(b->err, b->errsz, fmt, ap);
        va_end(ap);
        return -EBADMSG;
}

static int ber_fill(struct cms_in_ber *b)
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

static int ber_read(struct cms_in_ber *b, uint8_t *p, size_t n)
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
static ssize_t ber_read_some(struct cms_in_ber *b, uint8_t *p, size_t n)
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

static int ber_hdr(struct cms_in_ber *b, struct cms_in_tlv *t)
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


static int buf_add(struct cms_in_buf *d, const uint8_t *p, size_t n)
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
static int ber_capture_content(struct cms_in_ber *b, const struct cms_in_tlv *t, struct cms_in_buf *d, int depth)
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
                struct cms_in_tlv c;

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

static int ber_capture(struct cms_in_ber *b, const struct cms_in_tlv *t, struct cms_in_buf *d)
{
        int r = buf_add(d, t->hdr, t->hdr_len);

        return r < 0 ? r : ber_capture_content(b, t, d, 0);
}

/* The end of a constructed element: EOC for indefinite lengths, the exact
 * offset for definite ones. */
static int ber_close(struct cms_in_ber *b, const struct cms_in_tlv *t, const char *what)
{
        if (t->indef) {
                struct cms_in_tlv e;
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
static int ber_at_end(struct cms_in_ber *b, const struct cms_in_tlv *t, struct cms_in_tlv *next, bool *at_end)
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

/* ---- What the message may be -------------------------------------------------- */

static const uint8_t OID_ENVELOPED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03 };
static const uint8_t OID_AUTH_ENVELOPED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x10, 0x01, 0x17 };
static const uint8_t OID_SIGNED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02 };
static const uint8_t OID_ENCRYPTED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x06 };
static const uint8_t OID_COMPRESSED[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x10, 0x01, 0x09 };

/* ---- S/MIME header block and input format ------------------------------------- */

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
static int read_mime_header(struct cms_in *d)
{
        char line[8192], ctype[2048] = "", cte[128] = "";
        char *field = NULL;     /* which value continuation lines extend */
        size_t total = 0;
        bool any = false;

        for (;;) {
                ssize_t k = d->io.gets(d->io.ctx, line, sizeof(line));
                size_t len;

                if (k < 0)
                        return (int)k;
                if (k == 0)
                        break;
                total += (size_t)k;
                if (total > CMS_IN_MAX_MIME_HEADER) {
                        return cms_fail(d, "the S/MIME header block is longer than %u KiB; "
                                       "is this a MIME message?", CMS_IN_MAX_MIME_HEADER / 1024);
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
                        return cms_fail(d, "the input is neither DER, PEM nor a MIME entity (line \"%.60s\" is not a header "
                                       "field); give the encrypted message itself", line);
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
                return cms_fail(d, "the input is empty; give an encrypted S/MIME message, or CMS in DER or PEM");
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
                return cms_fail(d, "this message is signed (multipart/signed), not encrypted; "
                               "there is nothing to decrypt");
        }
        if (strcmp(type, "application/pkcs7-mime") != 0 && strcmp(type, "application/x-pkcs7-mime") != 0) {
                return cms_fail(d, "this is not an S/MIME encrypted message: its Content-Type is '%s', expected "
                               "application/pkcs7-mime; smime-type=enveloped-data", type[0] ? type : "(none, text/plain)");
        }
        if (smime_type[0] && strcmp(smime_type, "enveloped-data") != 0 && strcmp(smime_type, "authenveloped-data") != 0) {
                return cms_fail(d, "this S/MIME message is smime-type=%s, not enveloped-data or "
                               "authEnveloped-data; %s", smime_type,
                               strcmp(smime_type, "signed-data") == 0 ? "it is signed, not encrypted"
                                                                      : "there is nothing to decrypt");
        }
        for (char *p = cte; *p; p++)
                *p = (char)tolower((unsigned char)*p);
        for (size_t e = strlen(cte); e > 0 && (cte[e - 1] == ' ' || cte[e - 1] == '\t'); e--)
                cte[e - 1] = '\0';
        if (strcmp(cte, "base64") == 0) {
                d->src.b64 = true;
        } else if (cte[0] && strcmp(cte, "binary") != 0) {
                return cms_fail(d, "unsupported Content-Transfer-Encoding '%s' for an S/MIME message; "
                               "expected base64", cte);
        } else if (!cte[0]) {
                /* Without a transfer encoding a 7bit body can only be base64. */
                d->src.b64 = true;
        }
        return 0;
}

/* Chooses DER, PEM or S/MIME from the first bytes and sets up the source. */
static int setup_input(struct cms_in *d)
{
        uint8_t head[64];
        size_t n = 0;

        d->src.io = &d->io;
        d->src.err = d->why;
        d->src.errsz = sizeof(d->why);

        while (n < sizeof(head)) {
                ssize_t k = d->io.read(d->io.ctx, head + n, sizeof(head) - n);

                if (k < 0)
                        return (int)k;
                if (k == 0)
                        break;
                n += (size_t)k;
        }
        if (n == 0) {
                return cms_fail(d, "the input is empty; give an encrypted S/MIME message, or CMS in DER or PEM");
        }
        if (d->io.unread(d->io.ctx, head, n) < 0) {
                return -ENOMEM;
        }
        if (d->format == CMS_IN_AUTO) {
                size_t i = 0;

                while (i < n && (head[i] == '\n' || head[i] == '\r' || head[i] == ' ' || head[i] == '\t'))
                        i++;
                if (head[0] == 0x30 && n > 1 && (head[1] & 0x80))
                        d->format = CMS_IN_DER;
                else if (n - i >= 11 && memcmp(head + i, "-----BEGIN ", 11) == 0)
                        d->format = CMS_IN_PEM;
                else
                        d->format = CMS_IN_SMIME;
        }
        switch (d->format) {
        case CMS_IN_DER:
                return 0;
        case CMS_IN_PEM:
                for (;;) {
                        char line[256];
                        ssize_t k = d->io.gets(d->io.ctx, line, sizeof(line));

                        if (k < 0)
                                return (int)k;
                        if (k == 0) {
                                return cms_fail(d, "no -----BEGIN line in the PEM input");
                                }
                        if (strncmp(line, "-----BEGIN ", 11) == 0) {
                                if (!strstr(line, "CMS-----") && !strstr(line, "PKCS7-----")) {
                                        return cms_fail(d, "the PEM block is '%.*s', expected CMS or PKCS7",
                                                       (int)strcspn(line, "\r\n"), line);
                                                }
                                break;
                        }
                }
                d->src.b64 = true;
                d->src.pem = true;
                return 0;
        case CMS_IN_SMIME:
        default:
                return read_mime_header(d);
        }
}

/* ---- Parsing up to the ciphertext ------------------------------------------------ */

static int expect(struct cms_in_ber *b, const struct cms_in_tlv *t, uint8_t id, const char *what)
{
        if (t->id != id)
                return ber_fail(b, "expected %s at byte %llu, found element 0x%02x", what,
                                (unsigned long long)b->off - t->hdr_len, t->id);
        return 0;
}

static int parse_header(struct cms_in *d)
{
        struct cms_in_ber *b = &d->ber;
        struct cms_in_tlv t;
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
static CMS_ContentInfo *build_cms(struct cms_in *d, const char *propq)
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
        CMS_ContentInfo *cms;

        if (!der)
                return NULL;
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

        cms = CMS_ContentInfo_new_ex(NULL, propq);
        q = der;
        if (cms && !d2i_CMS_ContentInfo(&cms, &q, (long)total))
                cms = NULL;     /* d2i freed it */
        free(der);
        return cms;
}

typedef int (*feed_fn)(void *ctx, const uint8_t *data, size_t n);

static int stream_octets(struct cms_in *d, uint64_t len, feed_fn feed, void *ctx)
{
        while (len > 0) {
                size_t want = len < CMS_IN_CHUNK ? (size_t)len : CMS_IN_CHUNK;
                ssize_t k = ber_read_some(&d->ber, d->chunk, want);
                int r;

                if (k < 0)
                        return (int)k;
                if ((r = feed(ctx, d->chunk, (size_t)k)) < 0)
                        return r;
                len -= (uint64_t)k;
        }
        return 0;
}

/* The encrypted content: one primitive [0] or a constructed one made of
 * OCTET STRING segments (what streaming encoders write). */
static int stream_content(struct cms_in *d, const struct cms_in_tlv *t, int depth, feed_fn feed, void *ctx)
{
        struct cms_in_ber *b = &d->ber;

        if (!(t->id & ID_CONS))
                return stream_octets(d, t->len, feed, ctx);
        if (depth > BER_MAX_DEPTH)
                return ber_fail(b, "encrypted content nested too deeply at byte %llu", (unsigned long long)b->off);
        for (;;) {
                struct cms_in_tlv c;
                bool at_end;
                int r = ber_at_end(b, t, &c, &at_end);

                if (r < 0)
                        return r;
                if (at_end)
                        return 0;
                if (c.id == 0x04)
                        r = stream_octets(d, c.len, feed, ctx);
                else if (c.id == 0x24)
                        r = stream_content(d, &c, depth + 1, feed, ctx);
                else
                        r = ber_fail(b, "unexpected element 0x%02x inside the encrypted content at byte %llu", c.id,
                                     (unsigned long long)b->off - c.hdr_len);
                if (r < 0)
                        return r;
        }
}

/* After the content: the rest of the structure, the MAC of
 * AuthEnvelopedData. */
static int parse_trailer(struct cms_in *d, uint8_t *mac, size_t *mac_len)
{
        struct cms_in_ber *b = &d->ber;
        struct cms_in_tlv t;
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

/* ---- The API ---------------------------------------------------------------------- */

int cms_in_init(struct cms_in *p, const struct cms_in_io *io)
{
        memset(p, 0, sizeof(*p));
        p->io = *io;
        p->src.io = &p->io;
        p->src.err = p->why;
        p->src.errsz = sizeof(p->why);
        p->ber.src = &p->src;
        p->ber.err = p->why;
        p->ber.errsz = sizeof(p->why);
        p->version.max = p->originator.max = p->rinfos.max = p->ctype.max = p->calg.max = CMS_IN_MAX_HEADER;
        p->chunk = malloc(CMS_IN_CHUNK);
        return p->chunk ? 0 : -ENOMEM;
}

void cms_in_done(struct cms_in *p)
{
        free(p->version.p);
        free(p->originator.p);
        free(p->rinfos.p);
        free(p->ctype.p);
        free(p->calg.p);
        free(p->chunk);
        memset(p, 0, sizeof(*p));
}

int cms_in_start(struct cms_in *p, enum cms_in_format format)
{
        p->format = format;
        return setup_input(p);
}

int cms_in_header(struct cms_in *p)
{
        int r = parse_header(p);

        return r < 0 && p->ber.io ? p->ber.io : r;
}

CMS_ContentInfo *cms_in_build(struct cms_in *p, const char *propq)
{
        return build_cms(p, propq);
}

int cms_in_content(struct cms_in *p, int (*feed)(void *ctx, const uint8_t *data, size_t n), void *ctx)
{
        int r = stream_content(p, &p->content, 0, feed, ctx);

        return r < 0 && p->ber.io ? p->ber.io : r;
}

int cms_in_trailer(struct cms_in *p, uint8_t mac[16], size_t *mac_len)
{
        int r = parse_trailer(p, mac, mac_len);

        return r < 0 && p->ber.io ? p->ber.io : r;
}
