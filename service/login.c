/* login.c — the PIN cache policy as requests see it, and the LOGIN and
 * LOCK requests (smimectl login / smimectl lock).
 *
 * SIGN and DECRYPT ask conn_needs_login() for each key they are about to
 * use: a token that is not logged in, or whose cached login the policy no
 * longer lets this use of this key reuse, needs conn_login_key() first.
 * Every login a request relies on is held until the request ends, so the
 * expiry thread never logs a token out under a running signature.
 *
 * conn_context_auth() finds the PIN for a CKA_ALWAYS_AUTHENTICATE key's
 * context-specific login (token/ makes the login itself, between the
 * operation's Init and the operation).
 *
 * Must never: log in without being asked to (LOGIN, or a request that
 * needs the key), or keep a PIN beyond the request (policy.c keeps one only
 * for always-authenticate = reuse).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "agent.h"
#include "identity.h"
#include "log.h"
#include "policy.h"

static struct conn_hold *held(struct conn *c, struct token *t)
{
        for (size_t i = 0; i < c->n_holds; i++)
                if (c->holds[i].token == t)
                        return &c->holds[i];
        return NULL;
}

static void remember_hold(struct conn *c, const struct token_key *k, int use)
{
        struct conn_hold *h = &c->holds[c->n_holds++];

        h->token = k->token;
        h->id_len = k->id_len < sizeof(h->id) ? k->id_len : sizeof(h->id);
        memcpy(h->id, k->id, h->id_len);
        h->use = use;
}

bool conn_needs_login(struct conn *c, const struct token_key *k, int use)
{
        struct token *t = k->token;

        if (!token_login_required(t))
                return false;
        if (token_needs_login(t))
                return true;
        if (held(c, t) || (c->fresh_login == t))
                return false;
        if (c->n_holds == sizeof(c->holds) / sizeof(c->holds[0])) {
                /* Never happens with the few tokens one request touches;
                 * decide without holding rather than leak a hold. */
                bool ok = policy_try_reuse(c->agent, k, (enum policy_use)use);

                if (ok)
                        policy_release(c->agent, t, k->id, k->id_len, (enum policy_use)use);
                return !ok;
        }
        if (!policy_try_reuse(c->agent, k, (enum policy_use)use))
                return true;
        remember_hold(c, k, use);
        return false;
}

int conn_login_key(struct conn *c, const struct token_key *k, int use)
{
        struct token *t = k->token;
        int r;

        /* Logged in, but the policy wants the PIN again: log out first, or
         * C_Login would not check the PIN at all. */
        c->relogin = token_is_logged_in(t);
        r = conn_login(c, t);
        c->relogin = false;
        if (r == 0 && !held(c, t) && c->n_holds < sizeof(c->holds) / sizeof(c->holds[0])) {
                policy_hold(c->agent, k, (enum policy_use)use);
                remember_hold(c, k, use);
        }
        return r;
}

bool conn_login_is_silent(struct conn *c, struct token *t)
{
        char path[4096], why[256];
        struct token_info ti;
        struct token_error e;

        if (policy_pin_source(&c->agent->cfg, t, path, sizeof(path), why, sizeof(why)) > 0)
                return true;
        return token_get_info(t, &ti, &e) == 0 && ti.protected_auth_path;
}

int conn_relogin_cb(void *conn, struct token *t)
{
        return conn_relogin_quietly(conn, t);
}

