/* keyprov.c — an OpenSSL provider whose keys live on PKCS#11 tokens.
 *
 * Why a provider: OpenSSL 3 streams CMS SignedData (constant memory for any
 * message size) and calls the signer's key only at the very end; a provider
 * key is the supported way to put a token behind that call. The provider
 * offers key management (public half only) and signatures for RSA
 * (PKCS#1 v1.5 and PSS), ECDSA and Ed25519. Digests are computed here in
 * software; the token sees a DigestInfo, a digest, or (pure EdDSA) the
 * signed attributes.
 *
 * Its algorithms carry the property "provider=smime-agent" and the default
 * library context prefers "provider=default", so ordinary fetches never land
 * here: only keys made by keyprov_pkey_new() use it.
 *
 * Must never: read, export or ask for private key material. Export and
 * import move public parameters only.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#include "keyprov.h"
#include "keyprov_int.h"

#define KP_NAME "smime-agent"
#define KP_REF_PARAM "smime-agent-token-key"
#define KP_EDDSA_MAX_MSG (64u * 1024u)  /* signed attributes are a few hundred bytes */

static const char *const kp_type_name[] = {
        [KP_RSA] = "RSA", [KP_EC] = "EC", [KP_ED25519] = "ED25519",
};

/* What keyprov_pkey_new() hands to the key-management import, by value. */
struct kp_ref {
        const struct token_key *tk;
        EVP_PKEY *pub;
        bool pss;
        const struct keyprov_ctx *ctx;
};

static _Thread_local struct token_error kp_err;
static _Thread_local int kp_err_code;

const struct token_error *keyprov_last_error(int *errno_code)
{
        if (kp_err_code == 0)
                return NULL;
        if (errno_code)
                *errno_code = kp_err_code;
        return &kp_err;
}

void keyprov_clear_error(void)
{
        kp_err_code = 0;
        kp_err.rv = 0;
        kp_err.message[0] = '\0';
}

/* ---- key management ----------------------------------------------------- */

static struct kp_key *kp_new(enum kp_type type)
{
        struct kp_key *k = calloc(1, sizeof(*k));

        if (k)
                k->type = type;
        return k;
}

static void *kp_new_rsa(void *provctx) { return kp_new(KP_RSA); }
static void *kp_new_ec(void *provctx) { return kp_new(KP_EC); }
static void *kp_new_ed25519(void *provctx) { return kp_new(KP_ED25519); }

static void kp_free(void *keydata)
{
        struct kp_key *k = keydata;

        if (!k)
                return;
        EVP_PKEY_free(k->pub);
        free(k);
}

static int kp_has(const void *keydata, int selection)
{
        const struct kp_key *k = keydata;

        if (!k || !k->pub)
                return 0;
        if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && !k->tk)
                return 0;
        return 1;
}

static int kp_match(const void *a, const void *b, int selection)
{
        const struct kp_key *ka = a, *kb = b;

        if (!ka->pub || !kb->pub)
                return 0;
        /* ECDH asks whether a peer's domain parameters match ours. */
        if (!(selection & OSSL_KEYMGMT_SELECT_KEYPAIR))
                return EVP_PKEY_parameters_eq(ka->pub, kb->pub) == 1;
        return EVP_PKEY_eq(ka->pub, kb->pub) == 1;
}

static int kp_import(void *keydata, int selection, const OSSL_PARAM params[])
{
        struct kp_key *k = keydata;
        const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, KP_REF_PARAM);
        EVP_PKEY_CTX *ctx;
        int ok;

        if (p) {
                /* Our own construction path: adopt the token key. */
                const void *ptr = NULL;
                size_t len = 0;
                struct kp_ref ref;

                if (!OSSL_PARAM_get_octet_string_ptr(p, &ptr, &len) || len != sizeof(ref))
                        return 0;
                memcpy(&ref, ptr, sizeof(ref));
                if (!ref.tk || !ref.pub || !EVP_PKEY_up_ref(ref.pub))
                        return 0;
                EVP_PKEY_free(k->pub);
                k->pub = ref.pub;
                k->tk = ref.tk;
                k->pss = ref.pss;
                k->ctx = ref.ctx;
                return 1;
        }

        /* Public parameters from another provider (EVP_PKEY_eq exports
         * a certificate's key into us to compare). */
        if (!(selection & (OSSL_KEYMGMT_SELECT_PUBLIC_KEY | OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS)))
                return 0;
        ctx = EVP_PKEY_CTX_new_from_name(NULL, kp_type_name[k->type], "provider=default");
        if (!ctx)
                return 0;
        ok = EVP_PKEY_fromdata_init(ctx) > 0 &&
             EVP_PKEY_fromdata(ctx, &k->pub, EVP_PKEY_PUBLIC_KEY, (OSSL_PARAM *)params) > 0;
        EVP_PKEY_CTX_free(ctx);
        return ok;
}

