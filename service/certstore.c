/* certstore.c — the address book and the trust policy (see certstore.h).
 *
 * File format (text, one entry per certificate, in the order added):
 *
 *   # smime-agent address book, format 1
 *   entry trust=none source=harvested added=1764000000 caps=aes-256-gcm,aes-256-cbc caps-time=1764000000
 *   -----BEGIN CERTIFICATE-----
 *   ...
 *   -----END CERTIFICATE-----
 *
 * caps=- means "no capabilities known". The fingerprint is recomputed on
 * load, never trusted from the file.
 *
 * Must never: write the book in place, or keep going after a failed write
 * as if it had succeeded.
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/asn1.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "certstore.h"
#include "log.h"
#include "revoke.h"

struct book_entry {
        X509 *cert;
        char fp[65];
        enum cs_trust trust;
        char source[16];
        time_t added;
        unsigned caps;
        bool caps_known;
        time_t caps_time;
};

struct certstore {
        pthread_mutex_t lock;
        char *path;
        char *load_error;
        struct book_entry *v;
        size_t n, cap;
        STACK_OF(X509) *anchors;        /* system bundle + ca-file, read once */
        char **crl_files;               /* re-read on every check: they are replaced by cron jobs */
        size_t n_crl_files;
        struct revoke *rv;              /* fetched and imported CRLs, OCSP (revoke.h) */
        bool unknown_allow;             /* revocation-unknown = allow */
};

/* ---- names ---------------------------------------------------------------- */

static const struct { unsigned bit; const char *name; int nid; } caps_table[CAP_COUNT] = {
        { CAP_AES256_GCM, "aes-256-gcm", NID_aes_256_gcm },
        { CAP_AES128_GCM, "aes-128-gcm", NID_aes_128_gcm },
        { CAP_AES256_CBC, "aes-256-cbc", NID_aes_256_cbc },
        { CAP_AES192_CBC, "aes-192-cbc", NID_aes_192_cbc },
        { CAP_AES128_CBC, "aes-128-cbc", NID_aes_128_cbc },
        { CAP_RSA_OAEP, "rsaes-oaep", NID_rsaesOaep },
};

const char *cs_cap_name(unsigned i)
{
        return i < CAP_COUNT ? caps_table[i].name : "?";
}

unsigned cs_cap_from_name(const char *name)
{
        for (unsigned i = 0; i < CAP_COUNT; i++)
                if (strcmp(name, caps_table[i].name) == 0)
                        return caps_table[i].bit;
        return 0;
}

unsigned cs_caps_from_der(const unsigned char *der, long len)
{
        X509_ALGORS *algs = d2i_X509_ALGORS(NULL, &der, len);
        unsigned caps = 0;

        for (int i = 0; algs && i < sk_X509_ALGOR_num(algs); i++) {
                const ASN1_OBJECT *obj;
                int nid;

                X509_ALGOR_get0(&obj, NULL, NULL, sk_X509_ALGOR_value(algs, i));
                nid = OBJ_obj2nid(obj);
                for (unsigned k = 0; k < CAP_COUNT; k++)
                        if (caps_table[k].nid == nid)
                                caps |= caps_table[k].bit;
        }
        sk_X509_ALGOR_pop_free(algs, X509_ALGOR_free);
        return caps;
}

static const char *const problem_names[CS_PROBLEM_COUNT] = {
        "BAD_SIGNATURE", "CONTENT_ALTERED", "NO_SIGNER_CERT", "UNSUPPORTED_ALGORITHM", "EXPIRED",
        "NOT_YET_VALID", "REVOKED", "UNTRUSTED", "CHAIN_INCOMPLETE", "DISTRUSTED", "KEY_USAGE",
        "CHAIN_INVALID", "FROM_MISMATCH", "UNSUPPORTED_KEY", "NO_CERT", "NO_COMMON_CIPHER", "REVOCATION_UNKNOWN",
};

const char *cs_problem_name(unsigned i)
{
        return i < CS_PROBLEM_COUNT ? problem_names[i] : "UNKNOWN";
}

static const char *trust_name(enum cs_trust t)
{
        return t == CS_TRUST_TRUSTED ? "trusted" : t == CS_TRUST_DISTRUSTED ? "distrusted" : "none";
}

/* ---- certificate facts ---------------------------------------------------- */

void cs_fingerprint(X509 *x, char out[65])
{
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned len = 0;

        out[0] = '\0';
        if (!X509_digest(x, EVP_sha256(), md, &len))
                return;
        for (unsigned i = 0; i < len && i < 32; i++)
                snprintf(out + 2 * i, 3, "%02x", md[i]);
}

time_t cs_asn1_time(const ASN1_TIME *t)
{
        struct tm tm;

        if (!t || !ASN1_TIME_to_tm(t, &tm))
                return 0;
        return timegm(&tm);
}

static void add_email(struct cert_facts *f, const char *e, size_t len)
{
        char **v;

        if (len == 0 || memchr(e, '\0', len))
                return;
        for (size_t i = 0; i < f->n_emails; i++)
                if (strlen(f->emails[i]) == len && strncasecmp(f->emails[i], e, len) == 0)
                        return;
        v = realloc(f->emails, (f->n_emails + 1) * sizeof(*v));
        if (!v)
                return;
        f->emails = v;
        if ((v[f->n_emails] = strndup(e, len)))
                f->n_emails++;
}

const char *cs_curve_name(int nid)
{
        switch (nid) {
        case NID_X9_62_prime256v1: return "P-256";
        case NID_secp384r1: return "P-384";
        case NID_secp521r1: return "P-521";
        }
        return OBJ_nid2sn(nid);
}

