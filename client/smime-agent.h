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
        SMIME_AGENT_E_RECIPIENT = 40,
        SMIME_AGENT_E_NOT_FOUND = 41,
        SMIME_AGENT_E_STORE = 42,
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
        /* "" for a token login; else the label of the key whose next use
         * needs the PIN (CKA_ALWAYS_AUTHENTICATE, e.g. PIV's signature key:
         * it asks for every signature, although the token is logged in). */
        const char *key_label;
        /* 1: the PIN is typed on the reader's PIN pad, not given here: tell
         * the user so, write nothing into pin and return 0 to go on (the
         * login then waits for the pad), or -1 to cancel. */
        int pin_pad;
};

/* Asked when a token needs its PIN. Write a NUL-terminated PIN of at most
 * size-1 bytes into pin and return 0, or return -1 to cancel. */
typedef int (*smime_agent_pin_fn)(const struct smime_agent_token *token, char *pin, size_t size, void *userdata);

struct smime_agent_options {
        const char *socket_path;        /* NULL: $SMIME_AGENT_SOCKET, else $XDG_RUNTIME_DIR/smime-agent/socket */
        smime_agent_pin_fn pin;         /* NULL: the agent answers PIN_REQUIRED instead of asking,
                                         * or shows its pinentry dialog when it has one configured */
        void *pin_userdata;
        const char *software;           /* your program's name, for the agent's log */
};

/* The HELLO carries the caller's DISPLAY, WAYLAND_DISPLAY, XAUTHORITY,
 * DBUS_SESSION_BUS_ADDRESS, GPG_TTY, TERM, LANG, LC_ALL, LC_CTYPE and
 * LC_MESSAGES (those set), so that an agent of the same user with a
 * pinentry shows its PIN dialog where the caller runs. */
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

/* Abandons the request in progress on a, from any thread: the connection
 * is shut down, so the call in progress (and every later one) fails. For
 * a program that chains two requests and must stop the second when the
 * first fails (smimectl sign --encrypt). */
void smime_agent_abort(struct smime_agent *a);

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
        /* How the agent notices its tokens coming and going: "events" (the
         * module's C_WaitForSlotEvent) or "poll" (its slot list, every
         * hotplug-poll seconds); "" from an agent that does not say. */
        const char *hotplug;
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

/* ---- Address book ------------------------------------------------------
 * The agent keeps correspondents' certificates, with your trust decisions
 * and their S/MIME capabilities. Strings are never NULL and are valid only
 * during the callback. */
struct smime_agent_cert {
        const char *fingerprint;        /* SHA-256, lowercase hex */
        const char *subject;
        const char *issuer;
        const char *serial;
        const char *const *emails;
        size_t n_emails;
        const char *key_type;           /* "RSA", "EC", "Ed25519", ... */
        unsigned bits;
        const char *curve;              /* "" unless EC */
        long long not_before;
        long long not_after;
        int can_sign;                   /* keyUsage/extendedKeyUsage allow it */
        int can_encrypt;
        const char *trust;              /* your decision: "trusted", "distrusted" or "none" */
        const char *trust_path;         /* "anchor", "trusted-by-you", "distrusted", "untrusted" */
        const char *source;             /* "harvested" or "imported" */
        long long added;
        int caps_known;
        const char *const *caps;        /* "aes-256-gcm", "aes-256-cbc", "rsaes-oaep", ... */
        size_t n_caps;
        const char *const *problems;    /* by name: "EXPIRED", "REVOKED", "UNTRUSTED", ... */
        size_t n_problems;
        int usable;                     /* mail can be encrypted to it now */
        const char *status;             /* a sentence */
};

typedef int (*smime_agent_cert_fn)(const struct smime_agent_cert *c, void *userdata);

/* Lists the address book (only the certificates for email, when given).
 * A non-zero return from fn stops the listing. */
int smime_agent_certs(struct smime_agent *a, const char *email, smime_agent_cert_fn fn, void *userdata);
/* Adds the certificates of in_fd (a signed message, a PEM or DER
 * certificate, a PKCS#7 bundle); fn sees each; *added (may be NULL)
 * counts the new ones. CRLs in the input (PEM, DER, in a bundle) go to
 * the agent's revocation cache. */
int smime_agent_import(struct smime_agent *a, int in_fd, smime_agent_cert_fn fn, void *userdata,
                       unsigned long long *added);
/* smime_agent_import, and *crls (may be NULL) counts the CRLs stored (new,
 * or newer than the one the agent held for that issuer). */
