/* policy.c — the PIN cache policy and the thread that ends cached logins.
 *
 *   cache-idle = 600                 # log out after 600 s without use (default)
 *   cache-lifetime = 28800           # and at the latest 8 h after the login (default: no limit)
 *   decrypt-cache-idle = ask         # decryption asks for the PIN every time
 *
 *   [token pkcs11:token=gateway-hsm]
 *   cache-idle = 86400               # a gateway HSM stays logged in for a day of quiet
 *   pin-file = /etc/smime-agent/hsm.pin
 *
 *   [key pkcs11:token=PIV;id=%02]
 *   sign-cache-idle = ask            # the non-repudiation key: PIN for every signature
 *
 * Times are measured on CLOCK_MONOTONIC in milliseconds; only status output
 * turns them into wall-clock times.
 *
 *   [key pkcs11:token=PIV;id=%02]
 *   always-authenticate = reuse      # CKA_ALWAYS_AUTHENTICATE key: no PIN question per use
 *
 * Must never: log a PIN, or keep one other than for always-authenticate =
 * reuse (kept_pins: locked memory, wiped when the login ends).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "agent.h"
#include "log.h"
#include "policy.h"
#include "secret.h"

/* ---- Configuration ------------------------------------------------------ */

static struct policy_rule *rule_new(struct agent_config *cfg)
{
        struct policy_rule *v = realloc(cfg->rules, (cfg->n_rules + 1) * sizeof(*v));

        if (!v)
                return NULL;
        cfg->rules = v;
        v = &cfg->rules[cfg->n_rules++];
        memset(v, 0, sizeof(*v));
        v->idle_all = v->lifetime_all = POLICY_UNSET;
        for (int u = 0; u < POLICY_USES; u++)
                v->idle[u] = v->lifetime[u] = POLICY_UNSET;
        return v;
}

static struct policy_rule *current_rule(struct agent_config *cfg)
{
        if (cfg->n_rules == 0 && !rule_new(cfg))
                return NULL;
        return &cfg->rules[cfg->in_section ? cfg->n_rules - 1 : 0];
}

int policy_config_section(struct agent_config *cfg, const char *header, char *why, size_t n)
{
        struct policy_rule *r;
        const char *sel;
        bool key;

        if (strncmp(header, "token ", 6) == 0) {
                key = false;
                sel = header + 6;
        } else if (strncmp(header, "key ", 4) == 0) {
                key = true;
                sel = header + 4;
        } else {
                snprintf(why, n, "unknown section [%s]; use [token PKCS11-URI] or [key PKCS11-URI]", header);
                return -EINVAL;
        }
        while (*sel == ' ' || *sel == '\t')
                sel++;
        if (cfg->n_rules == 0 && !rule_new(cfg))   /* the global one comes first */
                return -ENOMEM;
        r = rule_new(cfg);
        if (!r)
                return -ENOMEM;
        cfg->in_section = true;
        r->key_section = key;
        r->selector = strdup(sel);
        if (!r->selector)
                return -ENOMEM;
        if (strncmp(sel, "pkcs11:", 7) != 0 || token_uri_parse(sel, &r->uri) < 0) {
                snprintf(why, n, "[%s]: '%s' is not a PKCS#11 URI (RFC 7512), e.g. pkcs11:token=my-card%s", header, sel,
                         key ? ";id=%01" : "");
                return -EINVAL;
        }
        return 0;
}

/* "ask" (or 0) for idle times: ask every time. */
static int parse_seconds(const char *v, bool ask_ok, long *out)
{
        char *end;
        long x;

        if (ask_ok && strcasecmp(v, "ask") == 0) {
                *out = 0;
                return 0;
        }
        if (!ask_ok && strcasecmp(v, "none") == 0) {
                *out = 0;
                return 0;
        }
        errno = 0;
        x = strtol(v, &end, 10);
        if (errno || end == v || *end || x < 0 || x > 365L * 24 * 3600)
                return -EINVAL;
        *out = x;
        return 0;
}

