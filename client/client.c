/* client.c — libsmime-agent: the client side of the protocol.
 *
 * Must never: do cryptography, link PKCS#11, or hold more than one chunk of
 * content in memory. PINs pass through a buffer that is wiped at once.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "proto.h"
#include "smime-agent.h"

#define PIN_MAX 256

struct smime_agent {
        int fd;
        struct proto_frame frame;
        smime_agent_pin_fn pin;
        void *pin_userdata;
        char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
        uint32_t err_code;
        char err_msg[4096];
        uint8_t *buf;   /* one input chunk */
        char **recipients;      /* from the last NOT_RECIPIENT error */
        size_t n_recipients;
};

static _Thread_local char connect_error[4096 + 256];

const char *smime_agent_connect_error(void) { return connect_error; }
uint32_t smime_agent_error_code(const struct smime_agent *a) { return a->err_code; }
const char *smime_agent_error_message(const struct smime_agent *a) { return a->err_msg; }
const char *smime_agent_socket_path(const struct smime_agent *a) { return a->socket_path; }

const char *smime_agent_error_name(const struct smime_agent *a)
{
        return a->err_code ? proto_error_name(a->err_code) : "LOCAL";
}

static int fail(struct smime_agent *a, uint32_t code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct smime_agent *a, uint32_t code, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(a->err_msg, sizeof(a->err_msg), fmt, ap);
        va_end(ap);
        a->err_code = code;
        return -1;
}

static int fail_io(struct smime_agent *a, int r)
{
        if (r == 0 || r == -ECONNRESET || r == -EPIPE)
                return fail(a, 0, "the agent closed the connection (see its log for why)");
        if (r == -EPROTO || r == -EMSGSIZE)
                return fail(a, SMIME_AGENT_E_PROTOCOL, "the agent sent a malformed message: %s", strerror(-r));
        return fail(a, 0, "talking to the agent failed: %s", strerror(-r));
}

static void clear_recipients(struct smime_agent *a)
{
        while (a->n_recipients > 0)
                free(a->recipients[--a->n_recipients]);
        free(a->recipients);
        a->recipients = NULL;
}

size_t smime_agent_error_recipients(const struct smime_agent *a, const char *const **list)
{
        *list = (const char *const *)a->recipients;
        return a->n_recipients;
}

/* An ERROR frame from the agent becomes this handle's error. */
static int fail_frame(struct smime_agent *a)
{
        uint64_t code = 0;
        char *msg = NULL;
        struct proto_iter it;
        struct proto_field f;
        size_t cap = 0;

        if (a->frame.type != PROTO_ERROR)
                return fail(a, SMIME_AGENT_E_PROTOCOL, "unexpected %s message from the agent",
                            proto_type_name(a->frame.type));
        (void)proto_get_uint(a->frame.body, a->frame.len, PT_CODE, &code);
        (void)proto_get_string(a->frame.body, a->frame.len, PT_MESSAGE, &msg);
        fail(a, (uint32_t)code, "%s", msg ? msg : "the agent reported an error without a message");
        free(msg);
        clear_recipients(a);
        proto_iter_init(&it, a->frame.body, a->frame.len);
        while (proto_iter_next(&it, &f) > 0) {
                char *r = NULL;

                if (f.tag != PT_RECIPIENT || proto_field_string(&f, &r) < 0)
                        continue;
                if (a->n_recipients == cap) {
                        char **v = realloc(a->recipients, (cap ? 2 * cap : 16) * sizeof(*v));

                        if (!v) {
                                free(r);
                                break;
                        }
                        a->recipients = v;
                        cap = cap ? 2 * cap : 16;
                }
                a->recipients[a->n_recipients++] = r;
        }
        return -1;
}

static int read_frame(struct smime_agent *a)
{
        int r = proto_read_frame(a->fd, &a->frame);

        if (r <= 0)
                return fail_io(a, r);
        return 0;
}

/* Where a pinentry started by the agent should show its dialog for us
 * (PROTOCOL.md, SESSION_ENV). The agent ignores them from other users. */
static void put_session_env(struct proto_msg *m)
{
        static const char *const names[] = {
                "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "DBUS_SESSION_BUS_ADDRESS", "GPG_TTY", "TERM",
                "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES",
        };

        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
                const char *v = getenv(names[i]);
                char kv[1024];

                if (v && *v && (size_t)snprintf(kv, sizeof(kv), "%s=%s", names[i], v) < sizeof(kv))
                        proto_put_string(m, PT_SESSION_ENV, kv);
        }
}

