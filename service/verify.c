/* verify.c — the VERIFY and IMPORT requests.
 *
 * VERIFY: the client streams a signed message (S/MIME multipart/signed or
 * application/pkcs7-mime, CMS DER or PEM; or, with SIGNATURE, the content
 * of a detached signature). The agent spools it to an unlinked temporary
 * file (memory stays at one chunk whatever the size of a clear-signed
 * message), checks every SignerInfo — signature, content digest, the
 * signer's chain to the trust anchors, validity now and at signing time,
 * key usage, the sender address — and answers with the verified content
 * (unless the signature is bad) and a DONE that names each problem.
 * Signers whose signature is intact are harvested into the address book
 * with their SMIMECapabilities.
 *
 * Opaque (application/pkcs7-mime) messages are parsed whole by OpenSSL, so
 * their content is held in memory once.
 *
 * IMPORT: certificates from a signed message, a PEM/DER certificate file
 * or a PKCS#7 bundle go into the address book.
 *
 * Must never: send content of a message whose signature is bad, or report
 * "good" when any check failed.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/pem.h>  /* before cms.h */
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509v3.h>

#include "agent.h"
#include "certs.h"
#include "certstore.h"
#include "log.h"
#include "stream.h"

#define MAX_HEADER (256u * 1024u)               /* a message's header block */
#define MAX_SIG_PART (16u * 1024u * 1024u)      /* the signature part of multipart/signed */
#define MAX_IN_MEMORY (256u * 1024u * 1024u)    /* PEM input and IMPORT, parsed whole */
#define MAX_HINT_CONTENT (8u * 1024u * 1024u)   /* gateway rewrite analysis works in memory */

/* ---- the spool ----------------------------------------------------------------- */

static int spool_open(void)
{
        const char *dir = getenv("TMPDIR");
        char path[4096];
        int fd;

        if (!dir || !*dir)
                dir = "/tmp";
        fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
        if (fd >= 0 || (errno != EOPNOTSUPP && errno != EISDIR && errno != ENOENT))
                return fd >= 0 ? fd : -errno;
        snprintf(path, sizeof(path), "%s/smime-agent-XXXXXX", dir);
        fd = mkostemp(path, O_CLOEXEC);
        if (fd < 0)
                return -errno;
        unlink(path);
        return fd;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
        while (n > 0) {
                ssize_t k = write(fd, p, n);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0)
                        return -errno;
                p += k;
                n -= (size_t)k;
        }
        return 0;
}

static ssize_t pread_all(int fd, void *buf, size_t n, off_t off)
{
        size_t got = 0;

        while (got < n) {
                ssize_t k = pread(fd, (uint8_t *)buf + got, n - got, off + (off_t)got);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0)
                        return -errno;
                if (k == 0)
                        break;
                got += (size_t)k;
        }
        return (ssize_t)got;
}

/* Reads the whole input stream into fd. Returns 0, or negative (a
 * protocol or socket failure: st->err set; or a file system error). */
static int spool_input(struct stream *st, int fd, off_t *size)
{
        uint8_t buf[16384];
        ssize_t k;
        int r;

        *size = 0;
        while ((k = stream_read(st, buf, sizeof(buf))) > 0) {
                if ((r = write_all(fd, buf, (size_t)k)) < 0)
                        return r;
                *size += k;
        }
        return k < 0 ? (int)k : 0;
}

/* ---- a BIO over a byte range of a file -------------------------------------------- */

struct range {
        int fd;
        off_t start, pos, end;
};

static int range_read(BIO *b, char *buf, int n)
{
        struct range *r = BIO_get_data(b);
        size_t k;
        ssize_t got;

        if (n <= 0 || r->pos >= r->end)
                return 0;
        k = (size_t)n < (size_t)(r->end - r->pos) ? (size_t)n : (size_t)(r->end - r->pos);
        got = pread_all(r->fd, buf, k, r->pos);
        if (got < 0)
                return -1;
        r->pos += got;
        return (int)got;
}

static long range_ctrl(BIO *b, int cmd, long num, void *ptr)
{
        struct range *r = BIO_get_data(b);

        switch (cmd) {
        case BIO_CTRL_EOF:
                return r->pos >= r->end;
        case BIO_CTRL_RESET:
                r->pos = r->start;
                return 0;
        case BIO_CTRL_FLUSH:
                return 1;
        case BIO_CTRL_PENDING:
                return 0;
        }
        return 0;
}

static int range_destroy(BIO *b)
{
        free(BIO_get_data(b));
        BIO_set_data(b, NULL);
        return 1;
}

static BIO_METHOD *range_method;
static pthread_once_t range_once = PTHREAD_ONCE_INIT;

static void range_method_init(void)
{
        range_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "smime-agent file range");
        if (range_method) {
                BIO_meth_set_read(range_method, range_read);
                BIO_meth_set_ctrl(range_method, range_ctrl);
                BIO_meth_set_destroy(range_method, range_destroy);
        }
}

static BIO *range_bio(int fd, off_t off, off_t len)
{
        struct range *r;
        BIO *b;

        pthread_once(&range_once, range_method_init);
        if (!range_method || !(r = malloc(sizeof(*r))))
                return NULL;
        *r = (struct range){ fd, off, off, off + len };
        if (!(b = BIO_new(range_method))) {
                free(r);
                return NULL;
        }
        BIO_set_data(b, r);
        BIO_set_init(b, 1);
        return b;
}

/* ---- parsing the input --------------------------------------------------------------- */

struct parsed {
        CMS_ContentInfo *cms;
        bool detached;          /* content is [c_off, c_off + c_len) of the spool */
        off_t c_off, c_len;
        bool clear_signed;      /* multipart/signed: the content is a MIME entity */
        char *from;             /* the From header's address, when there was a header */
        int kind;               /* for messages: 0 der, 1 pem, 2 opaque S/MIME, 3 multipart/signed, 4 detached */
};

static void parsed_free(struct parsed *p)
{
        CMS_ContentInfo_free(p->cms);
        free(p->from);
        memset(p, 0, sizeof(*p));
}

/* A CMS from DER or PEM (any label: gpgsm writes "SIGNED MESSAGE") bytes. */
static CMS_ContentInfo *cms_from_bytes(const uint8_t *p, size_t n)
{
        CMS_ContentInfo *cms = NULL;
        BIO *b;

        if (n == 0 || n > INT32_MAX)
                return NULL;
        b = BIO_new_mem_buf(p, (int)n);
        if (b && memmem(p, n < 4096 ? n : 4096, "-----BEGIN ", 11)) {
                char *name = NULL, *header = NULL;
                unsigned char *data = NULL;
                long len = 0;

                if (PEM_read_bio(b, &name, &header, &data, &len)) {
                        const unsigned char *q = data;

                        cms = d2i_CMS_ContentInfo(NULL, &q, len);
                }
                OPENSSL_free(name);
                OPENSSL_free(header);
                OPENSSL_free(data);
        } else if (b) {
                cms = d2i_CMS_bio(b, NULL);
        }
        BIO_free(b);
        return cms;
}

/* The unfolded value of header field `name` in the block h[0..n), or NULL. */
static char *mime_header(const char *h, size_t n, const char *name)
{
        size_t nl = strlen(name);

        for (size_t pos = 0; pos < n;) {
                const char *line = h + pos;
                const char *eol = memchr(line, '\n', n - pos);
                size_t ll = eol ? (size_t)(eol - line) + 1 : n - pos;

                if (ll > nl && strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
                        char *out = malloc(n + 1);
                        size_t o = 0, p = pos + nl + 1;

                        if (!out)
                                return NULL;
                        /* The value and its continuation lines. */
                        for (;;) {
                                while (p < n && h[p] != '\n')
                                        if (h[p] != '\r')
                                                out[o++] = h[p++];
                                        else
                                                p++;
                                if (p + 1 < n && (h[p + 1] == ' ' || h[p + 1] == '\t')) {
                                        p++;
                                        continue;
                                }
                                break;
                        }
                        out[o] = '\0';
                        while (o > 0 && isspace((unsigned char)out[o - 1]))
                                out[--o] = '\0';
                        {
                                size_t s = 0;

                                while (isspace((unsigned char)out[s]))
                                        s++;
                                memmove(out, out + s, o - s + 1);
                        }
                        return out;
                }
                pos += ll;
        }
        return NULL;
}

