/* agent.h — the daemon's shared state and the per-connection context. */
#ifndef SMIME_AGENT_H
#define SMIME_AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include <openssl/x509.h>

#include "policy.h"
#include "proto.h"
#include "secret.h"
#include "token.h"

struct stream;
struct authz_grant;

#define PIN_TIMEOUT_DEFAULT 300u       /* seconds a client has to answer NEED_PIN */

struct agent_config {
        char *socket_path;
        char *module;           /* NULL: every module p11-kit has configured */
        char *default_key;      /* URI or e-mail */
        char *pin_file;         /* headless: PIN read from this file when a token needs one */
        char **ca_files;        /* extra certificates for --chain */
        size_t n_ca_files;
        unsigned max_connections;
        bool verbose;
        char *address_book;     /* the certificate store file (certstore.h) */
        char **crl_files;       /* revocation lists checked by verify and encrypt */
        size_t n_crl_files;
        bool no_system_ca;      /* system-ca = no: only ca-file certificates are trust anchors */
        /* Revocation from the network (revoke.h): all off by default. */
        bool crl_fetch;                 /* crl-fetch = yes */
        bool ocsp_aia;                  /* ocsp = aia */
        char *ocsp_responder;           /* ocsp-responder = URL */
        unsigned revocation_timeout;    /* seconds per HTTP exchange; 0: 10 */
        bool revocation_unknown_allow;  /* revocation-unknown = allow */
        /* Issue 5: who may use which key (authz.h), the socket's access, idling. */
        struct authz_grant *grants;     /* "allow" lines, in file order */
        size_t n_grants;
        unsigned socket_mode;           /* 0: 0600 */
        char *socket_group;             /* group owning the socket, NULL: ours */
        unsigned idle_exit_sec;         /* 0: never; else exit when socket-activated and idle this long */
        /* PIN cache policy and token settings (policy.h): rules[0] is the
         * global section; [token]/[key] sections follow in file order. */
        struct policy_rule *rules;
        size_t n_rules;
        bool in_section;                /* parsing: lines go to rules[n_rules - 1] */
        unsigned hotplug_poll;          /* seconds between slot polls; 0: never poll */
        unsigned call_timeout;          /* seconds a token call may take; 0: no limit */
        /* PIN dialogs through a pinentry program (pinentry.h, conn_ask_pin). */
        char *pinentry;                 /* resolved path; NULL: none configured */
        bool pinentry_always;           /* pinentry-mode = always: interactive clients too */
        unsigned pinentry_timeout;      /* seconds; 0: PINENTRY_DEFAULT_TIMEOUT */
        unsigned pin_timeout;           /* seconds to wait for the answer to NEED_PIN; 0: PIN_TIMEOUT_DEFAULT */
};

struct agent {
        struct agent_config cfg;
        struct token_store *store;
        STACK_OF(X509) *ca_certs;
        struct certstore *book;         /* the address book (certstore.h) */
};

/* A token login a request holds (policy.h): no expiry until it ends. */
struct conn_hold {
        struct token *token;
        uint8_t id[256];
        size_t id_len;
        int use;
};

struct conn {
        struct agent *agent;
        int fd;
        struct proto_frame frame;       /* the request being served */
        bool interactive;
        bool pin_pad_notice;            /* HELLO PIN_PAD_NOTICE: NEED_PIN before a PIN pad login */
        uid_t uid;
        pid_t pid;
        char software[128];
        /* The peer as the kernel reported it at connect time (SO_PEERCRED,
         * SO_PEERGROUPS) and its executable from /proc (for the audit log
         * only: it is racy and never used to decide anything). */
        gid_t gid;
        gid_t *groups;                  /* supplementary groups, malloc'd */
        size_t n_groups;
        char exe[256];                  /* "" when /proc does not tell us */
        char comm[32];                  /* /proc/PID/comm, readable for any peer */
        uint32_t last_error;            /* code of the last ERROR sent on this connection */
        /* Per request (cleared when it ends): the logins it holds, and the
         * token it logged in to itself (whose login it may use whatever
         * the policy says, or "ask every time" would ask forever). */
        struct conn_hold holds[8];
        size_t n_holds;
        struct token *fresh_login;
        bool relogin;                   /* conn_login: log out first (token_relogin) */
        /* The PIN typed for login_pin_token's login in this request: a
         * CKA_ALWAYS_AUTHENTICATE key of that token uses it rather than
         * asking twice in a row. Wiped when the request ends. */
        struct secret login_pin;
        struct token *login_pin_token;
        /* HELLO's SESSION_ENV ("NAME=value", allow-listed names, own-uid
         * peers only): where a pinentry shows its dialog for this client. */
        char *session_env[16];
        size_t n_session_env;
};

int config_load(struct agent_config *cfg, const char *path, bool must_exist);
void config_free(struct agent_config *cfg);