int cert_facts_load(struct cert_facts *f, X509 *x)
{
        GENERAL_NAMES *gens = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
        X509_NAME *name = X509_get_subject_name(x);
        EVP_PKEY *pub = X509_get0_pubkey(x);
        BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
        char *hex = bn ? BN_bn2hex(bn) : NULL;
        uint32_t ku, xku;
        bool eku_ok;
        int i = -1;

        memset(f, 0, sizeof(*f));
        cs_fingerprint(x, f->fp);
        X509_NAME_oneline(name, f->subject, sizeof(f->subject));
        X509_NAME_oneline(X509_get_issuer_name(x), f->issuer, sizeof(f->issuer));
        snprintf(f->serial, sizeof(f->serial), "%s", hex ? hex : "");
        OPENSSL_free(hex);
        BN_free(bn);
        f->not_before = cs_asn1_time(X509_get0_notBefore(x));
        f->not_after = cs_asn1_time(X509_get0_notAfter(x));
        for (int k = 0; gens && k < sk_GENERAL_NAME_num(gens); k++) {
                GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, k);

                if (g->type == GEN_EMAIL)
                        add_email(f, (const char *)ASN1_STRING_get0_data(g->d.rfc822Name),
                                  (size_t)ASN1_STRING_length(g->d.rfc822Name));
        }
        GENERAL_NAMES_free(gens);
        while ((i = X509_NAME_get_index_by_NID(name, NID_pkcs9_emailAddress, i)) >= 0) {
                ASN1_STRING *s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));

                add_email(f, (const char *)ASN1_STRING_get0_data(s), (size_t)ASN1_STRING_length(s));
        }

        f->key_type = "unknown";
        if (pub) {
                f->bits = (unsigned)EVP_PKEY_get_bits(pub);
                if (EVP_PKEY_is_a(pub, "RSA")) {
                        f->key_type = "RSA";
                } else if (EVP_PKEY_is_a(pub, "EC")) {
                        char g[64];

                        f->key_type = "EC";
                        if (EVP_PKEY_get_utf8_string_param(pub, "group", g, sizeof(g), NULL))
                                f->curve = cs_curve_name(OBJ_txt2nid(g));
                } else if (EVP_PKEY_is_a(pub, "ED25519")) {
                        f->key_type = "Ed25519";
                } else if (EVP_PKEY_is_a(pub, "ED448")) {
                        f->key_type = "Ed448";
                }
        }
        ku = X509_get_key_usage(x);             /* UINT32_MAX when absent */
        xku = X509_get_extended_key_usage(x);
        eku_ok = xku == UINT32_MAX || (xku & (XKU_SMIME | XKU_ANYEKU));
        f->usage_sign = eku_ok && (ku & (KU_DIGITAL_SIGNATURE | KU_NON_REPUDIATION));
        if (strcmp(f->key_type, "RSA") == 0)
                f->usage_encrypt = eku_ok && (ku & KU_KEY_ENCIPHERMENT);
        else if (strcmp(f->key_type, "EC") == 0)
                f->usage_encrypt = eku_ok && (ku & KU_KEY_AGREEMENT);
        f->is_ca = X509_check_ca(x) > 0;
        return 0;
}

void cert_facts_clear(struct cert_facts *f)
{
        for (size_t i = 0; i < f->n_emails; i++)
                free(f->emails[i]);
        free(f->emails);
        f->emails = NULL;
        f->n_emails = 0;
}

bool cert_facts_has_email(const struct cert_facts *f, const char *email)
{
        for (size_t i = 0; i < f->n_emails; i++)
                if (strcasecmp(f->emails[i], email) == 0)
                        return true;
        return false;
}

/* ---- entries ---------------------------------------------------------------- */

static void copy_entry(struct cs_entry *dst, const struct book_entry *e)
{
        memset(dst, 0, sizeof(*dst));
        X509_up_ref(e->cert);
        dst->cert = e->cert;
        cert_facts_load(&dst->facts, e->cert);
        dst->trust = e->trust;
        snprintf(dst->source, sizeof(dst->source), "%s", e->source);
        dst->added = e->added;
        dst->caps = e->caps;
        dst->caps_known = e->caps_known;
        dst->caps_time = e->caps_time;
}

void cs_entry_clear(struct cs_entry *e)
{
        X509_free(e->cert);
        cert_facts_clear(&e->facts);
        memset(e, 0, sizeof(*e));
}

void cs_list_free(struct cs_list *l)
{
        for (size_t i = 0; i < l->n; i++)
                cs_entry_clear(&l->v[i]);
        free(l->v);
        l->v = NULL;
        l->n = 0;
}

static struct book_entry *find_fp(struct certstore *cs, const char *fp)
{
        for (size_t i = 0; i < cs->n; i++)
                if (strcasecmp(cs->v[i].fp, fp) == 0)
                        return &cs->v[i];
        return NULL;
}

static struct book_entry *append(struct certstore *cs, X509 *x)
{
        struct book_entry *e;

        if (cs->n == cs->cap) {
                size_t cap = cs->cap ? cs->cap * 2 : 16;
                struct book_entry *v = realloc(cs->v, cap * sizeof(*v));

                if (!v)
                        return NULL;
                cs->v = v;
                cs->cap = cap;
        }
        if (!X509_up_ref(x))
                return NULL;
        e = &cs->v[cs->n++];
        memset(e, 0, sizeof(*e));
        e->cert = x;
        cs_fingerprint(x, e->fp);
        return e;
}

/* ---- the file --------------------------------------------------------------- */

static int parse_entry_line(struct book_entry *e, char *line)
{
        char *save = NULL;

        for (char *tok = strtok_r(line + 6, " \t\r\n", &save); tok; tok = strtok_r(NULL, " \t\r\n", &save)) {
                char *v = strchr(tok, '=');

                if (!v)
                        return -EINVAL;
                *v++ = '\0';
                if (strcmp(tok, "trust") == 0) {
                        e->trust = strcmp(v, "trusted") == 0 ? CS_TRUST_TRUSTED
                                   : strcmp(v, "distrusted") == 0 ? CS_TRUST_DISTRUSTED : CS_TRUST_NONE;
                        if (e->trust == CS_TRUST_NONE && strcmp(v, "none") != 0)
                                return -EINVAL;
                } else if (strcmp(tok, "source") == 0) {
                        snprintf(e->source, sizeof(e->source), "%s", v);
                } else if (strcmp(tok, "added") == 0) {
                        e->added = (time_t)strtoll(v, NULL, 10);
                } else if (strcmp(tok, "caps-time") == 0) {
                        e->caps_time = (time_t)strtoll(v, NULL, 10);
                } else if (strcmp(tok, "caps") == 0) {
                        char *s2 = NULL;

                        e->caps_known = strcmp(v, "-") != 0;
                        for (char *c = e->caps_known ? strtok_r(v, ",", &s2) : NULL; c; c = strtok_r(NULL, ",", &s2))
                                e->caps |= cs_cap_from_name(c);
                }       /* unknown keys: written by a newer agent; ignore */
        }
        return 0;
}

