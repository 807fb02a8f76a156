/* certs.c — the CERTS and TRUST requests: list the address book, record a
 * trust decision. Also parses certificates a client sends (DER or PEM).
 *
 * Must never: change a trust decision the client did not name exactly
 * (one fingerprint or one certificate).
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/pem.h>

#include "agent.h"
#include "certs.h"
#include "certstore.h"
#include "log.h"

X509 *certs_parse_one(const uint8_t *p, size_t n)
{
        BIO *b;
        X509 *x = NULL;

        if (n == 0 || n > INT32_MAX)
                return NULL;
        b = BIO_new_mem_buf(p, (int)n);
        if (b && n > 10 && memmem(p, n, "-----BEGIN", 10))
                x = PEM_read_bio_X509(b, NULL, NULL, NULL);
        else if (b)
                x = d2i_X509_bio(b, NULL);
        BIO_free(b);
        ERR_clear_error();
        return x;
}

static void fmt_day(time_t t, char *buf, size_t n)
{
        struct tm tm;

        gmtime_r(&t, &tm);
        strftime(buf, n, "%Y-%m-%d", &tm);
}

void certs_status(struct agent *a, X509 *x, const struct cert_facts *f, enum cs_trust decision,
                  struct cs_check *chk)
{
        certstore_check(a->book, x, NULL, false, 0, chk);
        if (!f->is_ca && strcmp(f->key_type, "RSA") != 0 && strcmp(f->key_type, "EC") != 0) {
                chk->problems |= P_UNSUPPORTED_KEY;
                snprintf(chk->text + strlen(chk->text), sizeof(chk->text) - strlen(chk->text),
                         "%s%s keys cannot receive encrypted mail here (RSA and EC can)",
                         chk->text[0] ? "; " : "", f->key_type);
        }
        (void)decision;
}

void certs_put_entry(struct conn *c, struct proto_msg *m, const struct cs_entry *e)
{
        const struct cert_facts *f = &e->facts;
        struct cs_check chk;
        char status[1200];

        proto_put_string(m, PT_FINGERPRINT, f->fp);
        proto_put_string(m, PT_SUBJECT, f->subject);
        proto_put_string(m, PT_ISSUER, f->issuer);
        proto_put_string(m, PT_SERIAL, f->serial);
        for (size_t i = 0; i < f->n_emails; i++)
                proto_put_string(m, PT_EMAIL, f->emails[i]);
        proto_put_string(m, PT_KEY_TYPE, f->key_type);
        if (f->bits)
                proto_put_uint(m, PT_KEY_BITS, f->bits);
        if (f->curve)
                proto_put_string(m, PT_CURVE, f->curve);
        proto_put_uint(m, PT_NOT_BEFORE, (uint64_t)f->not_before);
        proto_put_uint(m, PT_NOT_AFTER, (uint64_t)f->not_after);
        if (f->usage_sign)
                proto_put_string(m, PT_USAGE, "sign");
        if (f->usage_encrypt)
                proto_put_string(m, PT_USAGE, "encrypt");
        proto_put_string(m, PT_TRUST, e->trust == CS_TRUST_TRUSTED ? "trusted"
                                      : e->trust == CS_TRUST_DISTRUSTED ? "distrusted" : "none");
        proto_put_string(m, PT_SOURCE, e->source);
        proto_put_uint(m, PT_ADDED, (uint64_t)e->added);
        for (unsigned i = 0; e->caps_known && i < CAP_COUNT; i++)
                if (e->caps & (1u << i))
                        proto_put_string(m, PT_CAPS, cs_cap_name(i));
        if (e->caps_known && e->caps == 0)
                proto_put_string(m, PT_CAPS, "none");

        certs_status(c->agent, e->cert, f, e->trust, &chk);
        for (unsigned i = 0; i < CS_PROBLEM_COUNT; i++)
                if (chk.problems & (1u << i))
                        proto_put_string(m, PT_PROBLEM, cs_problem_name(i));
        if (f->is_ca) {
                snprintf(status, sizeof(status), "CA certificate%s%s", chk.problems ? ": " : "",
                         chk.problems ? chk.text : (strcmp(chk.trust, "untrusted") ? ", trusted" : ""));
        } else if (chk.problems) {
                snprintf(status, sizeof(status), "cannot be encrypted to: %s", chk.text);
        } else {
                char d[16];

                fmt_day(f->not_after, d, sizeof(d));
                snprintf(status, sizeof(status), "ok: valid until %s, %s", d,
                         strcmp(chk.trust, "trusted-by-you") == 0 ? "trusted by you" : "issued by a trusted CA");
        }
        proto_put_uint(m, PT_USABLE, !f->is_ca && chk.problems == 0);
        proto_put_string(m, PT_TRUST_PATH, chk.trust);
        proto_put_string(m, PT_STATUS_TEXT, status);
}

static int book_error(struct conn *c)
{
        const char *e = certstore_error(c->agent->book);

        return e ? conn_error(c, PE_STORE, "%s", e) : 1;
}

int certs_serve(struct conn *c)
{
        struct cs_list l;
        char *email = NULL;
        int r;

        if ((r = book_error(c)) <= 0)
                return r;
        if (proto_get_string(c->frame.body, c->frame.len, PT_EMAIL, &email) == -ENOMEM)
                return conn_error(c, PE_INTERNAL, "out of memory");
        if (certstore_list(c->agent->book, email && *email ? email : NULL, &l) < 0) {
                free(email);
                return conn_error(c, PE_INTERNAL, "out of memory");
        }
        free(email);
        r = 0;
        for (size_t i = 0; i < l.n && r >= 0; i++) {
                struct proto_msg m;

                proto_msg_init(&m, PROTO_CERT);
                certs_put_entry(c, &m, &l.v[i]);
                r = proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
        }
        cs_list_free(&l);
        return r < 0 ? r : proto_write_empty(c->fd, PROTO_DONE);
}

/* "AB:CD:..." or "abcd..." to 64 lowercase hex digits; false if not one. */
static bool normalise_fp(const char *in, char out[65])
{
        size_t n = 0;

        for (const char *p = in; *p; p++) {
                if (*p == ':' || *p == ' ')
                        continue;
                if (!isxdigit((unsigned char)*p) || n == 64)
                        return false;
                out[n++] = (char)tolower((unsigned char)*p);
        }
        out[n] = '\0';
        return n == 64;
}