int smime_agent_import_crls(struct smime_agent *a, int in_fd, smime_agent_cert_fn fn, void *userdata,
                            unsigned long long *added, unsigned long long *crls);
/* Records decision ("trusted", "distrusted" or "none") for the certificate
 * with this fingerprint, or for cert (DER or PEM, added to the book). */
int smime_agent_trust(struct smime_agent *a, const char *fingerprint, const void *cert, size_t cert_len,
                      const char *decision, smime_agent_cert_fn fn, void *userdata);

/* ---- Verify ------------------------------------------------------------ */
struct smime_agent_signer {
        const char *subject;            /* "" when the signer's certificate is unknown */
        const char *issuer;
        const char *serial;
        const char *fingerprint;
        const char *const *emails;
        size_t n_emails;
        long long signing_time;         /* 0 when the signature has none */
        long long not_before;
        long long not_after;
        const char *sig_alg;            /* "rsa-pkcs1-v1.5", "rsa-pss", "ecdsa", "ed25519" */
        const char *digest;             /* "sha256", ... */
        const char *trust_path;         /* "anchor", "trusted-by-you", "distrusted", "untrusted" */
        const char *const *chain;       /* subjects, the signer first */
        size_t n_chain;
        const char *const *problems;    /* "BAD_SIGNATURE", "CONTENT_ALTERED", "EXPIRED", ... */
        size_t n_problems;
        const char *const *caps;
        size_t n_caps;
        const char *status;             /* "ok" or the problems as a sentence */
};

struct smime_agent_verify_result {
        const char *verdict;            /* "good", "bad" or "untrusted" */
        const char *summary;            /* a sentence for people */
        const char *from;               /* the address checked against the certificates, or "" */
        const struct smime_agent_signer *signers;
        size_t n_signers;
        const char *const *hints;       /* e.g. what a gateway did to a clear-signed message */
        size_t n_hints;
};

struct smime_agent_verify_options {
        const char *from;               /* the sender to match; NULL: the message's From */
        const void *signature;          /* a detached signature (DER/PEM); in_fd is then the content */
        size_t signature_len;
        int no_content;                 /* do not send the verified content to out_fd */
};

typedef void (*smime_agent_verify_fn)(const struct smime_agent_verify_result *r, void *userdata);

/* Verifies the message read from in_fd. The verified content goes to
 * out_fd unless the signature is bad. Returns 0 when the agent judged the
 * message (whatever the verdict: see fn's result), -1 when it could not. */
int smime_agent_verify(struct smime_agent *a, const struct smime_agent_verify_options *o, int in_fd, int out_fd,
                       smime_agent_verify_fn fn, void *userdata);

/* ---- Encrypt ----------------------------------------------------------- */
struct smime_agent_blob {
        const void *data;
        size_t len;
};

struct smime_agent_encrypt_options {
        const char *const *recipients;  /* e-mail addresses or certificate fingerprints */
        size_t n_recipients;
        const struct smime_agent_blob *certs;   /* recipient certificates (DER or PEM) */
        size_t n_certs;
        const char *format;             /* "der", "pem" or "smime" (NULL: smime) */
        int no_self;                    /* do not add the sender's own certificate */
        const char *key;                /* whose certificate is "self"; NULL: the default key */
};

struct smime_agent_recipient {
        const char *name;               /* as named, or "yourself (...)" */
        const char *subject;
        const char *fingerprint;
        const char *const *emails;
        size_t n_emails;
        const char *key_transport;      /* "rsa-oaep", "rsa-pkcs1-v1.5", "dhSinglePass-stdDH-sha256kdf-scheme", ... */
        const char *source;             /* "address book", "token", "request" */
        long long not_after;
};

struct smime_agent_encryption {
        const char *cipher;             /* "aes-256-gcm", "aes-256-cbc", ... */
        const char *description;        /* "AES-256-GCM (AuthEnvelopedData)" */
        const struct smime_agent_recipient *recipients;
        size_t n_recipients;
};

typedef void (*smime_agent_encrypt_fn)(const struct smime_agent_encryption *e, void *userdata);

/* Encrypts in_fd to out_fd. fn (may be NULL) hears the choice before any
 * output. When a recipient cannot be encrypted to, nothing is written and
 * the error (SMIME_AGENT_E_RECIPIENT) lists every failing recipient. */
int smime_agent_encrypt(struct smime_agent *a, const struct smime_agent_encrypt_options *o, int in_fd, int out_fd,
                        smime_agent_encrypt_fn fn, void *userdata);

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
