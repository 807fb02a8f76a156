/* conn.c — one client connection: handshake, then one request at a time.
 *
 * Each connection runs on its own thread with blocking I/O (as gpg-agent
 * does): a slow token operation or a slow client holds only its own thread,
 * never the accept loop or other clients. A malformed frame ends this
 * connection only.
 *
 * Must never: log a PIN, keep a PIN after the login call, or answer a
 * request before the peer said HELLO.
 */
#include <errno.h>
#include <pthread.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "agent.h"
#include "authz.h"
#include "identity.h"
#include "log.h"
#include "pinentry.h"
#include "secret.h"
#include "stream.h"

/* p11-kit's pkcs11.h values used to classify failures (token.h keeps the
 * rv as a plain number so that service/ does not need PKCS#11 headers). */
#define RV_PIN_INCORRECT 0xa0ul
#define RV_PIN_LOCKED 0xa4ul
#define RV_PIN_EXPIRED 0xa3ul
#define RV_DEVICE_REMOVED 0x32ul
#define RV_TOKEN_NOT_PRESENT 0xe0ul
#define RV_SESSION_HANDLE_INVALID 0xb3ul
#define RV_USER_NOT_LOGGED_IN 0x101ul
#define RV_KEY_FUNCTION_NOT_PERMITTED 0x68ul
#define RV_MECHANISM_INVALID 0x70ul

uint32_t conn_token_code(int r, const struct token_error *e)
{
        switch (e ? e->rv : 0) {
        case RV_PIN_INCORRECT: return PE_PIN_INCORRECT;
        case RV_PIN_LOCKED:
        case RV_PIN_EXPIRED: return PE_PIN_LOCKED;
        case RV_DEVICE_REMOVED:
        case RV_TOKEN_NOT_PRESENT:
        case RV_SESSION_HANDLE_INVALID: return PE_TOKEN_REMOVED;
        case RV_USER_NOT_LOGGED_IN: return PE_PIN_REQUIRED;
        case RV_KEY_FUNCTION_NOT_PERMITTED: return PE_KEY_USAGE;
        case RV_MECHANISM_INVALID: return PE_MECHANISM;
        }
        if (r == -ENOENT)
                return PE_NO_PRIVATE_KEY;
        return PE_TOKEN;
}

int conn_stream_failure(struct conn *c, const struct stream *st)
{
        if (st->err == -EPROTO || st->err == -EMSGSIZE) {
                conn_error(c, st->err == -EMSGSIZE ? PE_TOO_LARGE : PE_PROTOCOL,
                           st->err == -EMSGSIZE ? "a frame or DATA chunk is over the protocol limit"
                                                : "expected DATA or END during the content stream");
                return -1;
        }
        log_info("connection from pid %d closed during the content stream", (int)c->pid);
        return -1;
}

int conn_error(struct conn *c, uint32_t code, const char *fmt, ...)
{
        char msg[4096];
        va_list ap;
        int r;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        log_info("pid %d: %s: %s", (int)c->pid, proto_error_name(code), msg);
        c->last_error = code;
        r = proto_write_error(c->fd, code, msg);
        if (r < 0)
                return r;
        if (code == PE_PROTOCOL || code == PE_TOO_LARGE || code == PE_VERSION)
                return -EPROTO;
        return 0;
}

static const char *pin_state_name(enum token_pin_state s)
{
        switch (s) {
        case TOKEN_PIN_COUNT_LOW: return "count-low";
        case TOKEN_PIN_FINAL_TRY: return "final-try";
        case TOKEN_PIN_LOCKED: return "locked";
        default: return "ok";
        }
}

static void put_token_fields(struct proto_msg *m, const struct token_info *ti)
{
        proto_put_string(m, PT_TOKEN_LABEL, ti->label);
        proto_put_string(m, PT_MANUFACTURER, ti->manufacturer);
        proto_put_string(m, PT_MODEL, ti->model);
        proto_put_string(m, PT_TOKEN_SERIAL, ti->serial);
        proto_put_string(m, PT_URI, ti->uri);
        proto_put_string(m, PT_PIN_STATE, pin_state_name(ti->pin_state));
}

/* One C_Login, or C_Logout + C_Login when the policy wants the PIN checked
 * again although the token is logged in. */
static int do_login(struct conn *c, struct token *t, const char *pin, size_t len, struct token_error *e)
{
        int r = c->relogin ? token_relogin(t, pin, len, e) : token_login(t, pin, len, e);

        if (r == 0) {
                policy_note_login(t);
                c->fresh_login = t;
        }
        return r;
}

