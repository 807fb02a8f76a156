/* test_token.c — checks token/ against the SoftHSM fixture (tests/softhsm/fixture.sh).
 *
 * usage: test_token FIXTURE_DIR [--spy]
 *
 * Every check prints one line; the last line is "test_token: N passed, M
 * failed" and the exit status is non-zero if anything failed. Signatures are
 * verified with OpenSSL against the public key in the token's certificate, so
 * a token that "signs" garbage fails here.
 *
 * With --spy the store loads OpenSC's pkcs11-spy in front of SoftHSM, and at
 * the end the spy's log is read back to prove that token/ never asked a
 * private key for anything but the public attributes it needs, never called
 * C_WrapKey/C_CopyObject/C_SetAttributeValue, called C_Login exactly once per
 * token_login(), and reused its sessions.
 *
 * What this test must never do: use a PIN other than the fixture's, or touch
 * any token but the fixture's (SOFTHSM2_CONF points SoftHSM at FIXTURE_DIR).
 */
#include "token.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#define SPY_MODULE "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so"
#define DEFAULT_MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define TOKEN_LABEL "smime-test"

static atomic_int n_passed, n_failed;

__attribute__((format(printf, 2, 3)))
static bool check(bool ok, const char *fmt, ...) {
        va_list ap;
        printf("%s: ", ok ? "ok  " : "FAIL");
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        printf("\n");
        fflush(stdout);
        atomic_fetch_add(ok ? &n_passed : &n_failed, 1);
        return ok;
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...) {
        va_list ap;
        printf("      ");
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        printf("\n");
}

/* ---- Fixture ------------------------------------------------------------ */

static const char *fixture_dir;
static char pin[256];
static const char *module_path;
static bool spy_mode;
static char spy_log[4096];
static int login_calls;         /* token_login() calls that reach C_Login via module_path */
static unsigned max_session_opens;

/* Reads "export NAME=VALUE" lines of DIR/env (values are plain paths and
 * digits in the fixture) and sets what the environment does not already
 * have. */
static void load_fixture_env(const char *dir) {
        char path[4096], line[4096];
        FILE *f;

        snprintf(path, sizeof(path), "%s/env", dir);
        f = fopen(path, "re");
        if (!f) {
                fprintf(stderr, "test_token: cannot read %s: %s\n", path, strerror(errno));
                return;
        }
        while (fgets(line, sizeof(line), f)) {
                char *p = line, *eq;
                line[strcspn(line, "\n")] = '\0';
                if (strncmp(p, "export ", 7) == 0)
                        p += 7;
                eq = strchr(p, '=');
                if (!eq || p[0] == '#')
                        continue;
                *eq = '\0';
                setenv(p, eq + 1, 0);
        }
        fclose(f);
}

/* ---- OpenSSL verification ------------------------------------------------ */

static EVP_PKEY *cert_pubkey(const struct token_key *k) {
        const unsigned char *p = k->cert_der;
        X509 *x;
        EVP_PKEY *pk;

        if (!p)
                return NULL;
        x = d2i_X509(NULL, &p, (long) k->cert_len);
        if (!x)
                return NULL;
        pk = X509_get_pubkey(x);
        X509_free(x);
        return pk;
}

static void sha(const EVP_MD *md, const void *msg, size_t len, uint8_t *out, unsigned *out_len) {
        EVP_Digest(msg, len, out, out_len, md, NULL);
}

static bool verify_rsa(EVP_PKEY *pk, bool pss, const uint8_t *hash, size_t hash_len, const uint8_t *sig,
                       size_t sig_len) {
        EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pk, NULL);
        bool ok = ctx && EVP_PKEY_verify_init(ctx) == 1 &&
                  EVP_PKEY_CTX_set_rsa_padding(ctx, pss ? RSA_PKCS1_PSS_PADDING : RSA_PKCS1_PADDING) == 1 &&
                  EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) == 1 &&
                  (!pss || (EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, 32) == 1 &&
                            EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256()) == 1)) &&
                  EVP_PKEY_verify(ctx, sig, sig_len, hash, hash_len) == 1;
        EVP_PKEY_CTX_free(ctx);
        return ok;
}

/* PKCS#11 ECDSA gives r || s; OpenSSL wants DER ECDSA-Sig-Value. */
static bool verify_ecdsa(EVP_PKEY *pk, const uint8_t *hash, size_t hash_len, const uint8_t *sig, size_t sig_len) {
        ECDSA_SIG *es = ECDSA_SIG_new();
        unsigned char *der = NULL;
        int der_len;
        bool ok = false;

        if (!es || sig_len == 0 || sig_len % 2)
                goto out;
        BIGNUM *r = BN_bin2bn(sig, (int) (sig_len / 2), NULL);
        BIGNUM *s = BN_bin2bn(sig + sig_len / 2, (int) (sig_len / 2), NULL);
        if (!r || !s || ECDSA_SIG_set0(es, r, s) != 1) {
                BN_free(r);
                BN_free(s);
                goto out;
        }
        der_len = i2d_ECDSA_SIG(es, &der);
        if (der_len <= 0)
                goto out;
        EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pk, NULL);
        ok = ctx && EVP_PKEY_verify_init(ctx) == 1 && EVP_PKEY_verify(ctx, der, (size_t) der_len, hash, hash_len) == 1;
        EVP_PKEY_CTX_free(ctx);
out:
        OPENSSL_free(der);
        ECDSA_SIG_free(es);
        return ok;
}

static bool verify_ed25519(EVP_PKEY *pk, const void *msg, size_t len, const uint8_t *sig, size_t sig_len) {
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        bool ok = ctx && EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, pk) == 1 &&
                  EVP_DigestVerify(ctx, sig, sig_len, msg, len) == 1;
        EVP_MD_CTX_free(ctx);
        return ok;
}

