/* encrypt.c — the ENCRYPT request: choose each recipient's certificate,
 * the key transport and the content cipher from what the recipients
 * advertise, then stream EnvelopedData / AuthEnvelopedData through
 * OpenSSL's CMS encoder (constant memory, like sign.c).
 *
 * Recipient certificates come from the address book, from the tokens (the
 * user's own) or from the request (RECIPIENT_CERT). The sender's own
 * certificate (the default identity's, or KEY's) is added unless NO_SELF.
 *
 * Must never: encrypt for some recipients when others fail (every failure
 * is collected and reported in one ERROR RECIPIENT before READY), or pick
 * a certificate that is expired, revoked, distrusted, untrusted or not
 * allowed to encrypt.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/pem.h>  /* before cms.h */
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/rsa.h>

#include "agent.h"
#include "authz.h"
#include "certs.h"
#include "certstore.h"
#include "identity.h"
#include "log.h"
#include "stream.h"

#define MAX_RECIPIENTS 256

/* What the agent itself decrypts (decrypt.c: AES-CBC/GCM, RSA-OAEP with
 * any SHA-2); the user's own certificates use it unless the address book
 * knows better. */
#define SELF_CAPS (CAP_AES256_GCM | CAP_AES128_GCM | CAP_AES256_CBC | CAP_AES192_CBC | CAP_AES128_CBC | CAP_RSA_OAEP)
/* RFC 8551 2.7.1: without SMIMECapabilities, assume AES-CBC. */
#define UNKNOWN_CAPS (CAP_AES256_CBC | CAP_AES128_CBC)

enum enc_format { ENC_DER, ENC_PEM, ENC_SMIME };

struct recip {
        char label[600];                /* as the client named it */
        X509 *cert;
        struct cert_facts f;
        bool have_facts;
        const char *source;             /* "address-book", "token", "request" */
        bool caps_known;
        unsigned caps;
        unsigned problems;
        char why[2048];
        char key_transport[64];         /* as DECRYPT names it */
        bool self;
};

static void recip_clear(struct recip *r)
{
        X509_free(r->cert);
        if (r->have_facts)
                cert_facts_clear(&r->f);
        memset(r, 0, sizeof(*r));
}

static void fmt_day(time_t t, char *buf, size_t n)
{
        struct tm tm;

        gmtime_r(&t, &tm);
        strftime(buf, n, "%Y-%m-%d", &tm);
}