/* Sends ERROR and logs it. Returns 0, or a negative code when the error
 * closes the connection (PROTOCOL, TOO_LARGE, VERSION) or could not be sent. */
int conn_error(struct conn *c, uint32_t code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The content stream broke (st->err): a client that broke the protocol is
 * answered PROTOCOL or TOO_LARGE, a connection lost is logged. Returns -1:
 * the connection ends either way. */
int conn_stream_failure(struct conn *c, const struct stream *st);

/* Logs in to t if it needs it: PIN file, else NEED_PIN to an interactive
 * client, else PIN_REQUIRED. Returns 0 when logged in; a positive proto
 * error code after the ERROR was sent; negative when the connection must
 * close. */
int conn_login(struct conn *c, struct token *t);

/* Asks for a PIN that no configuration provides: NEED_PIN to an
 * interactive client (with CONTEXT_KEY = key_label when the PIN is for a
 * CKA_ALWAYS_AUTHENTICATE key's next use, key_label NULL for a token
 * login), else the configured pinentry program (for every client with
 * pinentry-mode = always), else PIN_REQUIRED. Never asks twice: a wrong
 * PIN is the caller's PIN_INCORRECT. 0 with pin filled (the caller frees it); a
 * positive proto error code after the ERROR was sent; negative when the
 * connection must close. */
struct secret;
/* Before a login on token ti's PIN pad: NEED_PIN with PROTECTED_AUTH = 1
 * (and CONTEXT_KEY = key_label) to a client that asked for it in HELLO
 * (PIN_PAD_NOTICE), which answers PIN (go on) or CANCEL. 0 to go on; else
 * as conn_ask_pin(). */
int conn_pin_pad(struct conn *c, const struct token_info *ti, const char *key_label);
int conn_ask_pin(struct conn *c, const struct token_info *ti, const char *key_label, struct secret *pin);

/* The PIN for the next use of k, a CKA_ALWAYS_AUTHENTICATE key whose token
 * is logged in: the token's PIN pad; else the PIN typed for the login in
 * this same request; else, when always-authenticate = reuse, the token's
 * PIN file or credential or the PIN kept from its login; else asked for
 * (conn_ask_pin). Fills *auth, which may point into pin (the caller frees
 * pin after the operation). Returns as conn_ask_pin(). */
int conn_context_auth(struct conn *c, const struct token_key *k, struct secret *pin, struct token_auth *auth);

/* A request found its token logged out under it (a LOCK, a module
 * re-initialisation) after its login check: logs in again when a PIN file
 * or credential allows it, without a word to the client. 0, or -1 (then the
 * request fails as it would have). */
int conn_relogin_quietly(struct conn *c, struct token *t);
/* The same for keyprov_ctx.relogin (conn: the struct conn). */
int conn_relogin_cb(void *conn, struct token *t);

/* The PIN cache policy for requests (policy.h), use = POLICY_SIGN or
 * POLICY_DECRYPT. conn_needs_login: true when the request must log in to
 * k's token first (not logged in, or the policy wants the PIN again);
 * when false, the login is held until the request ends. conn_login_key:
 * conn_login, but logs out first if the token is logged in (so the PIN is
 * checked), and holds the new login for the request. */
bool conn_needs_login(struct conn *c, const struct token_key *k, int use);
int conn_login_key(struct conn *c, const struct token_key *k, int use);
/* LOGIN and LOCK requests. */
int conn_serve_login(struct conn *c);
int conn_serve_lock(struct conn *c);
/* True when a login to t needs no NEED_PIN (a PIN file or credential, or
 * a PIN pad): a request may then log in a second time. */
bool conn_login_is_silent(struct conn *c, struct token *t);
/* The end of a request: releases the logins it held. */
void conn_request_done(struct conn *c);
/* STATUS: the policy's and presence fields of one TOKEN group. */
void conn_put_token_state(struct conn *c, struct proto_msg *m, struct token *t, const struct token_info *ti);

/* Maps a token failure to a proto error code. */
uint32_t conn_token_code(int r, const struct token_error *e);

int sign_serve(struct conn *c);
int decrypt_serve(struct conn *c);

/* Reads the header block of a MIME entity from the stream (sign.c): other
 * fields go to the output, Content-* back in front of the body. Returns 0,
 * a positive proto error code (already answered), or negative. */
int smime_split_headers(struct conn *c, struct stream *st, bool *has_headers);

/* Address book, verify and encrypt (certs.c, verify.c, encrypt.c). */
struct cs_entry;
int certs_serve(struct conn *c);
int trust_serve(struct conn *c);
int import_serve(struct conn *c);
int verify_serve(struct conn *c);
int encrypt_serve(struct conn *c);
/* Puts the fields of an address book entry (a CERT message's payload). */
void certs_put_entry(struct conn *c, struct proto_msg *m, const struct cs_entry *e);
void *conn_main(void *arg);

#endif