/* Signs msg with k the way a CMS signer would (hashing here, as the service
 * does) and verifies the result against the certificate. */
static int sign_verify(const struct token_key *k, enum token_mech mech, const void *msg, size_t msg_len,
                       struct token_error *err) {
        static const uint8_t sha256_prefix[] = { 0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
                                                 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20 };
        struct token_sign_params p = { .mech = mech, .pss_hash = TOKEN_HASH_SHA256, .pss_salt_len = 32 };
        uint8_t hash[EVP_MAX_MD_SIZE], in[sizeof(sha256_prefix) + EVP_MAX_MD_SIZE], sig[1024];
        const uint8_t *input = in;
        size_t in_len, sig_len = sizeof(sig);
        unsigned hash_len = 0;
        EVP_PKEY *pk;
        bool ok;
        int r;

        const EVP_MD *md = EVP_sha256();
        if (mech == TOKEN_MECH_ECDSA && k->ec_params_len == 7 && memcmp(k->ec_params, "\x06\x05\x2b\x81\x04\x00\x22", 7) == 0)
                md = EVP_sha384();      /* P-384 pairs with SHA-384 */
        sha(md, msg, msg_len, hash, &hash_len);

        switch (mech) {
        case TOKEN_MECH_RSA_PKCS:
                memcpy(in, sha256_prefix, sizeof(sha256_prefix));
                memcpy(in + sizeof(sha256_prefix), hash, hash_len);
                in_len = sizeof(sha256_prefix) + hash_len;
                break;
        case TOKEN_MECH_RSA_PSS:
        case TOKEN_MECH_ECDSA:
                input = hash;
                in_len = hash_len;
                break;
        case TOKEN_MECH_EDDSA:
        default:
                input = msg;
                in_len = msg_len;
                break;
        }

        r = token_sign(k, &p, input, in_len, sig, &sig_len, err);
        if (r < 0)
                return r;

        pk = cert_pubkey(k);
        if (!pk)
                return -EBADMSG;
        switch (mech) {
        case TOKEN_MECH_RSA_PKCS:
        case TOKEN_MECH_RSA_PSS:
                ok = verify_rsa(pk, mech == TOKEN_MECH_RSA_PSS, hash, hash_len, sig, sig_len);
                break;
        case TOKEN_MECH_ECDSA:
                ok = verify_ecdsa(pk, hash, hash_len, sig, sig_len);
                break;
        default:
                ok = verify_ed25519(pk, msg, msg_len, sig, sig_len);
                break;
        }
        /* A verifier that accepts anything would make every check above
         * worthless: flip a bit and insist it now fails. */
        if (ok) {
                sig[sig_len / 2] ^= 0x01;
                bool still = mech == TOKEN_MECH_ECDSA ? verify_ecdsa(pk, hash, hash_len, sig, sig_len)
                           : mech == TOKEN_MECH_EDDSA ? verify_ed25519(pk, msg, msg_len, sig, sig_len)
                           : verify_rsa(pk, mech == TOKEN_MECH_RSA_PSS, hash, hash_len, sig, sig_len);
                if (still)
                        ok = false;
        }
        EVP_PKEY_free(pk);
        return ok ? (int) sig_len : -EBADMSG;
}

/* ---- Helpers ------------------------------------------------------------ */

static struct token *find_token(struct token_store *s, const char *label) {
        for (size_t i = 0; i < token_store_token_count(s); i++) {
                struct token_info ti;
                struct token_error e;
                if (token_get_info(token_store_token(s, i), &ti, &e) == 0 && strcmp(ti.label, label) == 0)
                        return token_store_token(s, i);
        }
        return NULL;
}

static const struct token_key *find_key(const struct token_keys *keys, struct token *t, const char *label) {
        for (size_t i = 0; i < keys->n; i++)
                if (keys->keys[i]->token == t && strcmp(keys->keys[i]->label, label) == 0)
                        return keys->keys[i];
        return NULL;
}

static size_t count_matches(const struct token_keys *keys, const char *uri, const struct token_key **first) {
        struct token_uri *u;
        size_t n = 0;

        if (first)
                *first = NULL;
        if (token_uri_parse(uri, &u) < 0)
                return (size_t) -1;
        for (size_t i = 0; i < keys->n; i++)
                if (token_key_match_uri(keys->keys[i], u)) {
                        if (first && !*first)
                                *first = keys->keys[i];
                        n++;
                }
        token_uri_free(u);
        return n;
}

static bool has_key(const struct token_keys *keys, struct token *t, const char *label) {
        return find_key(keys, t, label) != NULL;
}

static struct token_store *open_store(const char *path, unsigned max_sessions, struct token_error *err, int *r) {
        struct token_store_options o = { .module_path = path, .max_sessions = max_sessions };
        struct token_store *s = NULL;
        *r = token_store_open(&s, &o, err);
        return *r < 0 ? NULL : s;
}

/* ---- Checks ------------------------------------------------------------- */

static void test_rv_names(void) {
        check(strcmp(token_rv_name(0xa0), "CKR_PIN_INCORRECT") == 0, "token_rv_name(0xa0) is CKR_PIN_INCORRECT");
        check(strcmp(token_rv_name(0), "CKR_OK") == 0, "token_rv_name(0) is CKR_OK");
        check(strcmp(token_rv_name(0x101), "CKR_USER_NOT_LOGGED_IN") == 0, "token_rv_name(0x101) is CKR_USER_NOT_LOGGED_IN");
        check(strcmp(token_rv_name(0x200), "CKR_FUNCTION_REJECTED") == 0, "token_rv_name(0x200) is CKR_FUNCTION_REJECTED");
        check(strcmp(token_rv_name(0x80000000UL), "CKR_VENDOR_DEFINED") == 0, "token_rv_name(0x80000000) is CKR_VENDOR_DEFINED");
        check(strcmp(token_rv_name(0x1234), "CKR_0x1234") == 0, "token_rv_name(0x1234) is CKR_0x1234 (unnamed)");
}