/* A parameter of a Content-Type value (quoted or not), or NULL. */
static char *ct_param(const char *ct, const char *param)
{
        size_t pl = strlen(param);

        for (const char *p = strchr(ct, ';'); p; p = strchr(p + 1, ';')) {
                const char *q = p + 1;

                while (isspace((unsigned char)*q))
                        q++;
                if (strncasecmp(q, param, pl) != 0)
                        continue;
                q += pl;
                while (isspace((unsigned char)*q))
                        q++;
                if (*q != '=')
                        continue;
                q++;
                while (isspace((unsigned char)*q))
                        q++;
                if (*q == '"') {
                        const char *e = strchr(q + 1, '"');

                        return e ? strndup(q + 1, (size_t)(e - q - 1)) : NULL;
                }
                return strndup(q, strcspn(q, "; \t"));
        }
        return NULL;
}

static bool media_type_is(const char *ct, const char *type)
{
        size_t n = strlen(type);

        return strncasecmp(ct, type, n) == 0 && (ct[n] == '\0' || ct[n] == ';' || isspace((unsigned char)ct[n]));
}

/* The addr-spec of a From value: inside <...>, else the value itself. */
static char *addr_spec(const char *v)
{
        const char *lt = strrchr(v, '<'), *gt;

        if (lt && (gt = strchr(lt, '>')))
                return strndup(lt + 1, (size_t)(gt - lt - 1));
        return strndup(v, strcspn(v, " \t("));
}

/* End of the header block in h[0..n): offset of the body, or 0 if none. */
static size_t header_end(const char *h, size_t n)
{
        for (size_t i = 0; i + 1 < n; i++) {
                if (h[i] != '\n')
                        continue;
                if (h[i + 1] == '\n')
                        return i + 2;
                if (h[i + 1] == '\r' && i + 2 < n && h[i + 2] == '\n')
                        return i + 3;
        }
        return 0;
}

/* Finds the boundary lines of a multipart body in the spool: offsets of
 * the first three delimiter line starts and of the end of the first two. */
struct delims {
        off_t start[3], end[3];
        bool close[3];
        int n;
};

static int find_delimiters(int fd, off_t from, off_t size, const char *boundary, struct delims *d)
{
        size_t bl = strlen(boundary);
        char buf[65536];
        off_t pos = from;
        bool bol = true;

        memset(d, 0, sizeof(*d));
        if (bl == 0 || bl > 200)
                return -EINVAL;
        while (pos < size && d->n < 3) {
                ssize_t n = pread_all(fd, buf, sizeof(buf), pos);
                size_t i;

                if (n <= 0)
                        return n < 0 ? (int)n : -EIO;
                for (i = 0; i < (size_t)n && d->n < 3; i++) {
                        if (bol) {
                                size_t left = (size_t)n - i, need = bl + 6;

                                if (left < need && pos + n < size)
                                        break;  /* refill from this line start */
                                if (left >= 2 + bl && buf[i] == '-' && buf[i + 1] == '-' &&
                                    memcmp(buf + i + 2, boundary, bl) == 0) {
                                        size_t j = i + 2 + bl;
                                        bool close = j + 1 < (size_t)n && buf[j] == '-' && buf[j + 1] == '-';

                                        if (close)
                                                j += 2;
                                        while (j < (size_t)n && (buf[j] == ' ' || buf[j] == '\t'))
                                                j++;
                                        if (j == (size_t)n || buf[j] == '\n' || buf[j] == '\r') {
                                                d->start[d->n] = pos + (off_t)i;
                                                if (j < (size_t)n && buf[j] == '\r')
                                                        j++;
                                                if (j < (size_t)n && buf[j] == '\n')
                                                        j++;
                                                d->end[d->n] = pos + (off_t)j;
                                                d->close[d->n] = close;
                                                d->n++;
                                        }
                                }
                        }
                        bol = buf[i] == '\n';
                }
                pos += (off_t)i;
        }
        return 0;
}

/* Offset of the line end before a delimiter line at `at` (the CRLF or LF
 * belongs to the delimiter, RFC 2046). */
static off_t before_eol(int fd, off_t at, off_t floor)
{
        char two[2];

        if (at - floor >= 2 && pread_all(fd, two, 2, at - 2) == 2 && two[0] == '\r' && two[1] == '\n')
                return at - 2;
        if (at - floor >= 1 && pread_all(fd, two, 1, at - 1) == 1 && two[0] == '\n')
                return at - 1;
        return at;
}

static CMS_ContentInfo *cms_from_base64_range(int fd, off_t off, off_t len, bool base64)
{
        BIO *src = range_bio(fd, off, len), *b64 = base64 ? BIO_new(BIO_f_base64()) : NULL;
        CMS_ContentInfo *cms = NULL;

        if (src && (!base64 || b64)) {
                BIO *chain = base64 ? BIO_push(b64, src) : src;

                cms = d2i_CMS_bio(chain, NULL);
                if (base64) {
                        BIO_pop(b64);
                        BIO_free(b64);
                        b64 = NULL;
                }
        }
        BIO_free(b64);
        BIO_free(src);
        return cms;
}

static bool cte_is(const char *cte, const char *v)
{
        return cte && strcasecmp(cte, v) == 0;
}

/* Parses a MIME message in the spool. 0, or PE_BAD_INPUT with err. */
static int parse_mime(int fd, off_t size, struct parsed *pp, char *err, size_t en)
{
        char *h = malloc(MAX_HEADER + 1), *ct = NULL, *from = NULL, *cte = NULL, *param = NULL;
        ssize_t n = h ? pread_all(fd, h, MAX_HEADER, 0) : -ENOMEM;
        size_t skip = 0, body;
        int r = PE_BAD_INPUT;

        if (n < 0) {
                snprintf(err, en, "cannot read the spooled input: %s", strerror((int)-n));
                goto out;
        }
        /* An mbox "From " separator line is not a header field. */
        if (n > 5 && memcmp(h, "From ", 5) == 0) {
                char *nl = memchr(h, '\n', (size_t)n);

                skip = nl ? (size_t)(nl - h) + 1 : 0;
        }
        body = header_end(h + skip, (size_t)n - skip);
        if (!body) {
                snprintf(err, en, "the input is neither CMS (DER or PEM) nor a MIME message with a header block "
                         "(no blank line in the first %u KiB)", MAX_HEADER / 1024);
                goto out;
        }
        body += skip;
        ct = mime_header(h + skip, body - skip, "Content-Type");
        from = mime_header(h + skip, body - skip, "From");
        cte = mime_header(h + skip, body - skip, "Content-Transfer-Encoding");
        if (from && *from)
                pp->from = addr_spec(from);
        if (!ct) {
                snprintf(err, en, "the message has no Content-Type: it is not signed (S/MIME needs multipart/signed "
                         "or application/pkcs7-mime)");
                goto out;
        }
        if (media_type_is(ct, "multipart/signed")) {
                struct delims d;
                char *part = NULL;
                off_t sig_off, sig_end;
                size_t sig_len, pb;

                param = ct_param(ct, "boundary");
                if (!param || find_delimiters(fd, (off_t)body, size, param, &d) < 0 || d.n < 2 || d.close[0] ||
                    (d.close[1] && d.n == 2)) {
                        snprintf(err, en, "multipart/signed message without its two parts (boundary %s%s%s not found "
                                 "twice)", param ? "\"" : "", param ? param : "missing", param ? "\"" : "");
                        goto out;
                }
                pp->c_off = d.end[0];
                pp->c_len = before_eol(fd, d.start[1], d.end[0]) - d.end[0];
                sig_off = d.end[1];
                sig_end = d.n > 2 ? before_eol(fd, d.start[2], d.end[1]) : size;
                sig_len = (size_t)(sig_end - sig_off);
                if (sig_len > MAX_SIG_PART || !(part = malloc(sig_len + 1))) {
                        snprintf(err, en, "the signature part is over %u MiB", MAX_SIG_PART >> 20);
                        goto out;
                }
                if (pread_all(fd, part, sig_len, sig_off) != (ssize_t)sig_len) {
                        free(part);
                        snprintf(err, en, "cannot read the spooled input");
                        goto out;
                }
                pb = header_end(part, sig_len);
                {
                        char *pct = pb ? mime_header(part, pb, "Content-Type") : NULL;
                        char *pcte = pb ? mime_header(part, pb, "Content-Transfer-Encoding") : NULL;
                        bool is_sig = pct && (media_type_is(pct, "application/pkcs7-signature") ||
                                              media_type_is(pct, "application/x-pkcs7-signature"));

                        if (is_sig)
                                pp->cms = cms_from_base64_range(fd, sig_off + (off_t)pb, (off_t)(sig_len - pb),
                                                                !cte_is(pcte, "binary"));
                        if (!is_sig)
                                snprintf(err, en, "the second part of the multipart/signed message is %s, not "
                                         "application/pkcs7-signature", pct ? pct : "without a Content-Type");
                        else if (!pp->cms)
                                snprintf(err, en, "the application/pkcs7-signature part does not hold a CMS "
                                         "signature (bad base64 or DER)");
                        free(pct);
                        free(pcte);
                }
                free(part);
                if (!pp->cms)
                        goto out;
                pp->detached = pp->clear_signed = true;
                pp->kind = 3;
        } else if (media_type_is(ct, "application/pkcs7-mime") || media_type_is(ct, "application/x-pkcs7-mime")) {
                param = ct_param(ct, "smime-type");
                if (param && (strcasecmp(param, "enveloped-data") == 0 || strcasecmp(param, "authEnveloped-data") == 0)) {
                        snprintf(err, en, "the message is encrypted (smime-type=%s): decrypt it first, then verify "
                                 "what comes out", param);
                        goto out;
                }
                if (param && strcasecmp(param, "certs-only") == 0) {
                        snprintf(err, en, "the message only carries certificates (smime-type=certs-only): add them "
                                 "with `smimectl import`");
                        goto out;
                }
                pp->cms = cms_from_base64_range(fd, (off_t)body, size - (off_t)body, !cte_is(cte, "binary"));
                if (!pp->cms) {
                        snprintf(err, en, "the application/pkcs7-mime body does not hold a CMS structure (bad base64 "
                                 "or DER)");
                        goto out;
                }
                pp->kind = 2;
        } else {
                snprintf(err, en, "the message is not signed: its Content-Type is %.200s (S/MIME signatures are "
                         "multipart/signed or application/pkcs7-mime)", ct);
                goto out;
        }
        r = 0;
out:
        free(h);
        free(ct);
        free(from);
        free(cte);
        free(param);
        return r;
}