static int load_book(struct certstore *cs)
{
        BIO *b = BIO_new_file(cs->path, "r");
        char line[1024];
        unsigned entry = 0;
        int r = 0;

        if (!b) {
                if (errno == ENOENT)
                        return 0;
                r = -errno;
                if (asprintf(&cs->load_error, "cannot read the address book %s: %s", cs->path, strerror(-r)) < 0)
                        cs->load_error = NULL;
                return r;
        }
        while (BIO_gets(b, line, sizeof(line)) > 0) {
                struct book_entry tmp = { .trust = CS_TRUST_NONE }, *e;
                X509 *x;

                if (strncmp(line, "entry ", 6) != 0)
                        continue;       /* comments, blank lines */
                entry++;
                snprintf(tmp.source, sizeof(tmp.source), "imported");
                x = parse_entry_line(&tmp, line) == 0 ? PEM_read_bio_X509(b, NULL, NULL, NULL) : NULL;
                if (!x) {
                        if (asprintf(&cs->load_error, "the address book %s is damaged at entry %u; the agent will "
                                     "not change it: move it away (or fix it) and restart the agent",
                                     cs->path, entry) < 0)
                                cs->load_error = NULL;
                        r = -EINVAL;
                        break;
                }
                if (find_fp(cs, (cs_fingerprint(x, tmp.fp), tmp.fp)) || !(e = append(cs, x))) {
                        X509_free(x);
                        continue;
                }
                tmp.cert = e->cert;
                *e = tmp;
                X509_free(x);
        }
        BIO_free(b);
        if (r == 0)
                log_info("address book %s: %zu certificate(s)", cs->path, cs->n);
        return r;
}

int cs_mkdir_parents(const char *path)
{
        char buf[PATH_MAX];

        if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
                return -ENAMETOOLONG;
        for (char *p = buf + 1; *p; p++) {
                if (*p != '/')
                        continue;
                *p = '\0';
                if (mkdir(buf, 0700) < 0 && errno != EEXIST)
                        return -errno;
                *p = '/';
        }
        return 0;
}

/* Writes the whole book to a temporary file beside it, then renames. */
static int save_book(struct certstore *cs, char *err, size_t n)
{
        char tmp[PATH_MAX], dir[PATH_MAX];
        FILE *f = NULL;
        int fd = -1, r = 0;

        if (!cs->path)
                return 0;
        if (snprintf(tmp, sizeof(tmp), "%s.XXXXXX", cs->path) >= (int)sizeof(tmp))
                return -ENAMETOOLONG;
        if ((r = cs_mkdir_parents(cs->path)) < 0)
                goto fail;
        fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0) {
                r = -errno;
                goto fail;
        }
        f = fdopen(fd, "w");
        if (!f) {
                r = -errno;
                close(fd);
                unlink(tmp);
                goto fail;
        }
        fprintf(f, "# smime-agent address book, format 1. Written by smime-agent: change it with smimectl\n"
                   "# (import, trust, distrust) while the agent runs, never by hand.\n");
        for (size_t i = 0; i < cs->n; i++) {
                const struct book_entry *e = &cs->v[i];

                fprintf(f, "entry trust=%s source=%s added=%lld caps=", trust_name(e->trust), e->source,
                        (long long)e->added);
                if (!e->caps_known) {
                        fputc('-', f);
                } else {
                        bool first = true;

                        for (unsigned k = 0; k < CAP_COUNT; k++)
                                if (e->caps & caps_table[k].bit) {
                                        fprintf(f, "%s%s", first ? "" : ",", caps_table[k].name);
                                        first = false;
                                }
                        if (first)
                                fputs("none", f);
                }
                fprintf(f, " caps-time=%lld\n", (long long)e->caps_time);
                if (!PEM_write_X509(f, e->cert)) {
                        r = -EIO;
                        break;
                }
        }
        if (r == 0 && (fflush(f) != 0 || fsync(fileno(f)) < 0))
                r = -errno;
        if (fclose(f) != 0 && r == 0)
                r = -errno;
        if (r == 0 && rename(tmp, cs->path) < 0)
                r = -errno;
        if (r < 0) {
                unlink(tmp);
                goto fail;
        }
        /* The rename itself must reach the disk too. */
        snprintf(dir, sizeof(dir), "%s", cs->path);
        fd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0) {
                (void)fsync(fd);
                close(fd);
        }
        return 0;
fail:
        snprintf(err, n, "cannot write the address book %s: %s", cs->path, strerror(-r));
        log_error("%s", err);
        return r;
}

/* ---- open / close ------------------------------------------------------------ */

static int read_pem_certs(STACK_OF(X509) *sk, const char *path, bool must_exist)
{
        BIO *b = BIO_new_file(path, "r");
        X509 *x;

        if (!b) {
                if (!must_exist)
                        return 0;
                log_error("cannot read the CA file %s: %m", path);
                return -errno ? -errno : -EIO;
        }
        while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)))
                if (!sk_X509_push(sk, x))
                        X509_free(x);
        ERR_clear_error();
        BIO_free(b);
        return 0;
}