/* Every module p11-kit has configured: SoftHSM is registered, and with
 * SOFTHSM2_CONF pointing at the fixture its only initialised token is ours. */
static void test_registry(void) {
        struct token_error err;
        int r;
        struct token_store *s = open_store(NULL, 0, &err, &r);

        if (!check(s != NULL, "store opens with every p11-kit module (r=%d%s%s)", r, err.message[0] ? ": " : "",
                   err.message))
                return;
        if (err.message[0])
                note("a module was skipped: %s", err.message);

        bool softhsm = false;
        for (size_t i = 0; i < token_store_module_count(s); i++) {
                struct token_module_info mi;
                if (token_store_module_info(s, i, &mi) == 0) {
                        note("module %s: %s (%s) %u.%u", mi.name, mi.library, mi.manufacturer, mi.version_major,
                             mi.version_minor);
                        if (strcmp(mi.name, "softhsm2") == 0)
                                softhsm = true;
                }
        }
        check(softhsm, "the p11-kit registry lists the softhsm2 module by name");

        size_t ours = 0, from_softhsm = 0;
        for (size_t i = 0; i < token_store_token_count(s); i++) {
                struct token_info ti;
                if (token_get_info(token_store_token(s, i), &ti, &err) < 0)
                        continue;
                note("token '%s' from module %s: %s", ti.label, ti.module_name, ti.uri);
                if (strcmp(ti.module_name, "softhsm2") == 0)
                        from_softhsm++;
                if (strcmp(ti.label, TOKEN_LABEL) == 0)
                        ours++;
        }
        check(ours == 1 && from_softhsm == 1, "through the registry, softhsm2 offers exactly our token (%zu/%zu)", ours,
              from_softhsm);

        struct token_keys *keys = token_store_keys(s);
        struct token *t = find_token(s, TOKEN_LABEL);
        check(t && has_key(keys, t, "rsa2048"), "the registry store sees the fixture's certificates");
        token_keys_unref(keys);
        token_store_free(s);
}

static void test_bad_module(void) {
        struct token_error err;
        int r;
        struct token_store *s = open_store("/nonexistent/pkcs11-module.so", 0, &err, &r);
        check(s == NULL && r < 0 && err.message[0], "a module path that does not load is fatal (r=%d: %s)", r,
              err.message);
        token_store_free(s);
}

static void test_info_before_login(struct token_store *s, struct token *t) {
        struct token_info ti;
        struct token_error err;

        check(token_store_module_count(s) == 1, "one module with module_path set (%zu)", token_store_module_count(s));
        check(token_store_token_count(s) == 1, "the uninitialised SoftHSM slot is not listed (%zu tokens)",
              token_store_token_count(s));
        if (!check(token_get_info(t, &ti, &err) == 0, "token_get_info works (%s)", err.message))
                return;
        check(strcmp(ti.label, TOKEN_LABEL) == 0, "label is trimmed: '%s'", ti.label);
        check(strcmp(ti.manufacturer, "SoftHSM project") == 0, "manufacturer is trimmed: '%s'", ti.manufacturer);
        check(strcmp(ti.model, "SoftHSM v2") == 0, "model is trimmed: '%s'", ti.model);
        check(ti.serial[0] && ti.serial[strlen(ti.serial) - 1] != ' ', "serial is trimmed: '%s'", ti.serial);
        check(ti.login_required, "login is required");
        check(!ti.logged_in, "not logged in yet");
        check(!ti.protected_auth_path, "SoftHSM has no PIN pad");
        check(strncmp(ti.uri, "pkcs11:", 7) == 0 && strstr(ti.uri, "token=smime-test") &&
              strstr(ti.uri, "manufacturer=SoftHSM%20project"), "token URI: %s", ti.uri);
        check(token_needs_login(t), "token_needs_login before login");
}