int conn_context_auth(struct conn *c, const struct token_key *k, struct secret *pin, struct token_auth *auth)
{
        struct token *t = k->token;
        struct token_error e = { 0 };
        struct token_info ti;
        bool ask = false;
        int r;

        r = token_get_info(t, &ti, &e);
        if (r < 0) {
                r = conn_error(c, conn_token_code(r, &e), "%s", e.message);
                return r < 0 ? r : PE_TOKEN;
        }
        *auth = (struct token_auth){ NULL, 0 };
        if (ti.protected_auth_path)
                return conn_pin_pad(c, &ti, k->label);
        if (c->login_pin_token == t && c->login_pin.p) {
                r = secret_alloc(pin, c->login_pin.len + 1);
                if (r < 0)
                        goto nomem;
                memcpy(pin->p, c->login_pin.p, c->login_pin.len);
                pin->len = c->login_pin.len;
        } else if (policy_context_reuse(&c->agent->cfg, k)) {
                char path[4096], why[512];
                int src = policy_pin_source(&c->agent->cfg, t, path, sizeof(path), why, sizeof(why));

                if (src > 0) {
                        r = secret_read_file(pin, path);
                        if (r < 0) {
                                r = conn_error(c, PE_PIN_REQUIRED, "key '%s' on token '%s' needs the PIN for every use, "
                                               "but the PIN file %s cannot be read: %s", k->label, ti.label, path,
                                               strerror(-r));
                                return r < 0 ? r : PE_PIN_REQUIRED;
                        }
                } else {
                        r = policy_copy_pin(t, pin);
                        if (r < 0)
                                goto nomem;
                        ask = r == 0;   /* nothing kept (the login used a PIN pad, or came before the setting) */
                }
        } else {
                ask = true;
        }
        if (ask) {
                r = conn_ask_pin(c, &ti, k->label, pin);
                if (r != 0)
                        return r;
        }
        auth->pin = pin->p;
        auth->pin_len = pin->len;
        return 0;
nomem:
        r = conn_error(c, PE_INTERNAL, "out of memory for the PIN");
        return r < 0 ? r : PE_INTERNAL;
}

void conn_request_done(struct conn *c)
{
        for (size_t i = 0; i < c->n_holds; i++)
                policy_release(c->agent, c->holds[i].token, c->holds[i].id, c->holds[i].id_len,
                               (enum policy_use)c->holds[i].use);
        c->n_holds = 0;
        c->fresh_login = NULL;
        c->relogin = false;
        secret_free(&c->login_pin);
        c->login_pin_token = NULL;
}

static const char *state_name(enum token_state s)
{
        switch (s) {
        case TOKEN_STATE_REMOVED: return "removed";
        case TOKEN_STATE_UNRESPONSIVE: return "unresponsive";
        default: return "present";
        }
}

void conn_put_token_state(struct conn *c, struct proto_msg *m, struct token *t, const struct token_info *ti)
{
        proto_put_string(m, PT_TOKEN_STATE, state_name(ti->state));
        if (ti->login_required)
                policy_put_status(c->agent, m, t, ti->logged_in);
}

/* ---- LOGIN and LOCK ------------------------------------------------------- */

/* The tokens a LOGIN/LOCK selector names: a PKCS#11 URI (its token
 * attributes), or an e-mail address (the tokens of the identities with
 * it). No selector: every token. Returns how many were put in out. */
static size_t select_tokens(struct conn *c, const char *sel, struct token **out, size_t max, int *err)
{
        struct token_store *s = c->agent->store;
        size_t n = 0, nt = token_store_token_count(s);

        *err = 0;
        if (sel && strncmp(sel, "pkcs11:", 7) == 0) {
                struct token_uri *u = NULL;

                if (token_uri_parse(sel, &u) < 0) {
                        *err = -EINVAL;
                        return 0;
                }
                for (size_t i = 0; i < nt && n < max; i++) {
                        struct token *t = token_store_token(s, i);

                        if (t && token_match_uri(t, u))
                                out[n++] = t;
                }
                token_uri_free(u);
                return n;
        }
        if (sel && *sel) {
                struct identity_set *set = identity_set_get(s, c->agent->cfg.default_key);

                if (!set) {
                        *err = -ENOMEM;
                        return 0;
                }
                for (size_t i = 0; i < set->n; i++) {
                        const struct identity *id = &set->ids[i];
                        bool match = false, dup = false;

                        for (size_t k = 0; k < id->n_emails; k++)
                                match |= strcasecmp(id->emails[k], sel) == 0;
                        for (size_t j = 0; j < n; j++)
                                dup |= out[j] == id->tk->token;
                        if (match && !dup && n < max)
                                out[n++] = id->tk->token;
                }
                identity_set_unref(set);
                return n;
        }
        for (size_t i = 0; i < nt && n < max; i++) {
                struct token *t = token_store_token(s, i);

                if (t)
                        out[n++] = t;
        }
        return n;
}