static int login_result(struct conn *c, struct token *t, int r, const struct token_error *e)
{
        if (r == 0)
                return 0;
        r = conn_error(c, conn_token_code(r, e), "%s", e->message[0] ? e->message : "login failed");
        return r < 0 ? r : PE_PIN_INCORRECT;
}

/* A PIN file the token rejected is not tried again until it changes:
 * retrying a wrong PIN on every request is how cards get locked. */
struct rejected_pin {
        struct token *token;
        dev_t dev;
        ino_t ino;
        off_t size;
        struct timespec mtime;
};

static pthread_mutex_t rejected_lock = PTHREAD_MUTEX_INITIALIZER;
static struct rejected_pin rejected[32];

static bool same_file(const struct rejected_pin *r, struct token *t, const struct stat *st)
{
        return r->token == t && r->dev == st->st_dev && r->ino == st->st_ino && r->size == st->st_size &&
               r->mtime.tv_sec == st->st_mtim.tv_sec && r->mtime.tv_nsec == st->st_mtim.tv_nsec;
}

static bool pin_file_rejected(struct token *t, const struct stat *st)
{
        bool found = false;

        pthread_mutex_lock(&rejected_lock);
        for (size_t i = 0; i < sizeof(rejected) / sizeof(rejected[0]) && !found; i++)
                found = same_file(&rejected[i], t, st);
        pthread_mutex_unlock(&rejected_lock);
        return found;
}

static void pin_file_remember(struct token *t, const struct stat *st, bool bad)
{
        const size_t n = sizeof(rejected) / sizeof(rejected[0]);
        size_t slot = n;

        pthread_mutex_lock(&rejected_lock);
        /* This token's entry, else a free one, else the first. */
        for (size_t i = 0; i < n && slot == n; i++)
                if (rejected[i].token == t)
                        slot = i;
        for (size_t i = 0; i < n && slot == n; i++)
                if (!rejected[i].token)
                        slot = i;
        if (slot == n)
                slot = 0;
        if (bad)
                rejected[slot] = (struct rejected_pin){ t, st->st_dev, st->st_ino, st->st_size, st->st_mtim };
        else if (rejected[slot].token == t)
                rejected[slot].token = NULL;
        pthread_mutex_unlock(&rejected_lock);
}

/* quiet: no ERROR to the client (a request already streaming logs in again
 * after a LOCK); a failure is logged and returns -1. */
static int login_with_pin_file(struct conn *c, struct token *t, const struct token_info *ti, const char *path,
                               bool quiet)
{
        struct token_error e = { 0 };
        struct secret pin;
        struct stat st;
        int r;

        r = stat(path, &st) < 0 ? -errno : secret_read_file(&pin, path);
        if (r < 0 && quiet) {
                log_error("token '%s': cannot read the PIN file %s again: %s", ti->label, path, strerror(-r));
                return -1;
        }
        if (r < 0) {
                r = conn_error(c, PE_PIN_REQUIRED, "token '%s' needs its PIN, but the PIN file %s cannot be read: %s",
                               ti->label, path, strerror(-r));
                return r < 0 ? r : PE_PIN_REQUIRED;
        }
        if (pin_file_rejected(t, &st)) {
                secret_free(&pin);
                if (quiet)
                        return -1;
                r = conn_error(c, PE_PIN_INCORRECT, "token '%s' already rejected the PIN in %s; it is not tried again "
                               "until the file changes (a wrong PIN tried repeatedly locks the token)", ti->label, path);
                return r < 0 ? r : PE_PIN_INCORRECT;
        }
        r = do_login(c, t, pin.p, pin.len, &e);
        secret_free(&pin);
        pin_file_remember(t, &st, r < 0 && (e.rv == RV_PIN_INCORRECT || e.rv == RV_PIN_LOCKED));
        if (r < 0 && quiet) {
                log_error("token '%s': logging in again from %s failed: %s", ti->label, path, e.message);
                return -1;
        }
        if (r < 0 && e.rv == RV_PIN_INCORRECT) {
                r = conn_error(c, PE_PIN_INCORRECT, "%s (PIN from %s; fix the file, the agent will not try it again "
                               "until it changes)", e.message, path);
                return r < 0 ? r : PE_PIN_INCORRECT;
        }
        return login_result(c, t, r, &e);
}

/* Sends NEED_PIN (PROTECTED_AUTH = 1 for a PIN pad notice; CONTEXT_KEY =
 * key_label) and reads the answer into c->frame, waiting at most
 * pin-timeout seconds: a client that never answers must not hold the
 * request (and the logins it holds) forever. 0 with c->frame a PIN; else
 * as conn_ask_pin() (a timeout closes the connection: a late answer would
 * arrive out of turn). */
