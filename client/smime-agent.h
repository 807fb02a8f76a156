/* smime-agent.h — libsmime-agent: use a running smime-agent from C.
 *
 * The library speaks the protocol in PROTOCOL.md over the agent's Unix
 * socket. It does no cryptography and never sees a private key; content
 * streams from and to file descriptors in chunks, so a message of any size
 * takes constant memory.
 *
 * Every call returns 0 on success and -1 on failure; then
 * smime_agent_error_code() gives the agent's error code (SMIME_AGENT_E_*,
 * or 0 for a local failure such as an unreachable socket) and
 * smime_agent_error_message() a sentence to show the user.
 *
 * A handle serves one request at a time; use one handle per thread.
 */
#ifndef SMIME_AGENT_CLIENT_H
#define SMIME_AGENT_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility; what this header declares
 * is its whole public interface. */
#pragma GCC visibility push(default)

/* Error codes, as in PROTOCOL.md. */
enum {
        SMIME_AGENT_E_PROTOCOL = 1,
        SMIME_AGENT_E_TOO_LARGE = 2,
        SMIME_AGENT_E_VERSION = 3,
        SMIME_AGENT_E_UNSUPPORTED = 4,
        SMIME_AGENT_E_BUSY = 5,
        SMIME_AGENT_E_INTERNAL = 6,
        SMIME_AGENT_E_CANCELLED = 7,
        SMIME_AGENT_E_PERMISSION = 8,
        SMIME_AGENT_E_NO_KEY = 10,
        SMIME_AGENT_E_AMBIGUOUS_KEY = 11,
        SMIME_AGENT_E_NO_CERT = 12,
        SMIME_AGENT_E_CERT_EXPIRED = 13,
        SMIME_AGENT_E_KEY_USAGE = 14,
        SMIME_AGENT_E_MECHANISM = 15,
        SMIME_AGENT_E_NO_PRIVATE_KEY = 16,
        SMIME_AGENT_E_PIN_REQUIRED = 20,
        SMIME_AGENT_E_PIN_INCORRECT = 21,
        SMIME_AGENT_E_PIN_LOCKED = 22,
        SMIME_AGENT_E_TOKEN = 23,
        SMIME_AGENT_E_TOKEN_REMOVED = 24,
        SMIME_AGENT_E_BAD_INPUT = 30,
        SMIME_AGENT_E_NOT_RECIPIENT = 31,       /* no key on any token is a recipient of the message */
        SMIME_AGENT_E_INTEGRITY = 32,           /* content failed authentication/padding: discard the output */
        SMIME_AGENT_E_DECRYPT_FAILED = 33,      /* a matching key could not recover the content key */
};

struct smime_agent;

/* The token a PIN is asked for. Strings are never NULL. */
struct smime_agent_token {
        const char *label;
        const char *manufacturer;
        const char *model;
        const char *serial;
        const char *uri;
        const char *pin_state;  /* "ok", "count-low", "final-try", "locked" */
};

/* Asked when a token needs its PIN. Write a NUL-terminated PIN of at most
 * size-1 bytes into pin and return 0, or return -1 to cancel. */
typedef int (*smime_agent_pin_fn)(const struct smime_agent_token *token, char *pin, size_t size, void *userdata);

struct smime_agent_options {
        const char *socket_path;        /* NULL: $SMIME_AGENT_SOCKET, else $XDG_RUNTIME_DIR/smime-agent/socket */
        smime_agent_pin_fn pin;         /* NULL: the agent answers PIN_REQUIRED instead of asking */
        void *pin_userdata;
        const char *software;           /* your program's name, for the agent's log */
};

int smime_agent_connect(const struct smime_agent_options *opt, struct smime_agent **out);
void smime_agent_close(struct smime_agent *a);

uint32_t smime_agent_error_code(const struct smime_agent *a);
const char *smime_agent_error_name(const struct smime_agent *a);       /* "PIN_INCORRECT" */
const char *smime_agent_error_message(const struct smime_agent *a);
/* The socket path used (or tried). */
const char *smime_agent_socket_path(const struct smime_agent *a);

/* After NOT_RECIPIENT: the recipients the message was encrypted for, one
 * description each ("RSA key transport to issuer /CN=..., serial 1A2B").
 * Valid until the next call on the handle. */
size_t smime_agent_error_recipients(const struct smime_agent *a, const char *const **list);

/* The error of a failed smime_agent_connect(), which returns no handle. */
const char *smime_agent_connect_error(void);

