/* certstore.h — the address book: correspondents' certificates, the user's
 * trust decisions, the trust anchors (system CA bundle and ca-file), the
 * configured CRLs and the revocation cache (revoke.h: fetched and imported
 * CRLs, OCSP answers), and the policy that judges a certificate against
 * them.
 *
 * The book lives in one file (address-book, default
 * $XDG_STATE_HOME/smime-agent/addressbook) rewritten atomically on every
 * change: temporary file, fsync, rename, fsync of the directory. A crash
 * leaves the old or the new book, never a mix.
 *
 * Must never: hold a private key, or report a certificate as usable when a
 * check failed. Thread-safe: every call takes the store's lock.
 */
#ifndef SMIME_CERTSTORE_H
#define SMIME_CERTSTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include <openssl/x509.h>

enum cs_trust { CS_TRUST_NONE, CS_TRUST_TRUSTED, CS_TRUST_DISTRUSTED };

/* SMIMECapabilities we act on (RFC 8551, section 2.5.2). */
enum {
        CAP_AES256_GCM = 1u << 0,
        CAP_AES128_GCM = 1u << 1,
        CAP_AES256_CBC = 1u << 2,
        CAP_AES192_CBC = 1u << 3,
        CAP_AES128_CBC = 1u << 4,
        CAP_RSA_OAEP = 1u << 5,
};
#define CAP_COUNT 6
/* Name of capability bit i ("aes-256-gcm"), and the bit of a name (0: unknown). */
const char *cs_cap_name(unsigned i);
unsigned cs_cap_from_name(const char *name);
/* The capabilities of an SMIMECapabilities attribute value (DER SEQUENCE). */
unsigned cs_caps_from_der(const unsigned char *der, long len);

/* Problems, by name on the wire ("EXPIRED"). One bit each. */
enum cs_problem {
        P_BAD_SIGNATURE = 1u << 0,      /* the signature does not verify */
        P_CONTENT_ALTERED = 1u << 1,    /* messageDigest differs from the content */
        P_NO_SIGNER_CERT = 1u << 2,     /* the signer's certificate is not in the message or the book */
        P_UNSUPPORTED_ALGORITHM = 1u << 3,
        P_EXPIRED = 1u << 4,
        P_NOT_YET_VALID = 1u << 5,
        P_REVOKED = 1u << 6,
        P_UNTRUSTED = 1u << 7,          /* no path to a trust anchor (self-signed or unknown root) */
        P_CHAIN_INCOMPLETE = 1u << 8,   /* an issuer certificate is missing */
        P_DISTRUSTED = 1u << 9,         /* the user distrusted it (or a CA above it) */
        P_KEY_USAGE = 1u << 10,         /* keyUsage / extendedKeyUsage do not allow this use */
        P_CHAIN_INVALID = 1u << 11,     /* any other chain failure */
        P_FROM_MISMATCH = 1u << 12,     /* the sender address is not in the certificate */
        P_UNSUPPORTED_KEY = 1u << 13,   /* key type we cannot encrypt to */
        P_NO_CERT = 1u << 14,           /* no certificate known for the recipient */
        P_NO_COMMON_CIPHER = 1u << 15,
        P_REVOCATION_UNKNOWN = 1u << 16,/* a CRL or OCSP check was due but gave no answer (revocation-unknown = block) */
};
#define CS_PROBLEM_COUNT 17
#define CS_SIGNATURE_PROBLEMS (P_BAD_SIGNATURE | P_CONTENT_ALTERED | P_NO_SIGNER_CERT | P_UNSUPPORTED_ALGORITHM)
const char *cs_problem_name(unsigned bit_index);

/* What we know about one certificate, parsed once. */
struct cert_facts {
        char fp[65];                    /* SHA-256, lowercase hex */
        char subject[512];
        char issuer[512];
        char serial[80];
        char **emails;                  /* subjectAltName rfc822Name, then subject emailAddress */
        size_t n_emails;
        time_t not_before, not_after;
        const char *key_type;           /* "RSA", "EC", "Ed25519", "Ed448", "unknown" */
        unsigned bits;
        const char *curve;              /* "P-256", ... or NULL */
        bool usage_encrypt;             /* keyEncipherment (RSA) / keyAgreement (EC), EKU emailProtection */
        bool usage_sign;
        bool is_ca;
};