static void add_why(struct recip *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_why(struct recip *r, const char *fmt, ...)
{
        size_t used = strlen(r->why);
        va_list ap;

        if (used && used + 3 < sizeof(r->why)) {
                memcpy(r->why + used, "; ", 3);
                used += 2;
        }
        va_start(ap, fmt);
        vsnprintf(r->why + used, sizeof(r->why) - used, fmt, ap);
        va_end(ap);
}

static bool key_supported(const struct cert_facts *f)
{
        return strcmp(f->key_type, "RSA") == 0 ||
               (strcmp(f->key_type, "EC") == 0 && f->curve && f->curve[0] == 'P');
}

/* Problems of the user's own certificate: validity, usage, key type (the
 * chain is not asked for: the certificate is on the user's own token). */
static unsigned own_problems(const struct cert_facts *f, char *why, size_t n)
{
        time_t now = time(NULL);
        char d[16];

        if (now > f->not_after) {
                fmt_day(f->not_after, d, sizeof(d));
                snprintf(why, n, "certificate %s expired on %s", f->subject, d);
                return P_EXPIRED;
        }
        if (now < f->not_before) {
                fmt_day(f->not_before, d, sizeof(d));
                snprintf(why, n, "certificate %s is not valid before %s", f->subject, d);
                return P_NOT_YET_VALID;
        }
        if (!key_supported(f)) {
                snprintf(why, n, "certificate %s has a %s key; only RSA and EC (P-256/384/521) keys can receive "
                         "encrypted mail here", f->subject, f->key_type);
                return P_UNSUPPORTED_KEY;
        }
        if (!f->usage_encrypt) {
                snprintf(why, n, "certificate %s does not allow encryption (keyUsage needs %s, extendedKeyUsage "
                         "emailProtection)", f->subject, strcmp(f->key_type, "EC") == 0 ? "keyAgreement"
                                                                                    : "keyEncipherment");
                return P_KEY_USAGE;
        }
        why[0] = '\0';
        return 0;
}

/* A candidate certificate, judged. */
struct cand {
        X509 *cert;                     /* borrowed */
        struct cert_facts f;
        const char *source;
        bool caps_known;
        unsigned caps;
        unsigned problems;
        char why[1100];
};

static void judge(struct conn *c, struct cand *k, bool own)
{
        cert_facts_load(&k->f, k->cert);
        if (own) {
                k->problems = own_problems(&k->f, k->why, sizeof(k->why));
                return;
        }
        {
                struct cs_check chk;

                certs_status(c->agent, k->cert, &k->f, CS_TRUST_NONE, &chk);
                k->problems = chk.problems;
                if (!key_supported(&k->f) && !(k->problems & P_UNSUPPORTED_KEY)) {
                        k->problems |= P_UNSUPPORTED_KEY;
                        snprintf(chk.text + strlen(chk.text), sizeof(chk.text) - strlen(chk.text),
                                 "%s%s %s keys cannot receive encrypted mail here", chk.text[0] ? "; " : "",
                                 k->f.key_type, k->f.curve ? k->f.curve : "");
                }
                snprintf(k->why, sizeof(k->why), "%s", chk.text);
        }
}

/* Chooses among candidates: the newest usable one wins; when none is
 * usable, the newest explains, and the others are listed. */
static void choose(struct recip *r, struct cand *v, size_t n)
{
        struct cand *best = NULL, *newest = NULL;

        for (size_t i = 0; i < n; i++) {
                if (!newest || v[i].f.not_before > newest->f.not_before)
                        newest = &v[i];
                if (v[i].problems == 0 && (!best || v[i].f.not_before > best->f.not_before))
                        best = &v[i];
        }
        if (!best) {
                r->problems = newest->problems;
                add_why(r, "%s", newest->why);
                for (size_t i = 0; i < n; i++) {
                        char d[16];

                        if (&v[i] == newest)
                                continue;
                        fmt_day(v[i].f.not_after, d, sizeof(d));
                        add_why(r, "another certificate for it (%s, valid until %s, from the %s) cannot be used "
                                "either: %s", v[i].f.subject, d, v[i].source, v[i].why);
                }
                return;
        }
        X509_up_ref(best->cert);
        r->cert = best->cert;
        r->f = best->f;
        r->have_facts = true;
        memset(&best->f, 0, sizeof(best->f));   /* moved */
        r->source = best->source;
        r->caps_known = best->caps_known;
        r->caps = best->caps;
}

static void cands_free(struct cand *v, size_t n)
{
        for (size_t i = 0; i < n; i++)
                cert_facts_clear(&v[i].f);
        free(v);
}

static bool looks_like_fp(const char *s)
{
        size_t n = 0;

        for (; *s; s++) {
                if (*s == ':')
                        continue;
                if (!isxdigit((unsigned char)*s))
                        return false;
                n++;
        }
        return n == 64;
}

static void resolve_name(struct conn *c, struct identity_set *set, const char *name, struct recip *r)
{
        struct cs_list l = { 0 };
        struct cand *v = NULL;
        size_t n = 0;
        bool by_fp = looks_like_fp(name);
        char fp[65] = "";

        snprintf(r->label, sizeof(r->label), "%s", name);
        if (by_fp) {
                size_t k = 0;

                for (const char *s = name; *s && k < 64; s++)
                        if (*s != ':')
                                fp[k++] = (char)tolower((unsigned char)*s);
                fp[k] = '\0';
        }
        if (certstore_list(c->agent->book, by_fp ? NULL : name, &l) < 0)
                goto oom;
        v = calloc(l.n + set->n + 1, sizeof(*v));
        if (!v)
                goto oom;
        for (size_t i = 0; i < l.n; i++) {
                if (by_fp && strcmp(l.v[i].facts.fp, fp) != 0)
                        continue;
                if (l.v[i].facts.is_ca)
                        continue;
                v[n].cert = l.v[i].cert;
                v[n].source = "address book";
                v[n].caps_known = l.v[i].caps_known;
                v[n].caps = l.v[i].caps;
                judge(c, &v[n++], false);
        }
        for (size_t i = 0; i < set->n; i++) {
                const struct identity *id = &set->ids[i];
                char idfp[65];
                bool dup = false;

                if (!id->cert)
                        continue;
                cs_fingerprint(id->cert, idfp);
                if (by_fp ? strcmp(idfp, fp) != 0 : !cert_facts_has_email(&(struct cert_facts){
                                .emails = id->emails, .n_emails = id->n_emails }, name))
                        continue;
                for (size_t k = 0; k < n && !dup; k++)
                        dup = strcmp(v[k].f.fp, idfp) == 0;
                if (dup)
                        continue;
                v[n].cert = id->cert;
                v[n].source = "token";
                v[n].caps_known = true;
                v[n].caps = SELF_CAPS;
                judge(c, &v[n++], true);
        }
        if (n == 0) {
                r->problems = P_NO_CERT;
                if (by_fp)
                        add_why(r, "no certificate with this fingerprint in the address book or on the tokens");
                else
                        add_why(r, "no certificate for %s in the address book or on the tokens; import one from a "
                                "signed message from them (`smimectl verify` or `smimectl import`), or give the "
                                "certificate file with -r FILE", name);
        } else {
                choose(r, v, n);
        }
        cands_free(v, n);
        cs_list_free(&l);
        return;
oom:
        cs_list_free(&l);
        r->problems = P_NO_CERT;
        add_why(r, "out of memory");
}

static void resolve_cert(struct conn *c, const uint8_t *p, size_t len, unsigned idx, struct recip *r)
{
        struct cand k = { 0 };
        struct cs_entry e;

        snprintf(r->label, sizeof(r->label), "certificate #%u", idx + 1);
        k.cert = certs_parse_one(p, len);
        if (!k.cert) {
                r->problems = P_NO_CERT;
                add_why(r, "the certificate sent is neither a DER nor a PEM X.509 certificate");
                return;
        }
        k.source = "request";
        if (certstore_lookup(c->agent->book, k.cert, &e) == 0) {
                k.caps_known = e.caps_known;
                k.caps = e.caps;
                cs_entry_clear(&e);
        }
        judge(c, &k, false);
        if (k.f.n_emails)
                snprintf(r->label, sizeof(r->label), "%s", k.f.emails[0]);
        else
                snprintf(r->label, sizeof(r->label), "%s", k.f.subject);
        if (k.problems) {
                r->problems = k.problems;
                add_why(r, "%s", k.why);
                cert_facts_clear(&k.f);
        } else {
                r->cert = k.cert;
                k.cert = NULL;
                r->f = k.f;
                r->have_facts = true;
                r->source = k.source;
                r->caps_known = k.caps_known;
                r->caps = k.caps;
        }
        X509_free(k.cert);
}

/* The sender's own certificate: the identity KEY (or the default) names,
 * or another certificate on the tokens for the same address that allows
 * encryption (a separate encryption certificate); the newest valid. */
static void resolve_self(struct conn *c, struct identity_set *set, const char *key, struct recip *r)
{
        const char *sel = key && *key ? key : c->agent->cfg.default_key;
        const struct identity *id = NULL;
        struct cand *v;
        size_t n = 0;
        char msg[2048];

        r->self = true;
        snprintf(r->label, sizeof(r->label), "yourself");
        if (!sel) {
                r->problems = P_NO_CERT;
                add_why(r, "no default key is configured, so the agent cannot add your own certificate (to read the "
                        "message later): set default-key in the configuration, name yours with --key, or leave "
                        "yourself out with --no-self");
                return;
        }
        if (identity_select(set, sel, NULL, authz_visible_fn, c, &id, msg, sizeof(msg)) != 0) {
                r->problems = P_NO_CERT;
                add_why(r, "cannot add your own certificate (%s): %s; or leave yourself out with --no-self", sel, msg);
                return;
        }
        snprintf(r->label, sizeof(r->label), "yourself (%s)", id->n_emails ? id->emails[0] : sel);
        if (!(v = calloc(set->n + 1, sizeof(*v)))) {
                r->problems = P_NO_CERT;
                add_why(r, "out of memory");
                return;
        }
        for (size_t i = 0; i < set->n; i++) {
                const struct identity *o = &set->ids[i];
                bool same = o == id;

                for (size_t k = 0; !same && k < id->n_emails; k++)
                        for (size_t j = 0; !same && j < o->n_emails; j++)
                                same = strcasecmp(id->emails[k], o->emails[j]) == 0;
                if (!same || !o->cert)
                        continue;
                v[n].cert = o->cert;
                v[n].source = "token";
                judge(c, &v[n], true);
                {
                        struct cs_entry e;

                        v[n].caps_known = true;
                        v[n].caps = SELF_CAPS;
                        if (certstore_lookup(c->agent->book, o->cert, &e) == 0) {
                                if (e.caps_known)
                                        v[n].caps = e.caps;
                                cs_entry_clear(&e);
                        }
                }
                n++;
        }
        if (n == 0) {
                r->problems = P_NO_CERT;
                add_why(r, "your key %s has no certificate; leave yourself out with --no-self", id->tk->uri);
        } else {
                choose(r, v, n);
                if (r->problems)
                        add_why(r, "leave yourself out with --no-self, or store a certificate that allows encryption "
                                "on your token");
        }
        cands_free(v, n);
}

/* ---- ciphers -------------------------------------------------------------------------------- */

static const struct cipher_choice {
        unsigned cap;
        const char *name;
        const EVP_CIPHER *(*cipher)(void);
        const char *desc;
} ciphers[] = {
        { CAP_AES256_GCM, "aes-256-gcm", EVP_aes_256_gcm, "AES-256-GCM (AuthEnvelopedData)" },
        { CAP_AES256_CBC, "aes-256-cbc", EVP_aes_256_cbc, "AES-256-CBC (EnvelopedData)" },
        { CAP_AES128_GCM, "aes-128-gcm", EVP_aes_128_gcm, "AES-128-GCM (AuthEnvelopedData)" },
        { CAP_AES128_CBC, "aes-128-cbc", EVP_aes_128_cbc, "AES-128-CBC (EnvelopedData)" },
};

static unsigned accepts(const struct recip *r)
{
        return r->caps_known ? r->caps : UNKNOWN_CAPS;
}

static const struct cipher_choice *choose_cipher(struct recip *v, size_t n)
{
        for (size_t k = 0; k < sizeof(ciphers) / sizeof(ciphers[0]); k++) {
                bool all = true;

                for (size_t i = 0; i < n && all; i++)
                        all = (accepts(&v[i]) & ciphers[k].cap) != 0;
                if (all)
                        return &ciphers[k];
        }
        return NULL;
}

static void caps_text(const struct recip *r, char *buf, size_t n)
{
        size_t used = 0;

        buf[0] = '\0';
        if (!r->caps_known) {
                snprintf(buf, n, "no capabilities known (assumed AES-CBC)");
                return;
        }
        for (unsigned i = 0; i < CAP_COUNT && used + 2 < n; i++)
                if (r->caps & (1u << i)) {
                        snprintf(buf + used, n - used, "%s%s", used ? ", " : "", cs_cap_name(i));
                        used = strlen(buf);
                }
        if (!used)
                snprintf(buf, n, "no AES cipher advertised");
}

/* ---- the request ---------------------------------------------------------------------------- */

static int send_failures(struct conn *c, struct recip *v, size_t n)
{
        struct proto_msg m;
        char *msg = malloc(60000);
        size_t used, bad = 0;
        int r;

        if (!msg)
                return conn_error(c, PE_INTERNAL, "out of memory");
        for (size_t i = 0; i < n; i++)
                bad += v[i].problems != 0;
        snprintf(msg, 60000, "nothing was encrypted: %zu of %zu recipient(s) cannot be encrypted to:", bad, n);
        proto_msg_init(&m, PROTO_ERROR);
        proto_put_uint(&m, PT_CODE, PE_RECIPIENT);
        for (size_t i = 0; i < n; i++) {
                if (!v[i].problems)
                        continue;
                used = strlen(msg);
                snprintf(msg + used, 60000 - used, "\n  %s:", v[i].label);
                proto_begin_group(&m, PT_FAILED);
                proto_put_string(&m, PT_RECIPIENT, v[i].label);
                for (unsigned k = 0; k < CS_PROBLEM_COUNT; k++)
                        if (v[i].problems & (1u << k)) {
                                used = strlen(msg);
                                snprintf(msg + used, 60000 - used, " %s", cs_problem_name(k));
                                proto_put_string(&m, PT_PROBLEM, cs_problem_name(k));
                        }
                used = strlen(msg);
                snprintf(msg + used, 60000 - used, " — %s", v[i].why);
                proto_put_string(&m, PT_MESSAGE, v[i].why);
                proto_end_group(&m);
        }
        proto_put_string(&m, PT_MESSAGE, msg);
        log_info("pid %d: RECIPIENT: %s", (int)c->pid, msg);
        r = proto_msg_error(&m) ? proto_msg_error(&m) : proto_write_msg(c->fd, &m);
        proto_msg_free(&m);
        free(msg);
        return r;
}

static int ec_kdf(CMS_RecipientInfo *ri, const struct cert_facts *f)
{
        EVP_PKEY_CTX *pctx = CMS_RecipientInfo_get0_pkey_ctx(ri);
        /* RFC 5753 / 8551: the X9.63 KDF hash as strong as the curve. */
        const EVP_MD *md = f->bits > 384 ? EVP_sha512() : f->bits > 256 ? EVP_sha384() : EVP_sha256();

        return pctx && EVP_PKEY_CTX_set_ecdh_kdf_md(pctx, md) > 0;
}

static int rsa_oaep(CMS_RecipientInfo *ri)
{
        EVP_PKEY_CTX *pctx = CMS_RecipientInfo_get0_pkey_ctx(ri);

        return pctx && EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_OAEP_PADDING) > 0 &&
               EVP_PKEY_CTX_set_rsa_oaep_md(pctx, EVP_sha256()) > 0 &&
               EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha256()) > 0;
}

