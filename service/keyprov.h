/* keyprov.h — token keys as OpenSSL EVP_PKEYs.
 *
 * An in-process OpenSSL 3 provider ("smime-agent") whose key objects hold
 * the public half of a key (taken from its certificate) and a reference to
 * the private key on the token. OpenSSL's CMS code builds and encodes every
 * structure; when it needs a signature it calls this provider, which hashes
 * in software and hands only the private-key operation to token_sign().
 *
 * Must never: hold or ask for private key material (there is none to hold).
 */
#ifndef SMIME_KEYPROV_H
#define SMIME_KEYPROV_H

#include <stdbool.h>

#include <openssl/evp.h>

#include "token.h"

/* The property query under which OpenSSL finds this provider's signature
 * for a token key (and the default provider for everything else). */
#define KEYPROV_PROPQ "?provider=smime-agent"

/* Registers and loads the provider (and the default provider) in the
 * default library context. Call once at start-up. */
int keyprov_init(void);
/* Releases what keyprov_init() loaded; no token key may be in use. */
void keyprov_done(void);

/* An EVP_PKEY whose private operations go to k on the token. pub is the
 * key's public half (from the certificate); the new key takes a reference
 * on it. k is borrowed: the caller keeps the snapshot that owns k alive
 * until the EVP_PKEY is freed. pss: an RSA key signs with RSASSA-PSS (salt
 * = digest length, MGF1 with the same digest) instead of PKCS#1 v1.5.
 * ctx (borrowed like k, may be NULL): for a CKA_ALWAYS_AUTHENTICATE key, the
 * PIN of its context-specific login before each private-key operation; and
 * how to log in again when the token was logged out under the request. */
struct keyprov_ctx {
        const struct token_auth *auth;  /* CKA_ALWAYS_AUTHENTICATE keys: the PIN for each use */
        /* The token was logged out during the request (a LOCK): log in again
         * without asking anyone; 0 when done, then the operation is retried
         * once. NULL: no retry. */
        int (*relogin)(void *arg, struct token *t);
        void *arg;
};
EVP_PKEY *keyprov_pkey_new(const struct token_key *k, EVP_PKEY *pub, bool pss, const struct keyprov_ctx *ctx);

/* When a signature made by this provider failed in the token, the error of
 * the last failure on this thread; NULL otherwise. Cleared by
 * keyprov_clear_error(). */
const struct token_error *keyprov_last_error(int *errno_code);
void keyprov_clear_error(void);

#endif
