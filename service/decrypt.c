/* decrypt.c — the DECRYPT request: read an encrypted CMS message as it
 * streams in, find the recipient whose key is on a token, let the token
 * recover the content-encryption key, and stream the plaintext back.
 *
 * Why not CMS_decrypt(): it reads the whole message into memory. Here the
 * outer layers (ContentInfo, EnvelopedData or AuthEnvelopedData,
 * EncryptedContentInfo) are parsed with a small streaming BER reader; the
 * part before the ciphertext (version, originatorInfo, recipientInfos, the
 * content algorithm) is re-encoded as a CMS structure without content and
 * handed to OpenSSL, which decodes the RecipientInfos and, through the token
 * provider (keyprov_dec.c), recovers the content key and sets up the
 * content cipher. The ciphertext then streams through that cipher one chunk
 * at a time: memory stays bounded whatever the message size; only the
 * RecipientInfos (at most CMS_IN_MAX_HEADER bytes) are held whole. The
 * parsing (cms_in.c) knows nothing of the socket, so the fuzz harness runs
 * the same code.
 *
 * Plaintext leaves before the end of the message is seen, so the verdict on
 * the whole (CBC padding, the GCM tag that follows the ciphertext) comes at
 * the end: DONE when it holds, ERROR INTEGRITY when it does not, and the
 * client must then discard what it received (PROTOCOL.md).
 *
 * Input: DER/BER, PEM (-----BEGIN CMS/PKCS7-----), or an S/MIME entity
 * (application/pkcs7-mime, base64 or binary), detected from the first bytes.
 *
 * Must never: send DONE unless the content decrypted completely and
 * correctly; keep or log a content key; try a PIN the user did not give.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509v3.h>

#include "agent.h"
#include "audit.h"
#include "authz.h"
#include "certstore.h"
#include "cms_in.h"
#include "identity.h"
#include "keyprov.h"
#include "log.h"
#include "stream.h"

#define DECRYPT_CHUNK CMS_IN_CHUNK
#define LIST_IN_MESSAGE 20      /* recipients named in the error sentence; all go in RECIPIENT fields */

struct dec {
        struct conn *c;
        struct stream st;
        struct cms_in in;               /* the message being read */
        char why[1024];         /* parse or decode failure */
        char *key;              /* selector from the request */
        enum cms_in_format format;
        bool auth;              /* AuthEnvelopedData */
        bool has_originator;
        CMS_ContentInfo *cms;
        struct identity_set *set;
        const struct identity *used;
        const struct identity *denied;  /* first recipient key the peer may not use */
        double t0;                      /* for the audit record */
        bool audit_pending;             /* a key was used: one record still to write */
        EVP_MD_CTX *content_hash;       /* SHA-256 of the plaintext sent, for the audit */
        char transport[96];
        char cipher[48];
        BIO *cbio;              /* OpenSSL's cipher BIO; we drive its context */
        EVP_CIPHER_CTX *cctx;
        uint8_t *buf, *out;
};

static void openssl_error(char *buf, size_t n)
{
        unsigned long e = ERR_peek_last_error();
        const char *data = NULL;
        int flags = 0;

        ERR_peek_last_error_data(&data, &flags);
        if (e == 0)
                snprintf(buf, n, "unknown OpenSSL error");
        else if (data && (flags & ERR_TXT_STRING) && *data)
                snprintf(buf, n, "%s (%s)", ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "error", data);
        else
                ERR_error_string_n(e, buf, n);
        ERR_clear_error();
}

static int parse_opts(struct dec *d)
{
        struct conn *c = d->c;
        char *s = NULL;
        int r;

        d->format = CMS_IN_AUTO;
        if (proto_get_string(c->frame.body, c->frame.len, PT_KEY, &d->key) == -ENOMEM)
                return -ENOMEM;
        if (proto_get_string(c->frame.body, c->frame.len, PT_FORMAT, &s) == 0) {
                if (strcmp(s, "der") == 0)
                        d->format = CMS_IN_DER;
                else if (strcmp(s, "pem") == 0)
                        d->format = CMS_IN_PEM;
                else if (strcmp(s, "smime") == 0)
                        d->format = CMS_IN_SMIME;
                else if (strcmp(s, "auto") != 0) {
                        r = conn_error(c, PE_UNSUPPORTED, "unknown input format '%s'; use der, pem, smime or leave it out", s);
                        free(s);
                        return r < 0 ? r : 1;
                }
                free(s);
        }
        return 0;
}

