/* keyprov_int.h — what the two halves of the token provider share:
 * keyprov.c (key management, signatures) and keyprov_dec.c (RSA decryption,
 * ECDH). Not for the rest of the service; use keyprov.h. */
#ifndef SMIME_KEYPROV_INT_H
#define SMIME_KEYPROV_INT_H

#include <stdbool.h>

#include <openssl/core_dispatch.h>
#include <openssl/evp.h>

#include "token.h"

#define KP_PROPS "provider=smime-agent"

enum kp_type { KP_RSA, KP_EC, KP_ED25519 };

struct kp_key {
        enum kp_type type;
        EVP_PKEY *pub;                  /* default-provider public key */
        const struct token_key *tk;     /* NULL for public-only (imported) keys */
        bool pss;                       /* RSA: sign with PSS (the caller sets the AlgorithmIdentifier) */
        const struct token_auth *auth;  /* CKA_ALWAYS_AUTHENTICATE keys: the PIN for each use; borrowed */
};

/* Records a token failure for keyprov_last_error() and on OpenSSL's error queue. */
void kp_record(int r, const struct token_error *e);

extern const OSSL_DISPATCH kp_asym_rsa[];
extern const OSSL_DISPATCH kp_ecdh[];

#endif
