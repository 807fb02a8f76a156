/* revoke.c — revocation status from the network: CRLs fetched from a
 * certificate's HTTP CRL distribution points (crl-fetch = yes), OCSP
 * (ocsp = aia, or ocsp-responder = URL), and CRLs imported by hand, all
 * kept in a cache directory beside the address book (revocation/).
 *
 * Design decisions (docs/SECURITY.md, "Revocation", says the same):
 *
 * - Off by default. The shipped systemd units run the agent with
 *   PrivateNetwork=yes, RestrictAddressFamilies=AF_UNIX and
 *   IPAddressDeny=any: it cannot reach any host, and that stays the
 *   default, because an agent holding signing keys that talks to no one is
 *   much easier to trust than one that does, and because every fetch tells
 *   the CA (OCSP: which certificate) that you are writing to or reading
 *   from its subscriber. Turning crl-fetch or ocsp on is a deliberate act
 *   that goes with a unit drop-in (PrivateNetwork=no, RestrictAddressFamilies
 *   with AF_INET and AF_INET6, IPAddressAllow= for the CDP and responder
 *   hosts), shipped as systemd/revocation.conf.example (installed in the
 *   documentation directory). When a fetch fails
 *   because the process has no network, the error says exactly that and
 *   names the drop-in; offline machines import CRLs by hand with
 *   `smimectl import FILE.crl` instead.
 * - Plain HTTP only: CRLs and OCSP answers are signed, so TLS adds
 *   nothing but a trust problem (RFC 5280 4.2.1.13, RFC 6960 A.1). Every
 *   exchange has a timeout (revocation-timeout) and a size cap.
 * - Nothing is believed that its issuer did not sign: a fetched CRL must
 *   carry the issuer's name and verify with the issuer's key before it is
 *   stored (OpenSSL's CRL check verifies it again on every use); an OCSP
 *   response must verify with OCSP_basic_verify() (signed by the issuer,
 *   or by a responder the issuer delegated to with id-kp-OCSPSigning,
 *   chaining to the anchors), cover the certificate, be within its
 *   thisUpdate/nextUpdate (5 minutes of clock skew), and echo our nonce
 *   when it carries one (a response without a nonce is accepted, as RFC
 *   6960 allows pre-produced responses; its validity period bounds replay).
 * - Cached until nextUpdate: a CRL whose nextUpdate is ahead is used
 *   without asking the network; good and revoked OCSP answers are kept
 *   until theirs. A CRL past its nextUpdate stays in the cache (it still
 *   proves revocations) but makes the status "unknown" unless a fresh one
 *   is fetched. A failed fetch from a URL is not retried for a minute, so
 *   that listing an address book full of one CA's certificates waits for
 *   one timeout, not for each certificate.
 * - What "unknown" means for a request is certstore.c's policy
 *   (revocation-unknown).
 *
 * Must never: hold the lock across network I/O; write a cache file in
 * place (temporary file, fsync, rename, fsync of the directory).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <limits.h>
#include <net/if.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/http.h>
#include <openssl/ocsp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "certstore.h"
#include "log.h"
#include "revoke.h"

#define CRL_MAX_BYTES OSSL_HTTP_DEFAULT_MAX_CRL_LEN     /* 32 MiB, as OpenSSL's own CRL download */
#define OCSP_MAX_BYTES (256 * 1024)
#define CLOCK_SKEW_SEC 300
#define RETRY_AFTER_SEC 60
#define MAX_URLS 4                                      /* distribution points tried per certificate */

struct crl_entry {
        char name[96];          /* file in dir: crl-url-HEX.pem or crl-import-HEX.pem */
        char *url;              /* NULL: imported by hand */
        X509_CRL *crl;
};

struct ocsp_entry {
        char name[96];          /* file in dir: ocsp-HEX.der (HEX: SHA-256 of the CertID) */
        uint8_t *der;           /* the OCSP response as received */
        size_t len;
};

struct failure {
        char url[256];
        time_t at;
        char msg[700];
};

struct revoke {
        pthread_mutex_t lock;
        char *dir;
        bool crl_fetch, ocsp_aia;
        char *responder;
        unsigned timeout;
        struct crl_entry *crls;
        size_t n_crls;
        struct ocsp_entry *ocsp;
        size_t n_ocsp;
        struct failure fails[32];       /* recent transport failures, by URL */
};

/* ---- small helpers ----------------------------------------------------------------- */

