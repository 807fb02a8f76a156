/* keyprov_dec.c — the token provider's decryption half: RSA key transport
 * (PKCS#1 v1.5 and OAEP) and ECDH key agreement for CMS RecipientInfos.
 *
 * OpenSSL's CMS code parses every RecipientInfo, sets the padding, OAEP
 * digests, label and the X9.63 KDF parameters on these contexts, and does the
 * key unwrap; only the private-key step reaches the token:
 *   - RSA: C_Decrypt with CKM_RSA_PKCS or CKM_RSA_PKCS_OAEP. Tokens often
 *     offer OAEP with SHA-1 only (SoftHSM 2.6 does); for other OAEP
 *     parameters the token does the raw RSA operation (CKM_RSA_X_509) and the
 *     OAEP decoding, which needs no secret but the decrypted block, runs here
 *     in OpenSSL's constant-time code.
 *   - ECDH: CKM_ECDH1_DERIVE gives Z in a session object read and destroyed
 *     at once (token_ecdh); the X9.63 KDF runs here.
 *
 * Must never: fall back to anything that would need the private key itself.
 * Buffers that held a content-encryption key, Z or a decrypted block are
 * cleansed before they are freed.
 */
#define OPENSSL_SUPPRESS_DEPRECATED     /* RSA_padding_check_PKCS1_OAEP_mgf1: no EVP replacement for a raw block */

#include <errno.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include "keyprov_int.h"

/* ---- RSA decryption -------------------------------------------------------- */

struct kp_dec {
        struct kp_key *key;
        int pad;                /* RSA_PKCS1_PADDING or RSA_PKCS1_OAEP_PADDING */
        EVP_MD *oaep_md;        /* NULL: SHA-1 */
        EVP_MD *mgf1_md;        /* NULL: same as oaep_md */
        unsigned char *label;
        size_t label_len;
};

static void *kp_dec_newctx(void *provctx)
{
        struct kp_dec *d = calloc(1, sizeof(*d));

        if (d)
                d->pad = RSA_PKCS1_PADDING;
        return d;
}

static void kp_dec_freectx(void *ctx)
{
        struct kp_dec *d = ctx;

        if (!d)
                return;
        EVP_MD_free(d->oaep_md);
        EVP_MD_free(d->mgf1_md);
        free(d->label);
        free(d);
}

static void *kp_dec_dupctx(void *ctx)
{
        struct kp_dec *s = ctx, *d = calloc(1, sizeof(*d));

        if (!d)
                return NULL;
        *d = *s;
        d->oaep_md = d->mgf1_md = NULL;
        d->label = NULL;
        if ((s->oaep_md && !EVP_MD_up_ref(s->oaep_md)) || (s->mgf1_md && !EVP_MD_up_ref(s->mgf1_md)))
                goto fail;
        d->oaep_md = s->oaep_md;
        d->mgf1_md = s->mgf1_md;
        if (s->label_len) {
                d->label = malloc(s->label_len);
                if (!d->label)
                        goto fail;
                memcpy(d->label, s->label, s->label_len);
        }
        return d;
fail:
        kp_dec_freectx(d);
        return NULL;
}

static int kp_dec_set_ctx_params(void *ctx, const OSSL_PARAM params[]);

static int kp_dec_init(void *ctx, void *keydata, const OSSL_PARAM params[])
{
        struct kp_dec *d = ctx;

        d->key = keydata;
        if (!d->key || !d->key->tk || d->key->type != KP_RSA)
                return 0;
        return kp_dec_set_ctx_params(d, params);
}

static int kp_hash_of(const EVP_MD *md, enum token_hash *h)
{
        if (!md || EVP_MD_is_a(md, "SHA1"))
                *h = TOKEN_HASH_SHA1;
        else if (EVP_MD_is_a(md, "SHA2-224"))
                *h = TOKEN_HASH_SHA224;
        else if (EVP_MD_is_a(md, "SHA2-256"))
                *h = TOKEN_HASH_SHA256;
        else if (EVP_MD_is_a(md, "SHA2-384"))
                *h = TOKEN_HASH_SHA384;
        else if (EVP_MD_is_a(md, "SHA2-512"))
                *h = TOKEN_HASH_SHA512;
        else
                return 0;
        return 1;
}

