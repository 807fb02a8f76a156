/* sign.c — the SIGN request: choose the key, log in, stream the content
 * through OpenSSL's CMS encoder, and let the token make the one signature.
 *
 * Memory stays bounded for any message size: OpenSSL streams SignedData
 * (indefinite-length BER for opaque output), the content passes through one
 * chunk at a time, and only the S/MIME header block (at most
 * SIGN_MAX_HEADER bytes) is held whole.
 *
 * Must never: hand the token anything but the data to be signed, or send
 * DONE when any step failed.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/pem.h>  /* before cms.h: it declares the CMS PEM functions */
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/pkcs7.h>
#include <openssl/rsa.h>

#include "agent.h"
#include "audit.h"
#include "authz.h"
#include "identity.h"
#include "keyprov.h"
#include "log.h"
#include "mime.h"
#include "stream.h"

#define SIGN_MAX_HEADER MIME_MAX_HEADER

enum sign_format { FMT_DER, FMT_PEM, FMT_SMIME };

struct sign_opts {
        char *key;
        enum sign_format format;
        bool detached, no_certs, chain, pss;
        const EVP_MD *md;
};

static int parse_opts(struct conn *c, struct sign_opts *o)
{
        const uint8_t *p = c->frame.body;
        size_t n = c->frame.len;
        char *s = NULL;
        uint64_t v;
        int r;

        memset(o, 0, sizeof(*o));
        o->format = FMT_SMIME;
        o->md = NULL;   /* chosen with the key unless asked for */
        if (proto_get_string(p, n, PT_KEY, &o->key) == -ENOMEM)
                return -ENOMEM;
        if (proto_get_string(p, n, PT_FORMAT, &s) == 0) {
                if (strcmp(s, "der") == 0)
                        o->format = FMT_DER;
                else if (strcmp(s, "pem") == 0)
                        o->format = FMT_PEM;
                else if (strcmp(s, "smime") != 0) {
                        r = conn_error(c, PE_UNSUPPORTED, "unknown output format '%s'; use der, pem or smime", s);
                        free(s);
                        return r < 0 ? r : 1;
                }
                free(s);
        }
        s = NULL;
        if (proto_get_string(p, n, PT_DIGEST, &s) == 0) {
                if (strcasecmp(s, "sha256") == 0)
                        o->md = EVP_sha256();
                else if (strcasecmp(s, "sha384") == 0)
                        o->md = EVP_sha384();
                else if (strcasecmp(s, "sha512") == 0)
                        o->md = EVP_sha512();
                else
                        o->md = NULL;
                if (!o->md) {
                        r = conn_error(c, PE_UNSUPPORTED, "unknown digest '%s'; use sha256, sha384 or sha512", s);
                        free(s);
                        return r < 0 ? r : 1;
                }
                free(s);
        }
        o->detached = proto_get_uint(p, n, PT_DETACHED, &v) == 0 && v;
        o->no_certs = proto_get_uint(p, n, PT_NO_CERTS, &v) == 0 && v;
        o->chain = proto_get_uint(p, n, PT_CHAIN, &v) == 0 && v;
        o->pss = proto_get_uint(p, n, PT_PSS, &v) == 0 && v;
        return 0;
}

/* ---- S/MIME header block ---------------------------------------------- */

/* Reads the header block of an RFC 5322 message or MIME entity. Fields
 * other than Content-* and MIME-Version are written to the output now (they
 * stay outside the signature, in the outer message); the Content-* fields
 * are put back in front of the body to be signed (mime.c parses). *has_headers
 * is false when the input does not start with a header block: it is then
 * signed as text/plain. Returns 0, a positive proto error code (already
 * answered), or negative. */