/* 0, or PE_BAD_INPUT with err filled. */
static int parse_input(int fd, off_t size, const uint8_t *sig, size_t siglen, struct parsed *pp, char *err, size_t en)
{
        uint8_t head[64];
        ssize_t k = pread_all(fd, head, sizeof(head), 0);
        size_t i = 0;

        memset(pp, 0, sizeof(*pp));
        if (sig) {
                pp->cms = cms_from_bytes(sig, siglen);
                if (!pp->cms) {
                        snprintf(err, en, "the detached signature is not a CMS structure (DER or PEM)");
                        return PE_BAD_INPUT;
                }
                pp->detached = true;
                pp->c_off = 0;
                pp->c_len = size;
                pp->kind = 4;
                return 0;
        }
        if (k <= 0) {
                snprintf(err, en, "the input is empty");
                return PE_BAD_INPUT;
        }
        while (i < (size_t)k && isspace(head[i]))
                i++;
        if (i + 11 <= (size_t)k && memcmp(head + i, "-----BEGIN ", 11) == 0) {
                uint8_t *all;

                if (size > MAX_IN_MEMORY) {
                        snprintf(err, en, "PEM input over %u MiB; send DER or S/MIME instead", MAX_IN_MEMORY >> 20);
                        return PE_BAD_INPUT;
                }
                all = malloc((size_t)size);
                if (all && pread_all(fd, all, (size_t)size, 0) == size)
                        pp->cms = cms_from_bytes(all, (size_t)size);
                free(all);
                pp->kind = 1;
        } else if (head[0] == 0x30) {
                pp->cms = cms_from_base64_range(fd, 0, size, false);
                pp->kind = 0;
        } else {
                return parse_mime(fd, size, pp, err, en);
        }
        if (!pp->cms) {
                snprintf(err, en, "the input looks like %s but is not a CMS structure", pp->kind ? "PEM" : "DER");
                return PE_BAD_INPUT;
        }
        return 0;
}

/* ---- checking the signers ------------------------------------------------------------ */

struct signer_res {
        X509 *cert;
        struct cert_facts f;
        bool have_facts;
        unsigned problems;
        char text[2048];
        const char *trust;
        char chain[8][512];
        size_t n_chain;
        time_t signing_time;
        const char *sig_alg;
        char digest[16];
        bool caps_known;
        unsigned caps;
};

struct vres {
        struct signer_res *s;
        size_t n;
        const char *verdict;
        char summary[4096];
        char hints[4][1024];
        size_t n_hints;
        bool canonicalised;
};

static void vres_free(struct vres *v)
{
        for (size_t i = 0; i < v->n; i++) {
                X509_free(v->s[i].cert);
                if (v->s[i].have_facts)
                        cert_facts_clear(&v->s[i].f);
        }
        free(v->s);
        memset(v, 0, sizeof(*v));
}