static int kp_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
        struct kp_key *k = keydata;

        if (!k->pub)
                return 0;
        /* Public half only, whatever was asked for. */
        selection &= OSSL_KEYMGMT_SELECT_PUBLIC_KEY | OSSL_KEYMGMT_SELECT_ALL_PARAMETERS;
        if (!selection)
                return 0;
        return EVP_PKEY_export(k->pub, selection, cb, cbarg);
}

static EVP_KEYMGMT *kp_default_km[3];
static EVP_PKEY_CTX *kp_default_fromdata[3];

/* The parameters the default provider's key management takes for this
 * type; we import and export the same public parameters. */
static const OSSL_PARAM *kp_types(enum kp_type t, int selection, int import)
{
        if (!kp_default_fromdata[t])
                return NULL;
        return EVP_PKEY_fromdata_settable(kp_default_fromdata[t], selection);
}

#define KP_TYPE_FUNCS(T, ID, OPNAME)                                                        \
        static const OSSL_PARAM *kp_import_types_##T(int sel) { return kp_types(ID, sel, 1); } \
        static const OSSL_PARAM *kp_export_types_##T(int sel) { return kp_types(ID, sel, 0); } \
        static const OSSL_PARAM *kp_gettable_##T(void *provctx)                              \
        {                                                                                    \
                return kp_default_km[ID] ? EVP_KEYMGMT_gettable_params(kp_default_km[ID]) : NULL; \
        }                                                                                    \
        static const char *kp_opname_##T(int op) { return OPNAME; }

KP_TYPE_FUNCS(rsa, KP_RSA, "RSA")
KP_TYPE_FUNCS(ec, KP_EC, op == OSSL_OP_KEYEXCH ? "ECDH" : "ECDSA")
KP_TYPE_FUNCS(ed25519, KP_ED25519, "ED25519")

static int kp_get_params(void *keydata, OSSL_PARAM params[])
{
        struct kp_key *k = keydata;

        if (!k->pub)
                return 0;
        /* Bits, security bits, max size, group name...: the public half knows. */
        return EVP_PKEY_get_params(k->pub, params);
}

/* Only a public key imported from elsewhere (an ECDH peer being built:
 * CMS sets its point after copying our group) may change; a token key's
 * public half comes from its certificate and is shared. */
static int kp_set_params(void *keydata, const OSSL_PARAM params[])
{
        struct kp_key *k = keydata;

        if (!k->pub || k->tk)
                return 0;
        return EVP_PKEY_set_params(k->pub, (OSSL_PARAM *)params);
}

static const OSSL_PARAM *kp_settable_params(void *provctx)
{
        static const OSSL_PARAM t[] = {
                OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
                OSSL_PARAM_END,
        };
        return t;
}

static int kp_validate(const void *keydata, int selection, int checktype)
{
        const struct kp_key *k = keydata;
        EVP_PKEY_CTX *ctx;
        int ok;

        if (!k || !k->pub)
                return 0;
        if (!(selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY))
                return 1;       /* the private half is the token's business */
        ctx = EVP_PKEY_CTX_new_from_pkey(NULL, k->pub, "provider=default");
        ok = ctx && EVP_PKEY_public_check(ctx) == 1;
        EVP_PKEY_CTX_free(ctx);
        return ok;
}

#define KP_KEYMGMT_TABLE(T)                                                                 \
        static const OSSL_DISPATCH kp_keymgmt_##T[] = {                                     \
                { OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))kp_new_##T },                       \
                { OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))kp_free },                         \
                { OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))kp_has },                           \
                { OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))kp_match },                       \
                { OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))kp_import },                     \
                { OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))kp_import_types_##T },     \
                { OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))kp_export },                     \
                { OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))kp_export_types_##T },     \
                { OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))kp_get_params },             \
                { OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))kp_gettable_##T },      \
                { OSSL_FUNC_KEYMGMT_SET_PARAMS, (void (*)(void))kp_set_params },             \
                { OSSL_FUNC_KEYMGMT_SETTABLE_PARAMS, (void (*)(void))kp_settable_params },   \
                { OSSL_FUNC_KEYMGMT_VALIDATE, (void (*)(void))kp_validate },                 \
                { OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))kp_opname_##T },   \
                { 0, NULL }                                                                  \
        }