/* OAEP through the raw RSA operation: the token returns the whole padded
 * block, OpenSSL checks and strips the padding in constant time. */
static int kp_dec_oaep_raw(struct kp_dec *d, unsigned char *out, size_t *outlen, size_t outsize,
                           const unsigned char *in, size_t inlen, size_t n)
{
        struct token_decrypt_params p = { .mech = TOKEN_DEC_RSA_X509, .auth = kp_auth(d->key) };
        struct token_error err = { 0 };
        unsigned char *block = malloc(n), *tmp = malloc(n);
        size_t blen = n;
        int r, len = -1;

        if (!block || !tmp)
                goto done;
        r = token_decrypt(d->key->tk, &p, in, inlen, block, &blen, &err);
        if (r < 0 && kp_relogin(d->key, r, &err)) {
                blen = n;
                err = (struct token_error){ 0 };
                r = token_decrypt(d->key->tk, &p, in, inlen, block, &blen, &err);
        }
        if (r < 0) {
                kp_record(r, &err);
                goto done;
        }
        if (blen < n) {
                /* Tokens may drop leading zero bytes of the raw result. */
                memmove(block + (n - blen), block, blen);
                memset(block, 0, n - blen);
        }
        len = RSA_padding_check_PKCS1_OAEP_mgf1(tmp, (int)n, block, (int)n, (int)n, d->label, (int)d->label_len,
                                                d->oaep_md ? d->oaep_md : EVP_sha1(),
                                                d->mgf1_md ? d->mgf1_md : (d->oaep_md ? d->oaep_md : EVP_sha1()));
        if (len < 0 || (size_t)len > outsize) {
                struct token_error e = { 0 };

                snprintf(e.message, sizeof(e.message),
                         "the RSA-OAEP encrypted key does not decode with key '%s' (wrong key or damaged message)",
                         d->key->tk->label);
                kp_record(-EBADMSG, &e);
                len = -1;
                goto done;
        }
        memcpy(out, tmp, (size_t)len);
        *outlen = (size_t)len;
done:
        if (block)
                OPENSSL_clear_free(block, n);
        if (tmp)
                OPENSSL_clear_free(tmp, n);
        return len >= 0;
}

static int kp_decrypt(void *ctx, unsigned char *out, size_t *outlen, size_t outsize,
                      const unsigned char *in, size_t inlen)
{
        struct kp_dec *d = ctx;
        struct token_decrypt_params p = { .auth = kp_auth(d->key) };
        struct token_error err = { 0 };
        int bytes = EVP_PKEY_get_size(d->key->pub);
        size_t n = bytes > 0 ? (size_t)bytes : 0, len;
        unsigned char *buf;
        int r;

        if (n == 0)
                return 0;
        if (!out) {
                *outlen = n;
                return 1;
        }

        if (d->pad == RSA_PKCS1_OAEP_PADDING) {
                if (!kp_hash_of(d->oaep_md, &p.oaep_hash) ||
                    !kp_hash_of(d->mgf1_md ? d->mgf1_md : d->oaep_md, &p.oaep_mgf1))
                        return 0;
                p.mech = TOKEN_DEC_RSA_OAEP;
                p.label = d->label;
                p.label_len = d->label_len;
                if (!token_key_can_decrypt(d->key->tk, TOKEN_DEC_RSA_OAEP))
                        return kp_dec_oaep_raw(d, out, outlen, outsize, in, inlen, n);
        } else if (d->pad == RSA_PKCS1_PADDING) {
                p.mech = TOKEN_DEC_RSA_PKCS;
        } else {
                return 0;
        }

        buf = malloc(n);
        if (!buf)
                return 0;
        len = n;
        r = token_decrypt(d->key->tk, &p, in, inlen, buf, &len, &err);
        if (r < 0 && kp_relogin(d->key, r, &err)) {
                len = n;
                err = (struct token_error){ 0 };
                r = token_decrypt(d->key->tk, &p, in, inlen, buf, &len, &err);
        }
        if (r < 0 && r != -EACCES && r != -EPERM && r != -EKEYREJECTED && p.mech == TOKEN_DEC_RSA_OAEP &&
            token_key_can_decrypt(d->key->tk, TOKEN_DEC_RSA_X509)) {
                /* The token has OAEP, but not with these hashes or a label:
                 * some refuse the parameters, others (SoftHSM 2.6 with a
                 * label) fail with CKR_GENERAL_ERROR. The raw operation and
                 * OpenSSL's decoding give the definitive answer. */
                OPENSSL_clear_free(buf, n);
                return kp_dec_oaep_raw(d, out, outlen, outsize, in, inlen, n);
        }
        if (r < 0 || len > outsize) {
                if (r < 0)
                        kp_record(r, &err);
                OPENSSL_clear_free(buf, n);
                return 0;
        }
        memcpy(out, buf, len);
        *outlen = len;
        OPENSSL_clear_free(buf, n);
        return 1;
}