static int need_pin(struct conn *c, const struct token_info *ti, const char *key_label, bool pad)
{
        unsigned wait = c->agent->cfg.pin_timeout ? c->agent->cfg.pin_timeout : PIN_TIMEOUT_DEFAULT;
        struct timeval tv = { .tv_sec = wait }, none = { 0 };
        struct proto_msg m;
        int r;

        proto_msg_init(&m, PROTO_NEED_PIN);
        put_token_fields(&m, ti);
        if (pad)
                proto_put_uint(&m, PT_PROTECTED_AUTH, 1);
        if (key_label)
                proto_put_string(&m, PT_CONTEXT_KEY, key_label);
        r = proto_write_msg(c->fd, &m);
        proto_msg_free(&m);
        if (r < 0)
                return r;
        (void)setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        r = proto_read_frame(c->fd, &c->frame);
        (void)setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
        if (r == -EAGAIN || r == -EWOULDBLOCK) {
                conn_error(c, PE_PIN_REQUIRED, "no answer to NEED_PIN for %s%s%stoken '%s' within %u s "
                           "(pin-timeout); the request is abandoned and the connection closed",
                           key_label ? "key '" : "", key_label ? key_label : "", key_label ? "' on " : "", ti->label,
                           wait);
                return -ETIMEDOUT;
        }
        if (r <= 0)
                return r < 0 ? r : -ECONNRESET;
        if (c->frame.type == PROTO_CANCEL) {
                r = conn_error(c, PE_CANCELLED, "%s for %s%s%stoken '%s' was cancelled",
                               pad ? "PIN pad entry" : "PIN entry", key_label ? "key '" : "",
                               key_label ? key_label : "", key_label ? "' on " : "", ti->label);
                return r < 0 ? r : PE_CANCELLED;
        }
        if (c->frame.type != PROTO_PIN) {
                proto_frame_wipe(&c->frame);
                r = conn_error(c, PE_PROTOCOL, "expected PIN or CANCEL after NEED_PIN, got %s",
                               proto_type_name(c->frame.type));
                return r < 0 ? r : PE_PROTOCOL;
        }
        return 0;
}

int conn_pin_pad(struct conn *c, const struct token_info *ti, const char *key_label)
{
        int r;

        log_info("pid %d: %s%s%stoken '%s' logs in on its PIN pad: the PIN is typed on the reader", (int)c->pid,
                 key_label ? "key '" : "", key_label ? key_label : "", key_label ? "' on " : "", ti->label);
        if (!c->pin_pad_notice)
                return 0;
        r = need_pin(c, ti, key_label, true);
        proto_frame_wipe(&c->frame);    /* a PIN sent anyway is not used */
        return r;
}

/* ---- PIN dialogs through a pinentry program ---------------------------------- */

/* The SESSION_ENV names a client may pass (HELLO) and that the pinentry
 * gets: where to show the dialog (X11, Wayland, the D-Bus session for
 * GNOME's prompter, a terminal for pinentry-curses) and its language. */
static const char *const session_env_names[] = {
        "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "DBUS_SESSION_BUS_ADDRESS", "GPG_TTY", "TERM",
        "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES",
};
#define SESSION_ENV_MAX_VALUE 1024

/* Never handed to the pinentry: where the PIN credentials are, and what
 * would let it talk to systemd as the agent. */
static const char *const hidden_env_prefixes[] = {
        "CREDENTIALS_DIRECTORY=", "NOTIFY_SOCKET=", "LISTEN_FDS=", "LISTEN_PID=", "LISTEN_FDNAMES=",
        "WATCHDOG_PID=", "WATCHDOG_USEC=",
};

static size_t env_name_len(const char *e)
{
        const char *eq = strchr(e, '=');

        return eq ? (size_t)(eq - e) : strlen(e);
}

static bool session_env_allowed(const char *e)
{
        size_t n = env_name_len(e);

        if (!e[n])
                return false;
        for (size_t i = 0; i < sizeof(session_env_names) / sizeof(session_env_names[0]); i++)
                if (strlen(session_env_names[i]) == n && strncmp(e, session_env_names[i], n) == 0)
                        return true;
        return false;
}

/* HELLO's SESSION_ENV fields: kept for a peer of the agent's own user
 * only (another user must not choose where our user's dialog appears);
 * unknown names, control characters and long values are skipped. */
