/* keyprov_int.h — what the two halves of the token provider share:
 * keyprov.c (key management, signatures) and keyprov_dec.c (RSA decryption,
 * ECDH). Not for the rest of the service; use keyprov.h. */
#ifndef SMIME_KEYPROV_INT_H
#define SMIME_KEYPROV_INT_H

#include <stdbool.h>

#include <openssl/core_dispatch.h>
#include <openssl/evp.h>

#include "keyprov.h"
#include "token.h"

#define KP_PROPS "provider=smime-agent"

enum kp_type { KP_RSA, KP_EC, KP_ED25519 };

struct kp_key {
        enum kp_type type;
        EVP_PKEY *pub;                  /* default-provider public key */
        const struct token_key *tk;     /* NULL for public-only (imported) keys */
        bool pss;                       /* RSA: sign with PSS (the caller sets the AlgorithmIdentifier) */
        const struct keyprov_ctx *ctx;  /* the request's: PIN for each use, relogin; borrowed, may be NULL */
};

/* The context-specific PIN of a key, or NULL. */
static inline const struct token_auth *kp_auth(const struct kp_key *k)
{
        return k->ctx ? k->ctx->auth : NULL;
}

/* After a private-key operation failed with r/err: when the token was
 * logged out under the request and the request can log in again quietly,
 * does so and returns true (retry the operation once). */
bool kp_relogin(const struct kp_key *k, int r, const struct token_error *err);

/* Records a token failure for keyprov_last_error() and on OpenSSL's error queue. */
void kp_record(int r, const struct token_error *e);

extern const OSSL_DISPATCH kp_asym_rsa[];
extern const OSSL_DISPATCH kp_ecdh[];

#endif
