/* revoke.h — revocation status from the network, and the CRL and OCSP
 * cache beside the address book (revoke.c explains the design).
 *
 * certstore.c is the only user: it asks revoke_check() about each
 * certificate of a chain it has built, then lets OpenSSL's CRL check run
 * over every CRL this module holds (revoke_crls()).
 *
 * Must never: call a certificate good unless a response or CRL signed by
 * its issuer (or the issuer's delegated OCSP responder) says so; hold its
 * lock across network I/O.
 */
#ifndef SMIME_REVOKE_H
#define SMIME_REVOKE_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include <openssl/x509.h>

struct revoke;

struct revoke_options {
        const char *dir;                /* the cache directory; NULL: memory only */
        bool crl_fetch;                 /* fetch CRLs from HTTP distribution points */
        bool ocsp_aia;                  /* ask the OCSP responder named in the certificate */
        const char *ocsp_responder;     /* ask this responder about every certificate (overrides AIA) */
        unsigned timeout;               /* seconds one HTTP exchange may take */
};

int revoke_open(struct revoke **out, const struct revoke_options *o);
void revoke_free(struct revoke *rv);
/* True when crl-fetch or OCSP is on: revoke_check() may use the network. */
bool revoke_online(const struct revoke *rv);

enum rv_state { RV_NONE, RV_GOOD, RV_REVOKED, RV_FAILED };

/* What the network said about one certificate. */
struct rv_result {
        enum rv_state ocsp;             /* RV_NONE: no responder to ask */
        char ocsp_url[256];
        time_t revoked_at;              /* RV_REVOKED */
        int reason;                     /* CRL reason code, -1: none given */
        bool crl_tried;                 /* an HTTP CDP applied, crl-fetch is on */
        bool crl_failed;                /* ... and no CRL could be had */
        char why[1024];                 /* the failures, for people ("" when none) */
};

/* Asks about x, issued by issuer: OCSP first (cached good or revoked
 * answers are reused until their nextUpdate), then, unless OCSP answered,
 * the CRLs of x's HTTP distribution points (fetched only when the cache
 * has none whose nextUpdate is still ahead). trust: the anchors the OCSP
 * responder must chain to; chain: untrusted certificates (x's chain). */
void revoke_check(struct revoke *rv, X509 *x, X509 *issuer, X509_STORE *trust, STACK_OF(X509) *chain,
                  struct rv_result *res);

/* Every CRL held (fetched or imported), up-referenced, with where it came
 * from for people ("the CRL from http://...", "a CRL imported with
 * smimectl import"). */
struct rv_crl {
        X509_CRL *crl;
        char source[320];
};
size_t revoke_crls(struct revoke *rv, struct rv_crl **out);
void revoke_crls_free(struct rv_crl *v, size_t n);

/* Stores a CRL imported by hand, whose signature by issuer the caller
 * checked. 1: stored; 0: the same or a newer CRL of that issuer is
 * already held; negative with err filled. */
int revoke_import_crl(struct revoke *rv, X509_CRL *crl, char *err, size_t n);

/* The CRL reason name ("keyCompromise"), "" for none. */
const char *revoke_reason_name(int reason);

#endif