static void appendf(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void appendf(char *buf, size_t n, const char *fmt, ...)
{
        size_t used = strlen(buf);
        va_list ap;

        if (used && used + 3 < n) {
                memcpy(buf + used, "; ", 3);
                used += 2;
        }
        if (used >= n)
                return;
        va_start(ap, fmt);
        vsnprintf(buf + used, n - used, fmt, ap);
        va_end(ap);
}

static void sha256_hex(const void *p, size_t len, char out[65])
{
        unsigned char md[32];
        unsigned mdlen = 0;

        out[0] = '\0';
        if (!EVP_Digest(p, len, md, &mdlen, EVP_sha256(), NULL))
                return;
        for (unsigned i = 0; i < mdlen && i < 32; i++)
                snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void fmt_time(time_t t, char *buf, size_t n)
{
        struct tm tm;

        gmtime_r(&t, &tm);
        strftime(buf, n, "%Y-%m-%d %H:%M:%S UTC", &tm);
}

const char *revoke_reason_name(int reason)
{
        static const char *const names[] = {
                "unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
                "cessationOfOperation", "certificateHold", "?", "removeFromCRL", "privilegeWithdrawn",
                "aACompromise",
        };

        return reason >= 0 && reason < (int)(sizeof(names) / sizeof(names[0])) ? names[reason] : "";
}

/* OpenSSL's error queue as one line; *sys_errno: the last system error in
 * it. OpenSSL retries a refused connection until the timeout, so "connect
 * timeout" is also what a server that is down gives. */
static void ossl_errors(char *buf, size_t n, int *sys_errno, unsigned timeout)
{
        unsigned long e;
        const char *data;
        int flags;

        buf[0] = '\0';
        while ((e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags))) {
                const char *why = ERR_reason_error_string(e);
                bool has_data = (flags & ERR_TXT_STRING) && data && *data;
                char one[300];

                if (ERR_GET_LIB(e) == ERR_LIB_SYS) {
                        *sys_errno = ERR_GET_REASON(e);
                        why = strerror(ERR_GET_REASON(e));
                }
                snprintf(one, sizeof(one), "%s%s%s%s", why ? why : "error", has_data ? " (" : "", has_data ? data : "",
                         has_data ? ")" : "");
                if (timeout && strcmp(one, "connect timeout") == 0)
                        snprintf(one, sizeof(one), "no connection within %u s (connection refused, or no route to "
                                 "the host)", timeout);
                if (!strstr(buf, one))
                        appendf(buf, n, "%s", one);
        }
        if (!buf[0])
                snprintf(buf, n, "no reason given");
}

/* When a fetch failed: does this process have a network at all? The
 * shipped systemd units take it away; say which setting and what to do. */
static void net_hint(int sys_errno, char *buf, size_t n)
{
        static const char fix[] = "when crl-fetch or ocsp is on, give the agent the network with the drop-in "
                                  "revocation.conf.example (smime-agent(8), REVOCATION: PrivateNetwork=no, "
                                  "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6, IPAddressAllow= the CRL and "
                                  "OCSP hosts), or import CRLs by hand with `smimectl import FILE.crl`";
        struct ifaddrs *ifa = NULL;
        bool other = false;
        int s;

        buf[0] = '\0';
        s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (s < 0 && (errno == EAFNOSUPPORT || errno == EPERM || errno == EACCES)) {
                snprintf(buf, n, "this process may not open IP sockets (%s: the systemd unit's "
                         "RestrictAddressFamilies=AF_UNIX does that); %s", strerror(errno), fix);
                return;
        }
        if (s >= 0)
                close(s);
        if (getifaddrs(&ifa) == 0) {
                for (struct ifaddrs *i = ifa; i; i = i->ifa_next)
                        if (!(i->ifa_flags & IFF_LOOPBACK) && (i->ifa_flags & IFF_UP))
                                other = true;
                freeifaddrs(ifa);
        } else {
                other = true;   /* cannot tell */
        }
        if (!other) {
                snprintf(buf, n, "this process has no network: no interface but loopback (the systemd unit's "
                         "PrivateNetwork=yes does that); %s", fix);
                return;
        }
        if (sys_errno == EPERM || sys_errno == EACCES)
                snprintf(buf, n, "the connection was refused locally with \"%s\" (the systemd unit's "
                         "IPAddressDeny=any does that); %s", strerror(sys_errno), fix);
}

static bool is_http(const char *url)
{
        return strncasecmp(url, "http://", 7) == 0;
}

/* ---- the cache directory --------------------------------------------------------- */

static int write_all(int fd, const uint8_t *p, size_t len)
{
        while (len) {
                ssize_t w = write(fd, p, len);

                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0)
                        return -errno;
                p += w;
                len -= (size_t)w;
        }
        return 0;
}

/* Temporary file beside it, fsync, rename, fsync of the directory. */
static int write_atomic(const char *dir, const char *name, const void *p, size_t len)
{
        char path[PATH_MAX], tmp[PATH_MAX];
        int fd, r;

        if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path) ||
            snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path) >= (int)sizeof(tmp))
                return -ENAMETOOLONG;
        if ((r = cs_mkdir_parents(path)) < 0)
                return r;
        if ((fd = mkostemp(tmp, O_CLOEXEC)) < 0)
                return -errno;
        r = write_all(fd, p, len);
        if (r == 0 && fsync(fd) < 0)
                r = -errno;
        if (close(fd) < 0 && r == 0)
                r = -errno;
        if (r == 0 && rename(tmp, path) < 0)
                r = -errno;
        if (r < 0) {
                unlink(tmp);
                return r;
        }
        if ((fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
                (void)fsync(fd);
                close(fd);
        }
        return 0;
}