/* DONE with one TOKEN group per token: where each stands now. */
static int answer_tokens(struct conn *c, struct token **tokens, size_t n, long logged_out)
{
        struct proto_msg m;
        int r;

        proto_msg_init(&m, PROTO_DONE);
        if (logged_out >= 0)
                proto_put_uint(&m, PT_LOGGED_OUT, (uint64_t)logged_out);
        for (size_t i = 0; i < n; i++) {
                struct token_info ti;
                struct token_error e;

                if (token_get_info(tokens[i], &ti, &e) < 0)
                        continue;
                proto_begin_group(&m, PT_TOKEN);
                proto_put_string(&m, PT_TOKEN_LABEL, ti.label);
                proto_put_string(&m, PT_URI, ti.uri);
                proto_put_string(&m, PT_MODULE_NAME, ti.module_name);
                proto_put_uint(&m, PT_LOGIN_REQUIRED, ti.login_required);
                proto_put_uint(&m, PT_LOGGED_IN, ti.logged_in);
                conn_put_token_state(c, &m, tokens[i], &ti);
                proto_end_group(&m);
        }
        r = proto_write_msg(c->fd, &m);
        proto_msg_free(&m);
        return r;
}

static int selection(struct conn *c, const char *what, char **sel, struct token **tokens, size_t max, size_t *n)
{
        int err, r;

        *sel = NULL;
        if (proto_get_string(c->frame.body, c->frame.len, PT_KEY, sel) == -ENOMEM)
                return -ENOMEM;
        *n = select_tokens(c, *sel, tokens, max, &err);
        if (err == -EINVAL) {
                r = conn_error(c, PE_UNSUPPORTED, "'%s' is not a valid PKCS#11 URI (RFC 7512)", *sel);
                return r < 0 ? r : 1;
        }
        if (err < 0) {
                r = conn_error(c, PE_INTERNAL, "cannot read the tokens (out of memory?)");
                return r < 0 ? r : 1;
        }
        if (*n == 0) {
                r = conn_error(c, PE_NO_KEY, "%s: no token matches '%s'; `smimectl status` lists the tokens and "
                               "their URIs", what, *sel ? *sel : "(any)");
                return r < 0 ? r : 1;
        }
        return 0;
}

int conn_serve_login(struct conn *c)
{
        struct token *tokens[64];
        char *sel = NULL;
        size_t n = 0, tried = 0;
        int r;

        r = selection(c, "login", &sel, tokens, sizeof(tokens) / sizeof(tokens[0]), &n);
        if (r != 0)
                goto out;
        for (size_t i = 0; i < n; i++) {
                struct token_info ti;
                struct token_error e;

                if (token_get_info(tokens[i], &ti, &e) < 0 || ti.state != TOKEN_STATE_PRESENT) {
                        if (sel) {
                                r = conn_error(c, PE_TOKEN_REMOVED, "token '%s' is not present (%s); insert it and "
                                               "try again", token_label(tokens[i]),
                                               ti.state == TOKEN_STATE_UNRESPONSIVE ? "its module does not answer"
                                                                                    : "removed");
                                goto out;
                        }
                        continue;
                }
                if (!token_needs_login(tokens[i]))
                        continue;
                tried++;
                r = conn_login(c, tokens[i]);
                if (r != 0)
                        goto out;
                log_info("pid %d logged in to token '%s' ahead of time", (int)c->pid, ti.label);
        }
        (void)tried;
        r = answer_tokens(c, tokens, n, -1);
out:
        free(sel);
        return r < 0 ? -1 : 0;
}

int conn_serve_lock(struct conn *c)
{
        struct token *tokens[64];
        char *sel = NULL, failed[2048] = "";
        size_t n = 0, fo = 0;
        long out = 0;
        int r;

        r = selection(c, "lock", &sel, tokens, sizeof(tokens) / sizeof(tokens[0]), &n);
        if (r != 0)
                goto done;
        for (size_t i = 0; i < n; i++) {
                struct token_error e = { 0 };

                if (!token_is_logged_in(tokens[i])) {
                        policy_forget(tokens[i]);
                        continue;
                }
                if (token_logout(tokens[i], &e) < 0) {
                        if (fo < sizeof(failed))
                                fo += (size_t)snprintf(failed + fo, sizeof(failed) - fo, "%s%s", fo ? "; " : "",
                                                       e.message);
                        continue;
                }
                policy_forget(tokens[i]);
                out++;
                log_info("pid %d locked token '%s' (logged out)", (int)c->pid, token_label(tokens[i]));
        }
        if (failed[0]) {
                r = conn_error(c, PE_TOKEN, "could not log out of every token: %s", failed);
                goto done;
        }
        r = answer_tokens(c, tokens, n, out);
done:
        free(sel);
        return r < 0 ? -1 : 0;
}