static void read_session_env(struct conn *c)
{
        const size_t max = sizeof(c->session_env) / sizeof(c->session_env[0]);
        struct proto_iter it;
        struct proto_field f;

        if (c->uid != getuid())
                return;
        proto_iter_init(&it, c->frame.body, c->frame.len);
        while (proto_iter_next(&it, &f) > 0 && c->n_session_env < max) {
                bool ok = f.len <= SESSION_ENV_MAX_VALUE, dup = false;
                char *v = NULL;

                if (f.tag != PT_SESSION_ENV || !ok || proto_field_string(&f, &v) < 0)
                        continue;
                for (const char *p = v; *p && ok; p++)
                        ok = (unsigned char)*p >= 0x20 && *p != 0x7f;
                for (size_t i = 0; i < c->n_session_env && ok; i++)
                        dup |= env_name_len(c->session_env[i]) == env_name_len(v) &&
                               strncmp(c->session_env[i], v, env_name_len(v)) == 0;
                if (!ok || dup || !session_env_allowed(v)) {
                        log_debug("pid %d: SESSION_ENV field ignored (not an allowed NAME=value, or repeated)",
                                  (int)c->pid);
                        free(v);
                        continue;
                }
                c->session_env[c->n_session_env++] = v;
        }
}

static const char *session_getenv(const struct conn *c, const char *name)
{
        size_t n = strlen(name);

        for (size_t i = 0; i < c->n_session_env; i++)
                if (strncmp(c->session_env[i], name, n) == 0 && c->session_env[i][n] == '=')
                        return c->session_env[i] + n + 1;
        return getenv(name);
}

static const char *first_env(const struct conn *c, const char *a, const char *b, const char *d)
{
        const char *v = session_getenv(c, a);

        if (!v || !*v)
                v = session_getenv(c, b);
        if (!v || !*v)
                v = session_getenv(c, d);
        return v && *v ? v : NULL;
}

/* The pinentry's environment: the agent's own (it runs in the user's
 * session under systemd --user), minus hidden_env_prefixes, with the
 * client's SESSION_ENV on top. Pointers into environ and c; free() the
 * array only. */
static char **pinentry_env(const struct conn *c)
{
        extern char **environ;
        size_t n = 0, o = 0;
        char **env;

        while (environ[n])
                n++;
        env = calloc(n + c->n_session_env + 1, sizeof(*env));
        if (!env)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                const char *e = environ[i];
                bool drop = false;

                for (size_t k = 0; k < sizeof(hidden_env_prefixes) / sizeof(hidden_env_prefixes[0]); k++)
                        drop |= strncmp(e, hidden_env_prefixes[k], strlen(hidden_env_prefixes[k])) == 0;
                for (size_t k = 0; k < c->n_session_env && !drop; k++)
                        drop = env_name_len(e) == env_name_len(c->session_env[k]) &&
                               strncmp(e, c->session_env[k], env_name_len(e)) == 0;
                if (!drop)
                        env[o++] = environ[i];
        }
        for (size_t k = 0; k < c->n_session_env; k++)
                env[o++] = c->session_env[k];
        env[o] = NULL;
        return env;
}

/* Who asks, as the dialog shows it: the process (its name and executable
 * as /proc showed them at connect time, which the process itself can
 * choose: for information, not proof), the software it declared, and the
 * user when it is not the agent's own. */
static void describe_requester(const struct conn *c, char *out, size_t n)
{
        char user[160] = "";

        if (c->uid != getuid()) {
                struct passwd pw, *res = NULL;
                char buf[1024];

                if (getpwuid_r(c->uid, &pw, buf, sizeof(buf), &res) == 0 && res)
                        snprintf(user, sizeof(user), ", user %s (uid %u) — not you: an allow line grants it this key",
                                 res->pw_name, (unsigned)c->uid);
                else
                        snprintf(user, sizeof(user), ", uid %u — not you: an allow line grants it this key",
                                 (unsigned)c->uid);
        }
        snprintf(out, n, "%s (pid %d%s%s%s%s%s)%s", c->comm[0] ? c->comm : "a process", (int)c->pid,
                 c->exe[0] ? ", " : "", c->exe, c->software[0] ? ", client \"" : "", c->software,
                 c->software[0] ? "\"" : "", user);
}