static void remove_file(struct revoke *rv, const char *name)
{
        char path[PATH_MAX];

        if (rv->dir && snprintf(path, sizeof(path), "%s/%s", rv->dir, name) < (int)sizeof(path))
                (void)unlink(path);
}

/* ---- the in-memory cache (callers hold the lock) --------------------------------------- */

static struct crl_entry *crl_find(struct revoke *rv, const char *name)
{
        for (size_t i = 0; i < rv->n_crls; i++)
                if (strcmp(rv->crls[i].name, name) == 0)
                        return &rv->crls[i];
        return NULL;
}

/* Puts crl under name (replacing what was there); takes a reference. */
static int crl_put(struct revoke *rv, const char *name, const char *url, X509_CRL *crl)
{
        struct crl_entry *e = crl_find(rv, name);
        char *u = url ? strdup(url) : NULL;

        if (url && !u)
                return -ENOMEM;
        if (!e) {
                struct crl_entry *v = realloc(rv->crls, (rv->n_crls + 1) * sizeof(*v));

                if (!v) {
                        free(u);
                        return -ENOMEM;
                }
                rv->crls = v;
                e = &v[rv->n_crls++];
                memset(e, 0, sizeof(*e));
                snprintf(e->name, sizeof(e->name), "%s", name);
        }
        free(e->url);
        X509_CRL_free(e->crl);
        e->url = u;
        X509_CRL_up_ref(crl);
        e->crl = crl;
        return 0;
}

static struct ocsp_entry *ocsp_find(struct revoke *rv, const char *name)
{
        for (size_t i = 0; i < rv->n_ocsp; i++)
                if (strcmp(rv->ocsp[i].name, name) == 0)
                        return &rv->ocsp[i];
        return NULL;
}

static void ocsp_drop(struct revoke *rv, const char *name)
{
        struct ocsp_entry *e = ocsp_find(rv, name);

        if (!e)
                return;
        free(e->der);
        *e = rv->ocsp[--rv->n_ocsp];
        remove_file(rv, name);
}

static int ocsp_put(struct revoke *rv, const char *name, const uint8_t *der, size_t len)
{
        struct ocsp_entry *e = ocsp_find(rv, name);
        uint8_t *copy = malloc(len ? len : 1);

        if (!copy)
                return -ENOMEM;
        memcpy(copy, der, len);
        if (!e) {
                struct ocsp_entry *v = realloc(rv->ocsp, (rv->n_ocsp + 1) * sizeof(*v));

                if (!v) {
                        free(copy);
                        return -ENOMEM;
                }
                rv->ocsp = v;
                e = &v[rv->n_ocsp++];
                memset(e, 0, sizeof(*e));
                snprintf(e->name, sizeof(e->name), "%s", name);
        }
        free(e->der);
        e->der = copy;
        e->len = len;
        return 0;
}

/* A transport failure of url less than RETRY_AFTER_SEC ago: its message. */
static bool failed_recently(struct revoke *rv, const char *url, char *msg, size_t n)
{
        time_t now = time(NULL);
        bool hit = false;

        pthread_mutex_lock(&rv->lock);
        for (size_t i = 0; i < sizeof(rv->fails) / sizeof(rv->fails[0]); i++) {
                struct failure *f = &rv->fails[i];

                if (f->at && strcmp(f->url, url) == 0 && now - f->at < RETRY_AFTER_SEC && now >= f->at) {
                        snprintf(msg, n, "%s (last tried %lld s ago; tried again after %d s)", f->msg,
                                 (long long)(now - f->at), RETRY_AFTER_SEC);
                        hit = true;
                        break;
                }
        }
        pthread_mutex_unlock(&rv->lock);
        return hit;
}

static void note_failure(struct revoke *rv, const char *url, const char *msg)
{
        struct failure *slot = &rv->fails[0];

        pthread_mutex_lock(&rv->lock);
        for (size_t i = 0; i < sizeof(rv->fails) / sizeof(rv->fails[0]); i++) {
                struct failure *f = &rv->fails[i];

                if (strcmp(f->url, url) == 0 || !f->at) {
                        slot = f;
                        break;
                }
                if (f->at < slot->at)
                        slot = f;
        }
        snprintf(slot->url, sizeof(slot->url), "%s", url);
        snprintf(slot->msg, sizeof(slot->msg), "%s", msg);
        slot->at = time(NULL);
        pthread_mutex_unlock(&rv->lock);
}

static void clear_failure(struct revoke *rv, const char *url)
{
        pthread_mutex_lock(&rv->lock);
        for (size_t i = 0; i < sizeof(rv->fails) / sizeof(rv->fails[0]); i++)
                if (strcmp(rv->fails[i].url, url) == 0)
                        rv->fails[i].at = 0;
        pthread_mutex_unlock(&rv->lock);
}

/* ---- loading and storing ---------------------------------------------------------- */