static int kp_set_md(EVP_MD **slot, const OSSL_PARAM *p)
{
        const char *name = NULL;
        EVP_MD *md;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &name))
                return 0;
        if (!name || !*name) {
                EVP_MD_free(*slot);
                *slot = NULL;
                return 1;
        }
        md = EVP_MD_fetch(NULL, name, "provider=default");
        if (!md)
                return 0;
        EVP_MD_free(*slot);
        *slot = md;
        return 1;
}

static int kp_dec_set_ctx_params(void *ctx, const OSSL_PARAM params[])
{
        struct kp_dec *d = ctx;
        const OSSL_PARAM *p;

        if (!params)
                return 1;
        if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE))) {
                int pad = 0;
                const char *name = NULL;

                if (p->data_type == OSSL_PARAM_INTEGER) {
                        if (!OSSL_PARAM_get_int(p, &pad))
                                return 0;
                } else if (OSSL_PARAM_get_utf8_string_ptr(p, &name)) {
                        pad = strcmp(name, OSSL_PKEY_RSA_PAD_MODE_OAEP) == 0 ? RSA_PKCS1_OAEP_PADDING
                              : strcmp(name, OSSL_PKEY_RSA_PAD_MODE_PKCSV15) == 0 ? RSA_PKCS1_PADDING : 0;
                }
                if (pad != RSA_PKCS1_PADDING && pad != RSA_PKCS1_OAEP_PADDING)
                        return 0;
                d->pad = pad;
        }
        if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST)) && !kp_set_md(&d->oaep_md, p))
                return 0;
        if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST)) && !kp_set_md(&d->mgf1_md, p))
                return 0;
        if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL))) {
                void *label = NULL;
                size_t len = 0;

                if (!OSSL_PARAM_get_octet_string(p, &label, 0, &len))
                        return 0;
                free(d->label);
                d->label = label;
                d->label_len = len;
        }
        /* "rsa_pkcs1_implicit_rejection" and the *-props parameters are
         * accepted and have no effect: the token decides how it reports a
         * bad block, and digests always come from the default provider. */
        return 1;
}

static int kp_dec_get_ctx_params(void *ctx, OSSL_PARAM params[])
{
        struct kp_dec *d = ctx;
        OSSL_PARAM *p;

        if ((p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE))) {
                if (p->data_type == OSSL_PARAM_INTEGER) {
                        if (!OSSL_PARAM_set_int(p, d->pad))
                                return 0;
                } else if (!OSSL_PARAM_set_utf8_string(p, d->pad == RSA_PKCS1_OAEP_PADDING ? OSSL_PKEY_RSA_PAD_MODE_OAEP
                                                                                          : OSSL_PKEY_RSA_PAD_MODE_PKCSV15)) {
                        return 0;
                }
        }
        if ((p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST)) &&
            !OSSL_PARAM_set_utf8_string(p, d->oaep_md ? EVP_MD_get0_name(d->oaep_md) : "SHA1"))
                return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST)) &&
            !OSSL_PARAM_set_utf8_string(p, d->mgf1_md ? EVP_MD_get0_name(d->mgf1_md)
                                           : d->oaep_md ? EVP_MD_get0_name(d->oaep_md) : "SHA1"))
                return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL)) &&
            !OSSL_PARAM_set_octet_ptr(p, d->label, d->label_len))
                return 0;
        return 1;
}