int smime_split_headers(struct conn *c, struct stream *st, bool *has_headers)
{
        uint8_t *raw = malloc(SIGN_MAX_HEADER);
        struct mime_split ms = { 0 };
        size_t len = 0, hdr_end = 0;
        bool ended = false;
        int r = 0;

        *has_headers = false;
        if (!raw)
                return -ENOMEM;
        /* Read until the blank line that ends the header block, or the end. */
        while (!ended && len < SIGN_MAX_HEADER) {
                ssize_t k = stream_read(st, raw + len, SIGN_MAX_HEADER - len);

                if (k < 0) {
                        r = (int)k;
                        goto out;
                }
                if (k == 0)
                        break;
                ended = mime_header_end(raw, len + (size_t)k, len > 3 ? len - 3 : 0, &hdr_end);
                len += (size_t)k;
        }

        /* Does it start with a header field at all? */
        if (!mime_starts_with_header(raw, len)) {
                r = stream_unread(st, raw, len);
                goto out;
        }
        if (!ended) {
                if (len >= SIGN_MAX_HEADER) {
                        r = conn_error(c, PE_BAD_INPUT,
                                       "the message header block is longer than %u KiB or is not followed by a blank line; "
                                       "sign it with --format der or pem, or fix the message", SIGN_MAX_HEADER / 1024);
                        r = r < 0 ? r : PE_BAD_INPUT;
                        goto out;
                }
                hdr_end = len;  /* headers only, no body */
        }
        *has_headers = true;

        r = mime_split_headers(raw, hdr_end, &ms);
        if (r < 0)
                goto out;
        r = stream_write(st, ms.outer, ms.outer_len);
        if (r < 0)
                goto out;
        /* The body bytes already read go back after the entity headers. */
        r = stream_unread(st, raw + hdr_end, len - hdr_end);
        if (r == 0)
                r = stream_unread(st, ms.inner, ms.inner_len);
out:
        free(raw);
        mime_split_free(&ms);
        return r;
}

/* ---- CMS ---------------------------------------------------------------- */

/* Without --digest, a digest as strong as the key: RFC 5753/5480 pair
 * P-384 with SHA-384 and P-521 with SHA-512 (gpgsm rejects a weaker one),
 * RFC 8419 fixes SHA-512 for Ed25519, and SHA-256 suits everything else. */
static const EVP_MD *default_digest(EVP_PKEY *pub)
{
        int bits = EVP_PKEY_get_bits(pub);

        if (EVP_PKEY_is_a(pub, "ED25519"))
                return EVP_sha512();
        if (EVP_PKEY_is_a(pub, "EC"))
                return bits > 384 ? EVP_sha512() : bits > 256 ? EVP_sha384() : EVP_sha256();
        return EVP_sha256();
}

/* RSAES-OAEP-params (RFC 4055) with SHA-256 and MGF1-SHA-256, the
 * parameters RFC 8551 section 2.7.1 recommends advertising. */
static const unsigned char oaep_sha256_params[] = {
        0x30, 0x2f,
        0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00,
        0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08,
        0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00,
};

static int add_oaep_capability(STACK_OF(X509_ALGOR) *sk)
{
        X509_ALGOR *a = X509_ALGOR_new();
        ASN1_STRING *params = ASN1_STRING_new();

        if (!a || !params || !ASN1_STRING_set(params, oaep_sha256_params, sizeof(oaep_sha256_params)) ||
            !X509_ALGOR_set0(a, OBJ_nid2obj(NID_rsaesOaep), V_ASN1_SEQUENCE, params)) {
                ASN1_STRING_free(params);
                X509_ALGOR_free(a);
                return 0;
        }
        if (!sk_X509_ALGOR_push(sk, a)) {
                X509_ALGOR_free(a);
                return 0;
        }
        return 1;
}

static int add_capabilities(CMS_SignerInfo *si)
{
        /* RFC 8551, section 2.7.1: what we can read, strongest first, and
         * that we decrypt RSA-OAEP (decrypt.c), so that correspondents may
         * prefer it to PKCS#1 v1.5 for our RSA encryption certificates. */
        static const int caps[] = { NID_aes_256_gcm, NID_aes_128_gcm, NID_aes_256_cbc, NID_aes_192_cbc, NID_aes_128_cbc };
        STACK_OF(X509_ALGOR) *sk = sk_X509_ALGOR_new_null();
        int ok = sk != NULL;

        for (size_t i = 0; ok && i < sizeof(caps) / sizeof(caps[0]); i++)
                ok = PKCS7_simple_smimecap(sk, caps[i], -1);
        if (ok)
                ok = add_oaep_capability(sk);
        ok = ok && CMS_add_smimecap(si, sk);
        sk_X509_ALGOR_pop_free(sk, X509_ALGOR_free);
        return ok;
}

