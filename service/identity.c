/* identity.c — pair token keys with their parsed certificates and choose
 * the one a request asks for.
 *
 * Must never: call PKCS#11 (token/ does), or report a key as able to sign
 * when its certificate forbids it.
 */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/asn1.h>
#include <openssl/bn.h>
#include <openssl/objects.h>
#include <openssl/x509v3.h>

#include "certstore.h"
#include "identity.h"
#include "proto.h"

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct identity_set *cache;

static void load_key_facts(struct identity *id)
{
        const struct token_key *tk = id->tk;

        id->key_type = "unknown";
        switch (tk->type) {
        case TOKEN_KEY_RSA:
                id->key_type = "RSA";
                id->bits = (unsigned)tk->modulus_bits;
                break;
        case TOKEN_KEY_EC:
        case TOKEN_KEY_EDDSA: {
                static const unsigned char ed25519_name[] = "\x13\x0c" "edwards25519";
                const unsigned char *p = tk->ec_params;
                ASN1_OBJECT *oid = p ? d2i_ASN1_OBJECT(NULL, &p, (long)tk->ec_params_len) : NULL;
                int nid = oid ? OBJ_obj2nid(oid) : NID_undef;

                ASN1_OBJECT_free(oid);
                /* PKCS#11 3.0 also allows a PrintableString curve name (SoftHSM does this). */
                if (tk->ec_params && tk->ec_params_len == sizeof(ed25519_name) - 1 &&
                    memcmp(tk->ec_params, ed25519_name, tk->ec_params_len) == 0)
                        nid = NID_ED25519;
                id->key_type = tk->type == TOKEN_KEY_EC ? "EC" : "EdDSA";
                if (nid == NID_ED25519) {
                        id->key_type = "Ed25519";
                        id->bits = 256;
                } else if (nid != NID_undef) {
                        id->curve = cs_curve_name(nid);
                        id->bits = nid == NID_X9_62_prime256v1 ? 256 : nid == NID_secp384r1 ? 384
                                                                     : nid == NID_secp521r1 ? 521 : 0;
                }
                break;
        }
        default:
                break;
        }
}

static void load_usage(struct identity *id)
{
        uint32_t ku, xku;

        if (!id->cert) {
                id->usage_sign = id->tk->can_sign;
                id->usage_decrypt = id->tk->can_decrypt || id->tk->can_derive;
                id->usage_encipher = id->tk->can_decrypt;
                id->usage_agree = id->tk->can_derive;
                return;
        }
        ku = X509_get_key_usage(id->cert);      /* UINT32_MAX when absent */
        xku = X509_get_extended_key_usage(id->cert);
        bool eku_ok = xku == UINT32_MAX || (xku & (XKU_SMIME | XKU_ANYEKU));
        id->usage_sign = eku_ok && (ku & (KU_DIGITAL_SIGNATURE | KU_NON_REPUDIATION));
        id->usage_encipher = eku_ok && (ku & KU_KEY_ENCIPHERMENT);
        id->usage_agree = eku_ok && (ku & KU_KEY_AGREEMENT);
        id->usage_decrypt = id->usage_encipher || id->usage_agree;
}

static void identity_fill(struct identity *id, const struct token_key *tk)
{
        id->tk = tk;
        if (tk->cert_der) {
                const unsigned char *p = tk->cert_der;

                id->cert = d2i_X509(NULL, &p, (long)tk->cert_len);
        }
        if (id->cert) {
                /* What the address book says of any certificate. */
                struct cert_facts f;

                cert_facts_load(&f, id->cert);
                id->pub = X509_get_pubkey(id->cert);
                memcpy(id->subject, f.subject, sizeof(id->subject));
                memcpy(id->issuer, f.issuer, sizeof(id->issuer));
                memcpy(id->serial, f.serial, sizeof(id->serial));
                id->not_before = f.not_before;
                id->not_after = f.not_after;
                id->key_type = f.key_type;
                id->bits = f.bits;
                id->curve = f.curve;
                id->emails = f.emails;          /* moved */
                id->n_emails = f.n_emails;
                f.emails = NULL;
                f.n_emails = 0;
                cert_facts_clear(&f);
        }
        if (!id->pub)
                load_key_facts(id);     /* from the token's attributes */
        load_usage(id);
}