/* Answers a failure of the input side: the stream, the base64 or the BER. */
static int input_failure(struct dec *d, int r, const char *stage)
{
        if (d->st.err)
                return conn_stream_failure(d->c, &d->st);
        if (r == -E2BIG)
                r = conn_error(d->c, PE_TOO_LARGE, "the message's recipient information is over %u MiB; "
                               "this agent does not read such messages", CMS_IN_MAX_HEADER >> 20);
        else if (r == -ENOMEM)
                r = conn_error(d->c, PE_INTERNAL, "out of memory while reading the message");
        else if (stage)
                r = conn_error(d->c, PE_BAD_INPUT, "%s: %s", stage, d->in.why[0] ? d->in.why : "malformed input");
        else
                r = conn_error(d->c, PE_BAD_INPUT, "%s", d->in.why[0] ? d->in.why : "malformed input");
        return r < 0 ? -1 : 1;
}

/* ---- Recipients ---------------------------------------------------------------- */

static void hex(char *out, size_t n, const unsigned char *p, size_t len, char sep)
{
        size_t o = 0;

        out[0] = '\0';
        for (size_t i = 0; i < len && o + 4 < n; i++) {
                if (sep && i)
                        out[o++] = sep;
                o += (size_t)snprintf(out + o, n - o, "%02x", p[i]);
        }
}

static void describe_rid(char *out, size_t n, ASN1_OCTET_STRING *keyid, X509_NAME *issuer, ASN1_INTEGER *sno)
{
        if (keyid) {
                char h[3 * 64];

                hex(h, sizeof(h), ASN1_STRING_get0_data(keyid), (size_t)ASN1_STRING_length(keyid), ':');
                snprintf(out, n, "subject key identifier %s", h);
        } else if (issuer && sno) {
                char name[384] = "", serial[96] = "";
                BIGNUM *bn = ASN1_INTEGER_to_BN(sno, NULL);
                char *sh = bn ? BN_bn2hex(bn) : NULL;

                X509_NAME_oneline(issuer, name, sizeof(name));
                snprintf(serial, sizeof(serial), "%s", sh ? sh : "?");
                OPENSSL_free(sh);
                BN_free(bn);
                snprintf(out, n, "issuer %s, serial %s", name, serial);
        } else {
                snprintf(out, n, "an unnamed recipient");
        }
}

/* Certificates known elsewhere (every token, the address book) that can
 * put an e-mail address on a recipient the user has no key for. */
struct known_certs {
        X509 **v;
        size_t n;
        struct cs_list book;
};

static void known_certs_load(struct dec *d, struct known_certs *k)
{
        size_t cap;

        memset(k, 0, sizeof(*k));
        if (d->c->agent->book && !certstore_error(d->c->agent->book) &&
            certstore_list(d->c->agent->book, NULL, &k->book) < 0)
                memset(&k->book, 0, sizeof(k->book));
        cap = k->book.n + (d->set ? d->set->n : 0);
        k->v = cap ? calloc(cap, sizeof(*k->v)) : NULL;
        if (!k->v)
                return;
        for (size_t i = 0; d->set && i < d->set->n; i++)
                if (d->set->ids[i].cert)
                        k->v[k->n++] = d->set->ids[i].cert;
        for (size_t i = 0; i < k->book.n; i++)
                if (k->book.v[i].cert)
                        k->v[k->n++] = k->book.v[i].cert;
}

static void known_certs_free(struct known_certs *k)
{
        free(k->v);
        cs_list_free(&k->book);
}

/* ", alice@example.org" style suffix for the first known certificate the
 * recipient names. */
static void recipient_email(const struct known_certs *k, CMS_RecipientInfo *ri, CMS_RecipientEncryptedKey *rek,
                            char *out, size_t n)
{
        out[0] = '\0';
        for (size_t i = 0; k && i < k->n; i++) {
                int cmp = rek ? CMS_RecipientEncryptedKey_cert_cmp(rek, k->v[i]) : CMS_RecipientInfo_ktri_cert_cmp(ri, k->v[i]);
                STACK_OF(OPENSSL_STRING) *emails;

                if (cmp != 0)
                        continue;
                emails = X509_get1_email(k->v[i]);
                if (emails && sk_OPENSSL_STRING_num(emails) > 0)
                        snprintf(out, n, " (%s)", sk_OPENSSL_STRING_value(emails, 0));
                X509_email_free(emails);
                if (out[0])
                        break;
        }
        ERR_clear_error();
}