/* RSASSA-PSS AlgorithmIdentifier (RFC 4055): hash and MGF1 hash = md, salt
 * length = digest length. OpenSSL 3.0 leaves the signer's algorithm unset
 * for padding chosen through CMS_KEY_PARAM (and then crashes), so the token
 * key itself signs with PSS and we set the AlgorithmIdentifier here. */
static int set_pss_algorithm(CMS_SignerInfo *si, const EVP_MD *md)
{
        RSA_PSS_PARAMS *pss = RSA_PSS_PARAMS_new();
        X509_ALGOR *mgf_md = X509_ALGOR_new(), *sig = NULL;
        ASN1_STRING *mgf_param = NULL, *params = NULL;
        int ok = 0;

        if (!pss || !mgf_md)
                goto out;
        pss->hashAlgorithm = X509_ALGOR_new();
        pss->maskGenAlgorithm = X509_ALGOR_new();
        pss->saltLength = ASN1_INTEGER_new();
        if (!pss->hashAlgorithm || !pss->maskGenAlgorithm || !pss->saltLength ||
            !ASN1_INTEGER_set(pss->saltLength, EVP_MD_get_size(md)))
                goto out;
        X509_ALGOR_set_md(pss->hashAlgorithm, md);
        X509_ALGOR_set_md(mgf_md, md);
        if (!ASN1_item_pack(mgf_md, ASN1_ITEM_rptr(X509_ALGOR), &mgf_param) ||
            !X509_ALGOR_set0(pss->maskGenAlgorithm, OBJ_nid2obj(NID_mgf1), V_ASN1_SEQUENCE, mgf_param))
                goto out;
        mgf_param = NULL;
        if (!ASN1_item_pack(pss, ASN1_ITEM_rptr(RSA_PSS_PARAMS), &params))
                goto out;
        CMS_SignerInfo_get0_algs(si, NULL, NULL, NULL, &sig);
        if (!sig || !X509_ALGOR_set0(sig, OBJ_nid2obj(NID_rsassaPss), V_ASN1_SEQUENCE, params))
                goto out;
        params = NULL;
        ok = 1;
out:
        ASN1_STRING_free(mgf_param);
        ASN1_STRING_free(params);
        X509_ALGOR_free(mgf_md);
        RSA_PSS_PARAMS_free(pss);
        return ok;
}

static CMS_ContentInfo *build_cms(struct conn *c, struct identity_set *set, const struct identity *id,
                                  EVP_PKEY *pkey, const struct sign_opts *o, const EVP_MD *md)
{
        /* OpenSSL 3.0 fetches the signature algorithm by this query, not
         * from the key's own provider: ask for ours, else the default. */
        CMS_ContentInfo *cms = CMS_sign_ex(NULL, NULL, NULL, NULL,
                                           CMS_PARTIAL | CMS_STREAM | (o->detached ? CMS_DETACHED : 0),
                                           NULL, KEYPROV_PROPQ);
        unsigned sflags = CMS_NOSMIMECAP | CMS_CADES | (o->no_certs ? CMS_NOCERTS : 0);
        CMS_SignerInfo *si;

        if (!cms)
                return NULL;
        si = CMS_add1_signer(cms, id->cert, pkey, md, sflags);
        if (!si || !add_capabilities(si))
                goto fail;
        if (o->pss && !set_pss_algorithm(si, md))
                goto fail;
        if (EVP_PKEY_is_a(id->pub, "ED25519")) {
                /* RFC 8419: id-Ed25519, parameters absent. */
                X509_ALGOR *sig = NULL;

                CMS_SignerInfo_get0_algs(si, NULL, NULL, NULL, &sig);
                if (!sig || !X509_ALGOR_set0(sig, OBJ_nid2obj(NID_ED25519), V_ASN1_UNDEF, NULL))
                        goto fail;
        }
        if (o->chain) {
                STACK_OF(X509) *chain = identity_chain(set, id, c->agent->ca_certs);

                for (int i = 0; chain && i < sk_X509_num(chain); i++)
                        if (!CMS_add1_cert(cms, sk_X509_value(chain, i))) {
                                sk_X509_pop_free(chain, X509_free);
                                goto fail;
                        }
                sk_X509_pop_free(chain, X509_free);
        }
        return cms;
fail:
        CMS_ContentInfo_free(cms);
        return NULL;
}