KP_KEYMGMT_TABLE(rsa);
KP_KEYMGMT_TABLE(ec);
KP_KEYMGMT_TABLE(ed25519);

/* ---- signatures ----------------------------------------------------------- */

struct kp_sig {
        struct kp_key *key;
        EVP_MD *md;             /* NULL for pure EdDSA */
        EVP_MD_CTX *mdctx;
        int pad;                /* RSA_PKCS1_PADDING (1) or RSA_PKCS1_PSS_PADDING (6) */
        int saltlen;            /* PSS; -1 = digest length */
        EVP_MD *mgf1;           /* PSS; NULL = same as md */
        unsigned char *msg;     /* EdDSA: the message, buffered */
        size_t msg_len;
};

#define KP_PAD_PKCS1 1
#define KP_PAD_PSS 6

static void *kp_sig_newctx(void *provctx, const char *propq)
{
        struct kp_sig *s = calloc(1, sizeof(*s));

        if (s) {
                s->pad = KP_PAD_PKCS1;
                s->saltlen = -1;
        }
        return s;
}

static void kp_sig_freectx(void *ctx)
{
        struct kp_sig *s = ctx;

        if (!s)
                return;
        EVP_MD_free(s->md);
        EVP_MD_free(s->mgf1);
        EVP_MD_CTX_free(s->mdctx);
        free(s->msg);
        free(s);
}

static void *kp_sig_dupctx(void *ctx)
{
        struct kp_sig *s = ctx, *d = calloc(1, sizeof(*d));

        if (!d)
                return NULL;
        *d = *s;
        d->md = NULL;
        d->mgf1 = NULL;
        d->mdctx = NULL;
        d->msg = NULL;
        if ((s->md && !EVP_MD_up_ref(s->md)) || (s->mgf1 && !EVP_MD_up_ref(s->mgf1)))
                goto fail;
        d->md = s->md;
        d->mgf1 = s->mgf1;
        if (s->mdctx) {
                d->mdctx = EVP_MD_CTX_new();
                if (!d->mdctx || !EVP_MD_CTX_copy_ex(d->mdctx, s->mdctx))
                        goto fail;
        }
        if (s->msg_len) {
                d->msg = malloc(s->msg_len);
                if (!d->msg)
                        goto fail;
                memcpy(d->msg, s->msg, s->msg_len);
        }
        return d;
fail:
        kp_sig_freectx(d);
        return NULL;
}

static int kp_sig_set_md(struct kp_sig *s, const char *mdname)
{
        EVP_MD *md;

        if (!mdname || !*mdname)
                return 1;
        if (s->key && s->key->type == KP_ED25519)
                return 1;       /* pure EdDSA: CMS names SHA-512 for its messageDigest only */
        md = EVP_MD_fetch(NULL, mdname, "provider=default");
        if (!md)
                return 0;
        EVP_MD_free(s->md);
        s->md = md;
        return 1;
}

static int kp_sig_set_ctx_params(void *ctx, const OSSL_PARAM params[]);

static int kp_sig_init(void *ctx, void *keydata, const OSSL_PARAM params[])
{
        struct kp_sig *s = ctx;

        s->key = keydata;
        if (!s->key || !s->key->tk)
                return 0;
        if (s->key->pss)
                s->pad = KP_PAD_PSS;
        return kp_sig_set_ctx_params(s, params);
}

static int kp_dsign_init(void *ctx, const char *mdname, void *keydata, const OSSL_PARAM params[])
{
        struct kp_sig *s = ctx;

        if (!kp_sig_init(ctx, keydata, params))
                return 0;
        if (s->key->type == KP_ED25519) {
                s->msg_len = 0;
                return 1;
        }
        if (!kp_sig_set_md(s, mdname ? mdname : "SHA256"))
                return 0;
        if (!s->mdctx && !(s->mdctx = EVP_MD_CTX_new()))
                return 0;
        return EVP_DigestInit_ex(s->mdctx, s->md, NULL);
}