/* One line per recipient (per key for key agreement): how, and to whom. */
static char **list_recipients(STACK_OF(CMS_RecipientInfo) *ris, const struct known_certs *known, size_t *count)
{
        size_t cap = 16, n = 0;
        char **v = malloc(cap * sizeof(*v));

        for (int i = 0; v && i < sk_CMS_RecipientInfo_num(ris); i++) {
                CMS_RecipientInfo *ri = sk_CMS_RecipientInfo_value(ris, i);
                char line[900], id[512], email[300];
                ASN1_OCTET_STRING *keyid = NULL;
                X509_NAME *issuer = NULL;
                ASN1_INTEGER *sno = NULL;
                int type = CMS_RecipientInfo_type(ri);
                int nrek = 1;

                if (type == CMS_RECIPINFO_AGREE)
                        nrek = sk_CMS_RecipientEncryptedKey_num(CMS_RecipientInfo_kari_get0_reks(ri));
                for (int j = 0; j < nrek; j++) {
                        switch (type) {
                        case CMS_RECIPINFO_TRANS:
                                CMS_RecipientInfo_ktri_get0_signer_id(ri, &keyid, &issuer, &sno);
                                describe_rid(id, sizeof(id), keyid, issuer, sno);
                                recipient_email(known, ri, NULL, email, sizeof(email));
                                snprintf(line, sizeof(line), "RSA key transport to %s%s", id, email);
                                break;
                        case CMS_RECIPINFO_AGREE: {
                                CMS_RecipientEncryptedKey *rek =
                                        sk_CMS_RecipientEncryptedKey_value(CMS_RecipientInfo_kari_get0_reks(ri), j);

                                CMS_RecipientEncryptedKey_get0_id(rek, &keyid, NULL, NULL, &issuer, &sno);
                                describe_rid(id, sizeof(id), keyid, issuer, sno);
                                recipient_email(known, ri, rek, email, sizeof(email));
                                snprintf(line, sizeof(line), "key agreement (ECDH) with %s%s", id, email);
                                break;
                        }
                        case CMS_RECIPINFO_KEK:
                                snprintf(line, sizeof(line), "a previously shared key (KEKRecipientInfo)");
                                break;
                        case CMS_RECIPINFO_PASS:
                                snprintf(line, sizeof(line), "a password (PasswordRecipientInfo)");
                                break;
                        default:
                                snprintf(line, sizeof(line), "an unknown kind of recipient");
                                break;
                        }
                        if (n == cap) {
                                char **w = realloc(v, 2 * cap * sizeof(*v));

                                if (!w)
                                        goto fail;
                                v = w;
                                cap *= 2;
                        }
                        if (!(v[n] = strdup(line)))
                                goto fail;
                        n++;
                }
        }
        *count = n;
        return v;
fail:
        while (n > 0)
                free(v[--n]);
        free(v);
        *count = 0;
        return NULL;
}

static void free_list(char **v, size_t n)
{
        while (n > 0)
                free(v[--n]);
        free(v);
}

/* The "you are not a recipient" answer: the sentence names the first
 * recipients, RECIPIENT fields carry all of them. */
static int answer_not_recipient(struct dec *d, const char *restriction)
{
        STACK_OF(CMS_RecipientInfo) *ris = CMS_get0_RecipientInfos(d->cms);
        size_t n = 0, o = 0;
        struct known_certs known;
        char **v;

        known_certs_load(d, &known);
        v = list_recipients(ris, &known, &n);
        known_certs_free(&known);
        char msg[8192];
        struct proto_msg m;
        int r;

        o = (size_t)snprintf(msg, sizeof(msg), "%s: the message is encrypted for %zu recipient%s: ",
                             restriction ? restriction : "none of your tokens holds a key for this message", n,
                             n == 1 ? "" : "s");
        for (size_t i = 0; i < n && i < LIST_IN_MESSAGE && o < sizeof(msg); i++)
                o += (size_t)snprintf(msg + o, sizeof(msg) - o, "%s%s", i ? "; " : "", v[i]);
        if (n > LIST_IN_MESSAGE && o < sizeof(msg))
                o += (size_t)snprintf(msg + o, sizeof(msg) - o, "; and %zu more", n - LIST_IN_MESSAGE);
        if (o < sizeof(msg))
                snprintf(msg + o, sizeof(msg) - o, ". Insert the token holding one of these keys, or ask the sender "
                         "to encrypt to your current certificate");

        proto_msg_init(&m, PROTO_ERROR);
        proto_put_uint(&m, PT_CODE, PE_NOT_RECIPIENT);
        proto_put_string(&m, PT_MESSAGE, msg);
        for (size_t i = 0; i < n; i++)
                proto_put_string(&m, PT_RECIPIENT, v[i]);
        r = proto_msg_error(&m) ? conn_error(d->c, PE_NOT_RECIPIENT, "%s", msg) : proto_write_msg(d->c->fd, &m);
        proto_msg_free(&m);
        log_info("request from pid %d: NOT_RECIPIENT: %s", (int)d->c->pid, msg);
        free_list(v, n);
        return r < 0 ? -1 : 1;
}