static const OSSL_PARAM *kp_dec_settable(void *ctx, void *provctx)
{
        static const OSSL_PARAM t[] = {
                OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
                OSSL_PARAM_int(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL),
                OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST_PROPS, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST_PROPS, NULL, 0),
                OSSL_PARAM_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
#ifdef OSSL_ASYM_CIPHER_PARAM_IMPLICIT_REJECTION
                OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_IMPLICIT_REJECTION, NULL),
#endif
                OSSL_PARAM_END,
        };
        return t;
}

static const OSSL_PARAM *kp_dec_gettable(void *ctx, void *provctx)
{
        static const OSSL_PARAM t[] = {
                OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
                OSSL_PARAM_octet_ptr(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
                OSSL_PARAM_END,
        };
        return t;
}

const OSSL_DISPATCH kp_asym_rsa[] = {
        { OSSL_FUNC_ASYM_CIPHER_NEWCTX, (void (*)(void))kp_dec_newctx },
        { OSSL_FUNC_ASYM_CIPHER_FREECTX, (void (*)(void))kp_dec_freectx },
        { OSSL_FUNC_ASYM_CIPHER_DUPCTX, (void (*)(void))kp_dec_dupctx },
        { OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, (void (*)(void))kp_dec_init },
        { OSSL_FUNC_ASYM_CIPHER_DECRYPT, (void (*)(void))kp_decrypt },
        { OSSL_FUNC_ASYM_CIPHER_GET_CTX_PARAMS, (void (*)(void))kp_dec_get_ctx_params },
        { OSSL_FUNC_ASYM_CIPHER_GETTABLE_CTX_PARAMS, (void (*)(void))kp_dec_gettable },
        { OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS, (void (*)(void))kp_dec_set_ctx_params },
        { OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS, (void (*)(void))kp_dec_settable },
        { 0, NULL }
};

/* ---- ECDH ------------------------------------------------------------------ */

struct kp_dh {
        struct kp_key *key;
        struct kp_key *peer;    /* public-only key of our key management */
        bool x963;              /* KDF: X9.63 (CMS), else none (raw Z) */
        EVP_MD *kdf_md;
        size_t kdf_outlen;
        unsigned char *ukm;     /* the DER ECC-CMS-SharedInfo, for CMS */
        size_t ukm_len;
};

static void *kp_dh_newctx(void *provctx)
{
        return calloc(1, sizeof(struct kp_dh));
}

static void kp_dh_freectx(void *ctx)
{
        struct kp_dh *d = ctx;

        if (!d)
                return;
        EVP_MD_free(d->kdf_md);
        free(d->ukm);
        free(d);
}

static void *kp_dh_dupctx(void *ctx)
{
        struct kp_dh *s = ctx, *d = calloc(1, sizeof(*d));

        if (!d)
                return NULL;
        *d = *s;
        d->kdf_md = NULL;
        d->ukm = NULL;
        if (s->kdf_md && !EVP_MD_up_ref(s->kdf_md))
                goto fail;
        d->kdf_md = s->kdf_md;
        if (s->ukm_len) {
                d->ukm = malloc(s->ukm_len);
                if (!d->ukm)
                        goto fail;
                memcpy(d->ukm, s->ukm, s->ukm_len);
        }
        return d;
fail:
        kp_dh_freectx(d);
        return NULL;
}

static int kp_dh_set_ctx_params(void *ctx, const OSSL_PARAM params[]);

static int kp_dh_init(void *ctx, void *keydata, const OSSL_PARAM params[])
{
        struct kp_dh *d = ctx;

        d->key = keydata;
        if (!d->key || !d->key->tk || d->key->type != KP_EC)
                return 0;
        return kp_dh_set_ctx_params(d, params);
}

static int kp_dh_set_peer(void *ctx, void *peerdata)
{
        struct kp_dh *d = ctx;
        struct kp_key *p = peerdata;

        if (!p || !p->pub || p->type != KP_EC)
                return 0;
        /* The peer key object outlives the derivation: EVP_PKEY_CTX holds
         * the EVP_PKEY that owns it until the context is freed. */
        d->peer = p;
        return 1;
}

static size_t kp_field_bytes(const struct kp_key *k)
{
        int bits = EVP_PKEY_get_bits(k->pub);

        return bits > 0 ? ((size_t)bits + 7) / 8 : 0;
}

static int kp_dh_derive(void *ctx, unsigned char *secret, size_t *secretlen, size_t outlen)
{
        struct kp_dh *d = ctx;
        struct token_error err = { 0 };
        unsigned char point[1 + 2 * 66 + 8];
        unsigned char z[80];
        size_t plen = 0, zlen = sizeof(z), field = kp_field_bytes(d->key);
        EVP_KDF *kdf = NULL;
        EVP_KDF_CTX *kctx = NULL;
        OSSL_PARAM kp[4], *q = kp;
        int r, ok = 0;

        if (!d->peer || field == 0 || field > sizeof(z))
                return 0;
        if (!secret) {
                *secretlen = d->x963 ? d->kdf_outlen : field;
                return 1;
        }
        if (d->x963 && (d->kdf_outlen == 0 || outlen < d->kdf_outlen))
                return 0;
        if (!d->x963 && outlen < field)
                return 0;

        if (!EVP_PKEY_get_octet_string_param(d->peer->pub, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point, sizeof(point), &plen) ||
            plen == 0 || point[0] != 0x04)
                return 0;
        r = token_ecdh(d->key->tk, kp_auth(d->key), point, plen, z, &zlen, &err);
        if (r < 0 && kp_relogin(d->key, r, &err)) {
                zlen = sizeof(z);
                err = (struct token_error){ 0 };
                r = token_ecdh(d->key->tk, kp_auth(d->key), point, plen, z, &zlen, &err);
        }
        if (r < 0) {
                kp_record(r, &err);
                return 0;
        }
        if (zlen < field) {
                /* Left-pad: Z is the x coordinate as a field-size string. */
                memmove(z + (field - zlen), z, zlen);
                memset(z, 0, field - zlen);
                zlen = field;
        }

        if (!d->x963) {
                memcpy(secret, z, zlen);
                *secretlen = zlen;
                ok = 1;
                goto done;
        }

        kdf = EVP_KDF_fetch(NULL, OSSL_KDF_NAME_X963KDF, "provider=default");
        kctx = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
        if (!kctx)
                goto done;
        *q++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)EVP_MD_get0_name(d->kdf_md), 0);
        *q++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, z, zlen);
        if (d->ukm_len)
                *q++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, d->ukm, d->ukm_len);
        *q = OSSL_PARAM_construct_end();
        if (EVP_KDF_derive(kctx, secret, d->kdf_outlen, kp) <= 0)
                goto done;
        *secretlen = d->kdf_outlen;
        ok = 1;