int cert_facts_load(struct cert_facts *f, X509 *x);
void cert_facts_clear(struct cert_facts *f);
bool cert_facts_has_email(const struct cert_facts *f, const char *email);
void cs_fingerprint(X509 *x, char out[65]);
/* An ASN.1 time as time_t (0 when missing or malformed). */
time_t cs_asn1_time(const ASN1_TIME *t);
/* "P-256", "P-384", "P-521", else OpenSSL's short name of the curve. */
const char *cs_curve_name(int nid);
/* Creates the missing directories above the file path (mode 0700). */
int cs_mkdir_parents(const char *path);

/* One address book entry, as copied out by certstore_list(). */
struct cs_entry {
        X509 *cert;
        struct cert_facts facts;
        enum cs_trust trust;
        char source[16];                /* "harvested", "imported" */
        time_t added;
        unsigned caps;
        bool caps_known;
        time_t caps_time;               /* signingTime of the message the caps came from */
};

struct cs_list {
        struct cs_entry *v;
        size_t n;
};
void cs_list_free(struct cs_list *l);

struct certstore;

struct certstore_options {
        const char *path;               /* the book file; NULL: in memory only */
        char *const *ca_files;          /* trust anchors besides the system bundle */
        size_t n_ca_files;
        char *const *crl_files;
        size_t n_crl_files;
        bool no_system_ca;
        /* Revocation from the network (revoke.h); the cache lives in the
         * directory "revocation" beside path. */
        bool crl_fetch;
        bool ocsp_aia;
        const char *ocsp_responder;
        unsigned revocation_timeout;    /* seconds; 0: 10 */
        bool revocation_unknown_allow;  /* "unknown" is not a problem (revocation-unknown = allow) */
};

/* Opens the book. A book that cannot be parsed is not fatal: every later
 * call that needs it fails with the load error (so a damaged file is never
 * overwritten). Returns 0 or a negative errno for an unusable option (a
 * ca-file or crl-file that cannot be read), with the reason logged. */
int certstore_open(struct certstore **out, const struct certstore_options *o);
void certstore_free(struct certstore *cs);
/* NULL, or why the book cannot be used ("line 7 of FILE: ..."). */
const char *certstore_error(struct certstore *cs);

/* Adds x (or, when known, updates its capabilities if caps_time is newer).
 * *added tells which. 0, or negative with err filled. */
int certstore_add(struct certstore *cs, X509 *x, const char *source, bool caps_known, unsigned caps,
                  time_t caps_time, bool *added, char *err, size_t n);
/* Sets the decision for the entry with fingerprint fp (adding x first when
 * given). -ENOENT: no such entry. *out (may be NULL) receives a copy. */
int certstore_set_trust(struct certstore *cs, X509 *x, const char *fp, enum cs_trust t, struct cs_entry *out,
                        char *err, size_t n);
/* Copies of the entries whose certificate names email (all when NULL). */
int certstore_list(struct certstore *cs, const char *email, struct cs_list *out);
/* The entry for x, copied into *out; -ENOENT when x is not in the book. */
int certstore_lookup(struct certstore *cs, X509 *x, struct cs_entry *out);
void cs_entry_clear(struct cs_entry *e);

/* Result of judging one certificate. */
struct cs_check {
        unsigned problems;              /* P_* bits */
        char text[1024];                /* why, for people; "" when fine */
        const char *trust;              /* "anchor", "trusted-by-you", "distrusted", "untrusted" */
        char chain[8][512];             /* subjects, the certificate first */
        size_t n_chain;
};

/* Verifies x's chain to the anchors (plus the book's trusted entries),
 * with extra (e.g. the message's certificates) and the book as untrusted
 * intermediates, at time `at` (0: now), for S/MIME signing (sign = true)
 * or encryption. Revocation: the configured CRLs and every CRL of the
 * revocation cache; when at is 0 and crl-fetch or OCSP is on, each
 * certificate of a chain that is otherwise good is also asked about over
 * the network (revoke_check(); this may take the revocation timeout). */
int certstore_check(struct certstore *cs, X509 *x, STACK_OF(X509) *extra, bool sign, time_t at,
                    struct cs_check *res);
/* Stores a CRL imported by hand in the revocation cache, after checking
 * that it is signed by a known issuer (an anchor or a certificate in the
 * book). 1: stored; 0: the same or a newer CRL of that issuer is held;
 * -ENOENT: its issuer is unknown; -EBADMSG: its signature does not verify;
 * other negative: cannot be stored. err says which, for people. */
int certstore_add_crl(struct certstore *cs, X509_CRL *crl, char *err, size_t n);
/* All non-distrusted certificates of the book, up-referenced. */
STACK_OF(X509) *certstore_certs(struct certstore *cs);

#endif