static void test_keys_before_login(struct token_store *s, struct token *t) {
        struct token_keys *keys = token_store_keys(s);
        const struct token_key *k;
        size_t with_cert = 0, with_private = 0;

        for (size_t i = 0; i < keys->n; i++) {
                with_cert += keys->keys[i]->cert_der != NULL;
                with_private += keys->keys[i]->has_private;
        }
        check(keys->n >= 6, "at least six keys before login (%zu)", keys->n);
        check(with_cert >= 5, "certificates are visible before login (%zu)", with_cert);
        check(with_private == 0, "no private key is visible before login (%zu)", with_private);

        k = find_key(keys, t, "rsa2048");
        if (check(k != NULL, "rsa2048 is found by label")) {
                check(k->id_len == 1 && k->id[0] == 0x01, "rsa2048 has id 01");
                check(k->cert_der && k->cert_len > 100, "rsa2048 certificate is paired (%zu bytes)", k->cert_len);
                check(k->has_public && !k->has_private, "rsa2048: public key paired, private hidden");
                check(k->type == TOKEN_KEY_RSA && k->modulus_bits == 2048, "rsa2048 is RSA 2048 from the public key (%lu)",
                      k->modulus_bits);
                check(strstr(k->uri, "type=private") && strstr(k->uri, "id=%01") && strstr(k->uri, "object=rsa2048") &&
                      strstr(k->uri, "token=smime-test"), "rsa2048 URI names the private key: %s", k->uri);
        }
        k = find_key(keys, t, "rsa3072");
        check(k && k->modulus_bits == 3072, "rsa3072 has 3072 bits");
        k = find_key(keys, t, "p256");
        check(k && k->type == TOKEN_KEY_EC && k->ec_params_len == 10, "p256 is EC with P-256 parameters");
        k = find_key(keys, t, "p384");
        check(k && k->type == TOKEN_KEY_EC && k->ec_params_len == 7, "p384 is EC with P-384 parameters");
        k = find_key(keys, t, "ed25519");
        check(k && k->type == TOKEN_KEY_EDDSA && k->ec_params, "ed25519 is EdDSA (CKK_EC_EDWARDS)");
        k = find_key(keys, t, "nocert");
        check(k && !k->cert_der && k->has_public, "nocert has a public key and no certificate");

        /* Before login the private key cannot be seen; -EACCES (not -ENOENT)
         * because the token requires login and we are not logged in: the
         * caller's next step is a login, not giving up on the key. */
        k = find_key(keys, t, "rsa2048");
        if (k) {
                struct token_error err;
                uint8_t sig[512];
                size_t sig_len = sizeof(sig);
                struct token_sign_params p = { .mech = TOKEN_MECH_RSA_PKCS };
                int r = token_sign(k, &p, (const uint8_t *) "x", 1, sig, &sig_len, &err);
                check(r == -EACCES && err.rv == 0x101 && strstr(err.message, "CKR_USER_NOT_LOGGED_IN") &&
                      strstr(err.message, "rsa2048") && strstr(err.message, TOKEN_LABEL),
                      "token_sign before login: -EACCES, CKR_USER_NOT_LOGGED_IN (r=%d: %s)", r, err.message);
        }

        /* The key's own URI must find it, even before login. */
        size_t self = 0;
        for (size_t i = 0; i < keys->n; i++) {
                const struct token_key *first;
                if (count_matches(keys, keys->keys[i]->uri, &first) == 1 && first == keys->keys[i])
                        self++;
        }
        check(self == keys->n, "before login every key's URI matches that key and no other (%zu/%zu)", self, keys->n);
        token_keys_unref(keys);
}

static void test_wrong_pin(struct token *t) {
        struct token_error err;
        int r = token_login(t, "0000", 4, &err);
        login_calls++;
        check(r == -EACCES, "wrong PIN: -EACCES (r=%d)", r);
        check(err.rv == 0xa0, "wrong PIN: err.rv is CKR_PIN_INCORRECT (0x%lx)", err.rv);
        check(strstr(err.message, "C_Login on token 'smime-test' (SoftHSM project): CKR_PIN_INCORRECT; ") != NULL,
              "wrong PIN message: %s", err.message);
        check(strstr(err.message, "0000") == NULL, "the PIN is not in the message");
        check(token_needs_login(t), "still needs login after a wrong PIN");
}

static void test_login(struct token_store *s, struct token *t, struct token_keys **old_keys) {
        struct token_error err;
        struct token_info ti;
        int r;

        *old_keys = token_store_keys(s);
        r = token_login(t, pin, strlen(pin), &err);
        login_calls++;
        check(r == 0, "login with the fixture PIN (after one wrong try) works (r=%d %s)", r, err.message);
        check(!token_needs_login(t), "no login needed after login");
        check(token_get_info(t, &ti, &err) == 0 && ti.logged_in, "token_get_info reports logged in");
        r = token_login(t, pin, strlen(pin), &err);
        login_calls++;
        check(r == 0, "a second login counts as success (CKR_USER_ALREADY_LOGGED_IN) (r=%d %s)", r, err.message);
}

static void test_keys_after_login(struct token_store *s, struct token *t, struct token_keys *old) {
        struct token_keys *keys = token_store_keys(s);
        const struct token_key *k, *ok;

        check(keys != old, "login published a new snapshot");
        k = find_key(keys, t, "rsa2048");
        ok = find_key(old, t, "rsa2048");
        if (check(k && ok, "rsa2048 in both snapshots")) {
                check(k->has_private && k->can_sign, "after login rsa2048 has a private key that can sign");
                check(!ok->has_private, "the old snapshot is unchanged (no private key)");
                check(ok->cert_der && ok->cert_len == k->cert_len && memcmp(ok->cert_der, k->cert_der, k->cert_len) == 0,
                      "the old snapshot's certificate is still readable");
                check(token_key_can(k, TOKEN_MECH_RSA_PKCS) && token_key_can(k, TOKEN_MECH_RSA_PSS),
                      "rsa2048 can RSA-PKCS and RSA-PSS");
                check(!token_key_can(k, TOKEN_MECH_ECDSA), "rsa2048 cannot ECDSA");
                check(k->can_decrypt, "rsa2048 can decrypt");
        }
        k = find_key(keys, t, "p256");
        check(k && k->has_private && token_key_can(k, TOKEN_MECH_ECDSA) && k->can_derive, "p256 can ECDSA and derive");
        k = find_key(keys, t, "ed25519");
        check(k && k->has_private && token_key_can(k, TOKEN_MECH_EDDSA), "ed25519 can EdDSA");
        k = find_key(keys, t, "nocert");
        check(k && k->has_private && !k->cert_der && k->type == TOKEN_KEY_RSA, "nocert has a private key, no certificate");
        /* The fixture's encrypt-only key is restricted by its certificate's
         * keyUsage; whether the token also clears CKA_SIGN depends on how it
         * was generated. Either way token_key_can must follow CKA_SIGN. */
        k = find_key(keys, t, "encrypt-only");
        if (k) {
                check(k->has_private && k->can_decrypt, "encrypt-only: private key with CKA_DECRYPT");
                check(token_key_can(k, TOKEN_MECH_RSA_PKCS) == k->can_sign,
                      "token_key_can follows CKA_SIGN of encrypt-only (CKA_SIGN %s)", k->can_sign ? "true" : "false");
        }
        size_t pairs = 0;
        for (size_t i = 0; i < keys->n; i++)
                pairs += keys->keys[i]->has_private && keys->keys[i]->has_public;
        check(pairs >= 6, "private and public keys are paired by CKA_ID (%zu)", pairs);
        for (size_t i = 0; i < keys->n; i++)
                check(!keys->keys[i]->always_authenticate, "%s does not need CKA_ALWAYS_AUTHENTICATE",
                      keys->keys[i]->label);
        token_keys_unref(keys);
}