static bool id_selected(const struct identity *id, const char *sel, struct token_uri *uri)
{
        if (!sel)
                return true;
        if (uri)
                return token_key_match_uri(id->tk, uri);
        for (size_t i = 0; i < id->n_emails; i++)
                if (strcasecmp(id->emails[i], sel) == 0)
                        return true;
        return false;
}

struct cand {
        CMS_RecipientInfo *ri;
        CMS_RecipientEncryptedKey *rek;         /* key agreement */
        const struct identity *id;
        bool seen;                              /* looked at in this attempt's first pass */
};

static size_t find_candidates(struct dec *d, struct token_uri *uri, struct cand **out)
{
        STACK_OF(CMS_RecipientInfo) *ris = CMS_get0_RecipientInfos(d->cms);
        struct cand *v = NULL;
        size_t n = 0, cap = 0;

        for (int i = 0; i < sk_CMS_RecipientInfo_num(ris); i++) {
                CMS_RecipientInfo *ri = sk_CMS_RecipientInfo_value(ris, i);
                int type = CMS_RecipientInfo_type(ri);
                STACK_OF(CMS_RecipientEncryptedKey) *reks = NULL;
                int nrek = 1;

                if (type == CMS_RECIPINFO_AGREE) {
                        reks = CMS_RecipientInfo_kari_get0_reks(ri);
                        nrek = sk_CMS_RecipientEncryptedKey_num(reks);
                } else if (type != CMS_RECIPINFO_TRANS) {
                        continue;
                }
                for (int j = 0; j < nrek; j++) {
                        CMS_RecipientEncryptedKey *rek = reks ? sk_CMS_RecipientEncryptedKey_value(reks, j) : NULL;

                        for (size_t k = 0; k < d->set->n; k++) {
                                const struct identity *id = &d->set->ids[k];
                                int cmp;

                                if (!id->cert || !id_selected(id, d->key, uri))
                                        continue;
                                cmp = rek ? CMS_RecipientEncryptedKey_cert_cmp(rek, id->cert)
                                          : CMS_RecipientInfo_ktri_cert_cmp(ri, id->cert);
                                if (cmp != 0)
                                        continue;
                                if (!authz_allowed(d->c, id, AUTHZ_DECRYPT)) {
                                        if (!d->denied)
                                                d->denied = id;
                                        continue;
                                }
                                if (n == cap) {
                                        struct cand *w = realloc(v, (cap ? 2 * cap : 4) * sizeof(*v));

                                        if (!w) {
                                                free(v);
                                                *out = NULL;
                                                return 0;
                                        }
                                        v = w;
                                        cap = cap ? 2 * cap : 4;
                                }
                                v[n++] = (struct cand){ .ri = ri, .rek = rek, .id = id };
                        }
                }
        }
        ERR_clear_error();
        *out = v;
        return n;
}