static uint8_t *read_file(const char *path, size_t max, size_t *len)
{
        FILE *f = fopen(path, "rbe");
        uint8_t *buf = NULL;
        struct stat stt;

        *len = 0;
        if (!f)
                return NULL;
        if (fstat(fileno(f), &stt) == 0 && stt.st_size >= 0 && (size_t)stt.st_size <= max &&
            (buf = malloc((size_t)stt.st_size + 1))) {
                *len = fread(buf, 1, (size_t)stt.st_size, f);
                buf[*len] = '\0';
        }
        fclose(f);
        return buf;
}

static const char URL_LINE[] = "# smime-agent: CRL from ";
static const char IMPORT_LINE[] = "# smime-agent: CRL imported by hand\n";

static void load_crl_file(struct revoke *rv, const char *name)
{
        char path[PATH_MAX], url[1024] = "";
        uint8_t *buf;
        size_t len;
        BIO *b;
        X509_CRL *crl;

        if (snprintf(path, sizeof(path), "%s/%s", rv->dir, name) >= (int)sizeof(path) ||
            !(buf = read_file(path, CRL_MAX_BYTES * 2, &len)))
                return;
        if (len > sizeof(URL_LINE) && memcmp(buf, URL_LINE, sizeof(URL_LINE) - 1) == 0) {
                const char *s = (const char *)buf + sizeof(URL_LINE) - 1, *e = strchr(s, '\n');

                if (e && (size_t)(e - s) < sizeof(url))
                        snprintf(url, sizeof(url), "%.*s", (int)(e - s), s);
        }
        b = BIO_new_mem_buf(buf, (int)len);
        crl = b ? PEM_read_bio_X509_CRL(b, NULL, NULL, NULL) : NULL;
        ERR_clear_error();
        if (!crl || (strncmp(name, "crl-url-", 8) == 0 && !url[0]))
                log_error("revocation cache: %s holds no CRL; ignored (it is replaced on the next fetch)", path);
        else if (crl_put(rv, name, url[0] ? url : NULL, crl) < 0)
                log_error("revocation cache: out of memory loading %s", path);
        X509_CRL_free(crl);
        BIO_free(b);
        free(buf);
}

static void load_ocsp_file(struct revoke *rv, const char *name)
{
        char path[PATH_MAX];
        uint8_t *buf;
        size_t len;

        if (snprintf(path, sizeof(path), "%s/%s", rv->dir, name) >= (int)sizeof(path) ||
            !(buf = read_file(path, OCSP_MAX_BYTES, &len)))
                return;
        if (ocsp_put(rv, name, buf, len) < 0)
                log_error("revocation cache: out of memory loading %s", path);
        free(buf);
}

static bool has_suffix(const char *s, const char *suf)
{
        size_t a = strlen(s), b = strlen(suf);

        return a >= b && strcmp(s + a - b, suf) == 0;
}

static void load_dir(struct revoke *rv)
{
        DIR *d = opendir(rv->dir);
        struct dirent *de;

        if (!d) {
                if (errno != ENOENT)
                        log_error("revocation cache %s cannot be read: %m; CRLs and OCSP answers are fetched again",
                                  rv->dir);
                return;
        }
        while ((de = readdir(d))) {
                if (strlen(de->d_name) >= sizeof(((struct crl_entry *)0)->name))
                        continue;
                if (strncmp(de->d_name, "crl-", 4) == 0 && has_suffix(de->d_name, ".pem"))
                        load_crl_file(rv, de->d_name);
                else if (strncmp(de->d_name, "ocsp-", 5) == 0 && has_suffix(de->d_name, ".der"))
                        load_ocsp_file(rv, de->d_name);
        }
        closedir(d);
        log_debug("revocation cache %s: %zu CRL(s), %zu OCSP answer(s)", rv->dir, rv->n_crls, rv->n_ocsp);
}

/* Writes the CRL file (memory-only caches skip it). */
static int store_crl_file(struct revoke *rv, const char *name, const char *url, X509_CRL *crl)
{
        BIO *b;
        char *p;
        long len;
        int r = -ENOMEM;

        if (!rv->dir)
                return 0;
        if (!(b = BIO_new(BIO_s_mem())))
                return -ENOMEM;
        if ((url ? BIO_printf(b, "%s%s\n", URL_LINE, url) : BIO_puts(b, IMPORT_LINE)) > 0 &&
            PEM_write_bio_X509_CRL(b, crl) && (len = BIO_get_mem_data(b, &p)) > 0)
                r = write_atomic(rv->dir, name, p, (size_t)len);
        BIO_free(b);
        ERR_clear_error();
        if (r < 0)
                log_error("cannot store the CRL in %s/%s: %s; it is used until the agent exits", rv->dir, name,
                          strerror(-r));
        return r;
}

/* ---- open / close ------------------------------------------------------------------ */