static void test_uris(struct token_store *s, struct token *t) {
        struct token_keys *keys = token_store_keys(s);
        const struct token_key *m;
        struct token_uri *u = NULL;
        size_t n;

        n = count_matches(keys, "pkcs11:token=smime-test;object=rsa2048", &m);
        check(n == 1 && m && strcmp(m->label, "rsa2048") == 0, "pkcs11:token=smime-test;object=rsa2048 matches rsa2048 (%zu)", n);
        n = count_matches(keys, "pkcs11:id=%01", &m);
        check(n == 1 && m && m->id[0] == 1, "pkcs11:id=%%01 matches the key with id 01 (%zu)", n);
        n = count_matches(keys, "pkcs11:object=rsa2048;type=cert", &m);
        check(n == 1 && m && strcmp(m->label, "rsa2048") == 0, "pkcs11:object=rsa2048;type=cert matches via the certificate (%zu)", n);
        n = count_matches(keys, "pkcs11:object=nocert;type=cert", NULL);
        check(n == 0, "pkcs11:object=nocert;type=cert matches nothing: nocert has no certificate (%zu)", n);
        n = count_matches(keys, "pkcs11:object=rsa2048;type=secret-key", NULL);
        check(n == 0, "type=secret-key matches nothing (%zu)", n);
        n = count_matches(keys, "pkcs11:token=another-token", NULL);
        check(n == 0, "pkcs11:token=another-token matches nothing (%zu)", n);
        n = count_matches(keys, "pkcs11:object=no-such-key", NULL);
        check(n == 0, "pkcs11:object=no-such-key matches nothing (%zu)", n);
        n = count_matches(keys, "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;id=%03", &m);
        check(n == 1 && m && strcmp(m->label, "p256") == 0, "model+manufacturer+id matches p256 (%zu)", n);
        n = count_matches(keys, "pkcs11:library-manufacturer=SoftHSM;object=p384", &m);
        check(n == 1 && m && strcmp(m->label, "p384") == 0, "library-manufacturer matches the module (%zu)", n);
        n = count_matches(keys, "pkcs11:library-manufacturer=OpenSC%20Project;object=p384", NULL);
        check(n == 0, "a different library-manufacturer matches nothing (%zu)", n);
        size_t priv = 0;
        for (size_t i = 0; i < keys->n; i++)
                priv += keys->keys[i]->has_private;
        n = count_matches(keys, "pkcs11:type=private", NULL);
        check(n == priv && n > 0, "pkcs11:type=private matches every key with a private key (%zu/%zu)", n, priv);
        n = count_matches(keys, "pkcs11:", NULL);
        check(n == keys->n, "pkcs11: matches every key (%zu/%zu)", n, keys->n);

        size_t self = 0;
        for (size_t i = 0; i < keys->n; i++)
                if (count_matches(keys, keys->keys[i]->uri, &m) == 1 && m == keys->keys[i])
                        self++;
        check(self == keys->n, "after login every key's URI matches that key and no other (%zu/%zu)", self, keys->n);

        check(token_uri_parse("http://example.org/", &u) == -EINVAL, "a non-pkcs11 URI is -EINVAL");
        check(token_uri_parse("pkcs11:id=%zz", &u) == -EINVAL, "a bad percent-escape is -EINVAL");
        check(token_uri_parse("pkcs11:tokn=smime-test", &u) == -EINVAL, "an unknown attribute (typo) is -EINVAL");
        check(token_uri_parse(NULL, &u) == -EINVAL, "NULL is -EINVAL");

        if (check(token_uri_parse("pkcs11:token=smime-test", &u) == 0, "pkcs11:token=smime-test parses")) {
                check(token_match_uri(t, u), "token_match_uri: token=smime-test matches the token");
                token_uri_free(u);
        }
        if (token_uri_parse("pkcs11:token=other", &u) == 0) {
                check(!token_match_uri(t, u), "token_match_uri: token=other does not match");
                token_uri_free(u);
        }
        struct token_info ti;
        struct token_error err;
        if (token_get_info(t, &ti, &err) == 0 && token_uri_parse(ti.uri, &u) == 0) {
                check(token_match_uri(t, u), "the token's own URI matches it");
                token_uri_free(u);
        }
        token_keys_unref(keys);
}