/* Detached DER/PEM: digest the content without writing it anywhere. */
static int sign_detached_binary(CMS_ContentInfo *cms, BIO *in, BIO *out, bool pem)
{
        BIO *cmsbio = CMS_dataInit(cms, NULL);
        char buf[16384];
        int n, ok = 0;

        if (!cmsbio)
                return 0;
        while ((n = BIO_read(in, buf, sizeof(buf))) > 0)
                if (BIO_write(cmsbio, buf, n) != n)
                        goto out;
        if (n < 0 || !BIO_eof(in))
                goto out;
        if (!CMS_dataFinal(cms, cmsbio))
                goto out;
        ok = pem ? PEM_write_bio_CMS(out, cms) : i2d_CMS_bio(out, cms);
out:
        BIO_free_all(cmsbio);   /* digest BIOs and the null sink: all ours */
        return ok;
}

/* The last OpenSSL error for the user; the whole queue for the log. */
static int sign_empty(CMS_ContentInfo *cms, BIO *out, bool pem)
{
        BIO *empty = BIO_new(BIO_s_mem());
        int ok = empty && CMS_final(cms, empty, NULL, CMS_BINARY) &&
                 (pem ? PEM_write_bio_CMS(out, cms) : i2d_CMS_bio(out, cms));

        BIO_free(empty);
        return ok;
}

static void openssl_error(char *buf, size_t n)
{
        unsigned long e = ERR_peek_last_error();
        const char *file, *data;
        int line, flags;

        if (e)
                ERR_error_string_n(e, buf, n);
        else
                snprintf(buf, n, "unknown OpenSSL error");
        while ((e = ERR_get_error_all(&file, &line, NULL, &data, &flags))) {
                char s[256];

                ERR_error_string_n(e, s, sizeof(s));
                log_debug("openssl: %s (%s:%d)%s%s", s, file, line, (flags & ERR_TXT_STRING) ? ": " : "",
                          (flags & ERR_TXT_STRING) ? data : "");
        }
}

static const char *mech_name(enum token_mech m)
{
        switch (m) {
        case TOKEN_MECH_RSA_PKCS: return "CKM_RSA_PKCS";
        case TOKEN_MECH_RSA_PSS: return "CKM_RSA_PKCS_PSS";
        case TOKEN_MECH_ECDSA: return "CKM_ECDSA";
        case TOKEN_MECH_EDDSA: return "CKM_EDDSA";
        }
        return "?";
}

/* result: 0, or the PE_* code sent (PE_CANCELLED when the client went
 * away without one). The content hash only when the whole input arrived. */
static void audit_sign(struct conn *c, const struct identity *id, EVP_MD_CTX *content_hash, const struct stream *st,
                       uint32_t result, double t0)
{
        unsigned char dg[32];
        unsigned dlen = 0;
        bool have = content_hash && st->in_eof && EVP_DigestFinal_ex(content_hash, dg, &dlen) && dlen == 32;

        audit_key_use(c, AUDIT_SIGN, id->tk->uri, id->subject, have ? dg : NULL, result, audit_now() - t0);
}