done:
        OPENSSL_cleanse(z, sizeof(z));
        EVP_KDF_CTX_free(kctx);
        EVP_KDF_free(kdf);
        return ok;
}

static int kp_dh_set_ctx_params(void *ctx, const OSSL_PARAM params[])
{
        struct kp_dh *d = ctx;
        const OSSL_PARAM *p;

        if (!params)
                return 1;
        if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE))) {
                int mode;

                /* The NIST prime curves have cofactor 1: both modes agree. */
                if (!OSSL_PARAM_get_int(p, &mode) || mode < -1 || mode > 1)
                        return 0;
        }
        if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_TYPE))) {
                const char *name = NULL;

                if (!OSSL_PARAM_get_utf8_string_ptr(p, &name))
                        return 0;
                if (!name || !*name)
                        d->x963 = false;
                else if (strcasecmp(name, OSSL_KDF_NAME_X963KDF) == 0)
                        d->x963 = true;
                else
                        return 0;
        }
        if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST)) && !kp_set_md(&d->kdf_md, p))
                return 0;
        if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_OUTLEN)) &&
            !OSSL_PARAM_get_size_t(p, &d->kdf_outlen))
                return 0;
        if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_UKM))) {
                void *ukm = NULL;
                size_t len = 0;

                if (!OSSL_PARAM_get_octet_string(p, &ukm, 0, &len))
                        return 0;
                free(d->ukm);
                d->ukm = ukm;
                d->ukm_len = len;
        }
        return 1;
}