static void openssl_error(char *buf, size_t n)
{
        unsigned long e = ERR_peek_last_error();

        if (e)
                ERR_error_string_n(e, buf, n);
        else
                snprintf(buf, n, "unknown OpenSSL error");
        ERR_clear_error();
}

int encrypt_serve(struct conn *c)
{
        const uint8_t *p = c->frame.body;
        size_t n = c->frame.len, nr = 0;
        struct recip *v = NULL;
        struct identity_set *set = NULL;
        const struct cipher_choice *cc = NULL;
        enum enc_format fmt = ENC_SMIME;
        CMS_ContentInfo *cms = NULL;
        BIO *in = NULL, *out = NULL;
        struct proto_iter it;
        struct proto_field f;
        struct stream st;
        char *key = NULL, *s = NULL, msg[1024];
        uint64_t no_self = 0;
        bool oaep = true, any_rsa = false, failed = false;
        unsigned idx = 0;
        int r = 0, ok;

        stream_init(&st, c->fd);
        if (certstore_error(c->agent->book)) {
                r = conn_error(c, PE_STORE, "%s", certstore_error(c->agent->book));
                goto done;
        }
        if (proto_get_string(p, n, PT_FORMAT, &s) == 0) {
                if (strcmp(s, "der") == 0)
                        fmt = ENC_DER;
                else if (strcmp(s, "pem") == 0)
                        fmt = ENC_PEM;
                else if (strcmp(s, "smime") != 0) {
                        r = conn_error(c, PE_UNSUPPORTED, "unknown output format '%s'; use der, pem or smime", s);
                        goto done;
                }
        }
        (void)proto_get_uint(p, n, PT_NO_SELF, &no_self);
        if (proto_get_string(p, n, PT_KEY, &key) == -ENOMEM || !(v = calloc(MAX_RECIPIENTS + 1, sizeof(*v)))) {
                r = conn_error(c, PE_INTERNAL, "out of memory");
                goto done;
        }
        set = identity_set_get(c->agent->store, c->agent->cfg.default_key);
        if (!set) {
                r = conn_error(c, PE_INTERNAL, "cannot read the keys of the tokens");
                goto done;
        }
        proto_iter_init(&it, p, n);
        while (proto_iter_next(&it, &f) > 0) {
                if (f.tag != PT_RECIPIENT && f.tag != PT_RECIPIENT_CERT)
                        continue;
                if (nr == MAX_RECIPIENTS) {
                        r = conn_error(c, PE_UNSUPPORTED, "more than %u recipients", MAX_RECIPIENTS);
                        goto done;
                }
                if (f.tag == PT_RECIPIENT) {
                        char *name = NULL;

                        if (proto_field_string(&f, &name) < 0) {
                                r = conn_error(c, PE_INTERNAL, "out of memory");
                                goto done;
                        }
                        resolve_name(c, set, name, &v[nr++]);
                        free(name);
                } else {
                        resolve_cert(c, f.val, f.len, idx++, &v[nr++]);
                }
        }
        if (nr == 0) {
                r = conn_error(c, PE_BAD_INPUT, "no recipient given: name at least one (-r EMAIL or -r CERTFILE)");
                goto done;
        }
        if (!no_self) {
                resolve_self(c, set, key, &v[nr]);
                /* Already a recipient (encrypting to oneself): once is enough. */
                for (size_t i = 0; i < nr && v[nr].cert; i++)
                        if (v[i].cert && X509_cmp(v[i].cert, v[nr].cert) == 0) {
                                recip_clear(&v[nr]);
                                break;
                        }
                if (v[nr].cert || v[nr].problems)
                        nr++;
        }
        for (size_t i = 0; i < nr; i++)
                failed |= v[i].problems != 0;
        if (!failed && !(cc = choose_cipher(v, nr))) {
                for (size_t i = 0; i < nr; i++) {
                        char caps[256];

                        caps_text(&v[i], caps, sizeof(caps));
                        v[i].problems |= P_NO_COMMON_CIPHER;
                        add_why(&v[i], "no content cipher is common to all recipients: this one advertises %s", caps);
                }
                failed = true;
        }
        if (failed) {
                r = send_failures(c, v, nr);
                goto done;
        }
        for (size_t i = 0; i < nr; i++)
                if (strcmp(v[i].f.key_type, "RSA") == 0) {
                        any_rsa = true;
                        oaep = oaep && v[i].caps_known && (v[i].caps & CAP_RSA_OAEP);
                }
        oaep = oaep && any_rsa;

        cms = CMS_encrypt_ex(NULL, NULL, cc->cipher(), CMS_PARTIAL | CMS_STREAM | (fmt == ENC_SMIME ? 0 : CMS_BINARY),
                             NULL, NULL);
        for (size_t i = 0; cms && i < nr; i++) {
                bool rsa = strcmp(v[i].f.key_type, "RSA") == 0;
                CMS_RecipientInfo *ri = CMS_add1_recipient_cert(cms, v[i].cert, CMS_KEY_PARAM);

                if (!ri || (rsa && oaep && !rsa_oaep(ri)) || (!rsa && !ec_kdf(ri, &v[i].f))) {
                        CMS_ContentInfo_free(cms);
                        cms = NULL;
                        break;
                }
                snprintf(v[i].key_transport, sizeof(v[i].key_transport), "%s", rsa ? (oaep ? "rsa-oaep" : "rsa-pkcs1-v1.5")
                         : v[i].f.bits > 384 ? "dhSinglePass-stdDH-sha512kdf-scheme"
                         : v[i].f.bits > 256 ? "dhSinglePass-stdDH-sha384kdf-scheme"
                         : "dhSinglePass-stdDH-sha256kdf-scheme");
        }
        if (!cms) {
                openssl_error(msg, sizeof(msg));
                r = conn_error(c, PE_INTERNAL, "cannot prepare the encryption: %s", msg);
                goto done;
        }
        {
                struct proto_msg m;

                proto_msg_init(&m, PROTO_READY);
                proto_put_string(&m, PT_CIPHER, cc->name);
                proto_put_string(&m, PT_SUMMARY, cc->desc);
                for (size_t i = 0; i < nr; i++) {
                        proto_begin_group(&m, PT_RECIPIENT_INFO);
                        proto_put_string(&m, PT_RECIPIENT, v[i].label);
                        proto_put_string(&m, PT_SUBJECT, v[i].f.subject);
                        proto_put_string(&m, PT_FINGERPRINT, v[i].f.fp);
                        for (size_t k = 0; k < v[i].f.n_emails; k++)
                                proto_put_string(&m, PT_EMAIL, v[i].f.emails[k]);
                        proto_put_string(&m, PT_KEY_TRANSPORT, v[i].key_transport);
                        proto_put_string(&m, PT_SOURCE, v[i].source);
                        proto_put_uint(&m, PT_NOT_AFTER, (uint64_t)v[i].f.not_after);
                        proto_end_group(&m);
                }
                r = proto_msg_error(&m) ? proto_msg_error(&m) : proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
                if (r < 0)
                        goto done;
        }

        in = stream_in_bio(&st);
        out = stream_out_bio(&st);
        if (!in || !out) {
                r = conn_error(c, PE_INTERNAL, "out of memory");
                goto done;
        }
        if (fmt == ENC_SMIME) {
                bool has_headers;

                r = smime_split_headers(c, &st, &has_headers);
                if (r > 0) {
                        r = 0;
                        goto done;
                }
                if (r < 0) {
                        r = st.err ? conn_stream_failure(c, &st) : r;
                        goto done;
                }
                st.crlf = true;
                ok = SMIME_write_CMS(out, cms, in, CMS_STREAM | (has_headers ? 0 : CMS_TEXT));
        } else if ((r = stream_input_empty(&st)) != 0) {
                BIO *empty;

                if (r < 0) {
                        r = conn_stream_failure(c, &st);
                        goto done;
                }
                /* OpenSSL 3.0 cannot stream empty content: finish it in one go. */
                empty = BIO_new(BIO_s_mem());
                ok = empty && CMS_final(cms, empty, NULL, CMS_BINARY) &&
                     (fmt == ENC_PEM ? PEM_write_bio_CMS(out, cms) : i2d_CMS_bio(out, cms));
                BIO_free(empty);
        } else if (fmt == ENC_DER) {
                ok = i2d_CMS_bio_stream(out, cms, in, CMS_STREAM | CMS_BINARY);
        } else {
                ok = PEM_write_bio_CMS_stream(out, cms, in, CMS_STREAM | CMS_BINARY);
        }
        if (ok && stream_flush(&st) < 0)
                ok = 0;
        if (st.err) {
                r = conn_stream_failure(c, &st);
        } else if (!ok) {
                openssl_error(msg, sizeof(msg));
                r = conn_error(c, PE_INTERNAL, "encryption failed: %s", msg);
        } else {
                struct proto_msg m;

                proto_msg_init(&m, PROTO_DONE);
                proto_put_uint(&m, PT_BYTES_IN, st.bytes_in);
                proto_put_uint(&m, PT_BYTES_OUT, st.bytes_out);
                r = proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
                log_info("encrypted %llu bytes for pid %d to %zu recipient(s) with %s", (unsigned long long)st.bytes_in,
                         (int)c->pid, nr, cc->name);
        }
done:
        BIO_free(in);
        BIO_free(out);
        CMS_ContentInfo_free(cms);
        for (size_t i = 0; v && i <= MAX_RECIPIENTS; i++)
                recip_clear(&v[i]);
        free(v);
        identity_set_unref(set);
        free(key);
        free(s);
        stream_done(&st);
        return r < 0 ? -1 : 0;
}
