/* proto.h — the smime-agent wire protocol: framing, field encoding, limits.
 *
 * Shared by the agent and every client. This layer knows bytes only: it never
 * links OpenSSL or PKCS#11, and it is the only code that turns untrusted
 * lengths into memory accesses. Everything here is specified in PROTOCOL.md;
 * change both together.
 *
 * A frame is a big-endian u32 body length followed by the body. The body is a
 * u8 message type and a payload. DATA payloads are raw bytes; every other
 * payload is a sequence of fields: u16 tag, u32 length, value.
 *
 * Functions return 0 (or a positive count) on success and a negative errno
 * code on failure:
 *   -EPROTO    malformed frame or field (bad length, NUL in a string, ...)
 *   -EMSGSIZE  a frame, chunk, string or nesting over its limit
 *   -ENOENT    the field asked for is absent
 *   -ECONNRESET/-EPIPE/-EIO  the peer went away or the socket failed
 *   -ENOMEM
 */
#ifndef SMIME_PROTO_H
#define SMIME_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PROTO_VERSION 1u

/* Hard limits. A receiver rejects anything larger before allocating. */
#define PROTO_MAX_FRAME  (1024u * 1024u)   /* body bytes (type + payload) */
#define PROTO_MAX_CHUNK  (256u * 1024u)    /* payload bytes of one DATA frame */
#define PROTO_MAX_STRING (64u * 1024u)     /* bytes of one string field */
#define PROTO_MAX_DEPTH  4u                /* nesting of group fields */

/* Message types: client to agent. */
enum {
        PROTO_HELLO = 0x01,
        PROTO_STATUS = 0x02,
        PROTO_KEYS = 0x03,
        PROTO_CERTS = 0x04,     /* address book listing */
        PROTO_IMPORT = 0x05,    /* add certificates to the address book */
        PROTO_TRUST = 0x06,     /* record a trust decision */
        PROTO_VERIFY = 0x07,
        PROTO_ENCRYPT = 0x08,
        PROTO_SIGN = 0x10,
        PROTO_DECRYPT = 0x11,
        PROTO_DATA = 0x20,      /* both directions */
        PROTO_END = 0x21,
        PROTO_PIN = 0x30,
        PROTO_CANCEL = 0x31,
        /* Tokens and PINs (0x40-0x4f). */
        PROTO_LOGIN = 0x40,     /* log in ahead of time: NEED_PIN as for SIGN, then DONE */
        PROTO_LOCK = 0x41,      /* log out of every (or the selected) token: DONE */
};

/* Message types: agent to client. */
enum {
        PROTO_MORE = 0x22,
        PROTO_HELLO_OK = 0x81,
        PROTO_STATUS_OK = 0x82,
        PROTO_KEY = 0x83,
        PROTO_CERT = 0x84,      /* one address book entry */
        PROTO_DONE = 0x8f,
        PROTO_NEED_PIN = 0x90,
        PROTO_READY = 0x91,
        PROTO_ERROR = 0xff,
};

/* Field tags. One namespace for all messages; see PROTOCOL.md for which
 * message carries which field and its type (u = uint, s = string, g = group). */
enum {
        PT_VERSION = 1,         /* u */
        PT_SOFTWARE = 2,        /* s */
        PT_INTERACTIVE = 3,     /* u: client can answer NEED_PIN */

        PT_KEY = 10,            /* s: PKCS#11 URI or e-mail address */
        PT_FORMAT = 11,         /* s: "der" | "pem" | "smime" */
        PT_DETACHED = 12,       /* u */
        PT_DIGEST = 13,         /* s: "sha256" | "sha384" | "sha512" */
        PT_NO_CERTS = 14,       /* u */
        PT_CHAIN = 15,          /* u */
        PT_PSS = 16,            /* u */

        PT_CODE = 20,           /* u */
        PT_MESSAGE = 21,        /* s */

        PT_PIN = 30,            /* s (secret) */