/* The revocation cache: "revocation" in the book's directory. */
static int open_revocation(struct certstore *cs, const struct certstore_options *o)
{
        struct revoke_options ro = {
                .crl_fetch = o->crl_fetch, .ocsp_aia = o->ocsp_aia, .ocsp_responder = o->ocsp_responder,
                .timeout = o->revocation_timeout,
        };
        char dir[PATH_MAX], cache[PATH_MAX];

        cs->unknown_allow = o->revocation_unknown_allow;
        if (cs->path) {
                snprintf(dir, sizeof(dir), "%s", cs->path);
                if (snprintf(cache, sizeof(cache), "%s/revocation", dirname(dir)) >= (int)sizeof(cache))
                        return -ENAMETOOLONG;
                ro.dir = cache;
        }
        return revoke_open(&cs->rv, &ro);
}

int certstore_open(struct certstore **out, const struct certstore_options *o)
{
        struct certstore *cs = calloc(1, sizeof(*cs));
        int r = -ENOMEM;

        *out = NULL;
        if (!cs)
                return -ENOMEM;
        pthread_mutex_init(&cs->lock, NULL);
        cs->anchors = sk_X509_new_null();
        if (!cs->anchors || (o->path && !(cs->path = strdup(o->path))))
                goto fail;
        if (!o->no_system_ca) {
                const char *env = getenv(X509_get_default_cert_file_env());
                const char *bundle = env && *env ? env : X509_get_default_cert_file();

                (void)read_pem_certs(cs->anchors, bundle, false);
                log_debug("%d trust anchor(s) from the system bundle %s", sk_X509_num(cs->anchors), bundle);
        }
        for (size_t i = 0; i < o->n_ca_files; i++)
                if ((r = read_pem_certs(cs->anchors, o->ca_files[i], true)) < 0)
                        goto fail;
        r = -ENOMEM;
        if (o->n_crl_files && !(cs->crl_files = calloc(o->n_crl_files, sizeof(char *))))
                goto fail;
        for (size_t i = 0; i < o->n_crl_files; i++) {
                if (access(o->crl_files[i], R_OK) < 0) {
                        r = -errno;
                        log_error("cannot read the CRL file %s: %m", o->crl_files[i]);
                        goto fail;
                }
                if (!(cs->crl_files[i] = strdup(o->crl_files[i])))
                        goto fail;
                cs->n_crl_files++;
        }
        if ((r = open_revocation(cs, o)) < 0)
                goto fail;
        if (cs->path && load_book(cs) < 0)
                log_error("%s", cs->load_error ? cs->load_error : "cannot load the address book");
        *out = cs;
        return 0;
fail:
        certstore_free(cs);
        return r;
}

void certstore_free(struct certstore *cs)
{
        if (!cs)
                return;
        for (size_t i = 0; i < cs->n; i++)
                X509_free(cs->v[i].cert);
        free(cs->v);
        for (size_t i = 0; i < cs->n_crl_files; i++)
                free(cs->crl_files[i]);
        free(cs->crl_files);
        sk_X509_pop_free(cs->anchors, X509_free);
        revoke_free(cs->rv);
        free(cs->path);
        free(cs->load_error);
        pthread_mutex_destroy(&cs->lock);
        free(cs);
}

const char *certstore_error(struct certstore *cs)
{
        return cs->load_error;
}

/* ---- changes ------------------------------------------------------------------ */

int certstore_add(struct certstore *cs, X509 *x, const char *source, bool caps_known, unsigned caps,
                  time_t caps_time, bool *added, char *err, size_t n)
{
        struct book_entry *e;
        char fp[65];
        bool changed = false;
        int r = 0;

        *added = false;
        cs_fingerprint(x, fp);
        pthread_mutex_lock(&cs->lock);
        if (cs->load_error) {
                snprintf(err, n, "%s", cs->load_error);
                r = -EIO;
                goto out;
        }
        e = find_fp(cs, fp);
        if (!e) {
                if (!(e = append(cs, x))) {
                        snprintf(err, n, "out of memory");
                        r = -ENOMEM;
                        goto out;
                }
                snprintf(e->source, sizeof(e->source), "%s", source);
                e->added = time(NULL);
                *added = changed = true;
        }
        /* RFC 8551 2.7.1: the capabilities of the newest message win. */
        if (caps_known && (!e->caps_known || caps_time >= e->caps_time) &&
            (e->caps != caps || !e->caps_known || e->caps_time != caps_time)) {
                e->caps = caps;
                e->caps_known = true;
                e->caps_time = caps_time;
                changed = true;
        }
        if (changed && (r = save_book(cs, err, n)) < 0 && *added) {
                /* Not on disk: not in the book either. */
                X509_free(cs->v[--cs->n].cert);
                *added = false;
        }
out:
        pthread_mutex_unlock(&cs->lock);
        return r;
}

int certstore_set_trust(struct certstore *cs, X509 *x, const char *fp_in, enum cs_trust t, struct cs_entry *out,
                        char *err, size_t n)
{
        struct book_entry *e;
        enum cs_trust old;
        bool appended = false;
        char fp[65];
        int r = 0;

        if (x)
                cs_fingerprint(x, fp);
        else
                snprintf(fp, sizeof(fp), "%s", fp_in);
        pthread_mutex_lock(&cs->lock);
        if (cs->load_error) {
                snprintf(err, n, "%s", cs->load_error);
                r = -EIO;
                goto out;
        }
        e = find_fp(cs, fp);
        if (!e && x) {
                if (!(e = append(cs, x))) {
                        snprintf(err, n, "out of memory");
                        r = -ENOMEM;
                        goto out;
                }
                snprintf(e->source, sizeof(e->source), "imported");
                e->added = time(NULL);
                appended = true;
        }
        if (!e) {
                snprintf(err, n, "no certificate with fingerprint %s in the address book; give the certificate "
                         "file instead, or list fingerprints with `smimectl certs`", fp);
                r = -ENOENT;
                goto out;
        }
        old = e->trust;
        e->trust = t;
        if ((r = save_book(cs, err, n)) < 0) {
                if (appended)
                        X509_free(cs->v[--cs->n].cert);
                else
                        e->trust = old;
                goto out;
        }
        if (out)
                copy_entry(out, e);
out:
        pthread_mutex_unlock(&cs->lock);
        return r;
}