int sign_serve(struct conn *c)
{
        struct agent *a = c->agent;
        struct identity_set *set = NULL;
        const struct identity *id = NULL;
        struct sign_opts o;
        struct stream st;
        CMS_ContentInfo *cms = NULL;
        EVP_PKEY *pkey = NULL;
        BIO *in = NULL, *out = NULL;
        const EVP_MD *md;
        enum token_mech mech;
        char msg[4096];
        int r, code, ok;
        /* Audit: every request that got past authorization to a key. */
        double t0 = audit_now();
        bool audited = false;
        EVP_MD_CTX *content_hash = NULL;
        struct secret ctx_pin = { 0 };
        struct token_auth auth = { 0 };
        struct keyprov_ctx kctx = { .relogin = conn_relogin_cb, .arg = c };

        c->last_error = 0;
        stream_init(&st, c->fd);
        r = parse_opts(c, &o);
        if (r != 0)
                goto done;

        /* Choose the key. After a login, or when the key's private half is
         * not visible yet (another client's login may have just unlocked
         * it), choose again on the newest snapshot. */
        int did_login = 0;
        bool rescanned = false;
        for (int attempt = 0; attempt < 5; attempt++) {
                identity_set_unref(set);
                id = NULL;      /* it pointed into the set just released */
                set = identity_set_get(a->store, a->cfg.default_key);
                if (!set) {
                        r = conn_error(c, PE_INTERNAL, "cannot read the keys of the tokens (out of memory?)");
                        goto done;
                }
                code = identity_select(set, o.key, a->cfg.default_key, authz_visible_fn, c, &id, msg, sizeof(msg));
                if (code == 0) {
                        /* Before the login: a peer without a grant must not
                         * even make the agent use the PIN file. */
                        r = authz_check(c, id, AUTHZ_SIGN);
                        if (r) {
                                id = NULL;      /* denial already audited */
                                goto done;
                        }
                        audited = true;
                        code = identity_sign_problem(id, msg, sizeof(msg));
                }
                if ((code == PE_NO_KEY || code == PE_TOKEN_REMOVED) && !rescanned) {
                        /* Maybe on a token whose objects changed since its
                         * scan (a card being set up): look again, once. */
                        rescanned = true;
                        if (token_store_rescan(a->store) > 0)
                                continue;
                }
                if (code) {
                        r = conn_error(c, code, "%s", msg);
                        goto done;
                }
                if (conn_needs_login(c, id->tk, POLICY_SIGN)) {
                        /* Twice: a module re-initialisation (hot-plug) may
                         * log the token out between the login and its use. */
                        if (did_login >= 2 || (did_login && !conn_login_is_silent(c, id->tk->token))) {
                                r = conn_error(c, PE_PIN_REQUIRED, "token '%s' was logged out again right after "
                                               "the login; try again", id->token_label);
                                goto done;
                        }
                        r = conn_login_key(c, id->tk, POLICY_SIGN);
                        if (r != 0)
                                goto done;
                        did_login++;
                        continue;
                }
                if (id->tk->has_private || attempt > 0)
                        break;
        }

        md = o.md ? o.md : default_digest(id->pub);
        if (EVP_PKEY_is_a(id->pub, "ED25519") && md != EVP_sha512()) {
                /* RFC 8419: Ed25519 in CMS goes with SHA-512. */
                r = conn_error(c, PE_UNSUPPORTED, "Ed25519 signatures use SHA-512 (RFC 8419); "
                               "leave out --digest or use --digest sha512 with '%s'", id->subject);
                goto done;
        }
        if (o.pss && !EVP_PKEY_is_a(id->pub, "RSA")) {
                r = conn_error(c, PE_UNSUPPORTED, "RSA-PSS was asked for, but the key of '%s' is %s", id->subject, id->key_type);
                goto done;
        }
        mech = EVP_PKEY_is_a(id->pub, "RSA") ? (o.pss ? TOKEN_MECH_RSA_PSS : TOKEN_MECH_RSA_PKCS)
               : EVP_PKEY_is_a(id->pub, "EC") ? TOKEN_MECH_ECDSA : TOKEN_MECH_EDDSA;
        if (!token_key_can(id->tk, mech)) {
                r = conn_error(c, PE_MECHANISM, "token '%s' does not offer %s for signing with key '%s'",
                               id->token_label, mech_name(mech), id->tk->label);
                goto done;
        }
        if (!id->tk->has_private) {
                r = conn_error(c, PE_NO_PRIVATE_KEY,
                               "certificate '%s' is on token '%s', but no private key with the same CKA_ID is visible; "
                               "check the key's CKA_ID matches the certificate's", id->subject, id->token_label);
                goto done;
        }
        /* PIV's signature key: a PIN for this one signature, before READY
         * (the token checks it when the signature is made, at the end). */
        if (id->tk->always_authenticate) {
                r = conn_context_auth(c, id->tk, &ctx_pin, &auth);
                if (r != 0)
                        goto done;
        }

        kctx.auth = id->tk->always_authenticate ? &auth : NULL;
        pkey = keyprov_pkey_new(id->tk, id->pub, o.pss, &kctx);
        cms = pkey ? build_cms(c, set, id, pkey, &o, md) : NULL;
        if (!cms) {
                openssl_error(msg, sizeof(msg));
                r = conn_error(c, PE_INTERNAL, "cannot prepare the signature with '%s': %s", id->subject, msg);
                goto done;
        }

        content_hash = EVP_MD_CTX_new();
        if (!content_hash || !EVP_DigestInit_ex(content_hash, EVP_sha256(), NULL)) {
                r = conn_error(c, PE_INTERNAL, "out of memory");
                goto done;
        }
        st.hash_in = content_hash;

        {
                struct proto_msg m;

                proto_msg_init(&m, PROTO_READY);
                proto_put_string(&m, PT_URI, id->tk->uri);
                proto_put_string(&m, PT_SUBJECT, id->subject);
                r = proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
                if (r < 0)
                        goto done;
        }

        in = stream_in_bio(&st);
        out = stream_out_bio(&st);
        if (!in || !out) {
                r = conn_error(c, PE_INTERNAL, "out of memory");
                goto done;
        }
        keyprov_clear_error();
        if (o.format == FMT_SMIME) {
                bool has_headers;

                r = smime_split_headers(c, &st, &has_headers);
                if (r > 0) {
                        r = 0;  /* already answered */
                        goto done;
                }
                if (r < 0) {
                        r = st.err ? conn_stream_failure(c, &st) : r;
                        goto done;
                }
                st.crlf = true;
                ok = SMIME_write_CMS(out, cms, in, CMS_STREAM | (o.detached ? CMS_DETACHED : 0) |
                                                   (has_headers ? 0 : CMS_TEXT));
        } else if (o.detached) {
                /* Digest only: the client may send while we hash. */
                st.more_early = true;
                ok = sign_detached_binary(cms, in, out, o.format == FMT_PEM);
        } else if ((r = stream_input_empty(&st)) != 0) {
                /* OpenSSL 3.0 cannot stream empty content (its own CLI
                 * fails too); nothing to stream, so finish it in one go. */
                if (r < 0) {
                        r = conn_stream_failure(c, &st);
                        goto done;
                }
                ok = sign_empty(cms, out, o.format == FMT_PEM);
        } else if (o.format == FMT_DER) {
                ok = i2d_CMS_bio_stream(out, cms, in, CMS_STREAM | CMS_BINARY);
        } else {
                ok = PEM_write_bio_CMS_stream(out, cms, in, CMS_STREAM | CMS_BINARY);
        }

        if (st.err) {
                r = conn_stream_failure(c, &st);
        } else if (!ok) {
                int terr = 0;
                const struct token_error *te = keyprov_last_error(&terr);

                if (te) {
                        r = conn_error(c, conn_token_code(terr, te), "signing with '%s' failed: %s", id->subject, te->message);
                } else {
                        openssl_error(msg, sizeof(msg));
                        r = conn_error(c, PE_INTERNAL, "signing with '%s' failed: %s", id->subject, msg);
                }
        } else {
                struct proto_msg m;

                /* The record is written before the client can see DONE:
                 * no completed signature without its audit record. */
                audit_sign(c, id, content_hash, &st, 0, t0);
                audited = false;
                proto_msg_init(&m, PROTO_DONE);
                proto_put_uint(&m, PT_BYTES_IN, st.bytes_in);
                proto_put_uint(&m, PT_BYTES_OUT, stream_total_out(&st));
                r = stream_finish(&st, &m);
                proto_msg_free(&m);
                log_info("signed %llu bytes for uid %u pid %d with %s (%s)", (unsigned long long)st.bytes_in,
                         (unsigned)c->uid, (int)c->pid, id->tk->uri, id->subject);
        }
done:
        if (audited && id)
                audit_sign(c, id, content_hash, &st, c->last_error ? c->last_error : PE_CANCELLED, t0);
        EVP_MD_CTX_free(content_hash);
        BIO_free(in);
        BIO_free(out);
        CMS_ContentInfo_free(cms);
        EVP_PKEY_free(pkey);
        secret_free(&ctx_pin);
        identity_set_unref(set);
        free(o.key);
        stream_done(&st);
        return r < 0 ? -1 : 0;
}