int smime_agent_connect(const struct smime_agent_options *opt, struct smime_agent **out)
{
        static const struct smime_agent_options none = { 0 };
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct smime_agent *a;
        struct proto_msg m;
        const char *path;
        int r;

        if (!opt)
                opt = &none;
        *out = NULL;
        path = opt->socket_path;
        if (!path || !*path)
                path = getenv("SMIME_AGENT_SOCKET");
        a = calloc(1, sizeof(*a));
        if (!a) {
                snprintf(connect_error, sizeof(connect_error), "out of memory");
                return -1;
        }
        a->fd = -1;
        if (path && *path) {
                snprintf(a->socket_path, sizeof(a->socket_path), "%s", path);
        } else if (getenv("XDG_RUNTIME_DIR")) {
                snprintf(a->socket_path, sizeof(a->socket_path), "%s/smime-agent/socket", getenv("XDG_RUNTIME_DIR"));
        } else {
                snprintf(connect_error, sizeof(connect_error),
                         "no agent socket known: set SMIME_AGENT_SOCKET or XDG_RUNTIME_DIR, or pass --socket");
                free(a);
                return -1;
        }
        a->pin = opt->pin;
        a->pin_userdata = opt->pin_userdata;
        memcpy(sa.sun_path, a->socket_path, sizeof(sa.sun_path));
        a->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (a->fd < 0 || connect(a->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
                snprintf(connect_error, sizeof(connect_error), "cannot connect to the agent at %s: %s%s", a->socket_path,
                         strerror(errno), errno == ENOENT || errno == ECONNREFUSED ? " (is smime-agent running?)" : "");
                smime_agent_close(a);
                return -1;
        }

        proto_msg_init(&m, PROTO_HELLO);
        proto_put_uint(&m, PT_VERSION, PROTO_VERSION);
        proto_put_string(&m, PT_SOFTWARE, opt->software ? opt->software : "libsmime-agent");
        proto_put_uint(&m, PT_INTERACTIVE, a->pin != NULL);
        proto_put_uint(&m, PT_PIN_PAD_NOTICE, a->pin != NULL);
        put_session_env(&m);
        r = proto_write_msg(a->fd, &m);
        proto_msg_free(&m);
        /* An agent that refuses us (PERMISSION, BUSY) may have sent its
         * ERROR and closed before our HELLO arrived: read it anyway. */
        if (r < 0 && read_frame(a) >= 0 && a->frame.type == PROTO_ERROR)
                r = 0;
        else if (r == 0 && read_frame(a) < 0)
                r = -1;
        if (r < 0 || (a->frame.type != PROTO_HELLO_OK && fail_frame(a) < 0)) {
                if (r < -1)
                        fail_io(a, r);
                snprintf(connect_error, sizeof(connect_error), "the agent at %s refused the connection: %s",
                         a->socket_path, a->err_msg);
                smime_agent_close(a);
                return -1;
        }
        *out = a;
        return 0;
}

void smime_agent_abort(struct smime_agent *a)
{
        if (a && a->fd >= 0)
                shutdown(a->fd, SHUT_RDWR);
}

void smime_agent_close(struct smime_agent *a)
{
        if (!a)
                return;
        if (a->fd >= 0)
                close(a->fd);
        proto_frame_free(&a->frame);
        clear_recipients(a);
        free(a->buf);
        free(a);
}

/* A string field as a malloc'd copy ("" when absent), remembered in store
 * so the caller frees them all at once. */
static char *field_str(const uint8_t *p, size_t n, uint16_t tag, char *store[], size_t *ns)
{
        char *s = NULL;

        if (proto_get_string(p, n, tag, &s) < 0 || !s)
                s = strdup("");
        if (s)
                store[(*ns)++] = s;
        return s ? s : (char *)"";
}

static int answer_pin(struct smime_agent *a)
{
        char *store[8];
        size_t ns = 0;
        const uint8_t *p = a->frame.body;
        size_t n = a->frame.len;
        struct smime_agent_token t = {
                .label = field_str(p, n, PT_TOKEN_LABEL, store, &ns),
                .manufacturer = field_str(p, n, PT_MANUFACTURER, store, &ns),
                .model = field_str(p, n, PT_MODEL, store, &ns),
                .serial = field_str(p, n, PT_TOKEN_SERIAL, store, &ns),
                .uri = field_str(p, n, PT_URI, store, &ns),
                .pin_state = field_str(p, n, PT_PIN_STATE, store, &ns),
                .key_label = field_str(p, n, PT_CONTEXT_KEY, store, &ns),
        };
        char pin[PIN_MAX] = "";
        struct proto_msg m;
        uint64_t pad = 0;
        int r, cb;

        t.pin_pad = proto_get_uint(p, n, PT_PROTECTED_AUTH, &pad) == 0 && pad;

        cb = a->pin ? a->pin(&t, pin, sizeof(pin), a->pin_userdata) : -1;
        for (size_t i = 0; i < ns; i++)
                free(store[i]);
        if (cb == 0) {
                pin[sizeof(pin) - 1] = '\0';
                proto_msg_init(&m, PROTO_PIN);
                proto_put_string(&m, PT_PIN, t.pin_pad ? "" : pin);
        } else {
                proto_msg_init(&m, PROTO_CANCEL);
        }
        explicit_bzero(pin, sizeof(pin));
        r = proto_write_msg(a->fd, &m);
        proto_msg_free(&m);     /* wipes the PIN */
        return r < 0 ? fail_io(a, r) : 0;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
        while (n > 0) {
                ssize_t k = write(fd, p, n);

                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += k;
                n -= (size_t)k;
        }
        return 0;
}

/* Fills up to a whole chunk, so pipes do not turn into tiny frames. */
static ssize_t read_chunk(int fd, uint8_t *buf, size_t n)
{
        size_t got = 0;

        while (got < n) {
                ssize_t k = read(fd, buf + got, n - got);

                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        break;
                got += (size_t)k;
        }
        return (ssize_t)got;
}

/* Reads agent frames, writing DATA to out_fd, until one of type `until`
 * (MORE or DONE) arrives. */
static int pump_output(struct smime_agent *a, int out_fd, uint8_t until)
{
        for (;;) {
                int r;

                if (read_frame(a) < 0)
                        return -1;
                if (a->frame.type == PROTO_DATA) {
                        r = write_all(out_fd, a->frame.body, a->frame.len);
                        if (r < 0)
                                return fail(a, 0, "cannot write the output: %s", strerror(-r));
                        continue;
                }
                if (a->frame.type == until)
                        return 0;
                if (a->frame.type == PROTO_NEED_PIN) {
                        /* DECRYPT learns which token it needs from the content. */
                        if (answer_pin(a) < 0)
                                return -1;
                        continue;
                }
                return fail_frame(a);
        }
}

/* After READY: the input in lock-step chunks, then END; output to out_fd. */
static int stream_content(struct smime_agent *a, int in_fd, int out_fd)
{
        int r;

        if (!a->buf && !(a->buf = malloc(PROTO_MAX_CHUNK)))
                return fail(a, 0, "out of memory");
        for (;;) {
                ssize_t n = read_chunk(in_fd, a->buf, PROTO_MAX_CHUNK);

                if (n < 0) {
                        shutdown(a->fd, SHUT_RDWR);
                        return fail(a, 0, "cannot read the input: %s", strerror((int)-n));
                }
                if (n == 0)
                        break;
                r = proto_write_data(a->fd, a->buf, (size_t)n);
                if (r < 0)
                        return fail_io(a, r);
                if (pump_output(a, out_fd, PROTO_MORE) < 0)
                        return -1;
        }
        r = proto_write_empty(a->fd, PROTO_END);
        return r < 0 ? fail_io(a, r) : 0;
}

static int expect_ready(struct smime_agent *a)
{
        if (read_frame(a) < 0)
                return -1;
        return a->frame.type == PROTO_READY ? 0 : fail_frame(a);
}

int smime_agent_sign(struct smime_agent *a, const struct smime_agent_sign_options *o, int in_fd, int out_fd)
{
        static const struct smime_agent_sign_options defaults = { 0 };
        struct proto_msg m;
        int r;

        if (!o)
                o = &defaults;
        a->err_code = 0;
        a->err_msg[0] = '\0';
        if (!a->buf && !(a->buf = malloc(PROTO_MAX_CHUNK)))
                return fail(a, 0, "out of memory");

        proto_msg_init(&m, PROTO_SIGN);
        if (o->key)
                proto_put_string(&m, PT_KEY, o->key);
        if (o->format)
                proto_put_string(&m, PT_FORMAT, o->format);
        if (o->digest)
                proto_put_string(&m, PT_DIGEST, o->digest);
        proto_put_uint(&m, PT_DETACHED, o->detached != 0);
        proto_put_uint(&m, PT_NO_CERTS, o->no_certs != 0);
        proto_put_uint(&m, PT_CHAIN, o->chain != 0);
        proto_put_uint(&m, PT_PSS, o->pss != 0);
        r = proto_msg_error(&m) ? proto_msg_error(&m) : proto_write_msg(a->fd, &m);
        proto_msg_free(&m);
        if (r < 0)
                return r == -EMSGSIZE ? fail(a, SMIME_AGENT_E_TOO_LARGE, "the key selector is too long") : fail_io(a, r);

        /* Until READY the agent may ask for a PIN. */
        for (;;) {
                if (read_frame(a) < 0)
                        return -1;
                if (a->frame.type == PROTO_READY)
                        break;
                if (a->frame.type != PROTO_NEED_PIN)
                        return fail_frame(a);
                if (answer_pin(a) < 0)
                        return -1;
        }

        if (stream_content(a, in_fd, out_fd) < 0)
                return -1;
        return pump_output(a, out_fd, PROTO_DONE);
}

static void copy_field(const struct proto_frame *f, uint16_t tag, char *dst, size_t n)
{
        const uint8_t *p = NULL;
        size_t len = 0;

        dst[0] = '\0';
        if (proto_get_raw(f->body, f->len, tag, &p, &len) < 0)
                return;
        if (len >= n)
                len = n - 1;
        memcpy(dst, p, len);
        dst[len] = '\0';
}

int smime_agent_decrypt(struct smime_agent *a, const struct smime_agent_decrypt_options *o, int in_fd, int out_fd,
                        struct smime_agent_decrypt_result *res)
{
        static const struct smime_agent_decrypt_options defaults = { 0 };
        struct proto_msg m;
        uint64_t v;
        int r;

        if (!o)
                o = &defaults;
        if (res)
                memset(res, 0, sizeof(*res));
        a->err_code = 0;
        a->err_msg[0] = '\0';
        clear_recipients(a);
        if (!a->buf && !(a->buf = malloc(PROTO_MAX_CHUNK)))
                return fail(a, 0, "out of memory");

        proto_msg_init(&m, PROTO_DECRYPT);
        if (o->key)
                proto_put_string(&m, PT_KEY, o->key);
        if (o->format)
                proto_put_string(&m, PT_FORMAT, o->format);
        r = proto_msg_error(&m) ? proto_msg_error(&m) : proto_write_msg(a->fd, &m);
        proto_msg_free(&m);
        if (r < 0)
                return r == -EMSGSIZE ? fail(a, SMIME_AGENT_E_TOO_LARGE, "the key selector is too long") : fail_io(a, r);
        if (expect_ready(a) < 0 || stream_content(a, in_fd, out_fd) < 0)
                return -1;
        if (pump_output(a, out_fd, PROTO_DONE) < 0)
                return -1;
        if (res) {
                copy_field(&a->frame, PT_URI, res->key_uri, sizeof(res->key_uri));
                copy_field(&a->frame, PT_SUBJECT, res->subject, sizeof(res->subject));
                copy_field(&a->frame, PT_CIPHER, res->cipher, sizeof(res->cipher));
                copy_field(&a->frame, PT_KEY_TRANSPORT, res->key_transport, sizeof(res->key_transport));
                res->authenticated = proto_get_uint(a->frame.body, a->frame.len, PT_AUTHENTICATED, &v) == 0 && v;
                res->bytes_in = proto_get_uint(a->frame.body, a->frame.len, PT_BYTES_IN, &v) == 0 ? v : 0;
                res->bytes_out = proto_get_uint(a->frame.body, a->frame.len, PT_BYTES_OUT, &v) == 0 ? v : 0;
        }
        return 0;
}

int smime_agent_keys(struct smime_agent *a, smime_agent_key_fn fn, void *userdata)
{
        bool stopped = false;
        int r;

        a->err_code = 0;
        r = proto_write_empty(a->fd, PROTO_KEYS);
        if (r < 0)
                return fail_io(a, r);
        for (;;) {
                const char *emails[64];
                char *store[96];
                size_t ns = 0, ne = 0;
                struct proto_iter it;
                struct proto_field f;
                struct smime_agent_identity id = { 0 };
                const uint8_t *p;
                size_t n;
                uint64_t v;

                if (read_frame(a) < 0)
                        return -1;
                if (a->frame.type == PROTO_DONE)
                        return 0;
                if (a->frame.type != PROTO_KEY)
                        return fail_frame(a);
                if (stopped)
                        continue;
                p = a->frame.body;
                n = a->frame.len;
                id.uri = field_str(p, n, PT_URI, store, &ns);
                id.label = field_str(p, n, PT_LABEL, store, &ns);
                id.token_label = field_str(p, n, PT_TOKEN_LABEL, store, &ns);
                id.subject = field_str(p, n, PT_SUBJECT, store, &ns);
                id.issuer = field_str(p, n, PT_ISSUER, store, &ns);
                id.serial = field_str(p, n, PT_SERIAL, store, &ns);
                id.key_type = field_str(p, n, PT_KEY_TYPE, store, &ns);
                id.curve = field_str(p, n, PT_CURVE, store, &ns);
                id.status = field_str(p, n, PT_STATUS_TEXT, store, &ns);
                id.bits = proto_get_uint(p, n, PT_KEY_BITS, &v) == 0 ? (unsigned)v : 0;
                id.not_before = proto_get_uint(p, n, PT_NOT_BEFORE, &v) == 0 ? (long long)v : 0;
                id.not_after = proto_get_uint(p, n, PT_NOT_AFTER, &v) == 0 ? (long long)v : 0;
                id.usable = proto_get_uint(p, n, PT_USABLE, &v) == 0 && v;
                id.is_default = proto_get_uint(p, n, PT_DEFAULT, &v) == 0 && v;
                proto_iter_init(&it, p, n);
                while (proto_iter_next(&it, &f) > 0) {
                        char *s = NULL;

                        if ((f.tag != PT_EMAIL && f.tag != PT_USAGE) || proto_field_string(&f, &s) < 0)
                                continue;
                        if (f.tag == PT_USAGE) {
                                id.can_sign |= strcmp(s, "sign") == 0;
                                id.can_decrypt |= strcmp(s, "decrypt") == 0;
                                free(s);
                        } else if (ne < 64 && ns < 96) {
                                emails[ne++] = s;
                                store[ns++] = s;
                        } else {
                                free(s);
                        }
                }
                id.emails = emails;
                id.n_emails = ne;
                if (fn && fn(&id, userdata) != 0)
                        stopped = true;
                for (size_t i = 0; i < ns; i++)
                        free(store[i]);
        }
}

/* One TOKEN group to fns->token; the strings go to store (freed by the caller). */
static void token_group(const struct proto_field *f, const struct smime_agent_status_fns *fns, void *userdata,
                        char *store[], size_t *ns)
{
        struct smime_agent_token_status t = {
                .token = {
                        .label = field_str(f->val, f->len, PT_TOKEN_LABEL, store, ns),
                        .manufacturer = field_str(f->val, f->len, PT_MANUFACTURER, store, ns),
                        .model = field_str(f->val, f->len, PT_MODEL, store, ns),
                        .serial = field_str(f->val, f->len, PT_TOKEN_SERIAL, store, ns),
                        .uri = field_str(f->val, f->len, PT_URI, store, ns),
                        .pin_state = field_str(f->val, f->len, PT_PIN_STATE, store, ns),
                },
                .module = field_str(f->val, f->len, PT_MODULE_NAME, store, ns),
                .state = field_str(f->val, f->len, PT_TOKEN_STATE, store, ns),
                .login_policy = field_str(f->val, f->len, PT_LOGIN_POLICY, store, ns),
        };
        uint64_t v;

        t.login_required = proto_get_uint(f->val, f->len, PT_LOGIN_REQUIRED, &v) == 0 && v;
        t.logged_in = proto_get_uint(f->val, f->len, PT_LOGGED_IN, &v) == 0 && v;
        t.protected_auth = proto_get_uint(f->val, f->len, PT_PROTECTED_AUTH, &v) == 0 && v;
        t.login_expires = proto_get_uint(f->val, f->len, PT_LOGIN_EXPIRES, &v) == 0 ? (long long)v : 0;
        t.sign_expires = proto_get_uint(f->val, f->len, PT_SIGN_EXPIRES, &v) == 0 ? (long long)v : 0;
        t.decrypt_expires = proto_get_uint(f->val, f->len, PT_DECRYPT_EXPIRES, &v) == 0 ? (long long)v : 0;
        fns->token(&t, userdata);
}

int smime_agent_status(struct smime_agent *a, const struct smime_agent_status_fns *fns, void *userdata)
{
        struct proto_iter it;
        struct proto_field f;
        char *store[16];
        size_t ns = 0;
        uint64_t v = 0;
        int r;

        a->err_code = 0;
        r = proto_write_empty(a->fd, PROTO_STATUS);
        if (r < 0)
                return fail_io(a, r);
        if (read_frame(a) < 0)
                return -1;
        if (a->frame.type != PROTO_STATUS_OK)
                return fail_frame(a);
        if (fns && fns->agent) {
                char *sw = field_str(a->frame.body, a->frame.len, PT_SOFTWARE, store, &ns);

                (void)proto_get_uint(a->frame.body, a->frame.len, PT_KEY_COUNT, &v);
                fns->agent(sw, (unsigned long long)v, userdata);
                free(store[--ns]);
        }
        proto_iter_init(&it, a->frame.body, a->frame.len);
        while (fns && proto_iter_next(&it, &f) > 0) {
                if (f.tag == PT_MODULE && fns->module) {
                        struct smime_agent_module m = {
                                .name = field_str(f.val, f.len, PT_MODULE_NAME, store, &ns),
                                .library = field_str(f.val, f.len, PT_LIBRARY, store, &ns),
                                .manufacturer = field_str(f.val, f.len, PT_MANUFACTURER, store, &ns),
                                .hotplug = field_str(f.val, f.len, PT_HOTPLUG, store, &ns),
                        };
                        fns->module(&m, userdata);
                } else if (f.tag == PT_TOKEN && fns->token) {
                        token_group(&f, fns, userdata, store, &ns);
                }
                while (ns > 0)
                        free(store[--ns]);
        }
        return 0;
}

/* ---- Address book, verify, encrypt ------------------------------------- */

/* Strings copied out of a frame for one callback, freed together. */
struct strpool {
        char **v;
        size_t n, cap;
};

static const char *pool_add(struct strpool *p, char *s)
{
        if (!s)
                return "";
        if (p->n == p->cap) {
                size_t cap = p->cap ? p->cap * 2 : 32;
                char **v = realloc(p->v, cap * sizeof(*v));

                if (!v) {
                        free(s);
                        return "";
                }
                p->v = v;
                p->cap = cap;
        }
        p->v[p->n++] = s;
        return s;
}

static void pool_free(struct strpool *p)
{
        for (size_t i = 0; i < p->n; i++)
                free(p->v[i]);
        free(p->v);
        memset(p, 0, sizeof(*p));
}

static const char *pool_str(struct strpool *pool, const uint8_t *p, size_t n, uint16_t tag)
{
        char *s = NULL;

        if (proto_get_string(p, n, tag, &s) < 0)
                return "";
        return pool_add(pool, s);
}

/* Every value of a repeatable string field, as a pool-owned array. */
static const char *const *pool_strs(struct strpool *pool, const uint8_t *p, size_t n, uint16_t tag, size_t *count)
{
        struct proto_iter it;
        struct proto_field f;
        const char **v = NULL;
        size_t k = 0;

        *count = 0;
        proto_iter_init(&it, p, n);
        while (proto_iter_next(&it, &f) > 0) {
                char *s = NULL;
                const char **nv;

                if (f.tag != tag || proto_field_string(&f, &s) < 0)
                        continue;
                if (!(nv = realloc(v, (k + 1) * sizeof(*v)))) {
                        free(s);
                        break;
                }
                v = nv;
                v[k++] = pool_add(pool, s);
        }
        if (!v)
                return NULL;
        pool_add(pool, (char *)v);
        *count = k;
        return v;
}

static uint64_t get_u(const uint8_t *p, size_t n, uint16_t tag)
{
        uint64_t v = 0;

        (void)proto_get_uint(p, n, tag, &v);
        return v;
}

static void read_cert(struct strpool *pool, const uint8_t *p, size_t n, struct smime_agent_cert *c)
{
        size_t nu = 0;
        const char *const *usage;

        memset(c, 0, sizeof(*c));
        c->fingerprint = pool_str(pool, p, n, PT_FINGERPRINT);
        c->subject = pool_str(pool, p, n, PT_SUBJECT);
        c->issuer = pool_str(pool, p, n, PT_ISSUER);
        c->serial = pool_str(pool, p, n, PT_SERIAL);
        c->emails = pool_strs(pool, p, n, PT_EMAIL, &c->n_emails);
        c->key_type = pool_str(pool, p, n, PT_KEY_TYPE);
        c->bits = (unsigned)get_u(p, n, PT_KEY_BITS);
        c->curve = pool_str(pool, p, n, PT_CURVE);
        c->not_before = (long long)get_u(p, n, PT_NOT_BEFORE);
        c->not_after = (long long)get_u(p, n, PT_NOT_AFTER);
        usage = pool_strs(pool, p, n, PT_USAGE, &nu);
        for (size_t i = 0; i < nu; i++) {
                c->can_sign |= strcmp(usage[i], "sign") == 0;
                c->can_encrypt |= strcmp(usage[i], "encrypt") == 0;
        }
        c->trust = pool_str(pool, p, n, PT_TRUST);
        c->trust_path = pool_str(pool, p, n, PT_TRUST_PATH);
        c->source = pool_str(pool, p, n, PT_SOURCE);
        c->added = (long long)get_u(p, n, PT_ADDED);
        c->caps = pool_strs(pool, p, n, PT_CAPS, &c->n_caps);
        c->caps_known = c->n_caps > 0;
        if (c->n_caps == 1 && strcmp(c->caps[0], "none") == 0)
                c->n_caps = 0;
        c->problems = pool_strs(pool, p, n, PT_PROBLEM, &c->n_problems);
        c->usable = get_u(p, n, PT_USABLE) != 0;
        c->status = pool_str(pool, p, n, PT_STATUS_TEXT);
}

/* Reads CERT frames until DONE, calling fn for each. */
static int read_certs(struct smime_agent *a, smime_agent_cert_fn fn, void *userdata)
{
        bool stopped = false;

        for (;;) {
                struct strpool pool = { 0 };
                struct smime_agent_cert c;

                if (read_frame(a) < 0)
                        return -1;
                if (a->frame.type == PROTO_DONE)
                        return 0;
                if (a->frame.type != PROTO_CERT)
                        return fail_frame(a);
                if (stopped || !fn)
                        continue;
                read_cert(&pool, a->frame.body, a->frame.len, &c);
                stopped = fn(&c, userdata) != 0;
                pool_free(&pool);
        }
}

static int send_request(struct smime_agent *a, struct proto_msg *m)
{
        int r = proto_msg_error(m) ? proto_msg_error(m) : proto_write_msg(a->fd, m);

        proto_msg_free(m);
        if (r == -EMSGSIZE)
                return fail(a, SMIME_AGENT_E_TOO_LARGE, "the request is over the protocol's size limits");
        return r < 0 ? fail_io(a, r) : 0;
}

static void reset_error(struct smime_agent *a)
{
        a->err_code = 0;
        a->err_msg[0] = '\0';
}

int smime_agent_certs(struct smime_agent *a, const char *email, smime_agent_cert_fn fn, void *userdata)
{
        struct proto_msg m;

        reset_error(a);
        proto_msg_init(&m, PROTO_CERTS);
        if (email)
                proto_put_string(&m, PT_EMAIL, email);
        if (send_request(a, &m) < 0)
                return -1;
        return read_certs(a, fn, userdata);
}

/* After READY: input chunks in lock-step until END; output to out_fd
 * (-1: none expected) until `until` (DONE, or CERT for IMPORT). */
int smime_agent_import(struct smime_agent *a, int in_fd, smime_agent_cert_fn fn, void *userdata,
                       unsigned long long *added)
{
        return smime_agent_import_crls(a, in_fd, fn, userdata, added, NULL);
}

int smime_agent_import_crls(struct smime_agent *a, int in_fd, smime_agent_cert_fn fn, void *userdata,
                            unsigned long long *added, unsigned long long *crls)
{
        struct proto_msg m;
        bool stopped = false;

        reset_error(a);
        if (added)
                *added = 0;
        if (crls)
                *crls = 0;
        proto_msg_init(&m, PROTO_IMPORT);
        if (send_request(a, &m) < 0 || expect_ready(a) < 0 || stream_content(a, in_fd, -1) < 0)
                return -1;
        for (;;) {
                struct strpool pool = { 0 };
                struct smime_agent_cert c;

                if (read_frame(a) < 0)
                        return -1;
                if (a->frame.type == PROTO_DONE) {
                        if (added)
                                *added = get_u(a->frame.body, a->frame.len, PT_COUNT);
                        if (crls)
                                *crls = get_u(a->frame.body, a->frame.len, PT_CRL_COUNT);
                        return 0;
                }
                if (a->frame.type != PROTO_CERT)
                        return fail_frame(a);
                if (stopped || !fn)
                        continue;
                read_cert(&pool, a->frame.body, a->frame.len, &c);
                stopped = fn(&c, userdata) != 0;
                pool_free(&pool);
        }
}

int smime_agent_trust(struct smime_agent *a, const char *fingerprint, const void *cert, size_t cert_len,
                      const char *decision, smime_agent_cert_fn fn, void *userdata)
{
        struct proto_msg m;

        reset_error(a);
        proto_msg_init(&m, PROTO_TRUST);
        proto_put_string(&m, PT_TRUST, decision ? decision : "trusted");
        if (cert)
                proto_put_bytes(&m, PT_CERT_DATA, cert, cert_len);
        else if (fingerprint)
                proto_put_string(&m, PT_FINGERPRINT, fingerprint);
        if (send_request(a, &m) < 0)
                return -1;
        return read_certs(a, fn, userdata);
}

int smime_agent_verify(struct smime_agent *a, const struct smime_agent_verify_options *o, int in_fd, int out_fd,
                       smime_agent_verify_fn fn, void *userdata)
{
        static const struct smime_agent_verify_options defaults = { 0 };
        struct smime_agent_signer *signers = NULL;
        struct smime_agent_verify_result res = { 0 };
        struct strpool pool = { 0 };
        struct proto_iter it;
        struct proto_field f;
        struct proto_msg m;
        const uint8_t *p;
        size_t n, ns = 0;

        if (!o)
                o = &defaults;
        reset_error(a);
        proto_msg_init(&m, PROTO_VERIFY);
        if (o->from)
                proto_put_string(&m, PT_FROM, o->from);
        if (o->signature)
                proto_put_bytes(&m, PT_SIGNATURE, o->signature, o->signature_len);
        if (o->no_content)
                proto_put_uint(&m, PT_NO_CONTENT, 1);
        if (send_request(a, &m) < 0 || expect_ready(a) < 0 || stream_content(a, in_fd, out_fd) < 0 ||
            pump_output(a, out_fd, PROTO_DONE) < 0)
                return -1;
        p = a->frame.body;
        n = a->frame.len;
        res.verdict = pool_str(&pool, p, n, PT_VERDICT);
        res.summary = pool_str(&pool, p, n, PT_SUMMARY);
        res.from = pool_str(&pool, p, n, PT_FROM);
        res.hints = pool_strs(&pool, p, n, PT_HINT, &res.n_hints);
        proto_iter_init(&it, p, n);
        while (proto_iter_next(&it, &f) > 0)
                ns += f.tag == PT_SIGNER;
        signers = calloc(ns ? ns : 1, sizeof(*signers));
        if (!signers) {
                pool_free(&pool);
                return fail(a, 0, "out of memory");
        }
        ns = 0;
        proto_iter_init(&it, p, n);
        while (proto_iter_next(&it, &f) > 0) {
                struct smime_agent_signer *s = &signers[ns];

                if (f.tag != PT_SIGNER)
                        continue;
                ns++;
                s->subject = pool_str(&pool, f.val, f.len, PT_SUBJECT);
                s->issuer = pool_str(&pool, f.val, f.len, PT_ISSUER);
                s->serial = pool_str(&pool, f.val, f.len, PT_SERIAL);
                s->fingerprint = pool_str(&pool, f.val, f.len, PT_FINGERPRINT);
                s->emails = pool_strs(&pool, f.val, f.len, PT_EMAIL, &s->n_emails);
                s->signing_time = (long long)get_u(f.val, f.len, PT_SIGNING_TIME);
                s->not_before = (long long)get_u(f.val, f.len, PT_NOT_BEFORE);
                s->not_after = (long long)get_u(f.val, f.len, PT_NOT_AFTER);
                s->sig_alg = pool_str(&pool, f.val, f.len, PT_SIG_ALG);
                s->digest = pool_str(&pool, f.val, f.len, PT_DIGEST);
                s->trust_path = pool_str(&pool, f.val, f.len, PT_TRUST_PATH);
                s->chain = pool_strs(&pool, f.val, f.len, PT_CHAIN_SUBJECT, &s->n_chain);
                s->problems = pool_strs(&pool, f.val, f.len, PT_PROBLEM, &s->n_problems);
                s->caps = pool_strs(&pool, f.val, f.len, PT_CAPS, &s->n_caps);
                s->status = pool_str(&pool, f.val, f.len, PT_STATUS_TEXT);
        }
        res.signers = signers;
        res.n_signers = ns;
        if (fn)
                fn(&res, userdata);
        free(signers);
        pool_free(&pool);
        return 0;
}

int smime_agent_encrypt(struct smime_agent *a, const struct smime_agent_encrypt_options *o, int in_fd, int out_fd,
                        smime_agent_encrypt_fn fn, void *userdata)
{
        static const struct smime_agent_encrypt_options defaults = { 0 };
        struct proto_msg m;

        if (!o)
                o = &defaults;
        reset_error(a);
        proto_msg_init(&m, PROTO_ENCRYPT);
        for (size_t i = 0; i < o->n_recipients; i++)
                proto_put_string(&m, PT_RECIPIENT, o->recipients[i]);
        for (size_t i = 0; i < o->n_certs; i++)
                proto_put_bytes(&m, PT_RECIPIENT_CERT, o->certs[i].data, o->certs[i].len);
        if (o->format)
                proto_put_string(&m, PT_FORMAT, o->format);
        if (o->no_self)
                proto_put_uint(&m, PT_NO_SELF, 1);
        if (o->key)
                proto_put_string(&m, PT_KEY, o->key);
        if (send_request(a, &m) < 0 || expect_ready(a) < 0)
                return -1;
        if (fn) {
                struct strpool pool = { 0 };
                struct smime_agent_encryption e = { 0 };
                struct smime_agent_recipient *rv;
                struct proto_iter it;
                struct proto_field f;
                size_t nr = 0;

                proto_iter_init(&it, a->frame.body, a->frame.len);
                while (proto_iter_next(&it, &f) > 0)
                        nr += f.tag == PT_RECIPIENT_INFO;
                if (!(rv = calloc(nr ? nr : 1, sizeof(*rv))))
                        return fail(a, 0, "out of memory");
                nr = 0;
                proto_iter_init(&it, a->frame.body, a->frame.len);
                while (proto_iter_next(&it, &f) > 0) {
                        struct smime_agent_recipient *r = &rv[nr];

                        if (f.tag != PT_RECIPIENT_INFO)
                                continue;
                        nr++;
                        r->name = pool_str(&pool, f.val, f.len, PT_RECIPIENT);
                        r->subject = pool_str(&pool, f.val, f.len, PT_SUBJECT);
                        r->fingerprint = pool_str(&pool, f.val, f.len, PT_FINGERPRINT);
                        r->emails = pool_strs(&pool, f.val, f.len, PT_EMAIL, &r->n_emails);
                        r->key_transport = pool_str(&pool, f.val, f.len, PT_KEY_TRANSPORT);
                        r->source = pool_str(&pool, f.val, f.len, PT_SOURCE);
                        r->not_after = (long long)get_u(f.val, f.len, PT_NOT_AFTER);
                }
                e.cipher = pool_str(&pool, a->frame.body, a->frame.len, PT_CIPHER);
                e.description = pool_str(&pool, a->frame.body, a->frame.len, PT_SUMMARY);
                e.recipients = rv;
                e.n_recipients = nr;
                fn(&e, userdata);
                free(rv);
                pool_free(&pool);
        }
        if (stream_content(a, in_fd, out_fd) < 0)
                return -1;
        return pump_output(a, out_fd, PROTO_DONE);
}

/* LOGIN or LOCK: the request, PINs as asked, then DONE with TOKEN groups. */
static int token_request(struct smime_agent *a, uint8_t type, const char *selector, unsigned *logged_out,
                         const struct smime_agent_status_fns *fns, void *userdata)
{
        struct proto_iter it;
        struct proto_field f;
        struct proto_msg m;
        char *store[16];
        size_t ns = 0;
        uint64_t v;
        int r;

        a->err_code = 0;
        a->err_msg[0] = '\0';
        proto_msg_init(&m, type);
        if (selector)
                proto_put_string(&m, PT_KEY, selector);
        r = proto_msg_error(&m) ? proto_msg_error(&m) : proto_write_msg(a->fd, &m);
        proto_msg_free(&m);
        if (r < 0)
                return r == -EMSGSIZE ? fail(a, SMIME_AGENT_E_TOO_LARGE, "the token selector is too long") : fail_io(a, r);
        for (;;) {
                if (read_frame(a) < 0)
                        return -1;
                if (a->frame.type == PROTO_DONE)
                        break;
                if (a->frame.type != PROTO_NEED_PIN)
                        return fail_frame(a);
                if (answer_pin(a) < 0)
                        return -1;
        }
        if (logged_out)
                *logged_out = proto_get_uint(a->frame.body, a->frame.len, PT_LOGGED_OUT, &v) == 0 ? (unsigned)v : 0;
        proto_iter_init(&it, a->frame.body, a->frame.len);
        while (fns && fns->token && proto_iter_next(&it, &f) > 0) {
                if (f.tag == PT_TOKEN)
                        token_group(&f, fns, userdata, store, &ns);
                while (ns > 0)
                        free(store[--ns]);
        }
        return 0;
}

int smime_agent_login(struct smime_agent *a, const char *selector, const struct smime_agent_status_fns *fns,
                      void *userdata)
{
        return token_request(a, PROTO_LOGIN, selector, NULL, fns, userdata);
}

int smime_agent_lock(struct smime_agent *a, const char *selector, unsigned *logged_out,
                     const struct smime_agent_status_fns *fns, void *userdata)
{
        return token_request(a, PROTO_LOCK, selector, logged_out, fns, userdata);
}