/* ---- queries -------------------------------------------------------------------- */

int certstore_list(struct certstore *cs, const char *email, struct cs_list *out)
{
        int r = 0;

        memset(out, 0, sizeof(*out));
        pthread_mutex_lock(&cs->lock);
        out->v = calloc(cs->n ? cs->n : 1, sizeof(*out->v));
        if (!out->v) {
                r = -ENOMEM;
                goto out;
        }
        for (size_t i = 0; i < cs->n; i++) {
                struct cs_entry *d = &out->v[out->n];

                copy_entry(d, &cs->v[i]);
                if (email && !cert_facts_has_email(&d->facts, email)) {
                        cs_entry_clear(d);
                        continue;
                }
                out->n++;
        }
out:
        pthread_mutex_unlock(&cs->lock);
        return r;
}

int certstore_lookup(struct certstore *cs, X509 *x, struct cs_entry *out)
{
        struct book_entry *e;
        char fp[65];
        int r = -ENOENT;

        cs_fingerprint(x, fp);
        pthread_mutex_lock(&cs->lock);
        if ((e = find_fp(cs, fp))) {
                copy_entry(out, e);
                r = 0;
        }
        pthread_mutex_unlock(&cs->lock);
        return r;
}

STACK_OF(X509) *certstore_certs(struct certstore *cs)
{
        STACK_OF(X509) *sk = sk_X509_new_null();

        pthread_mutex_lock(&cs->lock);
        for (size_t i = 0; sk && i < cs->n; i++) {
                X509 *x = cs->v[i].cert;

                if (cs->v[i].trust != CS_TRUST_DISTRUSTED && X509_up_ref(x) && !sk_X509_push(sk, x))
                        X509_free(x);
        }
        pthread_mutex_unlock(&cs->lock);
        return sk;
}

/* ---- the trust policy -------------------------------------------------------------- */

/* What is known about the revocation of one certificate of the chain. */
struct rv_note {
        X509 *cert;                     /* borrowed: from the chain of a pass */
        bool asked;                     /* revoke_check() ran for it */
        struct rv_result net;
        bool crl_missing;               /* OpenSSL found no CRL of its issuer */
        bool crl_stale;                 /* ... only one past its nextUpdate */
        bool crl_revoked;
        char stale[600];
};

/* Where a CRL in the store came from, for people. */
struct crl_src {
        X509_CRL *crl;
        char source[320];
};

struct collect {
        struct cs_check *res;
        int seen[16];
        size_t n_seen;
        struct rv_note notes[8];
        size_t n_notes;
        struct crl_src *srcs;
        size_t n_srcs;
};

static void fmt_date(time_t t, char *buf, size_t n)
{
        struct tm tm;

        gmtime_r(&t, &tm);
        strftime(buf, n, "%Y-%m-%d", &tm);
}