static int kp_dsign_update(void *ctx, const unsigned char *data, size_t len)
{
        struct kp_sig *s = ctx;

        if (s->key->type != KP_ED25519)
                return EVP_DigestUpdate(s->mdctx, data, len);
        if (len > KP_EDDSA_MAX_MSG - s->msg_len)
                return 0;
        unsigned char *m = realloc(s->msg, s->msg_len + len);
        if (!m)
                return 0;
        memcpy(m + s->msg_len, data, len);
        s->msg = m;
        s->msg_len += len;
        return 1;
}

static enum token_hash kp_token_hash(const EVP_MD *md)
{
        switch (EVP_MD_get_type(md)) {
        case NID_sha1: return TOKEN_HASH_SHA1;
        case NID_sha224: return TOKEN_HASH_SHA224;
        case NID_sha384: return TOKEN_HASH_SHA384;
        case NID_sha512: return TOKEN_HASH_SHA512;
        default: return TOKEN_HASH_SHA256;
        }
}

/* DER prefixes of DigestInfo (RFC 8017, section 9.2, note 1). */
static const unsigned char di_sha1[] = { 0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14 };
static const unsigned char di_sha224[] = { 0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04, 0x05, 0x00, 0x04, 0x1c };
static const unsigned char di_sha256[] = { 0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20 };
static const unsigned char di_sha384[] = { 0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30 };
static const unsigned char di_sha512[] = { 0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40 };

static size_t kp_digestinfo(const EVP_MD *md, const unsigned char *dg, size_t dglen, unsigned char *out)
{
        const unsigned char *pre;
        size_t n;

        switch (EVP_MD_get_type(md)) {
        case NID_sha1: pre = di_sha1; n = sizeof(di_sha1); break;
        case NID_sha224: pre = di_sha224; n = sizeof(di_sha224); break;
        case NID_sha256: pre = di_sha256; n = sizeof(di_sha256); break;
        case NID_sha384: pre = di_sha384; n = sizeof(di_sha384); break;
        case NID_sha512: pre = di_sha512; n = sizeof(di_sha512); break;
        default: return 0;
        }
        memcpy(out, pre, n);
        memcpy(out + n, dg, dglen);
        return n + dglen;
}

static size_t kp_max_sig(const struct kp_sig *s)
{
        int n = EVP_PKEY_get_size(s->key->pub);

        return n > 0 ? (size_t)n : 0;
}

bool kp_relogin(const struct kp_key *k, int r, const struct token_error *err)
{
        return r == -EACCES && token_error_not_logged_in(err) && k->ctx && k->ctx->relogin &&
               k->ctx->relogin(k->ctx->arg, k->tk->token) == 0;
}

void kp_record(int r, const struct token_error *e)
{
        kp_err_code = r;
        kp_err = *e;
        ERR_raise_data(ERR_LIB_USER, ERR_R_OPERATION_FAIL, "%s", e->message);
}

/* Sign a prepared input with the token and convert the result to what CMS
 * stores: RSA as is, ECDSA r||s to a DER ECDSA-Sig-Value, EdDSA as is. */
static int kp_token_sign(struct kp_sig *s, const unsigned char *tbs, size_t tbslen,
                         unsigned char *sig, size_t *siglen, size_t sigsize)
{
        struct token_sign_params p = { 0 };
        struct token_error err = { 0 };
        unsigned char raw[1024];
        size_t rawlen = sizeof(raw);
        int r;

        switch (s->key->type) {
        case KP_RSA:
                p.mech = s->pad == KP_PAD_PSS ? TOKEN_MECH_RSA_PSS : TOKEN_MECH_RSA_PKCS;
                if (p.mech == TOKEN_MECH_RSA_PSS) {
                        p.pss_hash = kp_token_hash(s->md);
                        p.pss_salt_len = s->saltlen >= 0 ? (unsigned long)s->saltlen
                                                         : (unsigned long)EVP_MD_get_size(s->md);
                }
                break;
        case KP_EC: p.mech = TOKEN_MECH_ECDSA; break;
        case KP_ED25519: p.mech = TOKEN_MECH_EDDSA; break;
        }

        p.auth = kp_auth(s->key);
        r = token_sign(s->key->tk, &p, tbs, tbslen, raw, &rawlen, &err);
        if (r < 0 && kp_relogin(s->key, r, &err)) {
                rawlen = sizeof(raw);
                err = (struct token_error){ 0 };
                r = token_sign(s->key->tk, &p, tbs, tbslen, raw, &rawlen, &err);
        }
        if (r < 0) {
                kp_record(r, &err);
                return 0;
        }

        if (s->key->type == KP_EC) {
                ECDSA_SIG *es = ECDSA_SIG_new();
                BIGNUM *br = BN_bin2bn(raw, (int)(rawlen / 2), NULL);
                BIGNUM *bs = BN_bin2bn(raw + rawlen / 2, (int)(rawlen / 2), NULL);
                unsigned char *q = sig;
                int n = -1;

                if (es && br && bs && rawlen % 2 == 0 && ECDSA_SIG_set0(es, br, bs)) {
                        br = bs = NULL;
                        if ((size_t)i2d_ECDSA_SIG(es, NULL) <= sigsize)
                                n = i2d_ECDSA_SIG(es, &q);
                }
                BN_free(br);
                BN_free(bs);
                ECDSA_SIG_free(es);
                if (n < 0)
                        return 0;
                *siglen = (size_t)n;
                return 1;
        }
        if (rawlen > sigsize)
                return 0;
        memcpy(sig, raw, rawlen);
        *siglen = rawlen;
        return 1;
}