        PT_URI = 40,            /* s */
        PT_LABEL = 41,          /* s */
        PT_SUBJECT = 42,        /* s */
        PT_ISSUER = 43,         /* s */
        PT_SERIAL = 44,         /* s: certificate serial, hex */
        PT_EMAIL = 45,          /* s, repeatable */
        PT_KEY_TYPE = 46,       /* s: "RSA" | "EC" | "Ed25519" */
        PT_KEY_BITS = 47,       /* u */
        PT_USAGE = 48,          /* s, repeatable: "sign" | "decrypt" */
        PT_NOT_BEFORE = 49,     /* u: seconds since the epoch */
        PT_NOT_AFTER = 50,      /* u */
        PT_USABLE = 51,         /* u */
        PT_STATUS_TEXT = 52,    /* s */
        PT_CURVE = 53,          /* s */
        PT_DEFAULT = 54,        /* u */

        PT_TOKEN = 60,          /* g, repeatable (STATUS_OK) */
        PT_MANUFACTURER = 61,   /* s */
        PT_MODEL = 62,          /* s */
        PT_TOKEN_SERIAL = 63,   /* s */
        PT_MODULE_NAME = 64,    /* s */
        PT_LOGIN_REQUIRED = 65, /* u */
        PT_LOGGED_IN = 66,      /* u */
        PT_PIN_STATE = 67,      /* s: "ok" | "count-low" | "final-try" | "locked" */
        PT_PROTECTED_AUTH = 68, /* u */
        PT_TOKEN_LABEL = 69,    /* s */
        PT_MODULE = 70,         /* g, repeatable (STATUS_OK) */
        PT_LIBRARY = 71,        /* s: module library description */
        PT_KEY_COUNT = 72,      /* u */
        PT_PATH = 73,           /* s */

        PT_BYTES_IN = 80,       /* u */
        PT_BYTES_OUT = 81,      /* u */

        PT_CIPHER = 90,         /* s: content cipher, e.g. "aes-256-gcm" */
        PT_AUTHENTICATED = 91,  /* u: 1 = AEAD tag verified over the whole content */
        PT_RECIPIENT = 92,      /* s, repeatable: a recipient the message was encrypted for */
        PT_KEY_TRANSPORT = 93,  /* s: how the content key reached us, e.g. "rsa-oaep" */

        /* Address book, verify and encrypt (tags 100-149). */
        PT_FINGERPRINT = 100,   /* s: SHA-256 of the certificate, lowercase hex */
        PT_TRUST = 101,         /* s: "trusted" | "distrusted" | "none" (decision); in SIGNER: how trusted */
        PT_CERT_DATA = 102,     /* b: a certificate (DER or PEM) */
        PT_SOURCE = 103,        /* s: "harvested" | "imported" | "token" | "file" */
        PT_ADDED = 104,         /* u */
        PT_CAPS = 105,          /* s, repeatable: SMIMECapabilities ("aes-256-gcm", ...) */
        PT_PROBLEM = 106,       /* s, repeatable: a problem by name ("EXPIRED", ...) */
        PT_VERDICT = 107,       /* s: "good" | "bad" | "untrusted" */
        PT_SIGNER = 108,        /* g, repeatable */
        PT_SIGNING_TIME = 109,  /* u */
        PT_SIG_ALG = 110,       /* s: "rsa-pkcs1-v1.5" | "rsa-pss" | "ecdsa" | "ed25519" */
        PT_CHAIN_SUBJECT = 111, /* s, repeatable: the chain, signer first */
        PT_HINT = 112,          /* s, repeatable */
        PT_FROM = 113,          /* s: the sender address to match */
        PT_RECIPIENT_CERT = 115,/* b, repeatable: a recipient certificate (DER or PEM) */
        PT_NO_SELF = 116,       /* u */
        PT_RECIPIENT_INFO = 118,/* g, repeatable (READY of ENCRYPT) */
        /* ENCRYPT also uses RECIPIENT (an e-mail address or fingerprint;
         * in groups, the recipient as named), CIPHER and KEY_TRANSPORT. */
        PT_FAILED = 120,        /* g, repeatable (ERROR RECIPIENT) */
        PT_SIGNATURE = 121,     /* b: a detached signature (DER or PEM) */
        PT_COUNT = 122,         /* u */
        PT_SUMMARY = 123,       /* s: the verify result as a sentence */
        PT_NO_CONTENT = 124,    /* u: do not send the verified content */
        PT_TRUST_PATH = 125,    /* s: "anchor" | "trusted-by-you" | "distrusted" | "untrusted" */
        /* Revocation (200-219). */
        PT_CRL_COUNT = 200,     /* u: CRLs IMPORT stored (new, or newer than the one held) */
        /* Tokens and PINs (160-179). */
        PT_LOGIN_EXPIRES = 160, /* u: when the cached login ends (epoch seconds), if nothing uses it */
        PT_SIGN_EXPIRES = 161,  /* u: ... for signing */
        PT_DECRYPT_EXPIRES = 162, /* u: ... for decryption */
        PT_LOGIN_POLICY = 163,  /* s: the PIN cache policy, for people */
        PT_TOKEN_STATE = 164,   /* s: "present" | "removed" | "unresponsive" */
        PT_LOGGED_OUT = 165,    /* u: tokens LOCK logged out */