struct smime_agent_sign_options {
        const char *key;        /* PKCS#11 URI or e-mail; NULL: the agent's default */
        const char *format;     /* "der", "pem" or "smime" (NULL: smime) */
        int detached;
        const char *digest;     /* "sha256" (NULL), "sha384", "sha512" */
        int no_certs;
        int chain;
        int pss;
};

/* Signs everything read from in_fd until EOF; writes the result to out_fd.
 * On failure, bytes already written to out_fd are not a valid result. */
int smime_agent_sign(struct smime_agent *a, const struct smime_agent_sign_options *o, int in_fd, int out_fd);

struct smime_agent_decrypt_options {
        const char *key;        /* only keys matching this PKCS#11 URI or e-mail; NULL: any key on any token */
        const char *format;     /* input "der", "pem", "smime"; NULL: detected from the first bytes */
};

struct smime_agent_decrypt_result {
        char key_uri[1024];     /* the token key that decrypted */
        char subject[512];      /* its certificate's subject */
        char cipher[48];        /* content cipher, e.g. "aes-256-gcm" */
        char key_transport[96]; /* "rsa-oaep", "rsa-pkcs1-v1.5", "dhSinglePass-stdDH-sha256kdf-scheme", ... */
        int authenticated;      /* 1: an AEAD tag covered the whole content; 0: CBC, no integrity protection */
        unsigned long long bytes_in, bytes_out;
};

/* Decrypts the message read from in_fd until EOF (DER, PEM or an S/MIME
 * entity) and writes the content to out_fd as it is decrypted. Returns 0
 * only when the whole content decrypted and (GCM) authenticated, or
 * (CBC) ended in valid padding. On any failure, and in particular
 * SMIME_AGENT_E_INTEGRITY, the bytes already written to out_fd must be
 * discarded. res may be NULL. */
int smime_agent_decrypt(struct smime_agent *a, const struct smime_agent_decrypt_options *o, int in_fd, int out_fd,
                        struct smime_agent_decrypt_result *res);

struct smime_agent_identity {
        const char *uri;
        const char *label;
        const char *token_label;
        const char *subject;    /* "" when the key has no certificate */
        const char *issuer;
        const char *serial;
        const char *const *emails;
        size_t n_emails;
        const char *key_type;
        unsigned bits;
        const char *curve;      /* "" unless EC */
        int can_sign;
        int can_decrypt;
        long long not_before;   /* seconds since the epoch; 0 without a certificate */
        long long not_after;
        int usable;
        const char *status;     /* "ok" or why the key cannot sign */
        int is_default;
};

typedef int (*smime_agent_key_fn)(const struct smime_agent_identity *id, void *userdata);
/* Calls fn for every identity on every token. A non-zero return from fn
 * stops the listing (the call still returns 0). */
int smime_agent_keys(struct smime_agent *a, smime_agent_key_fn fn, void *userdata);

struct smime_agent_module {
        const char *name;
        const char *library;
        const char *manufacturer;
};

struct smime_agent_token_status {
        struct smime_agent_token token;
        const char *module;
        int login_required;
        int logged_in;
        int protected_auth;
        /* Since 0.2 (agents that do not send them: "", 0). */
        const char *state;              /* "present", "removed", "unresponsive" */
        long long login_expires;        /* seconds since the epoch; 0 when not logged in */
        long long sign_expires;         /* ... the login's end for signing */
        long long decrypt_expires;      /* ... for decryption */
        const char *login_policy;       /* the PIN cache policy, for people */
};

struct smime_agent_status_fns {
        void (*agent)(const char *software, unsigned long long key_count, void *userdata);
        void (*module)(const struct smime_agent_module *m, void *userdata);
        void (*token)(const struct smime_agent_token_status *t, void *userdata);
};

int smime_agent_status(struct smime_agent *a, const struct smime_agent_status_fns *fns, void *userdata);

/* Logs in to the tokens a selector names (a PKCS#11 URI, or an e-mail
 * address: the tokens of its identities; NULL: every token that needs a
 * login), asking for PINs through the connection's PIN callback, so that
 * later requests need none while the PIN cache policy allows. fns->token,
 * if set, is called for each selected token afterwards. */
int smime_agent_login(struct smime_agent *a, const char *selector, const struct smime_agent_status_fns *fns,
                      void *userdata);

/* Logs out of the selected tokens (NULL: all of them) at once: the next
 * request needs a PIN again. *logged_out (may be NULL) is how many were
 * logged in. */
int smime_agent_lock(struct smime_agent *a, const char *selector, unsigned *logged_out,
                     const struct smime_agent_status_fns *fns, void *userdata);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif

#endif