/* EVP_PKEY_sign(): the input is already a digest (or, for EdDSA, the message). */
static int kp_sign(void *ctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                   const unsigned char *tbs, size_t tbslen)
{
        struct kp_sig *s = ctx;
        unsigned char di[128];

        if (!sig) {
                *siglen = kp_max_sig(s);
                return *siglen > 0;
        }
        if (s->key->type == KP_RSA && s->pad == KP_PAD_PKCS1) {
                size_t n;

                if (!s->md && !kp_sig_set_md(s, "SHA256"))
                        return 0;
                if ((int)tbslen != EVP_MD_get_size(s->md) || !(n = kp_digestinfo(s->md, tbs, tbslen, di)))
                        return 0;
                return kp_token_sign(s, di, n, sig, siglen, sigsize);
        }
        if (s->key->type == KP_RSA && !s->md && !kp_sig_set_md(s, "SHA256"))
                return 0;
        return kp_token_sign(s, tbs, tbslen, sig, siglen, sigsize);
}

static int kp_dsign_final(void *ctx, unsigned char *sig, size_t *siglen, size_t sigsize)
{
        struct kp_sig *s = ctx;
        unsigned char dg[EVP_MAX_MD_SIZE];
        unsigned int dglen = 0;

        if (!sig) {
                *siglen = kp_max_sig(s);
                return *siglen > 0;
        }
        if (s->key->type == KP_ED25519)
                return kp_token_sign(s, s->msg, s->msg_len, sig, siglen, sigsize);
        if (!EVP_DigestFinal_ex(s->mdctx, dg, &dglen))
                return 0;
        return kp_sign(s, sig, siglen, sigsize, dg, dglen);
}

static int kp_dsign(void *ctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                    const unsigned char *tbs, size_t tbslen)
{
        struct kp_sig *s = ctx;

        if (!sig) {
                *siglen = kp_max_sig(s);
                return *siglen > 0;
        }
        if (s->key->type == KP_ED25519)
                return kp_token_sign(s, tbs, tbslen, sig, siglen, sigsize);
        return kp_dsign_update(s, tbs, tbslen) && kp_dsign_final(s, sig, siglen, sigsize);
}

static int kp_sig_get_ctx_params(void *ctx, OSSL_PARAM params[])
{
        struct kp_sig *s = ctx;
        OSSL_PARAM *p;

        if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST)) && s->md &&
            !OSSL_PARAM_set_utf8_string(p, EVP_MD_get0_name(s->md)))
                return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PAD_MODE))) {
                if (p->data_type == OSSL_PARAM_INTEGER) {
                        if (!OSSL_PARAM_set_int(p, s->pad))
                                return 0;
                } else if (!OSSL_PARAM_set_utf8_string(p, s->pad == KP_PAD_PSS ? OSSL_PKEY_RSA_PAD_MODE_PSS
                                                                                 : OSSL_PKEY_RSA_PAD_MODE_PKCSV15)) {
                        return 0;
                }
        }
        if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST))) {
                const EVP_MD *m = s->mgf1 ? s->mgf1 : s->md;

                if (m && !OSSL_PARAM_set_utf8_string(p, EVP_MD_get0_name(m)))
                        return 0;
        }
        if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN))) {
                int sl = s->saltlen >= 0 ? s->saltlen : (s->md ? EVP_MD_get_size(s->md) : 32);

                if (p->data_type == OSSL_PARAM_INTEGER) {
                        if (!OSSL_PARAM_set_int(p, sl))
                                return 0;
                } else {
                        char buf[16];

                        snprintf(buf, sizeof(buf), "%d", sl);
                        if (!OSSL_PARAM_set_utf8_string(p, buf))
                                return 0;
                }
        }
        return 1;
}