int revoke_open(struct revoke **out, const struct revoke_options *o)
{
        struct revoke *rv = calloc(1, sizeof(*rv));

        *out = NULL;
        if (!rv)
                return -ENOMEM;
        pthread_mutex_init(&rv->lock, NULL);
        rv->crl_fetch = o->crl_fetch;
        rv->ocsp_aia = o->ocsp_aia;
        rv->timeout = o->timeout ? o->timeout : 10;
        if ((o->dir && !(rv->dir = strdup(o->dir))) ||
            (o->ocsp_responder && !(rv->responder = strdup(o->ocsp_responder)))) {
                revoke_free(rv);
                return -ENOMEM;
        }
        if (rv->dir)
                load_dir(rv);
        if (rv->crl_fetch || rv->ocsp_aia || rv->responder)
                log_info("revocation: CRL fetching %s, OCSP %s, timeout %u s, cache %s",
                         rv->crl_fetch ? "on" : "off",
                         rv->responder ? rv->responder : rv->ocsp_aia ? "at the certificates' responders (AIA)" : "off",
                         rv->timeout, rv->dir ? rv->dir : "in memory");
        *out = rv;
        return 0;
}

void revoke_free(struct revoke *rv)
{
        if (!rv)
                return;
        for (size_t i = 0; i < rv->n_crls; i++) {
                free(rv->crls[i].url);
                X509_CRL_free(rv->crls[i].crl);
        }
        free(rv->crls);
        for (size_t i = 0; i < rv->n_ocsp; i++)
                free(rv->ocsp[i].der);
        free(rv->ocsp);
        free(rv->dir);
        free(rv->responder);
        pthread_mutex_destroy(&rv->lock);
        free(rv);
}

bool revoke_online(const struct revoke *rv)
{
        return rv->crl_fetch || rv->ocsp_aia || rv->responder;
}

/* ---- CRLs ---------------------------------------------------------------------------- */

size_t revoke_crls(struct revoke *rv, struct rv_crl **out)
{
        size_t n = 0;

        *out = NULL;
        pthread_mutex_lock(&rv->lock);
        if (rv->n_crls && (*out = calloc(rv->n_crls, sizeof(**out)))) {
                for (size_t i = 0; i < rv->n_crls; i++) {
                        struct rv_crl *c = &(*out)[n++];

                        X509_CRL_up_ref(rv->crls[i].crl);
                        c->crl = rv->crls[i].crl;
                        if (rv->crls[i].url)
                                snprintf(c->source, sizeof(c->source), "the CRL from %s", rv->crls[i].url);
                        else
                                snprintf(c->source, sizeof(c->source), "a CRL imported with `smimectl import`");
                }
        }
        pthread_mutex_unlock(&rv->lock);
        return n;
}

void revoke_crls_free(struct rv_crl *v, size_t n)
{
        for (size_t i = 0; i < n; i++)
                X509_CRL_free(v[i].crl);
        free(v);
}

static bool crl_fresh(const X509_CRL *crl, time_t now)
{
        const ASN1_TIME *next = X509_CRL_get0_nextUpdate(crl);

        return next && cs_asn1_time(next) > now && cs_asn1_time(X509_CRL_get0_lastUpdate(crl)) <= now + CLOCK_SKEW_SEC;
}

int revoke_import_crl(struct revoke *rv, X509_CRL *crl, char *err, size_t n)
{
        unsigned char *der = NULL;
        int len = i2d_X509_NAME(X509_CRL_get_issuer(crl), &der), r = 0;
        char hex[65], name[96];
        struct crl_entry *e;

        if (len <= 0) {
                snprintf(err, n, "the CRL's issuer name cannot be encoded");
                return -EINVAL;
        }
        sha256_hex(der, (size_t)len, hex);
        OPENSSL_free(der);
        snprintf(name, sizeof(name), "crl-import-%s.pem", hex);
        pthread_mutex_lock(&rv->lock);
        e = crl_find(rv, name);
        if (e && ASN1_TIME_compare(X509_CRL_get0_lastUpdate(crl), X509_CRL_get0_lastUpdate(e->crl)) <= 0)
                goto out;       /* the same or an older one */
        if (rv->dir && (r = store_crl_file(rv, name, NULL, crl)) < 0) {
                snprintf(err, n, "cannot store the CRL in %s: %s", rv->dir, strerror(-r));
                goto out;
        }
        if ((r = crl_put(rv, name, NULL, crl)) < 0)
                snprintf(err, n, "out of memory");
        else
                r = 1;
out:
        pthread_mutex_unlock(&rv->lock);
        return r;
}

/* A CRL is DER (RFC 5280 4.2.1.13: application/pkix-crl); expect_asn1
 * makes OpenSSL read exactly one DER object, at most CRL_MAX_BYTES. */
static X509_CRL *crl_download(const char *url, unsigned timeout, char *err, size_t n, int *sys_errno)
{
        X509_CRL *crl = NULL;
        BIO *mem;

        ERR_clear_error();
        mem = OSSL_HTTP_get(url, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL, NULL, 1, CRL_MAX_BYTES, (int)timeout);
        if (!mem) {
                ossl_errors(err, n, sys_errno, timeout);
                return NULL;
        }
        if (!(crl = d2i_X509_CRL_bio(mem, NULL)))
                snprintf(err, n, "the answer is not a DER CRL");
        BIO_free(mem);
        ERR_clear_error();
        return crl;
}