int trust_serve(struct conn *c)
{
        const uint8_t *p = c->frame.body, *data = NULL;
        size_t n = c->frame.len, len = 0;
        char *decision = NULL, *fp_in = NULL, fp[65] = "", err[1024];
        enum cs_trust t;
        struct cs_entry e;
        struct proto_msg m;
        X509 *x = NULL;
        int r;

        if ((r = book_error(c)) <= 0)
                return r;
        if (proto_get_string(p, n, PT_TRUST, &decision) < 0 ||
            (strcmp(decision, "trusted") && strcmp(decision, "distrusted") && strcmp(decision, "none"))) {
                r = conn_error(c, PE_UNSUPPORTED, "TRUST needs TRUST = trusted, distrusted or none");
                goto out;
        }
        t = strcmp(decision, "trusted") == 0 ? CS_TRUST_TRUSTED
            : strcmp(decision, "distrusted") == 0 ? CS_TRUST_DISTRUSTED : CS_TRUST_NONE;
        if (proto_get_raw(p, n, PT_CERT_DATA, &data, &len) == 0) {
                if (!(x = certs_parse_one(data, len))) {
                        r = conn_error(c, PE_BAD_INPUT, "the certificate sent is neither a DER nor a PEM X.509 "
                                       "certificate");
                        goto out;
                }
        } else if (proto_get_string(p, n, PT_FINGERPRINT, &fp_in) < 0 || !normalise_fp(fp_in, fp)) {
                r = conn_error(c, PE_BAD_INPUT, "name the certificate by its SHA-256 fingerprint (64 hex digits, "
                               "as `smimectl certs` shows) or send the certificate itself");
                goto out;
        }
        r = certstore_set_trust(c->agent->book, x, fp, t, &e, err, sizeof(err));
        if (r < 0) {
                r = conn_error(c, r == -ENOENT ? PE_NOT_FOUND : PE_STORE, "%s", err);
                goto out;
        }
        log_info("pid %d set trust of %s (%s) to %s", (int)c->pid, e.facts.fp, e.facts.subject, decision);
        proto_msg_init(&m, PROTO_CERT);
        certs_put_entry(c, &m, &e);
        r = proto_write_msg(c->fd, &m);
        proto_msg_free(&m);
        cs_entry_clear(&e);
        if (r == 0)
                r = proto_write_empty(c->fd, PROTO_DONE);
out:
        X509_free(x);
        free(decision);
        free(fp_in);
        return r;
}