static void identity_set_free(struct identity_set *set)
{
        for (size_t i = 0; i < set->n; i++) {
                struct identity *id = &set->ids[i];

                X509_free(id->cert);
                EVP_PKEY_free(id->pub);
                for (size_t k = 0; k < id->n_emails; k++)
                        free(id->emails[k]);
                free(id->emails);
        }
        free(set->ids);
        token_keys_unref(set->snap);
        free(set);
}

static struct identity_set *identity_set_build(struct token_keys *snap)
{
        struct identity_set *set = calloc(1, sizeof(*set));

        if (!set)
                return NULL;
        set->snap = snap;
        set->ids = calloc(snap->n ? snap->n : 1, sizeof(*set->ids));
        if (!set->ids) {
                free(set);
                return NULL;
        }
        for (size_t i = 0; i < snap->n; i++) {
                const struct token_key *tk = snap->keys[i];
                struct identity *id = &set->ids[set->n];
                struct token_info ti;

                /* A certificate alone with no key (a CA on the token) is not an
                 * identity, but it stays in the snapshot for chain building. */
                if (!tk->has_private && !tk->has_public && tk->cert_der) {
                        const unsigned char *p = tk->cert_der;
                        X509 *c = d2i_X509(NULL, &p, (long)tk->cert_len);
                        bool ca = c && X509_check_ca(c) > 0;

                        X509_free(c);
                        if (ca)
                                continue;
                }
                identity_fill(id, tk);
                if (token_get_info(tk->token, &ti, NULL) == 0)
                        snprintf(id->token_label, sizeof(id->token_label), "%s", ti.label);
                set->n++;
        }
        set->refs = 1;  /* the cache's */
        return set;
}

static void mark_default(struct identity_set *set, const char *default_selector)
{
        const struct identity *d = NULL;
        char msg[64];

        if (default_selector && identity_select(set, default_selector, NULL, NULL, NULL, &d, msg, sizeof(msg)) == 0)
                ((struct identity *)d)->is_default = true;
}

struct identity_set *identity_set_get(struct token_store *s, const char *default_selector)
{
        struct token_keys *snap = token_store_keys(s);
        struct identity_set *set, *old = NULL;

        if (!snap)
                return NULL;
        pthread_mutex_lock(&cache_lock);
        if (cache && cache->snap == snap) {
                token_keys_unref(snap);
                cache->refs++;
                set = cache;
                pthread_mutex_unlock(&cache_lock);
                return set;
        }
        pthread_mutex_unlock(&cache_lock);

        /* Parse outside the lock; the snapshot is immutable. */
        set = identity_set_build(snap);
        if (!set) {
                token_keys_unref(snap);
                return NULL;
        }
        mark_default(set, default_selector);

        pthread_mutex_lock(&cache_lock);
        if (cache && cache->snap == snap) {
                /* Another thread built the same one meanwhile. */
                cache->refs++;
                old = set;
                set = cache;
        } else {
                if (cache && --cache->refs == 0)
                        old = cache;
                cache = set;
                set->refs++;
        }
        pthread_mutex_unlock(&cache_lock);
        if (old)
                identity_set_free(old);
        return set;
}

void identity_set_unref(struct identity_set *set)
{
        bool last;

        if (!set)
                return;
        pthread_mutex_lock(&cache_lock);
        last = --set->refs == 0;
        pthread_mutex_unlock(&cache_lock);
        if (last)
                identity_set_free(set);
}

static void fmt_date(time_t t, char *buf, size_t n)
{
        struct tm tm;

        gmtime_r(&t, &tm);
        strftime(buf, n, "%Y-%m-%d %H:%M UTC", &tm);
}