static int kp_dh_get_ctx_params(void *ctx, OSSL_PARAM params[])
{
        struct kp_dh *d = ctx;
        OSSL_PARAM *p;

        if ((p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE)) && !OSSL_PARAM_set_int(p, 0))
                return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_TYPE)) &&
            !OSSL_PARAM_set_utf8_string(p, d->x963 ? OSSL_KDF_NAME_X963KDF : ""))
                return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST)) &&
            !OSSL_PARAM_set_utf8_string(p, d->kdf_md ? EVP_MD_get0_name(d->kdf_md) : ""))
                return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_OUTLEN)) && !OSSL_PARAM_set_size_t(p, d->kdf_outlen))
                return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_UKM)) &&
            !OSSL_PARAM_set_octet_ptr(p, d->ukm, d->ukm_len))
                return 0;
        return 1;
}

static const OSSL_PARAM *kp_dh_settable(void *ctx, void *provctx)
{
        static const OSSL_PARAM t[] = {
                OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE, NULL),
                OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST_PROPS, NULL, 0),
                OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
                OSSL_PARAM_octet_string(OSSL_EXCHANGE_PARAM_KDF_UKM, NULL, 0),
                OSSL_PARAM_END,
        };
        return t;
}

static const OSSL_PARAM *kp_dh_gettable(void *ctx, void *provctx)
{
        static const OSSL_PARAM t[] = {
                OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE, NULL),
                OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
                OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
                OSSL_PARAM_octet_ptr(OSSL_EXCHANGE_PARAM_KDF_UKM, NULL, 0),
                OSSL_PARAM_END,
        };
        return t;
}

const OSSL_DISPATCH kp_ecdh[] = {
        { OSSL_FUNC_KEYEXCH_NEWCTX, (void (*)(void))kp_dh_newctx },
        { OSSL_FUNC_KEYEXCH_FREECTX, (void (*)(void))kp_dh_freectx },
        { OSSL_FUNC_KEYEXCH_DUPCTX, (void (*)(void))kp_dh_dupctx },
        { OSSL_FUNC_KEYEXCH_INIT, (void (*)(void))kp_dh_init },
        { OSSL_FUNC_KEYEXCH_SET_PEER, (void (*)(void))kp_dh_set_peer },
        { OSSL_FUNC_KEYEXCH_DERIVE, (void (*)(void))kp_dh_derive },
        { OSSL_FUNC_KEYEXCH_SET_CTX_PARAMS, (void (*)(void))kp_dh_set_ctx_params },
        { OSSL_FUNC_KEYEXCH_SETTABLE_CTX_PARAMS, (void (*)(void))kp_dh_settable },
        { OSSL_FUNC_KEYEXCH_GET_CTX_PARAMS, (void (*)(void))kp_dh_get_ctx_params },
        { OSSL_FUNC_KEYEXCH_GETTABLE_CTX_PARAMS, (void (*)(void))kp_dh_gettable },
        { 0, NULL }
};