static void dialog_texts(const struct conn *c, const struct token_info *ti, const char *key_label, char *desc,
                         size_t dn, char *title, size_t tn)
{
        char who[512], token[256];
        const char *state = "";
        size_t o = 0;

        describe_requester(c, who, sizeof(who));
        snprintf(token, sizeof(token), "\"%s\" (%s%s%s, serial %s)", ti->label, ti->manufacturer,
                 ti->model[0] ? ", " : "", ti->model, ti->serial[0] ? ti->serial : "none");
        if (ti->pin_state == TOKEN_PIN_FINAL_TRY)
                state = "\nFINAL TRY: the token says one more wrong PIN locks it.";
        else if (ti->pin_state == TOKEN_PIN_COUNT_LOW)
                state = "\nCareful: the token says a wrong PIN was entered before; few tries are left.";
        if (key_label)
                o = (size_t)snprintf(desc, dn, "The key \"%s\" on token %s needs the PIN for one use "
                                     "(it asks for the PIN every time).", key_label, token);
        else
                o = (size_t)snprintf(desc, dn, "Token %s needs its user PIN.", token);
        if (o < dn)
                snprintf(desc + o, dn - o, "%s\n\nRequested by %s.", state, who);
        snprintf(title, tn, "smime-agent: PIN for %s", ti->label);
}

static int ask_pinentry(struct conn *c, const struct token_info *ti, const char *key_label, struct secret *pin)
{
        const struct agent_config *cfg = &c->agent->cfg;
        char desc[2048], title[128], owner[256], why[1024], what[160];
        struct pinentry_dialog d = {
                .program = cfg->pinentry,
                .timeout_sec = cfg->pinentry_timeout ? cfg->pinentry_timeout : PINENTRY_DEFAULT_TIMEOUT,
                .description = desc,
                .title = title,
                .prompt = "PIN:",
                .owner = owner,
                .watch_fd = c->fd,
        };
        char **env = pinentry_env(c);
        uint32_t code;
        int r;

        if (!env) {
                r = conn_error(c, PE_INTERNAL, "out of memory for the PIN dialog");
                return r < 0 ? r : PE_INTERNAL;
        }
        d.envp = env;
        d.ttyname = session_getenv(c, "GPG_TTY");
        d.ttytype = d.ttyname ? session_getenv(c, "TERM") : NULL;
        d.lc_ctype = first_env(c, "LC_ALL", "LC_CTYPE", "LANG");
        d.lc_messages = first_env(c, "LC_ALL", "LC_MESSAGES", "LANG");
        dialog_texts(c, ti, key_label, desc, sizeof(desc), title, sizeof(title));
        snprintf(owner, sizeof(owner), "for token '%s', asked by pid %d %s", ti->label, (int)c->pid, c->comm);
        snprintf(what, sizeof(what), "%s%s%stoken '%s'", key_label ? "key '" : "", key_label ? key_label : "",
                 key_label ? "' on " : "", ti->label);
        log_info("pid %d: asking for the PIN of %s with %s (timeout %u s)", (int)c->pid, what, d.program,
                 d.timeout_sec);
        r = pinentry_getpin(&d, pin, why, sizeof(why));
        free(env);
        if (r == 0 && pin->len == 0) {
                secret_free(pin);
                r = -ECANCELED;
                snprintf(why, sizeof(why), "the dialog was closed with an empty PIN");
        }
        switch (r) {
        case 0:
                return 0;
        case -ECONNRESET:
                log_info("pid %d: %s", (int)c->pid, why);
                return -ECONNRESET;
        case -ECANCELED:
                code = PE_CANCELLED;
                r = conn_error(c, code, "PIN entry for %s was cancelled: %s; nothing was tried on the token", what,
                               why);
                break;
        case -ENOMEM:
                code = PE_INTERNAL;
                r = conn_error(c, code, "%s", why);
                break;
        default:
                /* Timeouts, a busy dialog, a pinentry that failed or could not start. */
                code = PE_PIN_REQUIRED;
                r = conn_error(c, code, "%s needs its PIN and the PIN dialog failed: %s; nothing was tried on the "
                               "token", what, why);
                break;
        }
        return r < 0 ? r : (int)code;
}