        /* Hot-plug (tags 220-229). */
        PT_HOTPLUG = 220,       /* s: in MODULE: "events" | "poll" */
        /* Context-specific logins (240-249). */
        PT_SESSION_ENV = 230,   /* s, repeatable: HELLO: "NAME=value" of the client's session (a pinentry's display) */
        PT_CONTEXT_KEY = 240,   /* s: NEED_PIN: the PIN is for this CKA_ALWAYS_AUTHENTICATE key's next use */
        PT_PIN_PAD_NOTICE = 241, /* u: HELLO: tell me before a PIN pad login (NEED_PIN with PROTECTED_AUTH = 1) */
};

/* Stable error codes carried in ERROR.CODE. */
enum proto_error {
        PE_PROTOCOL = 1,        /* malformed or unexpected message; connection closed */
        PE_TOO_LARGE = 2,       /* over a limit; connection closed */
        PE_VERSION = 3,         /* unsupported protocol version; connection closed */
        PE_UNSUPPORTED = 4,     /* unknown request or option value */
        PE_BUSY = 5,            /* agent at its connection limit */
        PE_INTERNAL = 6,
        PE_CANCELLED = 7,
        PE_PERMISSION = 8,
        PE_NO_KEY = 10,
        PE_AMBIGUOUS_KEY = 11,
        PE_NO_CERT = 12,
        PE_CERT_EXPIRED = 13,
        PE_KEY_USAGE = 14,
        PE_MECHANISM = 15,
        PE_NO_PRIVATE_KEY = 16,
        PE_PIN_REQUIRED = 20,
        PE_PIN_INCORRECT = 21,
        PE_PIN_LOCKED = 22,
        PE_TOKEN = 23,
        PE_TOKEN_REMOVED = 24,
        PE_BAD_INPUT = 30,
        PE_NOT_RECIPIENT = 31,  /* no key on any token matches a recipient of the message */
        PE_INTEGRITY = 32,      /* content failed authentication or padding: discard the output */
        PE_DECRYPT_FAILED = 33, /* a matching key could not recover the content key */
        PE_RECIPIENT = 40,      /* a recipient cannot be encrypted to (FAILED groups say why) */
        PE_NOT_FOUND = 41,      /* no such certificate in the address book */
        PE_STORE = 42,          /* the address book cannot be read or written */
};

/* Symbolic name of an error code ("PIN_INCORRECT"), or "UNKNOWN". */
const char *proto_error_name(uint32_t code);
/* Name of a message type ("SIGN"), or "UNKNOWN". */
const char *proto_type_name(uint8_t type);

/* ---- Building a message ------------------------------------------------ */

/* A message under construction. Grows as needed up to PROTO_MAX_FRAME;
 * buf holds the 4-byte length prefix followed by the body so it can be
 * written with one call. */
struct proto_msg {
        uint8_t *buf;
        size_t len;             /* bytes used in buf, prefix included */
        size_t cap;
        size_t groups[PROTO_MAX_DEPTH]; /* offsets of open group headers */
        unsigned depth;
        int err;                /* first error; later puts are no-ops */
};

int proto_msg_init(struct proto_msg *m, uint8_t type);
void proto_msg_free(struct proto_msg *m);      /* wipes, then frees */
int proto_put_uint(struct proto_msg *m, uint16_t tag, uint64_t v);
int proto_put_string(struct proto_msg *m, uint16_t tag, const char *s);
int proto_put_bytes(struct proto_msg *m, uint16_t tag, const void *p, size_t n);
int proto_begin_group(struct proto_msg *m, uint16_t tag);
int proto_end_group(struct proto_msg *m);
/* Sticky error of the puts so far: 0, -EMSGSIZE, -ENOMEM, or -EPROTO (a
 * value of the wrong kind for its tag, an unbalanced proto_end_group). */