static void test_signing(struct token_store *s, struct token *t, struct token_keys *old) {
        struct token_keys *keys = token_store_keys(s);
        static const char msg[] = "Content-Type: text/plain\r\n\r\nhello from smime-agent\r\n";
        struct token_error err;
        const struct token_key *k;
        int r;

        static const struct {
                const char *label;
                enum token_mech mech;
                const char *what;
                int sig_len;
        } cases[] = {
                { "rsa2048", TOKEN_MECH_RSA_PKCS, "RSA PKCS#1 v1.5 with a SHA-256 DigestInfo", 256 },
                { "rsa3072", TOKEN_MECH_RSA_PKCS, "RSA-3072 PKCS#1 v1.5", 384 },
                { "rsa2048", TOKEN_MECH_RSA_PSS, "RSA-PSS, SHA-256, salt 32", 256 },
                { "p256", TOKEN_MECH_ECDSA, "ECDSA P-256 over SHA-256 (r||s)", 64 },
                { "p384", TOKEN_MECH_ECDSA, "ECDSA P-384 over SHA-384 (r||s)", 96 },
                { "ed25519", TOKEN_MECH_EDDSA, "Ed25519 (pure)", 64 },
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                k = find_key(keys, t, cases[i].label);
                if (!k) {
                        check(false, "%s: key %s missing", cases[i].what, cases[i].label);
                        continue;
                }
                r = sign_verify(k, cases[i].mech, msg, sizeof(msg) - 1, &err);
                check(r == cases[i].sig_len, "%s with %s verifies with OpenSSL (r=%d %s)", cases[i].what, k->label, r,
                      r < 0 ? err.message : "");
        }

        /* A key from the snapshot taken before login has no cached handle:
         * token_sign must find the private key by CKA_ID. */
        k = find_key(old, t, "p256");
        r = k ? sign_verify(k, TOKEN_MECH_ECDSA, msg, sizeof(msg) - 1, &err) : -1;
        check(r == 64, "signing with a key from the pre-login snapshot works (r=%d %s)", r, r < 0 ? err.message : "");

        uint8_t sig[512];
        size_t sig_len;
        struct token_sign_params p = { .mech = TOKEN_MECH_RSA_PKCS };
        uint8_t digestinfo[51] = { 0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
                                   0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20 };

        k = find_key(keys, t, "rsa2048");
        if (k) {
                sig_len = 100;
                r = token_sign(k, &p, digestinfo, sizeof(digestinfo), sig, &sig_len, &err);
                check(r == -ENOBUFS && sig_len == 256, "RSA-2048 into 100 bytes: -ENOBUFS, needs 256 (r=%d, %zu)", r, sig_len);
                sig_len = sizeof(sig);
                r = token_sign(k, &p, digestinfo, sizeof(digestinfo), sig, &sig_len, &err);
                check(r == 0 && sig_len == 256, "the session is usable after -ENOBUFS (r=%d %s)", r, err.message);

                p.mech = TOKEN_MECH_ECDSA;
                sig_len = sizeof(sig);
                r = token_sign(k, &p, digestinfo + 19, 32, sig, &sig_len, &err);
                /* SoftHSM refuses in C_SignInit or only in C_Sign; either
                 * way the message names the call, the key, the token and the
                 * CKR. */
                check(r == -EIO && strncmp(err.message, "C_Sign", 6) == 0 &&
                      strstr(err.message, " with key 'rsa2048' on token 'smime-test': CKR_") && err.rv != 0,
                      "ECDSA with an RSA key: -EIO naming call, key, token and CKR (r=%d: %s)", r, err.message);
                /* ... and the failed operation did not poison the session. */
                p.mech = TOKEN_MECH_RSA_PKCS;
                sig_len = sizeof(sig);
                r = token_sign(k, &p, digestinfo, sizeof(digestinfo), sig, &sig_len, &err);
                check(r == 0, "the session is usable after a failed C_Sign (r=%d %s)", r, err.message);
        }
        k = find_key(keys, t, "p256");
        if (k) {
                p.mech = TOKEN_MECH_ECDSA;
                sig_len = 10;
                r = token_sign(k, &p, digestinfo + 19, 32, sig, &sig_len, &err);
                check(r == -ENOBUFS && sig_len == 64, "ECDSA P-256 into 10 bytes: -ENOBUFS, needs 64 (r=%d, %zu)", r, sig_len);
        }
        k = find_key(keys, t, "encrypt-only");
        if (k && !k->can_sign) {
                p.mech = TOKEN_MECH_RSA_PKCS;
                sig_len = sizeof(sig);
                r = token_sign(k, &p, digestinfo, sizeof(digestinfo), sig, &sig_len, &err);
                check(r == -EIO && err.rv != 0 && strstr(err.message, "encrypt-only") && strstr(err.message, "CKR_"),
                      "signing with a key without CKA_SIGN fails: %s", err.message);
        }
        k = find_key(keys, t, "nocert");
        if (k) {
                p.mech = TOKEN_MECH_RSA_PKCS;
                sig_len = sizeof(sig);
                r = token_sign(k, &p, digestinfo, sizeof(digestinfo), sig, &sig_len, &err);
                check(r == 0 && sig_len == 256, "a key without a certificate still signs (r=%d %s)", r, err.message);
        }
        token_keys_unref(keys);
}

/* ---- Concurrency ----------------------------------------------------------- */

struct worker {
        const struct token_key *rsa, *ec, *ed;
        int id, rounds;
        atomic_int *bad;
        char first_error[1024];
};

static void *worker_run(void *arg) {
        struct worker *w = arg;
        struct token_error err;
        char msg[64];

        for (int i = 0; i < w->rounds; i++) {
                const struct token_key *k = i % 3 == 0 ? w->rsa : i % 3 == 1 ? w->ec : w->ed;
                enum token_mech mech = i % 3 == 0 ? TOKEN_MECH_RSA_PKCS : i % 3 == 1 ? TOKEN_MECH_ECDSA : TOKEN_MECH_EDDSA;
                int len = snprintf(msg, sizeof(msg), "thread %d round %d", w->id, i);
                int r = sign_verify(k, mech, msg, (size_t) len, &err);
                if (r < 0) {
                        if (atomic_fetch_add(w->bad, 1) == 0)
                                snprintf(w->first_error, sizeof(w->first_error), "%s (r=%d) %s", k->label, r, err.message);
                }
        }
        return NULL;
}