int identity_sign_problem(const struct identity *id, char *buf, size_t n)
{
        time_t now = time(NULL);
        char d[40];

        switch (token_get_state(id->tk->token)) {
        case TOKEN_STATE_REMOVED:
                snprintf(buf, n, "token '%s' holding key '%s' was removed (or its module lost it); insert it again: "
                         "the agent takes it back within seconds, without a restart", id->token_label, id->tk->label);
                return PE_TOKEN_REMOVED;
        case TOKEN_STATE_UNRESPONSIVE:
                snprintf(buf, n, "token '%s' holding key '%s' is not answering: a call into its module did not "
                         "return within the call timeout; requests fail at once until it does", id->token_label,
                         id->tk->label);
                return PE_TOKEN;
        default:
                break;
        }
        if (!id->cert) {
                snprintf(buf, n, "key '%s' on token '%s' has no certificate; store its certificate on the token "
                         "with the same CKA_ID (e.g. pkcs11-tool --write-object CERT --type cert --id ID)",
                         id->tk->label, id->token_label);
                return PE_NO_CERT;
        }
        if (now < id->not_before) {
                fmt_date(id->not_before, d, sizeof(d));
                snprintf(buf, n, "certificate '%s' is not valid before %s", id->subject, d);
                return PE_CERT_EXPIRED;
        }
        if (now > id->not_after) {
                fmt_date(id->not_after, d, sizeof(d));
                snprintf(buf, n, "certificate '%s' expired on %s; renew it and store the new certificate on the token",
                         id->subject, d);
                return PE_CERT_EXPIRED;
        }
        if (!id->usage_sign) {
                snprintf(buf, n, "certificate '%s' does not allow signing e-mail (keyUsage needs digitalSignature or "
                         "nonRepudiation, extendedKeyUsage emailProtection); choose another key",
                         id->subject);
                return PE_KEY_USAGE;
        }
        if (id->tk->has_private && !id->tk->can_sign) {
                snprintf(buf, n, "the private key '%s' on token '%s' does not allow signing (CKA_SIGN is false)",
                         id->tk->label, id->token_label);
                return PE_KEY_USAGE;
        }
        buf[0] = '\0';
        return 0;
}

static bool email_matches(const struct identity *id, const char *e)
{
        for (size_t i = 0; i < id->n_emails; i++)
                if (strcasecmp(id->emails[i], e) == 0)
                        return true;
        return false;
}

static void describe(const struct identity *id, char *buf, size_t n)
{
        snprintf(buf, n, "%s (%s)", id->n_emails ? id->emails[0] : id->tk->label, id->tk->uri);
}

static void list_candidates(const struct identity_set *set, const struct identity **v, size_t nv,
                            identity_visible_fn visible, const void *ctx, char *msg, size_t n)
{
        size_t used = strlen(msg), listed = 0;

        for (size_t i = 0; i < nv && used + 4 < n; i++) {
                const struct identity *id = v ? v[i] : &set->ids[i];
                char d[1400];

                if (visible && !visible(ctx, id))
                        continue;
                describe(id, d, sizeof(d));
                snprintf(msg + used, n - used, "%s%s", listed++ ? "; " : " ", d);
                used = strlen(msg);
        }
        if (listed == 0 && used + 8 < n)
                snprintf(msg + used, n - used, " none you may use");
}