static void note(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(char *buf, size_t n, const char *fmt, ...)
{
        size_t o = strlen(buf);
        va_list ap;

        if (o + 3 >= n)
                return;
        if (o) {
                memcpy(buf + o, "; ", 3);
                o += 2;
        }
        va_start(ap, fmt);
        vsnprintf(buf + o, n - o, fmt, ap);
        va_end(ap);
}

static void describe_transport(struct dec *d, const struct cand *c)
{
        X509_ALGOR *alg = NULL;
        const ASN1_OBJECT *obj = NULL;
        char name[80] = "?";

        if (c->rek)
                CMS_RecipientInfo_kari_get0_alg(c->ri, &alg, NULL);
        else
                CMS_RecipientInfo_ktri_get0_algs(c->ri, NULL, NULL, &alg);
        if (alg) {
                X509_ALGOR_get0(&obj, NULL, NULL, alg);
                OBJ_obj2txt(name, sizeof(name), obj, 0);
        }
        if (!c->rek && OBJ_obj2nid(obj) == NID_rsaEncryption)
                snprintf(d->transport, sizeof(d->transport), "rsa-pkcs1-v1.5");
        else if (!c->rek && OBJ_obj2nid(obj) == NID_rsaesOaep)
                snprintf(d->transport, sizeof(d->transport), "rsa-oaep");
        else
                snprintf(d->transport, sizeof(d->transport), "%s", name);
}

/* Recovers the content key through one candidate. 0 on success; otherwise
 * the reason is appended to why, and the result is the PE_* code of a PIN
 * failure (a context-specific login: never tried on another key) or -1. */
static int try_candidate(struct dec *d, const struct cand *c, const struct token_auth *auth, char *why, size_t n)
{
        const struct identity *id = c->id;
        struct keyprov_ctx kctx = { .auth = auth, .relogin = conn_relogin_cb, .arg = d->c };
        EVP_PKEY *pkey = keyprov_pkey_new(id->tk, id->pub, false, &kctx);
        int ok;

        if (!pkey) {
                note(why, n, "cannot use key '%s' (%s)", id->tk->label, id->key_type);
                return -1;
        }
        keyprov_clear_error();
        ERR_clear_error();
        if (c->rek) {
                ok = CMS_RecipientInfo_kari_set0_pkey_and_peer(c->ri, pkey, NULL) > 0 &&
                     CMS_RecipientInfo_kari_decrypt(d->cms, c->ri, c->rek) > 0;
                CMS_RecipientInfo_kari_set0_pkey_and_peer(c->ri, NULL, NULL);
                EVP_PKEY_free(pkey);
        } else {
                /* The RecipientInfo takes the key and frees it when it gets the next. */
                ok = CMS_RecipientInfo_set0_pkey(c->ri, pkey) > 0 && CMS_RecipientInfo_decrypt(d->cms, c->ri) > 0;
                CMS_RecipientInfo_set0_pkey(c->ri, NULL);
        }
        if (ok) {
                ERR_clear_error();
                describe_transport(d, c);
                d->audit_pending = true;        /* written once the content is through */
                return 0;
        }
        audit_key_use(d->c, AUDIT_DECRYPT, id->tk->uri, id->subject, NULL, PE_DECRYPT_FAILED, audit_now() - d->t0);

        int terr = 0;
        const struct token_error *te = keyprov_last_error(&terr);
        if (te) {
                uint32_t code = conn_token_code(terr, te);

                if (code == PE_PIN_INCORRECT || code == PE_PIN_LOCKED) {
                        snprintf(why, n, "%s", te->message);
                        return (int)code;
                }
                note(why, n, "key '%s' on token '%s' (%s): %s", id->tk->label, id->token_label, id->subject, te->message);
        } else {
                char msg[256];

                openssl_error(msg, sizeof(msg));
                note(why, n, "key '%s' on token '%s' (%s) could not recover the content key: %s", id->tk->label,
                     id->token_label, id->subject, msg);
        }
        return -1;
}

/* Finds a matching key, logs in as needed, and recovers the content key.
 * Returns 0, 1 (answered with an error), or <0 (connection lost). */
static int unlock_content_key(struct dec *d)
{
        struct agent *a = d->c->agent;
        struct token_uri *uri = NULL;
        struct token *logged[8];
        size_t n_logged = 0;
        char why[4096] = "";
        bool usage_only = true, rescanned = false;
        int r = 1;

        if (d->key && strncmp(d->key, "pkcs11:", 7) == 0 && token_uri_parse(d->key, &uri) < 0) {
                r = conn_error(d->c, PE_UNSUPPORTED, "'%s' is not a valid PKCS#11 URI (RFC 7512)", d->key);
                return r < 0 ? -1 : 1;
        }

        for (int attempt = 0; attempt < 4; attempt++) {
                struct cand *cands = NULL;
                size_t nc;
                bool relogged = false;

                identity_set_unref(d->set);
                d->set = identity_set_get(a->store, a->cfg.default_key);
                if (!d->set) {
                        r = conn_error(d->c, PE_INTERNAL, "cannot read the keys of the tokens (out of memory?)");
                        r = r < 0 ? -1 : 1;
                        goto out;
                }
                d->denied = NULL;
                nc = find_candidates(d, uri, &cands);
                if (nc == 0 && d->denied) {
                        /* Recipient keys exist, but this peer has no grant:
                         * the refusal names the key and is audited. */
                        r = authz_check(d->c, d->denied, AUTHZ_DECRYPT);
                        r = r < 0 ? -1 : 1;
                        free(cands);
                        goto out;
                }
                if (nc == 0 && !rescanned) {
                        /* The key may be on a token whose objects changed
                         * since its scan (a card being set up): look again, once. */
                        rescanned = true;
                        if (token_store_rescan(a->store) > 0) {
                                free(cands);
                                continue;
                        }
                }
                if (nc == 0) {
                        char restriction[600];

                        if (d->key) {
                                snprintf(restriction, sizeof(restriction),
                                         "no key matching '%s' is a recipient of this message", d->key);
                        }
                        r = answer_not_recipient(d, d->key ? restriction : NULL);
                        free(cands);
                        goto out;
                }
                why[0] = '\0';
                usage_only = true;
                /* Keys usable without a PIN first: a logged-in token beats a prompt. */
                for (int pass = 0; pass < 2 && !relogged; pass++) {
                        for (size_t i = 0; i < nc; i++) {
                                const struct identity *id = cands[i].id;
                                struct token *t = id->tk->token;
                                bool needs;

                                /* The second pass takes what the first left: a
                                 * token may have been logged in or out since. */
                                if (pass == 1 && cands[i].seen)
                                        continue;
                                needs = conn_needs_login(d->c, id->tk, POLICY_DECRYPT);
                                if (pass == 0 && needs)
                                        continue;
                                cands[i].seen = pass == 0;
                                if (!(cands[i].rek ? id->usage_agree : id->usage_encipher)) {
                                        note(why, sizeof(why), "certificate '%s' on token '%s' does not allow %s "
                                             "(keyUsage, or an extendedKeyUsage without emailProtection), so its "
                                             "key is not used to decrypt", id->subject,
                                             id->token_label, cands[i].rek ? "keyAgreement" : "keyEncipherment");
                                        continue;
                                }
                                usage_only = false;
                                if (needs) {
                                        bool again = false;

                                        for (size_t j = 0; j < n_logged; j++)
                                                again |= logged[j] == t;
                                        if (again) {
                                                note(why, sizeof(why), "token '%s' was logged out again right after "
                                                     "the login", id->token_label);
                                                continue;
                                        }
                                        r = conn_login_key(d->c, id->tk, POLICY_DECRYPT);
                                        if (r != 0) {
                                                free(cands);
                                                r = r < 0 ? -1 : 1;
                                                goto out;
                                        }
                                        if (n_logged < sizeof(logged) / sizeof(logged[0]))
                                                logged[n_logged++] = t;
                                        relogged = true;        /* new snapshot: private keys now visible */
                                        break;
                                }
                                if (!id->tk->has_private) {
                                        note(why, sizeof(why), "certificate '%s' is on token '%s', but no private key "
                                             "with the same CKA_ID is visible", id->subject, id->token_label);
                                        continue;
                                }
                                if (cands[i].rek ? !token_key_can_decrypt(id->tk, TOKEN_DEC_ECDH)
                                                 : !(token_key_can_decrypt(id->tk, TOKEN_DEC_RSA_PKCS) ||
                                                     token_key_can_decrypt(id->tk, TOKEN_DEC_RSA_OAEP) ||
                                                     token_key_can_decrypt(id->tk, TOKEN_DEC_RSA_X509))) {
                                        note(why, sizeof(why), "key '%s' on token '%s' may not be used for %s "
                                             "(its %s attribute is false, or the token lacks %s)", id->tk->label,
                                             id->token_label, cands[i].rek ? "key agreement" : "decryption",
                                             cands[i].rek ? "CKA_DERIVE" : "CKA_DECRYPT",
                                             cands[i].rek ? "CKM_ECDH1_DERIVE" : "CKM_RSA_PKCS");
                                        continue;
                                }
                                struct secret pin = { 0 };
                                struct token_auth auth = { 0 };
                                int tr;

                                if (id->tk->always_authenticate) {
                                        /* The key's PIN for this one use (NEED_PIN in place of a MORE). */
                                        r = conn_context_auth(d->c, id->tk, &pin, &auth);
                                        if (r != 0) {
                                                free(cands);
                                                r = r < 0 ? -1 : 1;
                                                goto out;
                                        }
                                }
                                tr = try_candidate(d, &cands[i], id->tk->always_authenticate ? &auth : NULL, why,
                                                   sizeof(why));
                                secret_free(&pin);
                                if (tr == 0) {
                                        d->used = id;
                                        free(cands);
                                        r = 0;
                                        goto out;
                                }
                                if (tr > 0) {
                                        /* A wrong PIN is not tried on the next key (nor again). */
                                        free(cands);
                                        r = conn_error(d->c, (uint32_t)tr, "%s", why);
                                        r = r < 0 ? -1 : 1;
                                        goto out;
                                }
                        }
                }
                free(cands);
                if (!relogged)
                        break;
        }
        r = conn_error(d->c, usage_only ? PE_KEY_USAGE : PE_DECRYPT_FAILED, "cannot decrypt: %s",
                       why[0] ? why : "no usable key");
        r = r < 0 ? -1 : 1;
out:
        token_uri_free(uri);
        return r;
}

/* ---- Content ------------------------------------------------------------------------ */

static int feed(void *ctx, const uint8_t *p, size_t n)
{
        struct dec *d = ctx;
        int outl = 0;

        if (!EVP_DecryptUpdate(d->cctx, d->out, &outl, p, (int)n))
                return -EIO;
        return outl > 0 ? stream_write(&d->st, d->out, (size_t)outl) : 0;
}

/* Input after the message (a trailing newline, a MIME epilogue) is read
 * and ignored so that the client's END arrives in order. */
static int drain(struct dec *d)
{
        for (;;) {
                ssize_t k = stream_read(&d->st, d->buf, DECRYPT_CHUNK);

                if (k <= 0)
                        return (int)k;
        }
}

static void lower(char *s)
{
        for (; *s; s++)
                *s = (char)tolower((unsigned char)*s);
}

/* The parser reads the client's DATA frames through these. */
static ssize_t io_read(void *ctx, void *buf, size_t n) { return stream_read(ctx, buf, n); }
static ssize_t io_gets(void *ctx, char *buf, size_t n) { return stream_gets(ctx, buf, n); }
static int io_unread(void *ctx, const void *buf, size_t n) { return stream_unread(ctx, buf, n); }

int decrypt_serve(struct conn *c)
{
        struct dec *d = calloc(1, sizeof(*d));
        uint8_t mac[16];
        size_t mac_len = 0;
        int outl = 0, r;

        if (!d)
                return conn_error(c, PE_INTERNAL, "out of memory") < 0 ? -1 : 0;
        d->c = c;
        d->t0 = audit_now();
        c->last_error = 0;
        stream_init(&d->st, c->fd);
        struct cms_in_io io = { .read = io_read, .gets = io_gets, .unread = io_unread, .ctx = &d->st };
        d->buf = malloc(DECRYPT_CHUNK);
        d->out = malloc(DECRYPT_CHUNK + EVP_MAX_BLOCK_LENGTH);
        if (!d->buf || !d->out || cms_in_init(&d->in, &io) < 0) {
                r = conn_error(c, PE_INTERNAL, "out of memory");
                goto done;
        }

        r = parse_opts(d);
        if (r != 0)
                goto done;
        {
                struct proto_msg m;

                proto_msg_init(&m, PROTO_READY);
                r = proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
                if (r < 0)
                        goto done;
        }

        r = cms_in_start(&d->in, d->format);
        if (r < 0) {
                r = input_failure(d, r, NULL);
                goto done;
        }
        r = cms_in_header(&d->in);
        if (r < 0) {
                r = input_failure(d, r, "cannot read the encrypted message");
                goto done;
        }
        d->cms = cms_in_build(&d->in, KEYPROV_PROPQ);
        if (!d->cms) {
                char msg[256];

                openssl_error(msg, sizeof(msg));
                r = conn_error(c, PE_BAD_INPUT, "cannot read the message's recipient information: %s", msg);
                goto done;
        }

        r = unlock_content_key(d);
        if (r != 0)
                goto done;
        /* The audit record carries the SHA-256 of the content handed out. */
        d->content_hash = EVP_MD_CTX_new();
        if (!d->content_hash || !EVP_DigestInit_ex(d->content_hash, EVP_sha256(), NULL)) {
                r = conn_error(c, PE_INTERNAL, "out of memory");
                goto done;
        }
        d->st.hash_out = d->content_hash;

        d->cbio = CMS_dataInit(d->cms, NULL);
        if (!d->cbio) {
                /* Without content OpenSSL gives a null BIO as the source;
                 * older versions want one passed in. */
                BIO *null = BIO_new(BIO_s_null());

                d->cbio = null ? CMS_dataInit(d->cms, null) : NULL;
                if (!d->cbio)
                        BIO_free(null);
        }
        BIO *cb = d->cbio ? BIO_find_type(d->cbio, BIO_TYPE_CIPHER) : NULL;
        if (!cb || BIO_get_cipher_ctx(cb, &d->cctx) <= 0 || !d->cctx) {
                char msg[256];

                openssl_error(msg, sizeof(msg));
                r = conn_error(c, PE_UNSUPPORTED, "cannot set up the content cipher of the message: %s", msg);
                goto done;
        }
        snprintf(d->cipher, sizeof(d->cipher), "%s", EVP_CIPHER_get0_name(EVP_CIPHER_CTX_get0_cipher(d->cctx)));
        lower(d->cipher);

        r = cms_in_content(&d->in, feed, d);
        if (r == -EIO && !d->st.err) {
                r = conn_error(c, PE_INTERNAL, "the content cipher failed");
                goto done;
        }
        if (r == 0)
                r = cms_in_trailer(&d->in, mac, &mac_len);
        if (r < 0) {
                r = input_failure(d, r, "the encrypted message is damaged; discard what was written so far");
                goto done;
        }
        if (drain(d) < 0) {
                r = conn_stream_failure(d->c, &d->st);
                goto done;
        }
        if (d->in.auth && EVP_CIPHER_CTX_ctrl(d->cctx, EVP_CTRL_AEAD_SET_TAG, (int)mac_len, mac) <= 0) {
                r = conn_error(c, PE_INTEGRITY, "the message's MAC does not fit its cipher %s; discard the output", d->cipher);
                goto done;
        }
        if (EVP_DecryptFinal_ex(d->cctx, d->out, &outl) <= 0) {
                ERR_clear_error();
                r = conn_error(c, PE_INTEGRITY, d->in.auth ? "the content failed authentication (%s tag mismatch): the message "
                                                          "was altered or damaged; discard the output"
                                                        : "the content does not decrypt to valid padding (%s): the message "
                                                          "is damaged or the content key is wrong; discard the output",
                               d->cipher);
                goto done;
        }
        if (outl > 0 && stream_write(&d->st, d->out, (size_t)outl) < 0) {
                r = conn_stream_failure(d->c, &d->st);
                goto done;
        }
        {
                struct proto_msg m;

                /* The record is written before the client can see DONE,
                 * with the hash of every byte handed out: the buffered tail
                 * goes first so that the hash covers it. */
                unsigned char dg[32];
                unsigned dlen = 0;

                if (stream_flush(&d->st) < 0) {
                        r = conn_stream_failure(d->c, &d->st);
                        goto done;
                }
                audit_key_use(c, AUDIT_DECRYPT, d->used->tk->uri, d->used->subject,
                              EVP_DigestFinal_ex(d->content_hash, dg, &dlen) && dlen == 32 ? dg : NULL, 0,
                              audit_now() - d->t0);
                d->audit_pending = false;
                proto_msg_init(&m, PROTO_DONE);
                proto_put_uint(&m, PT_BYTES_IN, d->st.bytes_in);
                proto_put_uint(&m, PT_BYTES_OUT, stream_total_out(&d->st));
                proto_put_string(&m, PT_URI, d->used->tk->uri);
                proto_put_string(&m, PT_SUBJECT, d->used->subject);
                proto_put_string(&m, PT_CIPHER, d->cipher);
                proto_put_string(&m, PT_KEY_TRANSPORT, d->transport);
                proto_put_uint(&m, PT_AUTHENTICATED, d->in.auth);
                /* The last of the content and DONE in one write. */
                r = stream_finish(&d->st, &m);
                proto_msg_free(&m);
        }
        log_info("decrypted %llu bytes for uid %u pid %d with %s (%s, %s, %s)", (unsigned long long)d->st.bytes_out,
                 (unsigned)c->uid, (int)c->pid, d->used->tk->uri, d->used->subject, d->transport, d->cipher);
done:
        if (d->audit_pending)
                audit_key_use(c, AUDIT_DECRYPT, d->used->tk->uri, d->used->subject, NULL,
                              c->last_error ? c->last_error : PE_CANCELLED, audit_now() - d->t0);
        EVP_MD_CTX_free(d->content_hash);
        BIO_free_all(d->cbio);
        CMS_ContentInfo_free(d->cms);
        identity_set_unref(d->set);
        free(d->key);
        cms_in_done(&d->in);
        free(d->buf);
        if (d->out)
                OPENSSL_clear_free(d->out, DECRYPT_CHUNK + EVP_MAX_BLOCK_LENGTH);
        stream_done(&d->st);
        free(d);
        return r < 0 ? -1 : 0;
}