int policy_config_set(struct agent_config *cfg, const char *key, const char *value, char *why, size_t n)
{
        static const struct {
                const char *prefix;
                int use;        /* -1: both */
        } uses[] = { { "", -1 }, { "sign-", POLICY_SIGN }, { "decrypt-", POLICY_DECRYPT } };
        struct policy_rule *r = current_rule(cfg);
        long v;

        if (!r)
                return -ENOMEM;
        for (size_t i = 0; i < sizeof(uses) / sizeof(uses[0]); i++) {
                size_t pl = strlen(uses[i].prefix);
                bool idle;

                if (strncmp(key, uses[i].prefix, pl) != 0)
                        continue;
                if (strcmp(key + pl, "cache-idle") == 0)
                        idle = true;
                else if (strcmp(key + pl, "cache-lifetime") == 0)
                        idle = false;
                else
                        continue;
                if (parse_seconds(value, idle, &v) < 0) {
                        snprintf(why, n, "%s must be a number of seconds%s, not '%s'", key,
                                 idle ? " or 'ask' (0: ask for the PIN every time)" : " or 'none' (0: no limit)", value);
                        return -EINVAL;
                }
                long *all = idle ? &r->idle_all : &r->lifetime_all;
                long *per = idle ? r->idle : r->lifetime;
                if (uses[i].use < 0)
                        *all = v;
                else
                        per[uses[i].use] = v;
                return 1;
        }
        if (strcmp(key, "pin-credential") == 0 || (strcmp(key, "pin-file") == 0 && cfg->in_section)) {
                char **dst = strcmp(key, "pin-file") == 0 ? &r->pin_file : &r->pin_credential;

                if (r->key_section || (!cfg->in_section && dst == &r->pin_file)) {
                        snprintf(why, n, "%s belongs in a [token URI] section (a PIN belongs to a token)", key);
                        return -EINVAL;
                }
                if (strcmp(key, "pin-credential") == 0 && (strchr(value, '/') || !*value || value[0] == '.')) {
                        snprintf(why, n, "pin-credential is the name of a systemd credential (LoadCredential=NAME:...), "
                                 "not a path: '%s'", value);
                        return -EINVAL;
                }
                free(*dst);
                *dst = strdup(value);
                return *dst ? 1 : -ENOMEM;
        }
        if (strcmp(key, "always-authenticate") == 0) {
                if (strcasecmp(value, "ask") == 0)
                        r->always_auth = POLICY_AUTH_ASK;
                else if (strcasecmp(value, "reuse") == 0)
                        r->always_auth = POLICY_AUTH_REUSE;
                else {
                        snprintf(why, n, "always-authenticate must be 'ask' (the PIN is asked for every use of a "
                                 "CKA_ALWAYS_AUTHENTICATE key) or 'reuse' (the agent uses the PIN it has), not '%s'",
                                 value);
                        return -EINVAL;
                }
                return 1;
        }
        if (strcmp(key, "hotplug-poll") == 0 || strcmp(key, "call-timeout") == 0) {
                if (cfg->in_section) {
                        snprintf(why, n, "%s is a global setting; put it before the first [section]", key);
                        return -EINVAL;
                }
                if (parse_seconds(value, false, &v) < 0 || v > 3600) {
                        snprintf(why, n, "%s must be a number of seconds from 0 to 3600, not '%s'", key, value);
                        return -EINVAL;
                }
                if (key[0] == 'h')
                        cfg->hotplug_poll = (unsigned)v + 1;   /* +1: 0 means "not configured" */
                else
                        cfg->call_timeout = (unsigned)v + 1;
                return 1;
        }
        return 0;
}

void policy_config_free(struct agent_config *cfg)
{
        for (size_t i = 0; i < cfg->n_rules; i++) {
                free(cfg->rules[i].selector);
                free(cfg->rules[i].pin_file);
                free(cfg->rules[i].pin_credential);
                token_uri_free(cfg->rules[i].uri);
        }
        free(cfg->rules);
        cfg->rules = NULL;
        cfg->n_rules = 0;
}

static bool rule_applies(const struct policy_rule *r, struct token *t, const struct token_key *k)
{
        if (!r->selector)
                return true;
        if (!r->uri)
                return false;
        if (r->key_section)
                return k && token_key_match_uri(k, r->uri);
        return token_match_uri(t, r->uri);
}