static int kp_sig_set_ctx_params(void *ctx, const OSSL_PARAM params[])
{
        struct kp_sig *s = ctx;
        const OSSL_PARAM *p;

        if (!params)
                return 1;
        if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST))) {
                const char *name = NULL;

                if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !kp_sig_set_md(s, name))
                        return 0;
        }
        if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE))) {
                int pad = 0;
                const char *name = NULL;

                if (p->data_type == OSSL_PARAM_INTEGER) {
                        if (!OSSL_PARAM_get_int(p, &pad))
                                return 0;
                } else if (OSSL_PARAM_get_utf8_string_ptr(p, &name)) {
                        pad = strcmp(name, OSSL_PKEY_RSA_PAD_MODE_PSS) == 0 ? KP_PAD_PSS
                              : strcmp(name, OSSL_PKEY_RSA_PAD_MODE_PKCSV15) == 0 ? KP_PAD_PKCS1 : 0;
                }
                if (pad != KP_PAD_PKCS1 && pad != KP_PAD_PSS)
                        return 0;
                s->pad = pad;
        }
        if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST))) {
                const char *name = NULL;
                EVP_MD *md;

                if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !(md = EVP_MD_fetch(NULL, name, "provider=default")))
                        return 0;
                EVP_MD_free(s->mgf1);
                s->mgf1 = md;
        }
        if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN))) {
                int sl;
                const char *v = NULL;

                if (p->data_type == OSSL_PARAM_INTEGER) {
                        if (!OSSL_PARAM_get_int(p, &sl))
                                return 0;
                } else if (OSSL_PARAM_get_utf8_string_ptr(p, &v)) {
                        sl = strcmp(v, OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST) == 0 ? -1 : atoi(v);
                } else {
                        return 0;
                }
                /* Only "digest length" (-1) or an explicit length: the token takes sLen. */
                if (sl < -1)
                        sl = -1;
                s->saltlen = sl;
        }
        return 1;
}

static const OSSL_PARAM *kp_sig_gettable(void *ctx, void *provctx)
{
        static const OSSL_PARAM t[] = {
                OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
                OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
                OSSL_PARAM_END,
        };
        return t;
}

static const OSSL_PARAM *kp_sig_settable(void *ctx, void *provctx)
{
        return kp_sig_gettable(ctx, provctx);
}

static const OSSL_DISPATCH kp_signature[] = {
        { OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))kp_sig_newctx },
        { OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))kp_sig_freectx },
        { OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))kp_sig_dupctx },
        { OSSL_FUNC_SIGNATURE_SIGN_INIT, (void (*)(void))kp_sig_init },
        { OSSL_FUNC_SIGNATURE_SIGN, (void (*)(void))kp_sign },
        { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))kp_dsign_init },
        { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, (void (*)(void))kp_dsign_update },
        { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, (void (*)(void))kp_dsign_final },
        { OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))kp_dsign },
        { OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))kp_sig_get_ctx_params },
        { OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))kp_sig_gettable },
        { OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))kp_sig_set_ctx_params },
        { OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))kp_sig_settable },
        { 0, NULL }
};

/* ---- the provider -------------------------------------------------------- */