static void test_concurrency(unsigned pool, int threads, int rounds) {
        struct token_error err;
        struct token_keys *keys;
        struct token *t;
        int r;
        struct token_store *s = open_store(module_path, pool, &err, &r);

        if (!check(s != NULL, "store with a pool of %u sessions opens (%s)", pool, err.message))
                return;
        max_session_opens += pool;
        t = find_token(s, TOKEN_LABEL);
        /* The first store is still logged in (login is per application), so
         * this may well be CKR_USER_ALREADY_LOGGED_IN: success either way. */
        r = t ? token_login(t, pin, strlen(pin), &err) : -1;
        login_calls++;
        check(r == 0, "login on the pool-of-%u store (r=%d %s)", pool, r, err.message);

        keys = token_store_keys(s);
        struct worker w[16] = {};
        pthread_t th[16];
        atomic_int bad = 0;
        const struct token_key *rsa = find_key(keys, t, "rsa2048"), *ec = find_key(keys, t, "p256"),
                               *ed = find_key(keys, t, "ed25519");
        if (!check(rsa && ec && ed && threads <= 16, "keys for the concurrency test are there")) {
                token_keys_unref(keys);
                token_store_free(s);
                return;
        }
        for (int i = 0; i < threads; i++) {
                w[i] = (struct worker){ .rsa = rsa, .ec = ec, .ed = ed, .id = i, .rounds = rounds, .bad = &bad };
                pthread_create(&th[i], NULL, worker_run, &w[i]);
        }
        for (int i = 0; i < threads; i++)
                pthread_join(th[i], NULL);
        const char *why = "";
        for (int i = 0; i < threads; i++)
                if (w[i].first_error[0])
                        why = w[i].first_error;
        check(atomic_load(&bad) == 0, "%d threads x %d signatures on a pool of %u sessions: all verify (%d bad%s%s)",
              threads, rounds, pool, atomic_load(&bad), why[0] ? ": " : "", why);
        token_keys_unref(keys);
        token_store_free(s);
}

/* ---- pkcs11-spy log ------------------------------------------------------ */

/* Reads the spy log back. It lists every call with its arguments; object
 * handles are tied to their class through the C_FindObjectsInit template
 * that found them. */
static void check_spy_log(void) {
        static const char *const allowed_private[] = {
                "CKA_ID", "CKA_LABEL", "CKA_KEY_TYPE", "CKA_SIGN", "CKA_DECRYPT", "CKA_DERIVE", "CKA_ALWAYS_AUTHENTICATE",
        };
        static const char *const forbidden_calls[] = {
                "C_WrapKey", "C_CopyObject", "C_SetAttributeValue", "C_DestroyObject", "C_UnwrapKey", "C_DeriveKey",
                "C_InitPIN", "C_SetPIN", "C_Decrypt",
        };
        struct { unsigned long h; char cls[64]; } objs[4096];
        size_t n_objs = 0;
        char line[4096], call[64] = "", search_cls[64] = "", cur_obj_cls[64] = "";
        bool in_template = false, in_out_template = false;
        unsigned logins = 0, opens = 0, private_reads = 0, bad_reads = 0, cert_value_reads = 0, bad_calls = 0,
                 unknown_object_reads = 0;
        char first_bad[512] = "";
        FILE *f = fopen(spy_log, "re");

        if (!check(f != NULL, "pkcs11-spy log %s is readable", spy_log))
                return;
        while (fgets(line, sizeof(line), f)) {
                unsigned long num, h;
                char name[64];
                line[strcspn(line, "\n")] = '\0';

                if (sscanf(line, "%lu: %63s", &num, name) == 2 && strncmp(name, "C_", 2) == 0) {
                        snprintf(call, sizeof(call), "%s", name);
                        in_template = in_out_template = false;
                        cur_obj_cls[0] = '\0';
                        if (strcmp(call, "C_FindObjectsInit") == 0)
                                search_cls[0] = '\0';
                        if (strcmp(call, "C_Login") == 0)
                                logins++;
                        if (strcmp(call, "C_OpenSession") == 0)
                                opens++;
                        for (size_t i = 0; i < sizeof(forbidden_calls) / sizeof(forbidden_calls[0]); i++)
                                if (strcmp(call, forbidden_calls[i]) == 0) {
                                        bad_calls++;
                                        if (!first_bad[0])
                                                snprintf(first_bad, sizeof(first_bad), "call %s", call);
                                }
                        continue;
                }
                if (strncmp(line, "[in] pTemplate", 14) == 0) {
                        in_template = true;
                        continue;
                }
                if (strncmp(line, "[out]", 5) == 0 || strncmp(line, "Returned", 8) == 0) {
                        in_template = false;
                        in_out_template = strncmp(line, "[out] pTemplate", 15) == 0;
                        continue;
                }
                (void) in_out_template;
                if (strcmp(call, "C_FindObjectsInit") == 0 && in_template) {
                        char a[64], v[64];
                        if (sscanf(line, " %63s %63s", a, v) == 2 && strcmp(a, "CKA_CLASS") == 0)
                                snprintf(search_cls, sizeof(search_cls), "%s", v);
                        continue;
                }
                if (strcmp(call, "C_FindObjects") == 0 && sscanf(line, "Object 0x%lx matches", &h) == 1) {
                        if (n_objs < sizeof(objs) / sizeof(objs[0])) {
                                objs[n_objs].h = h;
                                snprintf(objs[n_objs].cls, sizeof(objs[n_objs].cls), "%s", search_cls);
                                n_objs++;
                        }
                        continue;
                }
                if (strcmp(call, "C_GetAttributeValue") == 0) {
                        if (sscanf(line, "[in] hObject = 0x%lx", &h) == 1) {
                                snprintf(cur_obj_cls, sizeof(cur_obj_cls), "?");
                                for (size_t i = n_objs; i-- > 0;)
                                        if (objs[i].h == h) {
                                                snprintf(cur_obj_cls, sizeof(cur_obj_cls), "%s", objs[i].cls);
                                                break;
                                        }
                                if (strcmp(cur_obj_cls, "?") == 0)
                                        unknown_object_reads++;
                                continue;
                        }
                        char a[64];
                        if (!in_template || sscanf(line, " %63s", a) != 1 || strncmp(a, "CKA_", 4) != 0)
                                continue;
                        if (strcmp(cur_obj_cls, "CKO_CERTIFICATE") == 0 && strcmp(a, "CKA_VALUE") == 0)
                                cert_value_reads++;
                        if (strcmp(cur_obj_cls, "CKO_PRIVATE_KEY") != 0 && strcmp(cur_obj_cls, "?") != 0)
                                continue;
                        private_reads++;
                        bool ok = false;
                        for (size_t i = 0; i < sizeof(allowed_private) / sizeof(allowed_private[0]); i++)
                                ok = ok || strcmp(a, allowed_private[i]) == 0;
                        if (!ok) {
                                bad_reads++;
                                if (!first_bad[0])
                                        snprintf(first_bad, sizeof(first_bad), "%s of a private key", a);
                        }
                }
        }
        fclose(f);

        note("spy log: %zu objects found, %u attribute reads of private keys, %u certificate CKA_VALUE reads, "
             "%u C_Login, %u C_OpenSession", n_objs, private_reads, cert_value_reads, logins, opens);
        check(n_objs > 0 && private_reads > 0 && cert_value_reads > 0,
              "the spy log was understood (objects, private-key reads and certificate reads seen)");
        check(bad_reads == 0, "no attribute beyond id, label, key type and usage flags was read from a private key%s%s",
              first_bad[0] ? ": " : "", first_bad);
        check(unknown_object_reads == 0, "attributes were read only from objects found by class (%u others)",
              unknown_object_reads);
        check(bad_calls == 0, "no C_WrapKey, C_CopyObject, C_SetAttributeValue or other key-changing call%s%s",
              first_bad[0] ? ": " : "", first_bad);
        check(logins == (unsigned) login_calls, "exactly one C_Login per token_login() (%u C_Login, %d calls)", logins,
              login_calls);
        check(opens <= max_session_opens, "sessions are pooled and reused: %u C_OpenSession, at most %u allowed", opens,
              max_session_opens);
}