/* The HTTP URLs of x's CRL distribution points (full names only). */
static size_t crl_urls(X509 *x, char urls[MAX_URLS][256])
{
        STACK_OF(DIST_POINT) *dps = X509_get_ext_d2i(x, NID_crl_distribution_points, NULL, NULL);
        size_t n = 0;

        for (int i = 0; dps && i < sk_DIST_POINT_num(dps) && n < MAX_URLS; i++) {
                DIST_POINT *dp = sk_DIST_POINT_value(dps, i);

                if (!dp->distpoint || dp->distpoint->type != 0)
                        continue;
                for (int k = 0; k < sk_GENERAL_NAME_num(dp->distpoint->name.fullname) && n < MAX_URLS; k++) {
                        GENERAL_NAME *g = sk_GENERAL_NAME_value(dp->distpoint->name.fullname, k);
                        const char *s;
                        int len;

                        if (g->type != GEN_URI)
                                continue;
                        s = (const char *)ASN1_STRING_get0_data(g->d.uniformResourceIdentifier);
                        len = ASN1_STRING_length(g->d.uniformResourceIdentifier);
                        if (len > 7 && len < 256 && !memchr(s, '\0', (size_t)len) && strncasecmp(s, "http://", 7) == 0)
                                snprintf(urls[n++], 256, "%.*s", len, s);
                }
        }
        sk_DIST_POINT_pop_free(dps, DIST_POINT_free);
        ERR_clear_error();
        return n;
}

/* One distribution point: true when a fresh CRL from it is held now. */
static bool crl_from(struct revoke *rv, const char *url, X509 *issuer, char *why, size_t wn)
{
        char hex[65], name[96], err[700], hint[700] = "";
        time_t now = time(NULL);
        struct crl_entry *e;
        X509_CRL *crl;
        EVP_PKEY *ikey = X509_get0_pubkey(issuer);
        bool fresh = false;
        int sys_errno = 0;

        sha256_hex(url, strlen(url), hex);
        snprintf(name, sizeof(name), "crl-url-%s.pem", hex);
        pthread_mutex_lock(&rv->lock);
        e = crl_find(rv, name);
        fresh = e && crl_fresh(e->crl, now);
        pthread_mutex_unlock(&rv->lock);
        if (fresh)
                return true;
        if (failed_recently(rv, url, err, sizeof(err))) {
                appendf(why, wn, "the CRL from %s could not be fetched: %s", url, err);
                return false;
        }
        log_info("fetching the CRL from %s", url);
        if (!(crl = crl_download(url, rv->timeout, err, sizeof(err), &sys_errno))) {
                char msg[1400];

                net_hint(sys_errno, hint, sizeof(hint));
                snprintf(msg, sizeof(msg), "%s%s%s", err, hint[0] ? "; " : "", hint);
                note_failure(rv, url, msg);
                appendf(why, wn, "the CRL from %s could not be fetched: %s", url, msg);
                log_error("the CRL from %s could not be fetched: %s", url, msg);
                return false;
        }
        clear_failure(rv, url);
        if (X509_NAME_cmp(X509_CRL_get_issuer(crl), X509_get_subject_name(issuer)) != 0 || !ikey ||
            X509_CRL_verify(crl, ikey) <= 0) {
                char iss[300];

                X509_NAME_oneline(X509_get_subject_name(issuer), iss, sizeof(iss));
                appendf(why, wn, "the CRL from %s is not signed by the certificate's issuer %s: refused", url, iss);
                log_error("the CRL from %s is not signed by %s: refused", url, iss);
                note_failure(rv, url, "it served a CRL that its issuer did not sign");
                X509_CRL_free(crl);
                ERR_clear_error();
                return false;
        }
        pthread_mutex_lock(&rv->lock);
        (void)store_crl_file(rv, name, url, crl);
        (void)crl_put(rv, name, url, crl);
        pthread_mutex_unlock(&rv->lock);
        fresh = crl_fresh(crl, now);
        if (!fresh) {
                char d[40] = "none";

                if (X509_CRL_get0_nextUpdate(crl))
                        fmt_time(cs_asn1_time(X509_CRL_get0_nextUpdate(crl)), d, sizeof(d));
                appendf(why, wn, "the CRL from %s is out of date (its nextUpdate: %s)", url, d);
                note_failure(rv, url, "it served an out-of-date CRL");
        }
        X509_CRL_free(crl);
        return fresh;
}

static void crl_check(struct revoke *rv, X509 *x, X509 *issuer, struct rv_result *res)
{
        char urls[MAX_URLS][256];
        size_t n = crl_urls(x, urls);

        if (!n)
                return;
        res->crl_tried = true;
        for (size_t i = 0; i < n; i++)
                if (crl_from(rv, urls[i], issuer, res->why, sizeof(res->why)))
                        return;
        res->crl_failed = true;
}

/* ---- OCSP ---------------------------------------------------------------------------- */