int identity_select(struct identity_set *set, const char *selector, const char *default_selector,
                    identity_visible_fn visible, const void *ctx, const struct identity **out, char *msg, size_t n)
{
        const struct identity **hits = NULL;
        size_t nhits = 0, nusable = 0;
        struct token_uri *uri = NULL;
        char why[512];
        int r = 0;

        msg[0] = '\0';
        if (!selector || !*selector)
                selector = default_selector;
        if (selector && *selector && strncmp(selector, "pkcs11:", 7) == 0 && token_uri_parse(selector, &uri) < 0) {
                snprintf(msg, n, "'%s' is not a valid PKCS#11 URI (RFC 7512)", selector);
                return PE_UNSUPPORTED;
        }
        hits = calloc(set->n ? set->n : 1, sizeof(*hits));
        if (!hits) {
                token_uri_free(uri);
                snprintf(msg, n, "out of memory");
                return PE_INTERNAL;
        }
        for (size_t i = 0; i < set->n; i++) {
                const struct identity *id = &set->ids[i];
                bool m;

                if (uri)
                        m = token_key_match_uri(id->tk, uri);
                else if (selector && *selector)
                        m = email_matches(id, selector);
                else
                        m = identity_sign_problem(id, why, sizeof(why)) == 0;
                if (m)
                        hits[nhits++] = id;
        }
        token_uri_free(uri);

        /* Several matches: prefer the ones that can sign (an expired
         * certificate next to its renewal must not make the choice ambiguous). */
        for (size_t i = 0; i < nhits; i++)
                if (identity_sign_problem(hits[i], why, sizeof(why)) == 0)
                        hits[nusable++] = hits[i];
        if (nusable == 0 && nhits > 0)
                nusable = 1;    /* keep the first: its problem is what the user needs to hear */
        else
                nhits = nusable;

        if (nhits == 1) {
                *out = hits[0];
        } else if (nhits == 0) {
                if (selector && *selector)
                        snprintf(msg, n, "no key matches '%s' on any token; available:", selector);
                else
                        snprintf(msg, n, "no key on any token can sign; keys found:");
                if (set->n == 0)
                        snprintf(msg, n, "%s", selector && *selector ?
                                 "no key matches: no token with keys was found (is the token inserted and its module configured?)" :
                                 "no token with keys was found (is the token inserted and its module configured?)");
                else
                        list_candidates(set, NULL, set->n, visible, ctx, msg, n);
                r = PE_NO_KEY;
        } else {
                snprintf(msg, n, "%s matches several keys; choose one with --key URI or set default-key in the "
                         "configuration:", selector && *selector ? selector : "no key was named and");
                list_candidates(set, hits, nhits, visible, ctx, msg, n);
                r = PE_AMBIGUOUS_KEY;
        }
        free(hits);
        return r;
}

STACK_OF(X509) *identity_chain(struct identity_set *set, const struct identity *id, STACK_OF(X509) *extra)
{
        STACK_OF(X509) *pool = sk_X509_new_null(), *chain = sk_X509_new_null();
        X509 *cur = id->cert;

        if (!pool || !chain || !cur)
                goto done;
        for (size_t i = 0; i < set->snap->n; i++) {
                const struct token_key *tk = set->snap->keys[i];
                const unsigned char *p = tk->cert_der;
                X509 *c = p ? d2i_X509(NULL, &p, (long)tk->cert_len) : NULL;

                if (c && !sk_X509_push(pool, c))
                        X509_free(c);
        }
        for (int i = 0; extra && i < sk_X509_num(extra); i++) {
                X509 *c = sk_X509_value(extra, i);

                if (X509_up_ref(c) && !sk_X509_push(pool, c))
                        X509_free(c);
        }
        /* Walk up by issuer name and signature; stop at a self-signed
         * certificate or after a sane depth. */
        for (int depth = 0; depth < 10; depth++) {
                X509 *issuer = NULL;

                if (X509_check_issued(cur, cur) == X509_V_OK)
                        break;
                for (int i = 0; i < sk_X509_num(pool); i++) {
                        X509 *c = sk_X509_value(pool, i);
                        EVP_PKEY *k = X509_get0_pubkey(c);

                        if (X509_check_issued(c, cur) == X509_V_OK && k && X509_verify(cur, k) == 1) {
                                issuer = c;
                                break;
                        }
                }
                if (!issuer || X509_cmp(issuer, id->cert) == 0)
                        break;
                if (!X509_up_ref(issuer) || !sk_X509_push(chain, issuer))
                        break;
                cur = issuer;
        }
done:
        sk_X509_pop_free(pool, X509_free);
        return chain;
}