static const OSSL_ALGORITHM kp_keymgmt_algs[] = {
        { "RSA:rsaEncryption:1.2.840.113549.1.1.1", KP_PROPS, kp_keymgmt_rsa, "token RSA key" },
        { "EC:id-ecPublicKey:1.2.840.10045.2.1", KP_PROPS, kp_keymgmt_ec, "token EC key" },
        { "ED25519:1.3.101.112", KP_PROPS, kp_keymgmt_ed25519, "token Ed25519 key" },
        { NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM kp_signature_algs[] = {
        { "RSA:rsaEncryption:1.2.840.113549.1.1.1", KP_PROPS, kp_signature, "token RSA signature" },
        { "ECDSA", KP_PROPS, kp_signature, "token ECDSA signature" },
        { "ED25519:1.3.101.112", KP_PROPS, kp_signature, "token Ed25519 signature" },
        { NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM kp_asym_algs[] = {
        { "RSA:rsaEncryption:1.2.840.113549.1.1.1", KP_PROPS, kp_asym_rsa, "token RSA decryption" },
        { NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM kp_keyexch_algs[] = {
        { "ECDH", KP_PROPS, kp_ecdh, "token ECDH" },
        { NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM *kp_query(void *provctx, int op, int *no_cache)
{
        *no_cache = 0;
        switch (op) {
        case OSSL_OP_KEYMGMT: return kp_keymgmt_algs;
        case OSSL_OP_SIGNATURE: return kp_signature_algs;
        case OSSL_OP_ASYM_CIPHER: return kp_asym_algs;
        case OSSL_OP_KEYEXCH: return kp_keyexch_algs;
        }
        return NULL;
}

static void kp_teardown(void *provctx) { }

static const OSSL_DISPATCH kp_provider[] = {
        { OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))kp_query },
        { OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))kp_teardown },
        { 0, NULL }
};

static int kp_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                            const OSSL_DISPATCH **out, void **provctx)
{
        *out = kp_provider;
        *provctx = (void *)handle;
        return 1;
}

static OSSL_PROVIDER *kp_prov_default, *kp_prov_self;

void keyprov_done(void)
{
        for (int t = KP_RSA; t <= KP_ED25519; t++) {
                EVP_KEYMGMT_free(kp_default_km[t]);
                EVP_PKEY_CTX_free(kp_default_fromdata[t]);
                kp_default_km[t] = NULL;
                kp_default_fromdata[t] = NULL;
        }
        if (kp_prov_self)
                OSSL_PROVIDER_unload(kp_prov_self);
        if (kp_prov_default)
                OSSL_PROVIDER_unload(kp_prov_default);
        kp_prov_self = kp_prov_default = NULL;
}

int keyprov_init(void)
{
        if (!(kp_prov_default = OSSL_PROVIDER_load(NULL, "default")))
                return -ENOENT;
        /* Ordinary fetches must keep using the default provider. */
        if (!EVP_set_default_properties(NULL, "?provider=default"))
                return -EINVAL;
        for (int t = KP_RSA; t <= KP_ED25519; t++) {
                kp_default_km[t] = EVP_KEYMGMT_fetch(NULL, kp_type_name[t], "provider=default");
                kp_default_fromdata[t] = EVP_PKEY_CTX_new_from_name(NULL, kp_type_name[t], "provider=default");
                if (!kp_default_km[t] || !kp_default_fromdata[t] || EVP_PKEY_fromdata_init(kp_default_fromdata[t]) <= 0)
                        return -ENOENT;
        }
        if (!OSSL_PROVIDER_add_builtin(NULL, KP_NAME, kp_provider_init) ||
            !(kp_prov_self = OSSL_PROVIDER_load(NULL, KP_NAME)))
                return -ENOENT;
        return 0;
}

EVP_PKEY *keyprov_pkey_new(const struct token_key *k, EVP_PKEY *pub, bool pss, const struct keyprov_ctx *kctx)
{
        struct kp_ref ref = { .tk = k, .pub = pub, .pss = pss, .ctx = kctx };
        OSSL_PARAM params[2];
        EVP_PKEY_CTX *ctx;
        EVP_PKEY *pkey = NULL;
        const char *name;

        if (EVP_PKEY_is_a(pub, "RSA"))
                name = "RSA";
        else if (EVP_PKEY_is_a(pub, "EC"))
                name = "EC";
        else if (EVP_PKEY_is_a(pub, "ED25519"))
                name = "ED25519";
        else
                return NULL;

        ctx = EVP_PKEY_CTX_new_from_name(NULL, name, KP_PROPS);
        if (!ctx)
                return NULL;
        params[0] = OSSL_PARAM_construct_octet_string(KP_REF_PARAM, &ref, sizeof(ref));
        params[1] = OSSL_PARAM_construct_end();
        if (EVP_PKEY_fromdata_init(ctx) <= 0 || EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_KEYPAIR, params) <= 0)
                pkey = NULL;
        EVP_PKEY_CTX_free(ctx);
        return pkey;
}