static void add_text(struct cs_check *res, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_text(struct cs_check *res, const char *fmt, ...)
{
        size_t used = strlen(res->text);
        va_list ap;

        if (used && used + 3 < sizeof(res->text)) {
                memcpy(res->text + used, "; ", 3);
                used += 2;
        }
        va_start(ap, fmt);
        vsnprintf(res->text + used, sizeof(res->text) - used, fmt, ap);
        va_end(ap);
}

static struct rv_note *note_for(struct collect *c, X509 *x)
{
        if (!x)
                return NULL;
        for (size_t i = 0; i < c->n_notes; i++)
                if (X509_cmp(c->notes[i].cert, x) == 0)
                        return &c->notes[i];
        if (c->n_notes == sizeof(c->notes) / sizeof(c->notes[0]))
                return NULL;
        memset(&c->notes[c->n_notes], 0, sizeof(c->notes[0]));
        c->notes[c->n_notes].cert = x;
        c->notes[c->n_notes].net.reason = -1;
        return &c->notes[c->n_notes++];
}

static const char *crl_source(const struct collect *c, const X509_CRL *crl)
{
        for (size_t i = 0; crl && i < c->n_srcs; i++)
                if (c->srcs[i].crl == crl)
                        return c->srcs[i].source;
        return "a CRL";
}

/* "since 2025-01-02 (keyCompromise)" */
static void revoked_when(time_t at, int reason, char *buf, size_t n)
{
        char d[16] = "";
        const char *why = revoke_reason_name(reason);

        if (at)
                fmt_date(at, d, sizeof(d));
        snprintf(buf, n, "%s%s%s%s%s", at ? " since " : "", d, *why ? " (" : "", why, *why ? ")" : "");
}

/* Records every chain error and carries on, so that the result names all
 * of them (expired AND untrusted), not just the first. A missing or
 * out-of-date CRL is not an error here: revocation_verdict() weighs it
 * against what OCSP and the CRL fetch said. */
static int verify_cb(int ok, X509_STORE_CTX *ctx)
{
        struct collect *c = X509_STORE_CTX_get_app_data(ctx);
        int err = X509_STORE_CTX_get_error(ctx), depth = X509_STORE_CTX_get_error_depth(ctx);
        X509 *cur = X509_STORE_CTX_get_current_cert(ctx);
        struct cs_check *res = c->res;
        char subj[512] = "?", d[16];
        const char *who;
        struct rv_note *nt;

        if (ok)
                return 1;
        if (cur)
                X509_NAME_oneline(X509_get_subject_name(cur), subj, sizeof(subj));
        switch (err) {
        case X509_V_ERR_UNABLE_TO_GET_CRL:
                if ((nt = note_for(c, cur)))
                        nt->crl_missing = true;
                return 1;
        case X509_V_ERR_CRL_HAS_EXPIRED:
        case X509_V_ERR_CRL_NOT_YET_VALID:
                if ((nt = note_for(c, cur)) && !nt->crl_stale) {
                        X509_CRL *crl = X509_STORE_CTX_get0_current_crl(ctx);
                        const ASN1_TIME *t = crl ? (err == X509_V_ERR_CRL_HAS_EXPIRED ? X509_CRL_get0_nextUpdate(crl)
                                                                                     : X509_CRL_get0_lastUpdate(crl))
                                                 : NULL;

                        nt->crl_stale = true;
                        fmt_date(cs_asn1_time(t), d, sizeof(d));
                        snprintf(nt->stale, sizeof(nt->stale), "the newest CRL for it (%s) %s %s", crl_source(c, crl),
                                 err == X509_V_ERR_CRL_HAS_EXPIRED ? "was due to be replaced on"
                                                                   : "is not valid before",
                                 d);
                }
                return 1;
        }
        if (err == X509_V_ERR_CERT_REVOKED && (nt = note_for(c, cur)))
                nt->crl_revoked = true;
        for (size_t i = 0; i < c->n_seen; i++)
                if (c->seen[i] == err)
                        return 1;
        if (c->n_seen < sizeof(c->seen) / sizeof(c->seen[0]))
                c->seen[c->n_seen++] = err;
        who = depth == 0 ? "the certificate" : "its issuer";
        switch (err) {
        case X509_V_ERR_CERT_HAS_EXPIRED:
                res->problems |= P_EXPIRED;
                fmt_date(cs_asn1_time(X509_get0_notAfter(cur)), d, sizeof(d));
                add_text(res, "%s %s expired on %s", who, subj, d);
                break;
        case X509_V_ERR_CERT_NOT_YET_VALID:
                res->problems |= P_NOT_YET_VALID;
                fmt_date(cs_asn1_time(X509_get0_notBefore(cur)), d, sizeof(d));
                add_text(res, "%s %s is not valid before %s", who, subj, d);
                break;
        case X509_V_ERR_CERT_REVOKED: {
                X509_CRL *crl = X509_STORE_CTX_get0_current_crl(ctx);
                X509_REVOKED *rev = NULL;
                char when[80] = "";

                if (crl && cur && X509_CRL_get0_by_cert(crl, &rev, cur) == 1 && rev) {
                        ASN1_ENUMERATED *reason = X509_REVOKED_get_ext_d2i(rev, NID_crl_reason, NULL, NULL);

                        revoked_when(cs_asn1_time(X509_REVOKED_get0_revocationDate(rev)),
                                     reason ? (int)ASN1_ENUMERATED_get(reason) : -1, when, sizeof(when));
                        ASN1_ENUMERATED_free(reason);
                }
                res->problems |= P_REVOKED;
                add_text(res, "%s %s is revoked%s (listed in %s)", who, subj, when, crl_source(c, crl));
                break;
        }
        case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
        case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
                res->problems |= P_UNTRUSTED;
                add_text(res, "%s is self-signed and not trusted; if you know it is genuine (compare its "
                         "fingerprint with its owner), trust it with `smimectl trust`", subj);
                break;
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
        case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: {
                char iss[512] = "?";

                if (cur)
                        X509_NAME_oneline(X509_get_issuer_name(cur), iss, sizeof(iss));
                res->problems |= P_CHAIN_INCOMPLETE;
                add_text(res, "the issuer %s of %s is not known: import the issuer's certificate with `smimectl "
                         "import`, or add its CA to ca-file if you trust that CA", iss, subj);
                break;
        }
        case X509_V_ERR_INVALID_PURPOSE:
                res->problems |= P_KEY_USAGE;
                add_text(res, "%s %s does not allow signing e-mail (keyUsage digitalSignature or nonRepudiation, "
                         "extendedKeyUsage emailProtection)", who, subj);
                break;
        default:
                res->problems |= P_CHAIN_INVALID;
                add_text(res, "%s: %s", subj, X509_verify_cert_error_string(err));
                break;
        }
        ERR_clear_error();
        return 1;
}

/* The configured CRL files (re-read: cron jobs replace them), then the
 * revocation cache's CRLs, into st; srcs says where each came from. */
static void add_crls(X509_STORE *st, struct certstore *cs, struct collect *c)
{
        struct rv_crl *cached = NULL;
        size_t n_cached;

        for (size_t i = 0; i < cs->n_crl_files; i++) {
                BIO *b = BIO_new_file(cs->crl_files[i], "r");
                X509_CRL *crl, *list[64];
                size_t got = 0;

                while (b && got < 64 && (crl = PEM_read_bio_X509_CRL(b, NULL, NULL, NULL)))
                        list[got++] = crl;
                if (b && !got) {
                        (void)BIO_reset(b);
                        if ((crl = d2i_X509_CRL_bio(b, NULL)))
                                list[got++] = crl;
                }
                ERR_clear_error();
                if (!got)
                        log_error("CRL file %s holds no CRL (PEM or DER); revocation is not checked against it",
                                  cs->crl_files[i]);
                for (size_t k = 0; k < got; k++) {
                        struct crl_src *v = realloc(c->srcs, (c->n_srcs + 1) * sizeof(*v));

                        X509_STORE_add_crl(st, list[k]);
                        if (v) {
                                c->srcs = v;
                                v[c->n_srcs].crl = list[k];     /* the store holds a reference */
                                snprintf(v[c->n_srcs++].source, sizeof(v[0].source), "the CRL file %s",
                                         cs->crl_files[i]);
                        }
                        X509_CRL_free(list[k]);
                }
                BIO_free(b);
        }
        n_cached = revoke_crls(cs->rv, &cached);
        for (size_t i = 0; i < n_cached; i++) {
                struct crl_src *v = realloc(c->srcs, (c->n_srcs + 1) * sizeof(*v));

                X509_STORE_add_crl(st, cached[i].crl);
                if (v) {
                        c->srcs = v;
                        v[c->n_srcs].crl = cached[i].crl;
                        snprintf(v[c->n_srcs++].source, sizeof(v[0].source), "%s", cached[i].source);
                }
        }
        revoke_crls_free(cached, n_cached);
        ERR_clear_error();
}

/* Pass one: builds x's chain without revocation and, when it is good,
 * asks the network about each certificate below the anchor. The chain
 * (returned) must outlive the notes, which borrow its certificates. */
static STACK_OF(X509) *ask_network(struct certstore *cs, X509_STORE *st, X509 *x, STACK_OF(X509) *untrusted, bool sign,
                                   struct collect *c)
{
        X509_STORE_CTX *ctx = X509_STORE_CTX_new();
        STACK_OF(X509) *chain = NULL;
        int n;

        if (!ctx || !X509_STORE_CTX_init(ctx, st, x, untrusted))
                goto out;
        X509_VERIFY_PARAM_set_flags(X509_STORE_CTX_get0_param(ctx), X509_V_FLAG_PARTIAL_CHAIN);
        X509_STORE_CTX_set_purpose(ctx, sign ? X509_PURPOSE_SMIME_SIGN : X509_PURPOSE_ANY);
        /* A certificate that fails anyway is not worth telling a CA about. */
        if (X509_verify_cert(ctx) <= 0 || !(chain = X509_STORE_CTX_get1_chain(ctx)))
                goto out;
        n = sk_X509_num(chain);
        for (int i = 0; i + 1 < n; i++) {
                struct rv_note *nt = note_for(c, sk_X509_value(chain, i));

                if (!nt)
                        break;
                nt->asked = true;
                revoke_check(cs->rv, nt->cert, sk_X509_value(chain, i + 1), st, chain, &nt->net);
        }
out:
        ERR_clear_error();
        X509_STORE_CTX_free(ctx);
        return chain;
}

/* After pass two: revoked (by OCSP), good, or unknown, per certificate. */
static void revocation_verdict(struct certstore *cs, struct collect *c, bool crl_checked)
{
        struct cs_check *res = c->res;

        for (size_t i = 0; i < c->n_notes; i++) {
                struct rv_note *nt = &c->notes[i];
                char subj[512], why[1700] = "";
                bool good, unknown;

                /* An anchor's own CRL says nothing about the anchor. */
                if (X509_check_issued(nt->cert, nt->cert) == X509_V_OK)
                        continue;
                X509_NAME_oneline(X509_get_subject_name(nt->cert), subj, sizeof(subj));
                if (nt->net.ocsp == RV_REVOKED) {
                        if (!nt->crl_revoked) {
                                char when[80];

                                revoked_when(nt->net.revoked_at, nt->net.reason, when, sizeof(when));
                                res->problems |= P_REVOKED;
                                add_text(res, "%s is revoked%s (the OCSP responder %s says so)", subj, when,
                                         nt->net.ocsp_url);
                        }
                        continue;
                }
                if (nt->crl_revoked)
                        continue;
                good = nt->net.ocsp == RV_GOOD || (crl_checked && !nt->crl_missing && !nt->crl_stale);
                unknown = nt->net.ocsp == RV_FAILED || nt->net.crl_failed || nt->crl_stale;
                if (good || !unknown)
                        continue;
                snprintf(why, sizeof(why), "%s", nt->net.why);
                if (nt->crl_stale && !strstr(why, "out of date"))
                        snprintf(why + strlen(why), sizeof(why) - strlen(why), "%s%s", why[0] ? "; " : "", nt->stale);
                if (cs->unknown_allow) {
                        log_info("revocation status unknown for %s: %s; accepted (revocation-unknown = allow)", subj,
                                 why);
                        continue;
                }
                res->problems |= P_REVOCATION_UNKNOWN;
                add_text(res, "revocation status unknown for %s: %s (revocation-unknown = block refuses it)", subj,
                         why);
        }
}

int certstore_check(struct certstore *cs, X509 *x, STACK_OF(X509) *extra, bool sign, time_t at,
                    struct cs_check *res)
{
        X509_STORE *st = X509_STORE_new();
        X509_STORE_CTX *ctx = X509_STORE_CTX_new();
        STACK_OF(X509) *untrusted = sk_X509_new_null();
        STACK_OF(X509) *distrusted = sk_X509_new_null();
        STACK_OF(X509) *chain1 = NULL;
        struct collect *c = calloc(1, sizeof(*c));
        X509_VERIFY_PARAM *param;
        int r = -ENOMEM;

        memset(res, 0, sizeof(*res));
        if (!st || !ctx || !untrusted || !distrusted || !c)
                goto out;
        c->res = res;
        /* A certificate the user trusts directly is an anchor by itself (also
         * for the OCSP responder's chain, which OCSP_basic_verify builds). */
        X509_STORE_set_flags(st, X509_V_FLAG_PARTIAL_CHAIN);
        pthread_mutex_lock(&cs->lock);
        for (size_t i = 0; i < cs->n; i++) {
                struct book_entry *e = &cs->v[i];

                if (e->trust == CS_TRUST_DISTRUSTED) {
                        if (X509_up_ref(e->cert) && !sk_X509_push(distrusted, e->cert))
                                X509_free(e->cert);
                        continue;
                }
                if (e->trust == CS_TRUST_TRUSTED)
                        X509_STORE_add_cert(st, e->cert);
                if (X509_up_ref(e->cert) && !sk_X509_push(untrusted, e->cert))
                        X509_free(e->cert);
        }
        pthread_mutex_unlock(&cs->lock);
        for (int i = 0; i < sk_X509_num(cs->anchors); i++) {
                X509 *a = sk_X509_value(cs->anchors, i);
                bool bad = false;

                for (int k = 0; k < sk_X509_num(distrusted) && !bad; k++)
                        bad = X509_cmp(a, sk_X509_value(distrusted, k)) == 0;
                if (!bad)
                        X509_STORE_add_cert(st, a);
        }
        for (int i = 0; extra && i < sk_X509_num(extra); i++) {
                X509 *e = sk_X509_value(extra, i);

                if (X509_up_ref(e) && !sk_X509_push(untrusted, e))
                        X509_free(e);
        }
        if (at == 0 && revoke_online(cs->rv))
                chain1 = ask_network(cs, st, x, untrusted, sign, c);
        add_crls(st, cs, c);
        if (c->n_srcs)
                X509_STORE_set_flags(st, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
        if (!X509_STORE_CTX_init(ctx, st, x, untrusted))
                goto out;
        X509_STORE_CTX_set_verify_cb(ctx, verify_cb);
        X509_STORE_CTX_set_app_data(ctx, c);
        param = X509_STORE_CTX_get0_param(ctx);
        X509_STORE_CTX_set_purpose(ctx, sign ? X509_PURPOSE_SMIME_SIGN : X509_PURPOSE_ANY);
        if (at)
                X509_VERIFY_PARAM_set_time(param, at);
        (void)X509_verify_cert(ctx);
        revocation_verdict(cs, c, c->n_srcs > 0);
        {
                STACK_OF(X509) *chain = X509_STORE_CTX_get0_chain(ctx);
                int nchain = chain ? sk_X509_num(chain) : 0;

                for (int i = 0; i < nchain && res->n_chain < 8; i++)
                        X509_NAME_oneline(X509_get_subject_name(sk_X509_value(chain, i)), res->chain[res->n_chain++],
                                          sizeof(res->chain[0]));
                /* A distrusted certificate in the chain, or a distrusted CA
                 * (left out of the anchors) right above it. */
                for (int i = 0; i < nchain; i++) {
                        X509 *ci = sk_X509_value(chain, i);

                        for (int k = 0; k < sk_X509_num(distrusted); k++) {
                                X509 *d = sk_X509_value(distrusted, k);
                                bool hit = X509_cmp(ci, d) == 0 ||
                                           (i == nchain - 1 && X509_check_issued(d, ci) == X509_V_OK);

                                if (hit && !(res->problems & P_DISTRUSTED)) {
                                        char subj[512];

                                        X509_NAME_oneline(X509_get_subject_name(d), subj, sizeof(subj));
                                        res->problems |= P_DISTRUSTED;
                                        add_text(res, "you distrusted %s (`smimectl trust` undoes that)", subj);
                                }
                        }
                }
                if (!sign && !(res->problems & P_KEY_USAGE)) {
                        struct cert_facts f;

                        cert_facts_load(&f, x);
                        if (!f.usage_encrypt && (strcmp(f.key_type, "RSA") == 0 || strcmp(f.key_type, "EC") == 0)) {
                                res->problems |= P_KEY_USAGE;
                                add_text(res, "certificate %s does not allow encryption (keyUsage needs %s, "
                                         "extendedKeyUsage emailProtection)", f.subject,
                                         strcmp(f.key_type, "EC") == 0 ? "keyAgreement" : "keyEncipherment");
                        }
                        cert_facts_clear(&f);
                }
                if (res->problems & P_DISTRUSTED) {
                        res->trust = "distrusted";
                } else if (res->problems & (P_UNTRUSTED | P_CHAIN_INCOMPLETE)) {
                        res->trust = "untrusted";
                } else {
                        X509 *top = nchain ? sk_X509_value(chain, nchain - 1) : x;
                        struct cs_entry e;

                        res->trust = "anchor";
                        if (certstore_lookup(cs, top, &e) == 0) {
                                if (e.trust == CS_TRUST_TRUSTED)
                                        res->trust = "trusted-by-you";
                                cs_entry_clear(&e);
                        }
                }
        }
        r = 0;
out:
        ERR_clear_error();
        X509_STORE_CTX_free(ctx);
        X509_STORE_free(st);
        sk_X509_pop_free(chain1, X509_free);
        sk_X509_pop_free(untrusted, X509_free);
        sk_X509_pop_free(distrusted, X509_free);
        if (c)
                free(c->srcs);
        free(c);
        return r;
}

int certstore_add_crl(struct certstore *cs, X509_CRL *crl, char *err, size_t n)
{
        const X509_NAME *iname = X509_CRL_get_issuer(crl);
        STACK_OF(X509) *cands = sk_X509_new_null();
        bool named = false, signed_ok = false;
        char iss[512] = "?";
        int r;

        if (!cands) {
                snprintf(err, n, "out of memory");
                return -ENOMEM;
        }
        X509_NAME_oneline(iname, iss, sizeof(iss));
        pthread_mutex_lock(&cs->lock);
        for (size_t i = 0; i < cs->n; i++)
                if (cs->v[i].trust != CS_TRUST_DISTRUSTED && X509_up_ref(cs->v[i].cert) &&
                    !sk_X509_push(cands, cs->v[i].cert))
                        X509_free(cs->v[i].cert);
        pthread_mutex_unlock(&cs->lock);
        for (int i = 0; i < sk_X509_num(cs->anchors); i++) {
                X509 *a = sk_X509_value(cs->anchors, i);

                if (X509_up_ref(a) && !sk_X509_push(cands, a))
                        X509_free(a);
        }
        for (int i = 0; i < sk_X509_num(cands) && !signed_ok; i++) {
                X509 *x = sk_X509_value(cands, i);
                EVP_PKEY *k = X509_get0_pubkey(x);

                if (X509_NAME_cmp(X509_get_subject_name(x), iname) != 0)
                        continue;
                named = true;
                signed_ok = k && X509_CRL_verify(crl, k) > 0;
        }
        sk_X509_pop_free(cands, X509_free);
        ERR_clear_error();
        if (!named) {
                snprintf(err, n, "the CRL's issuer %s is not known: import the issuer's certificate first (or add it "
                         "to ca-file)", iss);
                return -ENOENT;
        }
        if (!signed_ok) {
                snprintf(err, n, "the CRL claims to be from %s but its signature does not verify with that "
                         "certificate's key: refused", iss);
                return -EBADMSG;
        }
        r = revoke_import_crl(cs->rv, crl, err, n);
        if (r >= 0)
                log_info("CRL of %s %s", iss, r ? "stored" : "not stored: the same or a newer one is held");
        return r;
}