static inline int proto_msg_error(const struct proto_msg *m) { return m->err; }

/* ---- Reading a message -------------------------------------------------- */

/* A received frame. body is owned (reused across reads, wiped on free). */
struct proto_frame {
        uint8_t type;
        uint8_t *body;          /* payload, without the type byte */
        size_t len;             /* payload length */
        uint8_t *raw;           /* allocation: type byte + payload */
        size_t cap;
};

struct proto_field {
        uint16_t tag;
        const uint8_t *val;
        size_t len;
};

/* Iterates over the fields of a payload or of a group's value. */
struct proto_iter {
        const uint8_t *p;
        size_t left;
};

void proto_frame_free(struct proto_frame *f);   /* wipes, then frees */
void proto_frame_wipe(struct proto_frame *f);   /* wipe the payload (after a PIN) */

/* Checks that a field payload is well formed: every field fits, strings
 * hold no NUL and respect PROTO_MAX_STRING, uints are 8 bytes, groups nest
 * within PROTO_MAX_DEPTH and are themselves well formed. The type of each
 * tag is known to this function (see the tag table above); unknown tags are
 * accepted as opaque bytes. */
int proto_validate(const uint8_t *p, size_t n);

void proto_iter_init(struct proto_iter *it, const uint8_t *p, size_t n);
/* 1 with *f filled, 0 at the end, -EPROTO on a malformed field. */
int proto_iter_next(struct proto_iter *it, struct proto_field *f);

/* Lookups in a payload (or a group value). The first occurrence wins. */
int proto_get_uint(const uint8_t *p, size_t n, uint16_t tag, uint64_t *out);
/* Copies into a NUL-terminated string allocated with malloc. */
int proto_get_string(const uint8_t *p, size_t n, uint16_t tag, char **out);
/* Points into the payload; not NUL-terminated. */
int proto_get_raw(const uint8_t *p, size_t n, uint16_t tag, const uint8_t **val, size_t *len);
/* A field's value as a uint / NUL-terminated malloc'd string. */
int proto_field_uint(const struct proto_field *f, uint64_t *out);
int proto_field_string(const struct proto_field *f, char **out);

/* ---- Socket I/O (blocking fds; EINTR and short reads/writes handled) ---- */

/* Reads one frame. Returns 1 with *f filled, 0 on a clean EOF before the
 * first byte of a frame, or a negative code. A length of 0 or above
 * PROTO_MAX_FRAME gives -EMSGSIZE without reading the body; a DATA frame
 * with an empty payload or one above PROTO_MAX_CHUNK gives -EMSGSIZE; a
 * non-DATA payload failing proto_validate() gives its error (-EPROTO, or
 * -EMSGSIZE for an over-long string or too deep nesting); EOF inside a
 * frame gives -ECONNRESET; other socket errors -errno (-EAGAIN after an
 * SO_RCVTIMEO). After any error the stream is out of step: close it. On
 * error f->len is 0 and its bytes are wiped. */
int proto_read_frame(int fd, struct proto_frame *f);

/* Writes a built message (its length prefix is filled in here). */
int proto_write_msg(int fd, struct proto_msg *m);
/* Writes one DATA frame (1 to PROTO_MAX_CHUNK bytes) without copying. */
int proto_write_data(int fd, const void *p, size_t n);
/* Writes a message of the given type with an empty payload (END, MORE, DONE...). */
int proto_write_empty(int fd, uint8_t type);
/* Write a DATA frame of n bytes (none when n is 0), then an empty message
 * of the given type or a built message, in one system call when the socket
 * takes it all: the reader wakes once instead of twice. Same limits as
 * proto_write_data() and proto_write_msg(). */
int proto_write_data_and_empty(int fd, const void *p, size_t n, uint8_t type);
int proto_write_data_and_msg(int fd, const void *p, size_t n, struct proto_msg *m);
/* Writes ERROR {CODE, MESSAGE}. */
int proto_write_error(int fd, uint32_t code, const char *message);

#endif