int conn_ask_pin(struct conn *c, const struct token_info *ti, const char *key_label, struct secret *pin)
{
        const uint8_t *p = NULL;
        size_t len = 0;
        int r;

        /* Precedence: a client that can ask asks (NEED_PIN), unless
         * pinentry-mode = always; else the pinentry; else PIN_REQUIRED. */
        if (c->agent->cfg.pinentry && (!c->interactive || c->agent->cfg.pinentry_always))
                return ask_pinentry(c, ti, key_label, pin);
        if (!c->interactive) {
                if (key_label)
                        r = conn_error(c, PE_PIN_REQUIRED, "key '%s' on token '%s' needs the PIN for every use "
                                       "(CKA_ALWAYS_AUTHENTICATE) and this client cannot ask for one; run a smimectl "
                                       "command from a terminal, configure a pinentry program (a PIN dialog), or set "
                                       "always-authenticate = reuse with a pin-file for this key", key_label,
                                       ti->label);
                else
                        r = conn_error(c, PE_PIN_REQUIRED, "token '%s' needs its PIN and this client cannot ask for "
                                       "one; run a smimectl command that signs from a terminal (it asks for the PIN "
                                       "and the agent stays logged in), configure a pinentry program (a PIN dialog), "
                                       "or configure pin-file", ti->label);
                return r < 0 ? r : PE_PIN_REQUIRED;
        }

        r = need_pin(c, ti, key_label, false);
        if (r != 0)
                return r;
        r = proto_get_raw(c->frame.body, c->frame.len, PT_PIN, &p, &len);
        if (r < 0) {
                proto_frame_wipe(&c->frame);
                r = conn_error(c, PE_PROTOCOL, "PIN message without a PIN field");
                return r < 0 ? r : PE_PROTOCOL;
        }
        r = secret_alloc(pin, len + 1);
        if (r == 0) {
                memcpy(pin->p, p, len);
                pin->len = len;
        }
        proto_frame_wipe(&c->frame);
        if (r < 0) {
                r = conn_error(c, PE_INTERNAL, "out of memory for the PIN");
                return r < 0 ? r : PE_INTERNAL;
        }
        return 0;
}

int conn_login(struct conn *c, struct token *t)
{
        struct token_error e = { 0 };
        struct token_info ti;
        int r;

        r = token_get_info(t, &ti, &e);
        if (r < 0) {
                r = conn_error(c, conn_token_code(r, &e), "%s", e.message);
                return r < 0 ? r : PE_TOKEN;
        }
        if (ti.state == TOKEN_STATE_REMOVED) {
                r = conn_error(c, PE_TOKEN_REMOVED, "token '%s' is removed; insert it again and retry (the agent "
                               "notices within seconds)", ti.label);
                return r < 0 ? r : PE_TOKEN_REMOVED;
        }
        if (ti.state == TOKEN_STATE_UNRESPONSIVE) {
                r = conn_error(c, PE_TOKEN, "token '%s' is not answering: a call into its module did not return "
                               "within the call timeout; requests fail at once until it does", ti.label);
                return r < 0 ? r : PE_TOKEN;
        }
        if (ti.pin_state == TOKEN_PIN_LOCKED) {
                r = conn_error(c, PE_PIN_LOCKED, "the user PIN of token '%s' is locked; unblock it with the "
                               "token's administration tool (SO PIN or PUK)", ti.label);
                return r < 0 ? r : PE_PIN_LOCKED;
        }

        {
                char path[4096], why[512];
                int src = policy_pin_source(&c->agent->cfg, t, path, sizeof(path), why, sizeof(why));

                if (src < 0) {
                        r = conn_error(c, PE_PIN_REQUIRED, "token '%s' needs its PIN, but %s", ti.label, why);
                        return r < 0 ? r : PE_PIN_REQUIRED;
                }
                if (src > 0)
                        return login_with_pin_file(c, t, &ti, path, false);
        }

        if (ti.protected_auth_path) {
                r = conn_pin_pad(c, &ti, NULL);
                if (r != 0)
                        return r;
                r = do_login(c, t, NULL, 0, &e);
                return login_result(c, t, r, &e);
        }

        {
                struct secret pin = { 0 };

                r = conn_ask_pin(c, &ti, NULL, &pin);
                if (r != 0)
                        return r;
                r = do_login(c, t, pin.p, pin.len, &e);
                if (r == 0) {
                        if (policy_keeps_pin(&c->agent->cfg, t))
                                policy_keep_pin(t, pin.p, pin.len);
                        secret_free(&c->login_pin);
                        c->login_pin = pin;     /* moved: wiped when the request ends */
                        c->login_pin_token = t;
                } else {
                        secret_free(&pin);
                }
        }
        return login_result(c, t, r, &e);
}

int conn_relogin_quietly(struct conn *c, struct token *t)
{
        char path[4096], why[512];
        struct token_error e = { 0 };
        struct token_info ti;

        if (token_get_info(t, &ti, &e) < 0 || ti.state != TOKEN_STATE_PRESENT ||
            policy_pin_source(&c->agent->cfg, t, path, sizeof(path), why, sizeof(why)) <= 0)
                return -1;
        log_info("pid %d: token '%s' was logged out during the request; logging in again from %s", (int)c->pid,
                 ti.label, path);
        return login_with_pin_file(c, t, &ti, path, true);
}