int policy_pin_source(const struct agent_config *cfg, struct token *t, char *path, size_t n, char *why, size_t wn)
{
        const char *file = cfg->pin_file, *cred = NULL, *dir;

        /* The global section, then [token] sections in order: the last wins. */
        for (size_t i = 0; i < cfg->n_rules; i++) {
                const struct policy_rule *r = &cfg->rules[i];

                if (r->key_section || !rule_applies(r, t, NULL))
                        continue;
                if (r->pin_credential) {
                        cred = r->pin_credential;
                        file = NULL;
                }
                if (r->pin_file) {
                        file = r->pin_file;
                        cred = NULL;
                }
        }
        if (cred) {
                dir = getenv("CREDENTIALS_DIRECTORY");
                if (!dir || !*dir) {
                        snprintf(why, wn, "its PIN is configured as the systemd credential '%s' and "
                                 "$CREDENTIALS_DIRECTORY is not set; run the agent as a systemd service with "
                                 "LoadCredential=%s:FILE (or LoadCredentialEncrypted=)", cred, cred);
                        return -ENOENT;
                }
                snprintf(path, n, "%s/%s", dir, cred);
                return 1;
        }
        if (file) {
                snprintf(path, n, "%s", file);
                return 1;
        }
        return 0;
}

bool policy_context_reuse(const struct agent_config *cfg, const struct token_key *k)
{
        int v = POLICY_AUTH_ASK;

        for (size_t i = 0; i < cfg->n_rules; i++)
                if (cfg->rules[i].always_auth != POLICY_AUTH_UNSET && rule_applies(&cfg->rules[i], k->token, k))
                        v = cfg->rules[i].always_auth;
        return v == POLICY_AUTH_REUSE;
}

bool policy_keeps_pin(const struct agent_config *cfg, struct token *t)
{
        for (size_t i = 0; i < cfg->n_rules; i++) {
                const struct policy_rule *r = &cfg->rules[i];

                if (r->always_auth != POLICY_AUTH_REUSE)
                        continue;
                /* A [key] section counts when its URI's token attributes fit t. */
                if (!r->selector || (r->uri && token_match_uri(t, r->uri)))
                        return true;
        }
        return false;
}

/* *from_key: a [key] section decided the idle time (then the key's own
 * last use is what counts). */
static void resolve(const struct agent_config *cfg, struct token *t, const struct token_key *k, enum policy_use u,
                    long *idle, long *lifetime, bool *from_key)
{
        *idle = POLICY_DEFAULT_IDLE;
        *lifetime = 0;
        *from_key = false;
        for (size_t i = 0; i < cfg->n_rules; i++) {
                const struct policy_rule *r = &cfg->rules[i];
                long ri = r->idle[u] != POLICY_UNSET ? r->idle[u] : r->idle_all;
                long rl = r->lifetime[u] != POLICY_UNSET ? r->lifetime[u] : r->lifetime_all;

                if (!rule_applies(r, t, k))
                        continue;
                if (ri != POLICY_UNSET) {
                        *idle = ri;
                        *from_key = r->key_section;
                }
                if (rl != POLICY_UNSET)
                        *lifetime = rl;
        }
}

void policy_resolve(const struct agent_config *cfg, struct token *t, const struct token_key *k, enum policy_use u,
                    long *idle, long *lifetime)
{
        bool from_key;

        resolve(cfg, t, k, u, idle, lifetime, &from_key);
}

/* ---- Login state -------------------------------------------------------- */

struct login_state {
        struct token *t;
        int64_t login_at;               /* ms, CLOCK_MONOTONIC */
        int64_t last_use[POLICY_USES];  /* 0: not used since the login */
        unsigned holds;
        bool expiring;                  /* being logged out by the expiry thread */
};

struct key_use {
        struct token *t;
        uint8_t id[256];
        size_t id_len;
        int64_t last_use[POLICY_USES];
};