static OCSP_RESPONSE *ocsp_send(const char *url, OCSP_REQUEST *req, unsigned timeout, char *err, size_t n,
                                int *sys_errno)
{
        char *host = NULL, *port = NULL, *path = NULL;
        BIO *rq = NULL, *rsp = NULL;
        OCSP_RESPONSE *resp = NULL;
        int ssl = 0;

        ERR_clear_error();
        if (!OSSL_HTTP_parse_url(url, &ssl, NULL, &host, &port, NULL, &path, NULL, NULL)) {
                snprintf(err, n, "it is not an http:// URL");
                goto out;
        }
        if (ssl) {
                snprintf(err, n, "https is not supported (OCSP answers are signed: use http://)");
                goto out;
        }
        if (!(rq = ASN1_item_i2d_mem_bio(ASN1_ITEM_rptr(OCSP_REQUEST), (const ASN1_VALUE *)req))) {
                snprintf(err, n, "out of memory");
                goto out;
        }
        rsp = OSSL_HTTP_transfer(NULL, host, port, path, 0, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL,
                                 "application/ocsp-request", rq, "application/ocsp-response", 1, OCSP_MAX_BYTES,
                                 (int)timeout, 0);
        if (!rsp) {
                ossl_errors(err, n, sys_errno, timeout);
                goto out;
        }
        if (!(resp = d2i_OCSP_RESPONSE_bio(rsp, NULL)))
                snprintf(err, n, "the answer is not an OCSP response");
out:
        BIO_free(rq);
        BIO_free(rsp);
        OPENSSL_free(host);
        OPENSSL_free(port);
        OPENSSL_free(path);
        ERR_clear_error();
        return resp;
}

/* Judges a response about id; req: the request it answers (NULL: from the
 * cache, no nonce to compare). *next: its nextUpdate (0: none). */
static enum rv_state ocsp_judge(OCSP_RESPONSE *resp, OCSP_CERTID *id, OCSP_REQUEST *req, X509_STORE *trust,
                                STACK_OF(X509) *chain, struct rv_result *res, time_t *next, char *err, size_t n)
{
        ASN1_GENERALIZEDTIME *rev = NULL, *thisupd = NULL, *nextupd = NULL;
        OCSP_BASICRESP *bs = NULL;
        enum rv_state st = RV_FAILED;
        int rs = OCSP_response_status(resp), status, reason = -1, dummy = 0;

        *next = 0;
        ERR_clear_error();
        if (rs != OCSP_RESPONSE_STATUS_SUCCESSFUL) {
                snprintf(err, n, "the responder answered \"%s\"", OCSP_response_status_str(rs));
                goto out;
        }
        if (!(bs = OCSP_response_get1_basic(resp))) {
                snprintf(err, n, "the answer holds no basic OCSP response");
                goto out;
        }
        if (req && OCSP_check_nonce(req, bs) == 0) {
                snprintf(err, n, "its nonce differs from the request's (a replayed or misdirected answer)");
                goto out;
        }
        if (OCSP_basic_verify(bs, chain, trust, 0) <= 0) {
                char e[400];

                ossl_errors(e, sizeof(e), &dummy, 0);
                snprintf(err, n, "its signature does not verify (%s): it is not signed by the certificate's issuer "
                         "or by a responder the issuer delegated to, chaining to your trust anchors", e);
                goto out;
        }
        if (!OCSP_resp_find_status(bs, id, &status, &reason, &rev, &thisupd, &nextupd)) {
                snprintf(err, n, "it does not cover this certificate");
                goto out;
        }
        if (!OCSP_check_validity(thisupd, nextupd, CLOCK_SKEW_SEC, -1)) {
                char a[40] = "?", b[40] = "none";

                fmt_time(cs_asn1_time(thisupd), a, sizeof(a));
                if (nextupd)
                        fmt_time(cs_asn1_time(nextupd), b, sizeof(b));
                snprintf(err, n, "it is out of date or not yet valid (thisUpdate %s, nextUpdate %s)", a, b);
                goto out;
        }
        *next = nextupd ? cs_asn1_time(nextupd) : 0;
        if (status == V_OCSP_CERTSTATUS_GOOD) {
                st = RV_GOOD;
        } else if (status == V_OCSP_CERTSTATUS_REVOKED) {
                st = RV_REVOKED;
                res->revoked_at = cs_asn1_time(rev);
                res->reason = reason;
        } else {
                snprintf(err, n, "the responder does not know this certificate (status \"unknown\")");
        }
out:
        OCSP_BASICRESP_free(bs);
        ERR_clear_error();
        return st;
}

static void ocsp_check(struct revoke *rv, X509 *x, X509 *issuer, X509_STORE *trust, STACK_OF(X509) *chain,
                       struct rv_result *res)
{
        STACK_OF(OPENSSL_STRING) *aia = NULL;
        const char *url = rv->responder;
        OCSP_CERTID *id = NULL;
        OCSP_REQUEST *req = NULL;
        OCSP_RESPONSE *resp = NULL;
        unsigned char *der = NULL;
        char hex[65], name[96], err[900] = "", hint[700] = "";
        struct ocsp_entry *e;
        enum rv_state st;
        time_t next = 0;
        int len, sys_errno = 0;