static int serve_keys(struct conn *c)
{
        struct identity_set *set = identity_set_get(c->agent->store, c->agent->cfg.default_key);
        int r = 0;

        if (!set)
                return conn_error(c, PE_INTERNAL, "cannot read the keys of the tokens");
        for (size_t i = 0; i < set->n && r >= 0; i++) {
                const struct identity *id = &set->ids[i];
                struct proto_msg m;
                char why[1024];
                int problem;

                /* Other users see only the keys granted to them. */
                if (!authz_visible(c, id))
                        continue;
                problem = identity_sign_problem(id, why, sizeof(why));
                proto_msg_init(&m, PROTO_KEY);
                proto_put_string(&m, PT_URI, id->tk->uri);
                proto_put_string(&m, PT_LABEL, id->tk->label);
                proto_put_string(&m, PT_TOKEN_LABEL, id->token_label);
                if (id->cert) {
                        proto_put_string(&m, PT_SUBJECT, id->subject);
                        proto_put_string(&m, PT_ISSUER, id->issuer);
                        proto_put_string(&m, PT_SERIAL, id->serial);
                        proto_put_uint(&m, PT_NOT_BEFORE, (uint64_t)id->not_before);
                        proto_put_uint(&m, PT_NOT_AFTER, (uint64_t)id->not_after);
                }
                for (size_t k = 0; k < id->n_emails; k++)
                        proto_put_string(&m, PT_EMAIL, id->emails[k]);
                proto_put_string(&m, PT_KEY_TYPE, id->key_type);
                if (id->bits)
                        proto_put_uint(&m, PT_KEY_BITS, id->bits);
                if (id->curve)
                        proto_put_string(&m, PT_CURVE, id->curve);
                if (id->usage_sign)
                        proto_put_string(&m, PT_USAGE, "sign");
                if (id->usage_decrypt)
                        proto_put_string(&m, PT_USAGE, "decrypt");
                proto_put_uint(&m, PT_USABLE, problem == 0);
                proto_put_string(&m, PT_STATUS_TEXT, problem ? why : "ok");
                proto_put_uint(&m, PT_DEFAULT, id->is_default);
                r = proto_write_msg(c->fd, &m);
                proto_msg_free(&m);
        }
        identity_set_unref(set);
        if (r < 0)
                return r;
        return proto_write_empty(c->fd, PROTO_DONE);
}

static int serve_status(struct conn *c)
{
        struct token_store *s = c->agent->store;
        struct token_keys *keys = token_store_keys(s);
        struct proto_msg m;
        int r;

        proto_msg_init(&m, PROTO_STATUS_OK);
        proto_put_string(&m, PT_SOFTWARE, "smime-agent " SMIME_VERSION);
        proto_put_uint(&m, PT_KEY_COUNT, keys ? keys->n : 0);
        token_keys_unref(keys);
        for (size_t i = 0; i < token_store_module_count(s); i++) {
                struct token_module_info mi;

                if (token_store_module_info(s, i, &mi) < 0)
                        continue;
                proto_begin_group(&m, PT_MODULE);
                proto_put_string(&m, PT_MODULE_NAME, mi.name);
                proto_put_string(&m, PT_LIBRARY, mi.library);
                proto_put_string(&m, PT_MANUFACTURER, mi.manufacturer);
                proto_put_string(&m, PT_HOTPLUG, mi.hotplug == TOKEN_HOTPLUG_EVENTS ? "events" : "poll");
                proto_end_group(&m);
        }
        for (size_t i = 0; i < token_store_token_count(s); i++) {
                struct token_info ti;
                struct token_error e;

                if (token_get_info(token_store_token(s, i), &ti, &e) < 0)
                        continue;
                proto_begin_group(&m, PT_TOKEN);
                put_token_fields(&m, &ti);
                proto_put_string(&m, PT_MODULE_NAME, ti.module_name);
                proto_put_uint(&m, PT_LOGIN_REQUIRED, ti.login_required);
                proto_put_uint(&m, PT_LOGGED_IN, ti.logged_in);
                proto_put_uint(&m, PT_PROTECTED_AUTH, ti.protected_auth_path);
                conn_put_token_state(c, &m, token_store_token(s, i), &ti);
                proto_end_group(&m);
        }
        r = proto_write_msg(c->fd, &m);
        proto_msg_free(&m);
        return r;
}

