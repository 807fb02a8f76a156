/* identity.h — what the service knows about each key: the token key, its
 * certificate parsed, and whether it may sign. Built once per token snapshot
 * and shared by every request (no certificate parsing per request).
 */
#ifndef SMIME_IDENTITY_H
#define SMIME_IDENTITY_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include <openssl/x509.h>

#include "token.h"

struct identity {
        const struct token_key *tk;     /* owned by the set's snapshot */
        X509 *cert;                     /* NULL when the key has no certificate */
        EVP_PKEY *pub;                  /* public key from the certificate, else NULL */
        char **emails;                  /* subjectAltName rfc822Name, then subject emailAddress */
        size_t n_emails;
        char subject[512];
        char issuer[512];
        char serial[80];
        char token_label[33];
        time_t not_before, not_after;
        const char *key_type;           /* "RSA", "EC", "Ed25519", "unknown" */
        unsigned bits;
        const char *curve;              /* "P-256", ... or NULL */
        bool usage_sign;                /* certificate allows digitalSignature/nonRepudiation + emailProtection */
        bool usage_decrypt;             /* keyEncipherment or keyAgreement */
        bool usage_encipher;            /* keyEncipherment: RSA key transport */
        bool usage_agree;               /* keyAgreement: ECDH */
        bool is_default;
};

struct identity_set {
        struct token_keys *snap;
        size_t n;
        struct identity *ids;
        int refs;                       /* guarded by the cache lock */
};

/* The identities of the store's current snapshot; rebuilt only when the
 * token layer published a new one. Release with identity_set_unref(). */
struct identity_set *identity_set_get(struct token_store *s, const char *default_selector);
void identity_set_unref(struct identity_set *set);

/* 0 if this identity can sign now; otherwise a proto error code
 * (PE_NO_CERT, PE_CERT_EXPIRED, PE_KEY_USAGE) with the reason in buf. */
int identity_sign_problem(const struct identity *id, char *buf, size_t n);

/* Chooses the identity for a request. selector: a PKCS#11 URI, an e-mail
 * address, or NULL (then default_selector, then the only identity that can
 * sign). Returns 0 and *out, or a proto error code (PE_NO_KEY,
 * PE_AMBIGUOUS_KEY, PE_UNSUPPORTED for a malformed URI) with msg filled in
 * for the user. The keys msg lists are those visible(ctx, id) accepts
 * (visible NULL: all), so that a peer limited by the configuration does not
 * learn of keys it may not use. */
typedef bool (*identity_visible_fn)(const void *ctx, const struct identity *id);
int identity_select(struct identity_set *set, const char *selector, const char *default_selector,
                    identity_visible_fn visible, const void *ctx, const struct identity **out, char *msg, size_t n);

/* Issuer certificates of id found among the set's certificates and in
 * extra (the configured CA files), nearest first. Caller frees the stack
 * with sk_X509_pop_free. */
STACK_OF(X509) *identity_chain(struct identity_set *set, const struct identity *id, STACK_OF(X509) *extra);

#endif