        if (!url && rv->ocsp_aia) {
                aia = X509_get1_ocsp(x);
                for (int i = 0; aia && i < sk_OPENSSL_STRING_num(aia) && !url; i++)
                        if (is_http(sk_OPENSSL_STRING_value(aia, i)))
                                url = sk_OPENSSL_STRING_value(aia, i);
        }
        if (!url)
                goto out;
        snprintf(res->ocsp_url, sizeof(res->ocsp_url), "%s", url);
        if (!(id = OCSP_cert_to_id(EVP_sha1(), x, issuer)) || (len = i2d_OCSP_CERTID(id, &der)) <= 0) {
                res->ocsp = RV_FAILED;
                appendf(res->why, sizeof(res->why), "no OCSP request can be made for it");
                goto out;
        }
        sha256_hex(der, (size_t)len, hex);
        snprintf(name, sizeof(name), "ocsp-%s.der", hex);

        /* A cached answer, judged again as if new (but without a nonce). */
        pthread_mutex_lock(&rv->lock);
        if ((e = ocsp_find(rv, name))) {
                const unsigned char *q = e->der;

                resp = d2i_OCSP_RESPONSE(NULL, &q, (long)e->len);
        }
        pthread_mutex_unlock(&rv->lock);
        if (resp) {
                struct rv_result tmp = { .reason = -1 };

                st = ocsp_judge(resp, id, NULL, trust, chain, &tmp, &next, err, sizeof(err));
                OCSP_RESPONSE_free(resp);
                resp = NULL;
                if ((st == RV_GOOD || st == RV_REVOKED) && next > time(NULL)) {
                        res->ocsp = st;
                        res->revoked_at = tmp.revoked_at;
                        res->reason = tmp.reason;
                        goto out;
                }
                pthread_mutex_lock(&rv->lock);
                ocsp_drop(rv, name);
                pthread_mutex_unlock(&rv->lock);
                err[0] = '\0';
        }

        res->ocsp = RV_FAILED;
        if (failed_recently(rv, url, err, sizeof(err))) {
                appendf(res->why, sizeof(res->why), "the OCSP responder %s could not be reached: %s", url, err);
                goto out;
        }
        if (!(req = OCSP_REQUEST_new()) || !OCSP_request_add0_id(req, id)) {
                appendf(res->why, sizeof(res->why), "out of memory");
                goto out;
        }
        id = NULL;      /* the request owns it */
        if (!OCSP_request_add1_nonce(req, NULL, -1)) {
                appendf(res->why, sizeof(res->why), "out of memory");
                goto out;
        }
        log_info("asking the OCSP responder %s", url);
        if (!(resp = ocsp_send(url, req, rv->timeout, err, sizeof(err), &sys_errno))) {
                char msg[1600];

                net_hint(sys_errno, hint, sizeof(hint));
                snprintf(msg, sizeof(msg), "%s%s%s", err, hint[0] ? "; " : "", hint);
                note_failure(rv, url, msg);
                appendf(res->why, sizeof(res->why), "the OCSP responder %s could not be reached: %s", url, msg);
                log_error("the OCSP responder %s could not be reached: %s", url, msg);
                goto out;
        }
        clear_failure(rv, url);
        st = ocsp_judge(resp, OCSP_onereq_get0_id(OCSP_request_onereq_get0(req, 0)), req, trust, chain, res, &next,
                        err, sizeof(err));
        if (st == RV_FAILED) {
                appendf(res->why, sizeof(res->why), "the answer of the OCSP responder %s was refused: %s", url, err);
                log_error("the answer of the OCSP responder %s was refused: %s", url, err);
                goto out;
        }
        res->ocsp = st;
        if (next > time(NULL)) {
                unsigned char *rder = NULL;
                int rlen = i2d_OCSP_RESPONSE(resp, &rder);

                if (rlen > 0) {
                        pthread_mutex_lock(&rv->lock);
                        if (ocsp_put(rv, name, rder, (size_t)rlen) == 0 && rv->dir) {
                                int r = write_atomic(rv->dir, name, rder, (size_t)rlen);

                                if (r < 0)
                                        log_error("cannot store the OCSP answer in %s/%s: %s", rv->dir, name,
                                                  strerror(-r));
                        }
                        pthread_mutex_unlock(&rv->lock);
                }
                OPENSSL_free(rder);
        }
out:
        OCSP_RESPONSE_free(resp);
        OCSP_REQUEST_free(req);
        OCSP_CERTID_free(id);
        OPENSSL_free(der);
        X509_email_free(aia);
        ERR_clear_error();
}

void revoke_check(struct revoke *rv, X509 *x, X509 *issuer, X509_STORE *trust, STACK_OF(X509) *chain,
                  struct rv_result *res)
{
        memset(res, 0, sizeof(*res));
        res->reason = -1;
        if (rv->responder || rv->ocsp_aia)
                ocsp_check(rv, x, issuer, trust, chain, res);
        if (res->ocsp == RV_GOOD || res->ocsp == RV_REVOKED)
                return;
        if (rv->crl_fetch)
                crl_check(rv, x, issuer, res);
}