static void add_sr_text(struct signer_res *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_sr_text(struct signer_res *s, const char *fmt, ...)
{
        size_t used = strlen(s->text);
        va_list ap;

        if (used && used + 3 < sizeof(s->text)) {
                memcpy(s->text + used, "; ", 3);
                used += 2;
        }
        va_start(ap, fmt);
        vsnprintf(s->text + used, sizeof(s->text) - used, fmt, ap);
        va_end(ap);
}

static void fmt_time(time_t t, char *buf, size_t n)
{
        struct tm tm;

        gmtime_r(&t, &tm);
        strftime(buf, n, "%Y-%m-%d %H:%M UTC", &tm);
}

static const char *sig_alg_name(int nid)
{
        switch (nid) {
        case NID_rsaEncryption:
        case NID_sha1WithRSAEncryption:
        case NID_sha224WithRSAEncryption:
        case NID_sha256WithRSAEncryption:
        case NID_sha384WithRSAEncryption:
        case NID_sha512WithRSAEncryption:
                return "rsa-pkcs1-v1.5";
        case NID_rsassaPss:
                return "rsa-pss";
        case NID_X9_62_id_ecPublicKey:
        case NID_ecdsa_with_SHA1:
        case NID_ecdsa_with_SHA224:
        case NID_ecdsa_with_SHA256:
        case NID_ecdsa_with_SHA384:
        case NID_ecdsa_with_SHA512:
                return "ecdsa";
        case NID_ED25519:
                return "ed25519";
        }
        return NULL;
}

static void signers_init(struct conn *c, CMS_ContentInfo *cms, struct vres *v)
{
        STACK_OF(CMS_SignerInfo) *sis = CMS_get0_SignerInfos(cms);
        STACK_OF(X509) *book = certstore_certs(c->agent->book);

        v->n = 0;
        v->s = calloc((size_t)(sk_CMS_SignerInfo_num(sis) > 0 ? sk_CMS_SignerInfo_num(sis) : 1), sizeof(*v->s));
        if (!v->s)
                goto out;
        /* The signers' certificates: from the message, else the address book. */
        (void)CMS_set1_signers_certs(cms, book, 0);
        ERR_clear_error();
        for (int i = 0; i < sk_CMS_SignerInfo_num(sis); i++) {
                CMS_SignerInfo *si = sk_CMS_SignerInfo_value(sis, i);
                struct signer_res *s = &v->s[v->n++];
                X509_ALGOR *dig = NULL, *sig = NULL;
                const ASN1_OBJECT *obj;
                X509 *x = NULL;
                int idx;

                CMS_SignerInfo_get0_algs(si, NULL, &x, &dig, &sig);
                X509_ALGOR_get0(&obj, NULL, NULL, sig);
                s->sig_alg = sig_alg_name(OBJ_obj2nid(obj));
                X509_ALGOR_get0(&obj, NULL, NULL, dig);
                snprintf(s->digest, sizeof(s->digest), "%s", OBJ_nid2sn(OBJ_obj2nid(obj)));
                for (char *p = s->digest; *p; p++)
                        *p = (char)tolower((unsigned char)*p);
                if (!s->sig_alg) {
                        char oid[80];

                        OBJ_obj2txt(oid, sizeof(oid), obj, 1);
                        s->sig_alg = "unsupported";
                        s->problems |= P_UNSUPPORTED_ALGORITHM;
                        add_sr_text(s, "the signature algorithm is not supported");
                }
                if (x && X509_up_ref(x)) {
                        s->cert = x;
                        cert_facts_load(&s->f, x);
                        s->have_facts = true;
                } else {
                        ASN1_OCTET_STRING *keyid = NULL;
                        X509_NAME *issuer = NULL;
                        ASN1_INTEGER *serial = NULL;
                        char iss[512] = "?";

                        CMS_SignerInfo_get0_signer_id(si, &keyid, &issuer, &serial);
                        if (issuer)
                                X509_NAME_oneline(issuer, iss, sizeof(iss));
                        s->problems |= P_NO_SIGNER_CERT;
                        add_sr_text(s, "the signer's certificate (issued by %s) is neither in the message nor in the "
                                    "address book; import it with `smimectl import`", iss);
                }
                idx = CMS_signed_get_attr_by_NID(si, NID_pkcs9_signingTime, -1);
                if (idx >= 0) {
                        ASN1_TYPE *t = X509_ATTRIBUTE_get0_type(CMS_signed_get_attr(si, idx), 0);
                        struct tm tm;

                        if (t && (t->type == V_ASN1_UTCTIME || t->type == V_ASN1_GENERALIZEDTIME) &&
                            ASN1_TIME_to_tm(t->value.utctime, &tm))
                                s->signing_time = timegm(&tm);
                }
                {
                        ASN1_STRING *caps = CMS_signed_get0_data_by_OBJ(si, OBJ_nid2obj(NID_SMIMECapabilities), -3,
                                                                        V_ASN1_SEQUENCE);

                        if (caps) {
                                s->caps_known = true;
                                s->caps = cs_caps_from_der(ASN1_STRING_get0_data(caps), ASN1_STRING_length(caps));
                        }
                }
        }
out:
        ERR_clear_error();
        sk_X509_pop_free(book, X509_free);
}

/* Runs the content through the digests; marks CONTENT_ALTERED. */
static int digest_content(CMS_ContentInfo *cms, BIO *dcont, struct vres *v)
{
        STACK_OF(CMS_SignerInfo) *sis = CMS_get0_SignerInfos(cms);
        BIO *chain = CMS_dataInit(cms, dcont);
        char buf[16384];
        int k;

        if (!chain)
                return -1;
        while ((k = BIO_read(chain, buf, sizeof(buf))) > 0)
                ;
        for (size_t i = 0; k == 0 && i < v->n; i++) {
                CMS_SignerInfo *si = sk_CMS_SignerInfo_value(sis, (int)i);
                struct signer_res *s = &v->s[i];

                s->problems &= ~P_CONTENT_ALTERED;
                if (CMS_signed_get_attr_count(si) < 0 && !s->cert)
                        continue;       /* no attributes: the signature itself covers the digest */
                if (CMS_SignerInfo_verify_content(si, chain) <= 0)
                        s->problems |= CMS_signed_get_attr_count(si) < 0 ? P_BAD_SIGNATURE : P_CONTENT_ALTERED;
        }
        ERR_clear_error();
        /* Free our digest BIOs; the caller's content BIO stays. */
        while (chain && chain != dcont) {
                BIO *next = BIO_pop(chain);

                BIO_free(chain);
                chain = next;
        }
        return k < 0 ? -1 : 0;
}

static size_t der_len(uint8_t *out, size_t len)
{
        size_t n = 0;

        if (len < 128) {
                out[0] = (uint8_t)len;
                return 1;
        }
        for (size_t l = len; l; l >>= 8)
                n++;
        out[0] = (uint8_t)(0x80 | n);
        for (size_t i = 0; i < n; i++)
                out[1 + i] = (uint8_t)(len >> (8 * (n - 1 - i)));
        return n + 1;
}

struct der_item {
        unsigned char *p;
        int len;
};

static int der_cmp(const void *a, const void *b)
{
        const struct der_item *x = a, *y = b;
        int m = memcmp(x->p, y->p, (size_t)(x->len < y->len ? x->len : y->len));

        return m ? m : x->len - y->len;
}

/* OpenSSL 3.0's CMS cannot verify Ed25519 (it insists on a digest for
 * EVP_DigestVerify). RFC 8419: the signature is over the DER SET OF the
 * signed attributes, with no separate digest. */
static int ed25519_verify(CMS_SignerInfo *si, EVP_PKEY *pk)
{
        int n = CMS_signed_get_attr_count(si), ok = 0;
        struct der_item *items = n > 0 ? calloc((size_t)n, sizeof(*items)) : NULL;
        ASN1_OCTET_STRING *sig = CMS_SignerInfo_get0_signature(si);
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        uint8_t *tbs = NULL, hdr[10];
        size_t total = 0, hl, pos;

        if (!items || !sig || !md)
                goto out;
        for (int i = 0; i < n; i++) {
                items[i].len = i2d_X509_ATTRIBUTE(CMS_signed_get_attr(si, i), &items[i].p);
                if (items[i].len <= 0)
                        goto out;
                total += (size_t)items[i].len;
        }
        qsort(items, (size_t)n, sizeof(*items), der_cmp);
        hl = der_len(hdr + 1, total) + 1;
        hdr[0] = 0x31;
        if (!(tbs = malloc(hl + total)))
                goto out;
        memcpy(tbs, hdr, hl);
        pos = hl;
        for (int i = 0; i < n; i++) {
                memcpy(tbs + pos, items[i].p, (size_t)items[i].len);
                pos += (size_t)items[i].len;
        }
        ok = EVP_DigestVerifyInit_ex(md, NULL, NULL, NULL, NULL, pk, NULL) == 1 &&
             EVP_DigestVerify(md, ASN1_STRING_get0_data(sig), (size_t)ASN1_STRING_length(sig), tbs, pos) == 1;
out:
        for (int i = 0; items && i < n; i++)
                OPENSSL_free(items[i].p);
        free(items);
        free(tbs);
        EVP_MD_CTX_free(md);
        ERR_clear_error();
        return ok;
}

static void check_signatures(CMS_ContentInfo *cms, struct vres *v)
{
        STACK_OF(CMS_SignerInfo) *sis = CMS_get0_SignerInfos(cms);

        for (size_t i = 0; i < v->n; i++) {
                CMS_SignerInfo *si = sk_CMS_SignerInfo_value(sis, (int)i);
                struct signer_res *s = &v->s[i];
                int ok;

                if (!s->cert || (s->problems & P_UNSUPPORTED_ALGORITHM) || CMS_signed_get_attr_count(si) < 0)
                        continue;
                if (strcmp(s->sig_alg, "ed25519") == 0)
                        ok = ed25519_verify(si, X509_get0_pubkey(s->cert));
                else
                        ok = CMS_SignerInfo_verify(si) == 1;
                if (!ok) {
                        s->problems |= P_BAD_SIGNATURE;
                        add_sr_text(s, "the signature does not verify with the key of %s", s->f.subject);
                }
        }
        ERR_clear_error();
}

static void check_certs(struct conn *c, CMS_ContentInfo *cms, const char *from, struct vres *v)
{
        STACK_OF(X509) *certs = CMS_get1_certs(cms);

        for (size_t i = 0; i < v->n; i++) {
                struct signer_res *s = &v->s[i];
                struct cs_check chk;

                if (!s->cert)
                        continue;
                if (certstore_check(c->agent->book, s->cert, certs, true, 0, &chk) < 0) {
                        s->problems |= P_CHAIN_INVALID;
                        add_sr_text(s, "out of memory while checking the certificate chain");
                        continue;
                }
                s->problems |= chk.problems;
                s->trust = chk.trust;
                memcpy(s->chain, chk.chain, sizeof(s->chain));
                s->n_chain = chk.n_chain;
                if (chk.problems)
                        add_sr_text(s, "%s", chk.text);
                if ((chk.problems & (P_EXPIRED | P_NOT_YET_VALID)) && s->signing_time) {
                        struct cs_check then;
                        char d[40];

                        fmt_time(s->signing_time, d, sizeof(d));
                        if (certstore_check(c->agent->book, s->cert, certs, true, s->signing_time, &then) == 0 &&
                            !(then.problems & (P_EXPIRED | P_NOT_YET_VALID)))
                                add_sr_text(s, "the certificate was valid at the signing time the message claims (%s)", d);
                        else
                                add_sr_text(s, "it was not valid at the claimed signing time (%s) either", d);
                }
                if (from && *from && !cert_facts_has_email(&s->f, from)) {
                        s->problems |= P_FROM_MISMATCH;
                        if (s->f.n_emails)
                                add_sr_text(s, "the message is from %s, but the certificate is for %s%s", from,
                                            s->f.emails[0], s->f.n_emails > 1 ? " (and others)" : "");
                        else
                                add_sr_text(s, "the message is from %s, but the certificate names no e-mail address",
                                            from);
                }
        }
        sk_X509_pop_free(certs, X509_free);
}

static void set_verdict(struct vres *v)
{
        unsigned all = 0;
        size_t used;

        for (size_t i = 0; i < v->n; i++)
                all |= v->s[i].problems;
        if (v->n == 0 || (all & CS_SIGNATURE_PROBLEMS))
                v->verdict = "bad";
        else if (all)
                v->verdict = "untrusted";
        else
                v->verdict = "good";

        v->summary[0] = '\0';
        for (size_t i = 0; i < v->n; i++) {
                const struct signer_res *s = &v->s[i];
                const char *who = s->have_facts ? (s->f.n_emails ? s->f.emails[0] : s->f.subject) : "an unknown signer";
                char when[40] = "";

                used = strlen(v->summary);
                if (s->signing_time)
                        fmt_time(s->signing_time, when, sizeof(when));
                if (s->problems & CS_SIGNATURE_PROBLEMS)
                        snprintf(v->summary + used, sizeof(v->summary) - used, "%sBAD signature from %s: %s. Do not "
                                 "rely on this message.", i ? " " : "", who, s->text);
                else if (s->problems)
                        snprintf(v->summary + used, sizeof(v->summary) - used, "%sThe signature from %s%s%s is intact, "
                                 "but it cannot be trusted: %s.", i ? " " : "", who, when[0] ? ", made " : "", when,
                                 s->text);
                else
                        snprintf(v->summary + used, sizeof(v->summary) - used, "%sGood signature from %s%s%s; %s.",
                                 i ? " " : "", who, when[0] ? ", made " : "", when,
                                 s->trust && strcmp(s->trust, "trusted-by-you") == 0 ?
                                 "you trust this certificate" : "the certificate is issued by a trusted CA");
        }
        if (v->n == 0)
                snprintf(v->summary, sizeof(v->summary), "The message has no signatures.");
}

/* ---- gateway rewriting hints ----------------------------------------------------------- */

static bool digest_matches(CMS_SignerInfo *si, const uint8_t *p, size_t n)
{
        ASN1_OCTET_STRING *want = CMS_signed_get0_data_by_OBJ(si, OBJ_nid2obj(NID_pkcs9_messageDigest), -3,
                                                              V_ASN1_OCTET_STRING);
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned len = 0;
        X509_ALGOR *dig = NULL;
        const ASN1_OBJECT *obj;
        const EVP_MD *type;

        CMS_SignerInfo_get0_algs(si, NULL, NULL, &dig, NULL);
        X509_ALGOR_get0(&obj, NULL, NULL, dig);
        type = EVP_get_digestbyobj(obj);
        if (!want || !type || !EVP_Digest(p, n, md, &len, type, NULL))
                return false;
        return (int)len == ASN1_STRING_length(want) && memcmp(md, ASN1_STRING_get0_data(want), len) == 0;
}

struct buf {
        uint8_t *p;
        size_t n, cap;
};

static bool buf_put(struct buf *b, const void *p, size_t n)
{
        if (b->n + n > b->cap) {
                size_t cap = (b->n + n) * 2 + 64;
                uint8_t *q = realloc(b->p, cap);

                if (!q)
                        return false;
                b->p = q;
                b->cap = cap;
        }
        memcpy(b->p + b->n, p, n);
        b->n += n;
        return true;
}

/* Lines with CRLF ends; strip: remove trailing spaces and tabs; lf: LF ends. */
static bool canon(struct buf *out, const uint8_t *p, size_t n, bool strip, bool lf)
{
        size_t i = 0;

        while (i < n) {
                const uint8_t *nl = memchr(p + i, '\n', n - i);
                size_t e = nl ? (size_t)(nl - p) : n, le = e;

                if (le > i && p[le - 1] == '\r')
                        le--;
                while (strip && le > i && (p[le - 1] == ' ' || p[le - 1] == '\t'))
                        le--;
                if (!buf_put(out, p + i, le - i))
                        return false;
                if (nl && !buf_put(out, lf ? "\n" : "\r\n", lf ? 1 : 2))
                        return false;
                i = nl ? e + 1 : n;
        }
        return true;
}

static int hexval(uint8_t c)
{
        return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static bool qp_decode(struct buf *out, const uint8_t *p, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                if (p[i] == '=' && i + 1 < n && (p[i + 1] == '\n' || (p[i + 1] == '\r' && i + 2 < n && p[i + 2] == '\n'))) {
                        i += p[i + 1] == '\r' ? 2 : 1;
                } else if (p[i] == '=' && i + 2 < n && hexval(p[i + 1]) >= 0 && hexval(p[i + 2]) >= 0) {
                        uint8_t c = (uint8_t)(hexval(p[i + 1]) << 4 | hexval(p[i + 2]));

                        if (!buf_put(out, &c, 1))
                                return false;
                        i += 2;
                } else if (!buf_put(out, p + i, 1)) {
                        return false;
                }
        }
        return true;
}

static bool b64_decode(struct buf *out, const uint8_t *p, size_t n)
{
        BIO *mem = BIO_new_mem_buf(p, (int)n), *b64 = BIO_new(BIO_f_base64());
        uint8_t tmp[4096];
        int k;
        bool ok = mem && b64;

        if (ok) {
                BIO_push(b64, mem);
                while ((k = BIO_read(b64, tmp, sizeof(tmp))) > 0)
                        if (!buf_put(out, tmp, (size_t)k))
                                ok = false;
                BIO_pop(b64);
        }
        BIO_free(b64);
        BIO_free(mem);
        return ok;
}

/* The entity with its Content-Transfer-Encoding replaced by `cte` (NULL:
 * the field removed) and its body decoded. */
static bool re_encode(struct buf *out, const uint8_t *p, size_t n, size_t body, bool qp, const char *cte)
{
        struct buf dec = { 0 };
        bool ok;

        for (size_t pos = 0; pos < body;) {
                const uint8_t *nl = memchr(p + pos, '\n', body - pos);
                size_t e = nl ? (size_t)(nl - p) + 1 : body, k = e;

                /* the field and its continuation lines */
                if (strncasecmp((const char *)p + pos, "Content-Transfer-Encoding:", 26) == 0) {
                        while (k < body && (p[k] == ' ' || p[k] == '\t')) {
                                const uint8_t *n2 = memchr(p + k, '\n', body - k);

                                k = n2 ? (size_t)(n2 - p) + 1 : body;
                        }
                        if (cte) {
                                char line[80];

                                snprintf(line, sizeof(line), "Content-Transfer-Encoding: %s\r\n", cte);
                                if (!buf_put(out, line, strlen(line)))
                                        return false;
                        }
                        pos = k;
                        continue;
                }
                if (!buf_put(out, p + pos, e - pos))
                        return false;
                pos = e;
        }
        ok = qp ? qp_decode(&dec, p + body, n - body) : b64_decode(&dec, p + body, n - body);
        ok = ok && buf_put(out, dec.p ? dec.p : (uint8_t *)"", dec.n);
        free(dec.p);
        return ok;
}

static bool variant_matches(CMS_ContentInfo *cms, struct vres *v, const uint8_t *p, size_t n)
{
        STACK_OF(CMS_SignerInfo) *sis = CMS_get0_SignerInfos(cms);

        for (size_t i = 0; i < v->n; i++)
                if ((v->s[i].problems & P_CONTENT_ALTERED) && digest_matches(sk_CMS_SignerInfo_value(sis, (int)i), p, n))
                        return true;
        return false;
}

static void add_hint(struct vres *v, const char *s)
{
        if (v->n_hints < sizeof(v->hints) / sizeof(v->hints[0]))
                snprintf(v->hints[v->n_hints++], sizeof(v->hints[0]), "%s", s);
}

/* The content digest does not match: say what a gateway probably did. */
static void gateway_hints(CMS_ContentInfo *cms, struct vres *v, int fd, const struct parsed *pp)
{
        uint8_t *p = NULL;
        struct buf b = { 0 }, c2 = { 0 };
        size_t n = (size_t)pp->c_len, body;
        bool found = false;

        if (n > MAX_HINT_CONTENT) {
                add_hint(v, "the signed content does not match its signature; it is too large to analyse what "
                         "changed it");
                return;
        }
        if (!(p = malloc(n + 1)) || pread_all(fd, p, n, pp->c_off) != (ssize_t)n)
                goto out;
        if (canon(&b, p, n, true, false) && variant_matches(cms, v, b.p ? b.p : p, b.n)) {
                add_hint(v, "the signed part matches its signature once trailing spaces are removed from its lines: "
                         "a mail server or gateway on the way added whitespace at line ends. The text is as signed, "
                         "but the message was modified in transit");
                found = true;
        }
        b.n = 0;
        if (!found && canon(&b, p, n, false, true) && variant_matches(cms, v, b.p ? b.p : p, b.n)) {
                add_hint(v, "the signed part matches its signature with bare LF line endings: the sending program "
                         "signed without converting line endings to CRLF first (RFC 8551 requires CRLF)");
                found = true;
        }
        body = header_end((const char *)p, n);
        if (!found && body && pp->clear_signed) {
                char *cte = mime_header((const char *)p, body, "Content-Transfer-Encoding");
                bool qp = cte && strcasecmp(cte, "quoted-printable") == 0, b64 = cte && strcasecmp(cte, "base64") == 0;
                static const char *const tries[] = { "8bit", "7bit", "binary", NULL };

                for (size_t t = 0; (qp || b64) && t < sizeof(tries) / sizeof(tries[0]) && !found; t++) {
                        c2.n = b.n = 0;
                        if (re_encode(&c2, p, n, body, qp, tries[t]) && canon(&b, c2.p, c2.n, false, false) &&
                            variant_matches(cms, v, b.p, b.n)) {
                                char h[1024];

                                snprintf(h, sizeof(h), "the signed part matches its signature when its %s transfer "
                                         "encoding is undone (Content-Transfer-Encoding: %s): a mail server or gateway "
                                         "re-encoded the message in transit, which breaks clear-signed messages. The "
                                         "text is as signed; ask the sender to sign opaque (application/pkcs7-mime) or "
                                         "to send 7-bit text", cte, tries[t] ? tries[t] : "none");
                                add_hint(v, h);
                                found = true;
                        }
                }
                free(cte);
        }
        if (!found)
                add_hint(v, "the signed content differs from what was signed, and not only by the usual gateway "
                         "rewrites (CRLF line endings, trailing whitespace, quoted-printable or base64 re-encoding "
                         "were tried): it was changed after it was signed");
out:
        free(p);
        free(b.p);
        free(c2.p);
}

/* LF -> CRLF copy of a range into a new spool. Returns the fd, or
 * negative; *changed false when the range was canonical already. */
static int canonical_copy(int fd, off_t off, off_t len, bool *changed, off_t *out_len)
{
        uint8_t in[16384], out[2 * sizeof(in)];
        int ofd = spool_open();
        uint8_t prev = 0;
        off_t pos = 0;

        *changed = false;
        *out_len = 0;
        if (ofd < 0)
                return ofd;
        while (pos < len) {
                size_t want = (size_t)(len - pos) < sizeof(in) ? (size_t)(len - pos) : sizeof(in), o = 0;
                ssize_t k = pread_all(fd, in, want, off + pos);
                int r;

                if (k <= 0) {
                        close(ofd);
                        return k < 0 ? (int)k : -EIO;
                }
                for (ssize_t i = 0; i < k; i++) {
                        if (in[i] == '\n' && prev != '\r') {
                                out[o++] = '\r';
                                *changed = true;
                        }
                        out[o++] = in[i];
                        prev = in[i];
                }
                if ((r = write_all(ofd, out, o)) < 0) {
                        close(ofd);
                        return r;
                }
                pos += k;
                *out_len += (off_t)o;
        }
        return ofd;
}

/* ---- the whole check ---------------------------------------------------------------------- */

struct verified {
        int content_fd;         /* the content (detached), possibly a canonical copy */
        off_t c_off, c_len;
        int own_fd;             /* a canonical copy to close, or -1 */
};

/* Verifies pp against the book; fills v. 0, or PE_* with err. */
static int run_verify(struct conn *c, int fd, struct parsed *pp, const char *from, struct vres *v,
                      struct verified *out, char *err, size_t en)
{
        BIO *dcont = NULL;
        int r;

        memset(v, 0, sizeof(*v));
        *out = (struct verified){ fd, pp->c_off, pp->c_len, -1 };
        if (OBJ_obj2nid(CMS_get0_type(pp->cms)) != NID_pkcs7_signed) {
                snprintf(err, en, "the CMS structure is not SignedData (it is %s)",
                         OBJ_nid2ln(OBJ_obj2nid(CMS_get0_type(pp->cms))));
                return PE_BAD_INPUT;
        }
        if (!pp->detached && CMS_is_detached(pp->cms)) {
                snprintf(err, en, "this is a detached signature: give the signed content too (smimectl verify "
                         "--content FILE --in SIGNATURE)");
                return PE_BAD_INPUT;
        }
        if (pp->detached && !CMS_is_detached(pp->cms) && pp->kind != 3) {
                snprintf(err, en, "the signature carries its own content; verify it without --content");
                return PE_BAD_INPUT;
        }
        signers_init(c, pp->cms, v);
        if (!v->s) {
                snprintf(err, en, "out of memory");
                return PE_INTERNAL;
        }
        if (v->n == 0) {
                snprintf(err, en, "the CMS SignedData has no signers: it is a certificate bundle; add its certificates "
                         "with `smimectl import`");
                return PE_BAD_INPUT;
        }
        if (pp->detached && !CMS_is_detached(pp->cms)) {
                /* multipart/signed whose signature carries content of its
                 * own: what was signed must be what is shown. */
                ASN1_OCTET_STRING **ec = CMS_get0_content(pp->cms);
                bool same = false;

                r = digest_content(pp->cms, NULL, v);
                if (r == 0 && ec && *ec && ASN1_STRING_length(*ec) == pp->c_len) {
                        uint8_t *shown = malloc((size_t)pp->c_len + 1);

                        same = shown && pread_all(fd, shown, (size_t)pp->c_len, pp->c_off) == pp->c_len &&
                               memcmp(shown, ASN1_STRING_get0_data(*ec), (size_t)pp->c_len) == 0;
                        free(shown);
                }
                for (size_t i = 0; r == 0 && !same && i < v->n; i++) {
                        v->s[i].problems |= P_CONTENT_ALTERED;
                        add_sr_text(&v->s[i], "the signature part carries its own signed content, which differs "
                                    "from the part the message shows as signed");
                }
                pp->detached = false;   /* hints and output: the signature's content */
        } else if (pp->detached) {
                dcont = range_bio(fd, pp->c_off, pp->c_len);
                r = dcont ? digest_content(pp->cms, dcont, v) : -1;
                BIO_free(dcont);
                dcont = NULL;
                bool altered = false;

                for (size_t i = 0; i < v->n; i++)
                        altered |= (v->s[i].problems & P_CONTENT_ALTERED) != 0;
                /* Saved mail often lost its CRs: the canonical form is what was signed. */
                if (r == 0 && altered) {
                        bool changed;
                        off_t clen;
                        int cfd = canonical_copy(fd, pp->c_off, pp->c_len, &changed, &clen);

                        if (cfd >= 0 && changed) {
                                struct vres save = *v;
                                unsigned *keep = calloc(v->n, sizeof(*keep));

                                for (size_t i = 0; keep && i < v->n; i++)
                                        keep[i] = v->s[i].problems;
                                dcont = range_bio(cfd, 0, clen);
                                if (keep && dcont && digest_content(pp->cms, dcont, v) == 0) {
                                        bool now = false;

                                        for (size_t i = 0; i < v->n; i++)
                                                now |= (v->s[i].problems & P_CONTENT_ALTERED) != 0;
                                        if (!now) {
                                                *out = (struct verified){ cfd, 0, clen, cfd };
                                                v->canonicalised = true;
                                                cfd = -1;
                                        } else {
                                                for (size_t i = 0; i < v->n; i++)
                                                        v->s[i].problems = keep[i];
                                        }
                                }
                                (void)save;
                                free(keep);
                                BIO_free(dcont);
                                dcont = NULL;
                        }
                        if (cfd >= 0)
                                close(cfd);
                }
        } else {
                r = digest_content(pp->cms, NULL, v);
        }
        if (r < 0) {
                snprintf(err, en, "cannot read the signed content");
                return PE_BAD_INPUT;
        }
        for (size_t i = 0; i < v->n; i++)
                if (v->s[i].problems & P_CONTENT_ALTERED)
                        add_sr_text(&v->s[i], "the content was altered after it was signed (its digest does not "
                                    "match the signed messageDigest)");
        check_signatures(pp->cms, v);
        check_certs(c, pp->cms, from, v);
        if (pp->detached) {
                bool altered = false;

                for (size_t i = 0; i < v->n; i++)
                        altered |= (v->s[i].problems & P_CONTENT_ALTERED) != 0;
                if (altered)
                        gateway_hints(pp->cms, v, fd, pp);
        }
        if (v->canonicalised)
                add_hint(v, "line endings were converted to CRLF before checking (the message was stored with LF "
                         "line ends, as mail files often are)");
        set_verdict(v);
        return 0;
}

/* Signers with an intact signature go into the address book. */
static void harvest(struct conn *c, const struct vres *v)
{
        for (size_t i = 0; i < v->n; i++) {
                const struct signer_res *s = &v->s[i];
                char err[512];
                bool added;

                if (!s->cert || (s->problems & CS_SIGNATURE_PROBLEMS) || s->f.is_ca)
                        continue;
                if (certstore_add(c->agent->book, s->cert, "harvested", s->caps_known, s->caps,
                                  s->signing_time ? s->signing_time : time(NULL), &added, err, sizeof(err)) < 0)
                        log_error("cannot harvest %s: %s", s->f.subject, err);
                else if (added)
                        log_info("address book: harvested %s (%s)", s->f.subject, s->f.fp);
        }
}

/* ---- VERIFY ---------------------------------------------------------------------------------- */

static int stream_failure(struct conn *c, struct stream *st, int r)
{
        if (st->err)
                return conn_stream_failure(c, st);
        r = conn_error(c, PE_INTERNAL, "cannot spool the input to a temporary file: %s", strerror(-r));
        return r < 0 ? r : 0;
}

static int send_content(struct stream *st, const struct parsed *pp, const struct verified *vf)
{
        uint8_t buf[65536];
        int r = 0;

        if (pp->detached) {
                for (off_t pos = 0; pos < vf->c_len && r == 0;) {
                        size_t want = (size_t)(vf->c_len - pos) < sizeof(buf) ? (size_t)(vf->c_len - pos) : sizeof(buf);
                        ssize_t k = pread_all(vf->content_fd, buf, want, vf->c_off + pos);

                        if (k <= 0)
                                return k < 0 ? (int)k : -EIO;
                        r = stream_write(st, buf, (size_t)k);
                        pos += k;
                }
        } else {
                ASN1_OCTET_STRING **pos = CMS_get0_content(pp->cms);

                if (pos && *pos && ASN1_STRING_length(*pos) > 0)
                        r = stream_write(st, ASN1_STRING_get0_data(*pos), (size_t)ASN1_STRING_length(*pos));
        }
        return r < 0 ? r : stream_flush(st);
}

static void put_signer(struct proto_msg *m, const struct signer_res *s)
{
        proto_begin_group(m, PT_SIGNER);
        if (s->have_facts) {
                proto_put_string(m, PT_SUBJECT, s->f.subject);
                proto_put_string(m, PT_ISSUER, s->f.issuer);
                proto_put_string(m, PT_SERIAL, s->f.serial);
                proto_put_string(m, PT_FINGERPRINT, s->f.fp);
                for (size_t k = 0; k < s->f.n_emails; k++)
                        proto_put_string(m, PT_EMAIL, s->f.emails[k]);
                proto_put_uint(m, PT_NOT_BEFORE, (uint64_t)s->f.not_before);
                proto_put_uint(m, PT_NOT_AFTER, (uint64_t)s->f.not_after);
        }
        if (s->signing_time)
                proto_put_uint(m, PT_SIGNING_TIME, (uint64_t)s->signing_time);
        proto_put_string(m, PT_SIG_ALG, s->sig_alg ? s->sig_alg : "unknown");
        proto_put_string(m, PT_DIGEST, s->digest);
        proto_put_string(m, PT_TRUST_PATH, s->trust ? s->trust : "untrusted");
        for (size_t k = 0; k < s->n_chain; k++)
                proto_put_string(m, PT_CHAIN_SUBJECT, s->chain[k]);
        for (unsigned k = 0; k < CS_PROBLEM_COUNT; k++)
                if (s->problems & (1u << k))
                        proto_put_string(m, PT_PROBLEM, cs_problem_name(k));
        for (unsigned k = 0; s->caps_known && k < CAP_COUNT; k++)
                if (s->caps & (1u << k))
                        proto_put_string(m, PT_CAPS, cs_cap_name(k));
        proto_put_string(m, PT_STATUS_TEXT, s->problems ? s->text : "ok");
        proto_end_group(m);
}

int verify_serve(struct conn *c)
{
        const uint8_t *p = c->frame.body, *sig_p = NULL;
        size_t n = c->frame.len, sig_len = 0;
        uint8_t *sig = NULL;
        char *from_opt = NULL, err[2048];
        struct parsed pp = { 0 };
        struct verified vf = { .own_fd = -1 };
        struct vres v = { 0 };
        struct stream st;
        uint64_t no_content = 0;
        const char *from;
        off_t size = 0;
        int fd = -1, r;

        stream_init(&st, c->fd);
        if (proto_get_string(p, n, PT_FROM, &from_opt) == -ENOMEM ||
            (proto_get_raw(p, n, PT_SIGNATURE, &sig_p, &sig_len) == 0 && !(sig = malloc(sig_len + 1)))) {
                r = conn_error(c, PE_INTERNAL, "out of memory");
                goto done;
        }
        if (sig)
                memcpy(sig, sig_p, sig_len);    /* the frame buffer is reused by the stream */
        (void)proto_get_uint(p, n, PT_NO_CONTENT, &no_content);
        if ((fd = spool_open()) < 0) {
                r = conn_error(c, PE_INTERNAL, "cannot create a temporary file in %s: %s",
                               getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", strerror(-fd));
                goto done;
        }
        if ((r = proto_write_empty(c->fd, PROTO_READY)) < 0)
                goto done;
        if ((r = spool_input(&st, fd, &size)) < 0) {
                r = stream_failure(c, &st, r);
                goto done;
        }
        r = parse_input(fd, size, sig, sig_len, &pp, err, sizeof(err));
        if (r) {
                r = conn_error(c, (uint32_t)r, "%s", err);
                goto done;
        }
        from = from_opt && *from_opt ? from_opt : pp.from;
        r = run_verify(c, fd, &pp, from, &v, &vf, err, sizeof(err));
        if (r) {
                r = conn_error(c, (uint32_t)r, "%s", err);
                goto done;
        }
        harvest(c, &v);
        if (strcmp(v.verdict, "bad") != 0 && !no_content && (r = send_content(&st, &pp, &vf)) < 0) {
                r = st.err ? stream_failure(c, &st, r) : conn_error(c, PE_INTERNAL, "cannot read the spooled content");
                goto done;
        }
        {
                struct proto_msg m;

                proto_msg_init(&m, PROTO_DONE);
                proto_put_uint(&m, PT_BYTES_IN, st.bytes_in);
                proto_put_uint(&m, PT_BYTES_OUT, st.bytes_out);
                proto_put_string(&m, PT_VERDICT, v.verdict);
                proto_put_string(&m, PT_SUMMARY, v.summary);
                if (from && *from)
                        proto_put_string(&m, PT_FROM, from);
                for (size_t i = 0; i < v.n; i++)
                        put_signer(&m, &v.s[i]);
                for (size_t i = 0; i < v.n_hints; i++)
                        proto_put_string(&m, PT_HINT, v.hints[i]);
                r = proto_msg_error(&m) ? proto_msg_error(&m) : proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
        }
        log_info("verified %llu bytes for pid %d: %s (%zu signer(s))", (unsigned long long)st.bytes_in, (int)c->pid,
                 v.verdict, v.n);
done:
        vres_free(&v);
        parsed_free(&pp);
        if (vf.own_fd >= 0)
                close(vf.own_fd);
        if (fd >= 0)
                close(fd);
        free(sig);
        free(from_opt);
        stream_done(&st);
        return r < 0 ? -1 : 0;
}

/* ---- IMPORT -------------------------------------------------------------------------------------- */

static void push_certs(STACK_OF(X509) *all, STACK_OF(X509) *more)
{
        for (int i = 0; more && i < sk_X509_num(more); i++) {
                X509 *x = sk_X509_value(more, i);

                if (X509_up_ref(x) && !sk_X509_push(all, x))
                        X509_free(x);
        }
}

static void push_crls(STACK_OF(X509_CRL) *all, STACK_OF(X509_CRL) *more)
{
        for (int i = 0; more && i < sk_X509_CRL_num(more); i++) {
                X509_CRL *x = sk_X509_CRL_value(more, i);

                if (X509_CRL_up_ref(x) && !sk_X509_CRL_push(all, x))
                        X509_CRL_free(x);
        }
}

/* Certificates and CRLs from PEM text: CERTIFICATE and X509 CRL blocks,
 * and PKCS7/CMS bundles. */
static void certs_from_pem(STACK_OF(X509) *all, STACK_OF(X509_CRL) *crls, const uint8_t *p, size_t n)
{
        BIO *b = BIO_new_mem_buf(p, (int)n);
        char *name = NULL, *header = NULL;
        unsigned char *data = NULL;
        long len = 0;

        while (b && PEM_read_bio(b, &name, &header, &data, &len)) {
                const unsigned char *q = data;

                if (strstr(name, "CERTIFICATE") && !strstr(name, "REQUEST")) {
                        X509 *x = d2i_X509(NULL, &q, len);

                        if (x && !sk_X509_push(all, x))
                                X509_free(x);
                } else if (strcmp(name, PEM_STRING_X509_CRL) == 0) {
                        X509_CRL *crl = d2i_X509_CRL(NULL, &q, len);

                        if (crl && !sk_X509_CRL_push(crls, crl))
                                X509_CRL_free(crl);
                } else {
                        CMS_ContentInfo *cms = d2i_CMS_ContentInfo(NULL, &q, len);
                        STACK_OF(X509) *certs = cms ? CMS_get1_certs(cms) : NULL;
                        STACK_OF(X509_CRL) *more = cms ? CMS_get1_crls(cms) : NULL;

                        push_certs(all, certs);
                        push_crls(crls, more);
                        sk_X509_pop_free(certs, X509_free);
                        sk_X509_CRL_pop_free(more, X509_CRL_free);
                        CMS_ContentInfo_free(cms);
                }
                OPENSSL_free(name);
                OPENSSL_free(header);
                OPENSSL_free(data);
                name = header = NULL;
                data = NULL;
        }
        ERR_clear_error();
        BIO_free(b);
}

int import_serve(struct conn *c)
{
        STACK_OF(X509) *all = sk_X509_new_null();
        STACK_OF(X509_CRL) *crls = sk_X509_CRL_new_null();
        struct parsed pp = { 0 };
        struct stream st;
        uint8_t *mem = NULL;
        uint64_t count = 0, crl_count = 0;
        char err[2048];
        off_t size = 0;
        int fd = -1, r;

        stream_init(&st, c->fd);
        if (certstore_error(c->agent->book)) {
                r = conn_error(c, PE_STORE, "%s", certstore_error(c->agent->book));
                goto done;
        }
        if (!all || !crls || (fd = spool_open()) < 0) {
                r = conn_error(c, PE_INTERNAL, "cannot create a temporary file: %s", strerror(fd < 0 ? -fd : ENOMEM));
                goto done;
        }
        if ((r = proto_write_empty(c->fd, PROTO_READY)) < 0)
                goto done;
        if ((r = spool_input(&st, fd, &size)) < 0) {
                r = stream_failure(c, &st, r);
                goto done;
        }
        if (size > MAX_IN_MEMORY) {
                r = conn_error(c, PE_BAD_INPUT, "the input is over %u MiB; import a certificate file or one message",
                               MAX_IN_MEMORY >> 20);
                goto done;
        }
        if (!(mem = malloc((size_t)size + 1)) || pread_all(fd, mem, (size_t)size, 0) != size) {
                r = conn_error(c, PE_INTERNAL, "cannot read the spooled input");
                goto done;
        }
        /* A certificate file or bundle first; else a signed message. */
        if (size > 0 && memmem(mem, (size_t)size, "-----BEGIN ", 11)) {
                certs_from_pem(all, crls, mem, (size_t)size);
        } else if (size > 0 && mem[0] == 0x30) {
                const unsigned char *q = mem;
                X509 *x = d2i_X509(NULL, &q, (long)size);
                X509_CRL *crl = NULL;

                if (x && q == mem + size) {
                        if (!sk_X509_push(all, x))
                                X509_free(x);
                } else {
                        X509_free(x);
                        q = mem;
                        crl = d2i_X509_CRL(NULL, &q, (long)size);
                        if (crl && q == mem + size) {
                                if (!sk_X509_CRL_push(crls, crl))
                                        X509_CRL_free(crl);
                        } else {
                                X509_CRL_free(crl);
                                q = mem;
                                pp.cms = d2i_CMS_ContentInfo(NULL, &q, (long)size);
                        }
                }
                ERR_clear_error();
        } else if (parse_input(fd, size, NULL, 0, &pp, err, sizeof(err)) != 0) {
                r = conn_error(c, PE_BAD_INPUT, "nothing to import: %s", err);
                goto done;
        }
        if (pp.cms) {
                STACK_OF(X509) *certs = CMS_get1_certs(pp.cms);
                STACK_OF(X509_CRL) *more = CMS_get1_crls(pp.cms);
                struct verified vf = { .own_fd = -1 };
                struct vres v = { 0 };

                /* A signed message: verify it, so that its signer's
                 * capabilities are recorded as on a harvest. */
                if (CMS_get0_SignerInfos(pp.cms) && sk_CMS_SignerInfo_num(CMS_get0_SignerInfos(pp.cms)) > 0 &&
                    (pp.kind == 2 || pp.kind == 3 || !CMS_is_detached(pp.cms)) &&
                    run_verify(c, fd, &pp, NULL, &v, &vf, err, sizeof(err)) == 0) {
                        harvest(c, &v);
                        if (vf.own_fd >= 0)
                                close(vf.own_fd);
                }
                vres_free(&v);
                push_certs(all, certs);
                push_crls(crls, more);
                sk_X509_pop_free(certs, X509_free);
                sk_X509_CRL_pop_free(more, X509_CRL_free);
                ERR_clear_error();
        }
        if (sk_X509_num(all) == 0 && sk_X509_CRL_num(crls) == 0) {
                r = conn_error(c, PE_BAD_INPUT, "no certificate or CRL found in the input (expected a signed message, "
                               "a PEM or DER certificate or CRL, or a PKCS#7 bundle)");
                goto done;
        }
        r = 0;
        for (int i = 0; i < sk_X509_num(all) && r >= 0; i++) {
                X509 *x = sk_X509_value(all, i);
                struct cs_entry e;
                struct proto_msg m;
                bool added;

                if (certstore_add(c->agent->book, x, "imported", false, 0, 0, &added, err, sizeof(err)) < 0) {
                        r = conn_error(c, PE_STORE, "%s", err);
                        goto done;
                }
                count += added;
                if (certstore_lookup(c->agent->book, x, &e) < 0)
                        continue;
                proto_msg_init(&m, PROTO_CERT);
                certs_put_entry(c, &m, &e);
                r = proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
                cs_entry_clear(&e);
        }
        /* CRLs after the certificates: their issuer may be in the same bundle. */
        for (int i = 0; i < sk_X509_CRL_num(crls) && r >= 0; i++) {
                int k = certstore_add_crl(c->agent->book, sk_X509_CRL_value(crls, i), err, sizeof(err));

                if (k < 0) {
                        r = conn_error(c, k == -ENOENT ? PE_NOT_FOUND : k == -EBADMSG ? PE_BAD_INPUT : PE_STORE,
                                       "CRL %d of %d not imported: %s%s", i + 1, sk_X509_CRL_num(crls), err,
                                       sk_X509_num(all) ? " (the certificates of the input were imported)" : "");
                        goto done;
                }
                crl_count += (uint64_t)k;
        }
        if (r >= 0) {
                struct proto_msg m;

                proto_msg_init(&m, PROTO_DONE);
                proto_put_uint(&m, PT_COUNT, count);
                proto_put_uint(&m, PT_CRL_COUNT, crl_count);
                r = proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
                log_info("imported %llu new certificate(s) of %d and %llu CRL(s) of %d for pid %d",
                         (unsigned long long)count, sk_X509_num(all), (unsigned long long)crl_count,
                         sk_X509_CRL_num(crls), (int)c->pid);
        }
done:
        sk_X509_pop_free(all, X509_free);
        sk_X509_CRL_pop_free(crls, X509_CRL_free);
        parsed_free(&pp);
        free(mem);
        if (fd >= 0)
                close(fd);
        stream_done(&st);
        return r < 0 ? -1 : 0;
}