/* always-authenticate = reuse: the PIN of a token's current login. */
struct kept_pin {
        struct token *t;
        struct secret pin;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake;
static struct kept_pin kept_pins[8];
static struct login_state *states;
static size_t n_states, cap_states;
static struct key_use *key_uses;
static size_t n_key_uses, cap_key_uses;

static int64_t now_ms(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Caller holds lock. NULL only when out of memory. */
static struct login_state *state_of(struct token *t, bool create)
{
        for (size_t i = 0; i < n_states; i++)
                if (states[i].t == t)
                        return &states[i];
        if (!create)
                return NULL;
        if (n_states == cap_states) {
                size_t cap = cap_states ? 2 * cap_states : 8;
                struct login_state *v = realloc(states, cap * sizeof(*v));

                if (!v)
                        return NULL;
                states = v;
                cap_states = cap;
        }
        memset(&states[n_states], 0, sizeof(states[0]));
        states[n_states].t = t;
        states[n_states].login_at = now_ms();
        return &states[n_states++];
}

/* Caller holds lock. */
static void pin_drop(struct token *t)
{
        for (size_t i = 0; i < sizeof(kept_pins) / sizeof(kept_pins[0]); i++)
                if (kept_pins[i].t == t) {
                        secret_free(&kept_pins[i].pin);
                        kept_pins[i].t = NULL;
                }
}

void policy_keep_pin(struct token *t, const char *pin, size_t len)
{
        struct kept_pin *slot = NULL;

        pthread_mutex_lock(&lock);
        pin_drop(t);
        for (size_t i = 0; i < sizeof(kept_pins) / sizeof(kept_pins[0]) && !slot; i++)
                if (!kept_pins[i].t)
                        slot = &kept_pins[i];
        /* More tokens than slots: that token's always-authenticate keys ask. */
        if (slot && secret_alloc(&slot->pin, len + 1) == 0) {
                memcpy(slot->pin.p, pin, len);
                slot->pin.len = len;
                slot->t = t;
        }
        pthread_mutex_unlock(&lock);
}

int policy_copy_pin(struct token *t, struct secret *pin)
{
        int r = 0;

        pthread_mutex_lock(&lock);
        for (size_t i = 0; i < sizeof(kept_pins) / sizeof(kept_pins[0]) && r == 0; i++) {
                if (kept_pins[i].t != t)
                        continue;
                r = secret_alloc(pin, kept_pins[i].pin.len + 1);
                if (r == 0) {
                        memcpy(pin->p, kept_pins[i].pin.p, kept_pins[i].pin.len);
                        pin->len = kept_pins[i].pin.len;
                        r = 1;
                }
        }
        pthread_mutex_unlock(&lock);
        return r;
}

static void state_drop(struct token *t)
{
        pin_drop(t);
        for (size_t i = 0; i < n_states; i++)
                if (states[i].t == t) {
                        states[i] = states[--n_states];
                        break;
                }
        for (size_t i = 0; i < n_key_uses;) {
                if (key_uses[i].t == t)
                        key_uses[i] = key_uses[--n_key_uses];
                else
                        i++;
        }
}

static struct key_use *key_use_of(struct token *t, const uint8_t *id, size_t id_len, bool create)
{
        if (id_len > sizeof(key_uses[0].id))
                id_len = sizeof(key_uses[0].id);
        for (size_t i = 0; i < n_key_uses; i++)
                if (key_uses[i].t == t && key_uses[i].id_len == id_len && memcmp(key_uses[i].id, id, id_len) == 0)
                        return &key_uses[i];
        if (!create)
                return NULL;
        if (n_key_uses == cap_key_uses) {
                size_t cap = cap_key_uses ? 2 * cap_key_uses : 16;
                struct key_use *v = realloc(key_uses, cap * sizeof(*v));

                if (!v)
                        return NULL;
                key_uses = v;
                cap_key_uses = cap;
        }
        struct key_use *k = &key_uses[n_key_uses++];
        memset(k, 0, sizeof(*k));
        k->t = t;
        memcpy(k->id, id, id_len);
        k->id_len = id_len;
        return k;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* When the login ends for use u of the token (no key sections), in ms. */
static int64_t use_expiry(const struct agent_config *cfg, const struct login_state *st, enum policy_use u)
{
        long idle, lifetime;
        bool from_key;
        int64_t base, e;

        resolve(cfg, st->t, NULL, u, &idle, &lifetime, &from_key);
        base = max64(st->login_at, st->last_use[u]);
        e = base + (int64_t)idle * 1000;
        if (lifetime > 0)
                e = min64(e, st->login_at + (int64_t)lifetime * 1000);
        return e;
}

static int64_t token_expiry(const struct agent_config *cfg, const struct login_state *st)
{
        int64_t e = 0;

        for (int u = 0; u < POLICY_USES; u++)
                e = max64(e, use_expiry(cfg, st, u));
        return e;
}

static void hold_locked(struct login_state *st, const struct token_key *k, enum policy_use u, int64_t now)
{
        struct key_use *ku = key_use_of(k->token, k->id, k->id_len, true);

        st->holds++;
        st->last_use[u] = now;
        if (ku)
                ku->last_use[u] = now;
}

bool policy_try_reuse(struct agent *a, const struct token_key *k, enum policy_use u)
{
        struct token *t = k->token;
        struct login_state *st;
        long idle, lifetime;
        bool from_key, ok = false;
        int64_t now = now_ms(), base;

        if (!token_is_logged_in(t))
                return false;
        pthread_mutex_lock(&lock);
        st = state_of(t, true);
        if (!st || st->expiring)
                goto out;
        resolve(&a->cfg, t, k, u, &idle, &lifetime, &from_key);
        if (idle == 0)
                goto out;
        base = st->login_at;
        if (from_key) {
                struct key_use *ku = key_use_of(t, k->id, k->id_len, false);

                if (ku)
                        base = max64(base, ku->last_use[u]);
        } else {
                base = max64(base, st->last_use[u]);
        }
        if (now - base > (int64_t)idle * 1000)
                goto out;
        if (lifetime > 0 && now - st->login_at > (int64_t)lifetime * 1000)
                goto out;
        hold_locked(st, k, u, now);
        ok = true;
out:
        pthread_mutex_unlock(&lock);
        return ok;
}

void policy_hold(struct agent *a, const struct token_key *k, enum policy_use u)
{
        struct login_state *st;

        pthread_mutex_lock(&lock);
        st = state_of(k->token, true);
        if (st)
                hold_locked(st, k, u, now_ms());
        pthread_mutex_unlock(&lock);
}

void policy_release(struct agent *a, struct token *t, const uint8_t *id, size_t id_len, enum policy_use u)
{
        struct login_state *st;
        int64_t now = now_ms();

        pthread_mutex_lock(&lock);
        st = state_of(t, false);
        if (st) {
                struct key_use *ku = key_use_of(t, id, id_len, false);

                if (st->holds > 0)
                        st->holds--;
                st->last_use[u] = now;
                if (ku)
                        ku->last_use[u] = now;
                /* "Ask every time": the thread logs out right away. */
                if (st->holds == 0 && token_expiry(&a->cfg, st) <= now)
                        pthread_cond_signal(&wake);
        }
        pthread_mutex_unlock(&lock);
}

void policy_note_login(struct token *t)
{
        struct login_state *st;

        pthread_mutex_lock(&lock);
        pin_drop(t);    /* a new login: the caller keeps its PIN again if the policy says so */
        st = state_of(t, true);
        if (st) {
                st->login_at = now_ms();
                memset(st->last_use, 0, sizeof(st->last_use));
                st->expiring = false;
        }
        for (size_t i = 0; i < n_key_uses; i++)
                if (key_uses[i].t == t)
                        memset(key_uses[i].last_use, 0, sizeof(key_uses[i].last_use));
        pthread_mutex_unlock(&lock);
}

void policy_forget(struct token *t)
{
        pthread_mutex_lock(&lock);
        state_drop(t);
        pthread_mutex_unlock(&lock);
}

/* ---- Status ------------------------------------------------------------- */

static uint64_t wall(int64_t mono_ms, int64_t now)
{
        int64_t left = mono_ms - now;

        return (uint64_t)(time(NULL) + (left > 0 ? (left + 999) / 1000 : 0));
}

static void describe(const struct agent_config *cfg, struct token *t, char *buf, size_t n)
{
        long idle[POLICY_USES], life[POLICY_USES];
        size_t o = 0;

        for (int u = 0; u < POLICY_USES; u++)
                policy_resolve(cfg, t, NULL, u, &idle[u], &life[u]);
        for (int u = 0; u < POLICY_USES && o < n; u++) {
                if (u == 1 && idle[0] == idle[1] && life[0] == life[1])
                        break;
                const char *who = (idle[0] == idle[1] && life[0] == life[1]) ? "sign and decrypt" :
                                  u == POLICY_SIGN ? "sign" : "decrypt";
                if (idle[u] == 0)
                        o += (size_t)snprintf(buf + o, n - o, "%s%s: ask for the PIN every time", o ? "; " : "", who);
                else
                        o += (size_t)snprintf(buf + o, n - o, "%s%s: log out after %ld s idle%s", o ? "; " : "", who,
                                              idle[u], life[u] ? "" : ", no lifetime limit");
                if (o < n && idle[u] != 0 && life[u])
                        o += (size_t)snprintf(buf + o, n - o, " or %ld s after the login", life[u]);
        }
}

void policy_put_status(struct agent *a, struct proto_msg *m, struct token *t, bool logged_in)
{
        char text[512] = "";
        int64_t now = now_ms();

        if (logged_in) {
                struct login_state *st;

                pthread_mutex_lock(&lock);
                st = state_of(t, true);
                if (st) {
                        proto_put_uint(m, PT_LOGIN_EXPIRES, wall(token_expiry(&a->cfg, st), now));
                        proto_put_uint(m, PT_SIGN_EXPIRES, wall(use_expiry(&a->cfg, st, POLICY_SIGN), now));
                        proto_put_uint(m, PT_DECRYPT_EXPIRES, wall(use_expiry(&a->cfg, st, POLICY_DECRYPT), now));
                }
                pthread_mutex_unlock(&lock);
        }
        describe(&a->cfg, t, text, sizeof(text));
        proto_put_string(m, PT_LOGIN_POLICY, text);
}

/* ---- The expiry thread -------------------------------------------------- */

static void *expiry_main(void *arg)
{
        struct agent *a = arg;

        for (;;) {
                struct token *out[32];
                size_t n_out = 0, n_tokens = token_store_token_count(a->store);
                int64_t now = now_ms(), next = now + 1000;

                /* Logins that happened without a note (they count from now). */
                for (size_t i = 0; i < n_tokens; i++) {
                        struct token *t = token_store_token(a->store, i);

                        if (t && token_is_logged_in(t)) {
                                pthread_mutex_lock(&lock);
                                (void)state_of(t, true);
                                pthread_mutex_unlock(&lock);
                        }
                }

                pthread_mutex_lock(&lock);
                for (size_t i = 0; i < n_states;) {
                        struct login_state *st = &states[i];
                        int64_t e;

                        if (!token_is_logged_in(st->t)) {
                                state_drop(st->t);      /* moves another state into slot i */
                                continue;
                        }
                        e = token_expiry(&a->cfg, st);
                        if (e <= now && st->holds == 0 && !st->expiring && n_out < sizeof(out) / sizeof(out[0])) {
                                st->expiring = true;
                                out[n_out++] = st->t;
                        } else if (e > now) {
                                next = min64(next, e);
                        }
                        i++;
                }
                pthread_mutex_unlock(&lock);

                for (size_t i = 0; i < n_out; i++) {
                        struct token_error e = { 0 };

                        if (token_logout(out[i], &e) < 0)
                                log_error("cached login of token '%s' expired, but logging out failed: %s",
                                          token_label(out[i]), e.message);
                        else
                                log_info("logged out of token '%s': its cached login expired (PIN cache policy)",
                                         token_label(out[i]));
                        policy_forget(out[i]);
                }

                pthread_mutex_lock(&lock);
                if (n_out == 0) {
                        struct timespec until;
                        int64_t wait = max64(next - now_ms(), 10);

                        clock_gettime(CLOCK_MONOTONIC, &until);
                        until.tv_sec += wait / 1000;
                        until.tv_nsec += (wait % 1000) * 1000000L;
                        if (until.tv_nsec >= 1000000000L) {
                                until.tv_sec++;
                                until.tv_nsec -= 1000000000L;
                        }
                        pthread_cond_timedwait(&wake, &lock, &until);
                }
                pthread_mutex_unlock(&lock);
        }
        return NULL;
}

int policy_start(struct agent *a)
{
        pthread_condattr_t ca;
        pthread_attr_t attr;
        pthread_t th;
        int r;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&wake, &ca);
        pthread_condattr_destroy(&ca);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        r = pthread_create(&th, &attr, expiry_main, a);
        pthread_attr_destroy(&attr);
        return -r;
}