static int handshake(struct conn *c)
{
        uint64_t version = 0, interactive = 0;
        struct proto_msg m;
        char *sw = NULL;
        int r;

        r = proto_read_frame(c->fd, &c->frame);
        if (r <= 0) {
                if (r == -EMSGSIZE)
                        conn_error(c, PE_TOO_LARGE, "frame over the protocol limit");
                else if (r == -EPROTO)
                        conn_error(c, PE_PROTOCOL, "malformed frame");
                return -1;
        }
        if (c->frame.type != PROTO_HELLO) {
                conn_error(c, PE_PROTOCOL, "the first message must be HELLO, not %s", proto_type_name(c->frame.type));
                return -1;
        }
        if (proto_get_uint(c->frame.body, c->frame.len, PT_VERSION, &version) < 0 || version != PROTO_VERSION) {
                conn_error(c, PE_VERSION, "this agent speaks protocol version %u; the client asked for %llu",
                           PROTO_VERSION, (unsigned long long)version);
                return -1;
        }
        (void)proto_get_uint(c->frame.body, c->frame.len, PT_INTERACTIVE, &interactive);
        c->interactive = interactive != 0;
        interactive = 0;
        (void)proto_get_uint(c->frame.body, c->frame.len, PT_PIN_PAD_NOTICE, &interactive);
        c->pin_pad_notice = c->interactive && interactive != 0;
        read_session_env(c);
        if (proto_get_string(c->frame.body, c->frame.len, PT_SOFTWARE, &sw) == 0) {
                snprintf(c->software, sizeof(c->software), "%s", sw);
                free(sw);
        }
        proto_msg_init(&m, PROTO_HELLO_OK);
        proto_put_uint(&m, PT_VERSION, PROTO_VERSION);
        proto_put_string(&m, PT_SOFTWARE, "smime-agent " SMIME_VERSION);
        r = proto_write_msg(c->fd, &m);
        proto_msg_free(&m);
        return r < 0 ? -1 : 0;
}

static void conn_free(struct conn *c)
{
        close(c->fd);
        proto_frame_free(&c->frame);
        for (size_t i = 0; i < c->n_session_env; i++)
                free(c->session_env[i]);
        free(c->groups);
        free(c);
}

/* A connection that never says HELLO must not hold its thread forever. */
#define HANDSHAKE_TIMEOUT_SEC 30

static void set_receive_timeout(int fd, time_t sec)
{
        struct timeval tv = { .tv_sec = sec };

        (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

void *conn_main(void *arg)
{
        struct conn *c = arg;
        int r;

        log_debug("connection from pid %d uid %u", (int)c->pid, (unsigned)c->uid);
        set_receive_timeout(c->fd, HANDSHAKE_TIMEOUT_SEC);
        if (handshake(c) < 0)
                goto out;
        /* Idle clients may keep their connection as long as they like. */
        set_receive_timeout(c->fd, 0);
        for (;;) {
                r = proto_read_frame(c->fd, &c->frame);
                if (r == 0)
                        break;
                if (r < 0) {
                        if (r == -EMSGSIZE)
                                conn_error(c, PE_TOO_LARGE, "frame over the protocol limit (%u bytes)", PROTO_MAX_FRAME);
                        else if (r == -EPROTO)
                                conn_error(c, PE_PROTOCOL, "malformed frame");
                        break;
                }
                switch (c->frame.type) {
                case PROTO_STATUS:
                        r = serve_status(c);
                        break;
                case PROTO_KEYS:
                        r = serve_keys(c);
                        break;
                case PROTO_SIGN:
                        r = sign_serve(c);
                        break;
                case PROTO_DECRYPT:
                        r = decrypt_serve(c);
                        break;
                case PROTO_CERTS:
                        r = certs_serve(c);
                        break;
                case PROTO_IMPORT:
                        r = import_serve(c);
                        break;
                case PROTO_TRUST:
                        r = trust_serve(c);
                        break;
                case PROTO_VERIFY:
                        r = verify_serve(c);
                        break;
                case PROTO_ENCRYPT:
                        r = encrypt_serve(c);
                        break;
                case PROTO_LOGIN:
                        r = conn_serve_login(c);
                        break;
                case PROTO_LOCK:
                        r = conn_serve_lock(c);
                        break;
                case PROTO_HELLO:
                        r = conn_error(c, PE_PROTOCOL, "HELLO was already received");
                        break;
                case PROTO_DATA:
                case PROTO_END:
                case PROTO_PIN:
                case PROTO_CANCEL:
                        r = conn_error(c, PE_PROTOCOL, "%s outside of a request", proto_type_name(c->frame.type));
                        break;
                default:
                        r = conn_error(c, PE_UNSUPPORTED, "unknown request type 0x%02x", c->frame.type);
                        break;
                }
                conn_request_done(c);
                if (r < 0)
                        break;
        }
out:
        conn_request_done(c);
        log_debug("connection from pid %d closed", (int)c->pid);
        conn_free(c);
        return NULL;
}