int main(int argc, char **argv) {
        if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "--spy") != 0)) {
                fprintf(stderr, "usage: %s FIXTURE_DIR [--spy]\n", argv[0]);
                return 2;
        }
        fixture_dir = argv[1];
        spy_mode = argc == 3;
        load_fixture_env(fixture_dir);
        snprintf(pin, sizeof(pin), "%s", getenv("SMIME_TEST_PIN") ? getenv("SMIME_TEST_PIN") : "1234");
        module_path = getenv("SMIME_TEST_MODULE") ? getenv("SMIME_TEST_MODULE") : DEFAULT_MODULE;
        if (!getenv("SOFTHSM2_CONF")) {
                fprintf(stderr, "test_token: SOFTHSM2_CONF is not set and %s/env does not set it\n", fixture_dir);
                return 2;
        }
        if (spy_mode) {
                snprintf(spy_log, sizeof(spy_log), "%s/pkcs11-spy.log", fixture_dir);
                remove(spy_log);
                setenv("PKCS11SPY", module_path, 1);
                setenv("PKCS11SPY_OUTPUT", spy_log, 1);
                module_path = SPY_MODULE;
        }
        printf("test_token: fixture %s, module %s%s\n", fixture_dir, module_path, spy_mode ? " (spying on SoftHSM)" : "");

        test_rv_names();
        test_registry();
        test_bad_module();

        struct token_error err;
        int r;
        struct token_store *s = open_store(module_path, 0, &err, &r);
        if (!check(s != NULL, "store opens with module_path %s (r=%d %s)", module_path, r, err.message))
                goto done;
        max_session_opens += 1;         /* everything on this store is sequential */
        struct token *t = find_token(s, TOKEN_LABEL);
        if (!check(t != NULL, "token %s is there", TOKEN_LABEL)) {
                token_store_free(s);
                goto done;
        }

        struct token_keys *old = NULL;
        test_info_before_login(s, t);
        test_keys_before_login(s, t);
        test_wrong_pin(t);
        test_login(s, t, &old);
        test_keys_after_login(s, t, old);
        test_uris(s, t);
        test_signing(s, t, old);
        token_keys_unref(old);

        /* The concurrency stores open while this one is still logged in, and
         * SoftHSM's login belongs to the process: keep it open so the pool
         * store sees a logged-in token either way. */
        test_concurrency(2, 8, spy_mode ? 10 : 50);
        test_concurrency(1, 4, spy_mode ? 5 : 20);
        token_store_free(s);

        if (spy_mode)
                check_spy_log();
done:
        printf("test_token: %d passed, %d failed\n", atomic_load(&n_passed), atomic_load(&n_failed));
        /* LeakSanitizer ends the process without flushing stdio. */
        fflush(stdout);
        return atomic_load(&n_failed) == 0 && atomic_load(&n_passed) > 0 ? 0 : 1;
}
