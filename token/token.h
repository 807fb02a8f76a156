/* token.h — everything smime-agent does with PKCS#11, behind one narrow door.
 *
 * This is the only directory that calls C_* functions. Modules come from
 * p11-kit (every registered module, or one module by path); URIs are
 * RFC 7512, parsed and matched by p11-kit.
 *
 * What this layer must never do: read a sensitive attribute of a private key
 * (CKA_VALUE, CKA_PRIVATE_EXPONENT, primes, exponents, coefficient), call
 * C_WrapKey, C_CopyObject or C_SetAttributeValue on a key, or log a PIN.
 * Only the public attributes needed to choose a key are read.
 *
 * Every function is safe to call from several threads at once. Errors are
 * negative errno codes; when a PKCS#11 call failed, struct token_error holds
 * its CK_RV and a message naming the call, the token and the CKR_* name.
 */
#ifndef SMIME_TOKEN_H
#define SMIME_TOKEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct token_store;
struct token;
struct token_uri;

struct token_error {
        unsigned long rv;       /* CK_RV of the failed call; 0 if not PKCS#11 */
        char message[512];      /* e.g. "C_Login on token 'alice' (SoftHSM project): CKR_PIN_INCORRECT" */
};

/* "CKR_PIN_INCORRECT" for 0xa0; "CKR_0x..." for values PKCS#11 does not name. */
const char *token_rv_name(unsigned long rv);

/* ---- The store: modules, tokens, keys ----------------------------------- */

struct token_store_options {
        const char *module_path;        /* NULL: every module p11-kit has configured */
        unsigned max_sessions;          /* per token; 0 means 8 */
        /* Deadline of every call into a module, in ms; 0: none, calls run on
         * the caller's thread. With a deadline, each operation runs on a
         * worker thread and the caller waits at most this long (logins on a
         * PIN pad: at least 5 minutes): then it gets -ETIMEDOUT, and the
         * token is "unresponsive" (every request for it fails at once, no
         * further call is made into it) until the call returns. */
        unsigned call_timeout_ms;
};

/* Loads and initialises the modules and scans every token once. A module
 * that fails to initialise is skipped with a message in err (the first such
 * failure) as long as at least one module loads; with module_path set, its
 * failure is fatal. No tokens at all is not an error. */
int token_store_open(struct token_store **out, const struct token_store_options *opt,
                     struct token_error *err);
void token_store_free(struct token_store *s);

/* At shutdown: waits (up to 2 s per module) for the calls in progress and
 * lets no new call into any module start, so that no thread is inside a
 * module while the process exits and the modules' static destructors run.
 * Modules watched by slot events are finalised (C_Finalize), which ends
 * their threads' waits; a thread still inside its module 2 s later is left
 * there (it is detached and holds nothing: exit does not wait for it). */
void token_store_stop(struct token_store *s);

/* How the hot-plug code learns of tokens coming and going in a module. */
enum token_hotplug {
        TOKEN_HOTPLUG_POLL = 0,         /* its slot list is polled (also while the probe below runs) */
        TOKEN_HOTPLUG_EVENTS,           /* a thread blocks in its C_WaitForSlotEvent */
};

struct token_module_info {
        char name[256];         /* p11-kit's module name, or the path */
        char library[33];       /* CK_INFO.libraryDescription, trimmed */
        char manufacturer[33];  /* CK_INFO.manufacturerID, trimmed */
        unsigned version_major, version_minor;
        enum token_hotplug hotplug;
        /* Why the module is polled (or "" while it is watched by events),
         * e.g. "C_WaitForSlotEvent: CKR_FUNCTION_NOT_SUPPORTED". */
        char hotplug_note[256];
};

size_t token_store_module_count(struct token_store *s);
int token_store_module_info(struct token_store *s, size_t i, struct token_module_info *out);

size_t token_store_token_count(struct token_store *s);
struct token *token_store_token(struct token_store *s, size_t i);

enum token_pin_state {
        TOKEN_PIN_OK = 0,
        TOKEN_PIN_COUNT_LOW,    /* CKF_USER_PIN_COUNT_LOW */
        TOKEN_PIN_FINAL_TRY,    /* CKF_USER_PIN_FINAL_TRY */
        TOKEN_PIN_LOCKED,       /* CKF_USER_PIN_LOCKED */
};

enum token_state {
        TOKEN_STATE_PRESENT = 0,
        TOKEN_STATE_REMOVED,            /* gone from its slot, or its module lost it; kept for its return */
        TOKEN_STATE_UNRESPONSIVE,       /* a call into its module did not return within the deadline */
};

struct token_info {
        char label[33];         /* trimmed, NUL-terminated */
        char manufacturer[33];
        char model[17];
        char serial[17];
        char module_name[256];
        char uri[1024];         /* RFC 7512 URI naming the token */
        bool login_required;    /* CKF_LOGIN_REQUIRED */
        bool logged_in;         /* a session of ours is in a user state */
        bool protected_auth_path;
        enum token_pin_state pin_state;
        enum token_state state;
};

/* Fresh C_GetTokenInfo plus our login state. A token that is removed or
 * unresponsive is not asked: out then holds what was last read, with
 * state saying why, and the call still returns 0. */
int token_get_info(struct token *t, struct token_info *out, struct token_error *err);

/* The label as read when the token was found; no call into the module. */
const char *token_label(const struct token *t);

/* ---- Hot-plug ------------------------------------------------------------ */

/* Compares every module's slots with the tokens known: a token that went
 * away is marked removed (its sessions and login are dropped; its keys stay
 * in the snapshot, so requests for them can say "removed": see
 * token_is_present); a token that appears is opened and scanned; a token
 * that comes back (same label, manufacturer, model and serial, in any slot)
 * is the same struct token again, so pointers to it stay valid. A module
 * that lost a token (or fails C_GetSlotList) is re-initialised (C_Finalize,
 * C_Initialize) with a growing back-off, because some modules (SoftHSM,
 * p11-kit's RPC client) only see a re-created token or a restarted server
 * after that; this logs out the module's other tokens too. Returns 1 when
 * the set of tokens or keys changed, 0 when not, negative on failure. */
int token_store_refresh(struct token_store *s, struct token_error *err);

/* Waits up to timeout_ms for a token operation to report a sign that a
 * token went away (CKR_DEVICE_REMOVED, a failed presence check...), or for
 * a module to report a slot event. True if one did: refresh now rather
 * than at the next poll. */
bool token_store_wait_suspect(struct token_store *s, unsigned timeout_ms);

/* Looks at the objects of every present token again (keys and certificates
 * added or removed by another program since the last scan; PKCS#11 has no
 * notification for that). Returns how many tokens were scanned. */
int token_store_rescan(struct token_store *s);

/* Slot events. For each module a thread asks C_WaitForSlotEvent with
 * CKF_DONT_BLOCK: CKR_FUNCTION_NOT_SUPPORTED (SoftHSM, p11-kit's RPC
 * client) or another error leaves the module polled; otherwise the thread
 * then blocks in C_WaitForSlotEvent(0) and wakes token_store_wait_suspect()
 * on every event. The thread holds no lock while it waits (a module
 * re-initialisation's C_Finalize ends the wait with
 * CKR_CRYPTOKI_NOT_INITIALIZED, and it waits again afterwards). A module
 * whose wait fails at once 5 times in a row, or that reports events
 * without pause (more than 100 in 10 s), is polled from then on; the
 * reason is in token_module_info.hotplug_note. Returns how many threads
 * were started. Call once. */
int token_store_watch_slots(struct token_store *s);

/* Which modules token_store_refresh_due() looks at. Event-watched modules
 * that reported an event, or lost a token and whose re-initialisation is
 * due, always; and besides: */
enum token_refresh {
        TOKEN_REFRESH_DUE = 0,          /* nothing else */
        TOKEN_REFRESH_POLLED,           /* every polled module (a poll, or a hint of removal) */
        TOKEN_REFRESH_ALL,              /* every module (the slow safety poll) */
};

/* Like token_store_refresh(), but only the modules named above. */
int token_store_refresh_due(struct token_store *s, enum token_refresh which, struct token_error *err);

/* Milliseconds until a refresh should run even without a poll or a hint:
 * an event-watched module's re-initialisation (after a lost token) falls
 * due, or a module's slot-event wait will have lasted long enough to count
 * as watched (so that status and the log show it); UINT32_MAX if nothing
 * is pending. Polled modules are left to the poll. */
uint32_t token_store_next_due_ms(struct token_store *s);

/* ---- Keys ------------------------------------------------------------- */

enum token_key_type {
        TOKEN_KEY_UNKNOWN = 0,
        TOKEN_KEY_RSA,
        TOKEN_KEY_EC,
        TOKEN_KEY_EDDSA,
};

/* One identity on a token: the objects sharing one CKA_ID — a certificate,
 * a public key and a private key, any of which may be missing (a private key
 * marked CKA_PRIVATE is only visible after login). Immutable once published
 * in a snapshot.
 *
 * Lifetime: functions taking a const struct token_key * need the pointer
 * from a snapshot the caller still holds (they find hidden state through
 * it) — never a copy. k->token lives as long as the store. id[] holds at
 * most 256 bytes; longer CKA_IDs are kept whole internally for lookups. */
struct token_key {
        struct token *token;
        uint8_t id[256];
        size_t id_len;
        char label[256];        /* CKA_LABEL of the private key, else the certificate, else the public key */
        char uri[1024];         /* RFC 7512 URI of the private key (type=private), with token and id */
        const uint8_t *cert_der;        /* CKA_VALUE of the X.509 certificate; NULL if none */
        size_t cert_len;
        enum token_key_type type;       /* from CKA_KEY_TYPE of the private or public key */
        unsigned long modulus_bits;     /* RSA: CKA_MODULUS_BITS of the public key, 0 if unknown */
        const uint8_t *ec_params;       /* EC/EdDSA: CKA_EC_PARAMS (DER), NULL if unknown */
        size_t ec_params_len;
        bool has_private;       /* a private key object with this CKA_ID is visible */
        bool has_public;
        bool can_sign;          /* private key's CKA_SIGN */
        bool can_decrypt;       /* CKA_DECRYPT */
        bool can_derive;        /* CKA_DERIVE */
        bool always_authenticate;
};

/* A reference-counted snapshot of every key on every token. A later scan
 * (after a login) publishes a new snapshot; old ones stay valid until their
 * last reference goes. */
struct token_keys {
        size_t n;
        const struct token_key *const *keys;
};

struct token_keys *token_store_keys(struct token_store *s);
void token_keys_unref(struct token_keys *k);

/* ---- URIs --------------------------------------------------------------- */

/* Parses an RFC 7512 URI with p11-kit; -EINVAL if it is not one. */
int token_uri_parse(const char *s, struct token_uri **out);
void token_uri_free(struct token_uri *u);
/* True when the URI's module, token and object attributes (id, object label,
 * type) all match this key. An object label or type matches when any of the
 * key's objects (certificate, public or private key) carries it. */
bool token_key_match_uri(const struct token_key *k, const struct token_uri *u);
/* True when the URI's module and token attributes match this token. */
bool token_match_uri(struct token *t, const struct token_uri *u);

/* ---- Login -------------------------------------------------------------- */

/* True if a private-key operation on this token needs a C_Login first. */
bool token_needs_login(struct token *t);

/* C_Login(CKU_USER). pin may be NULL when the token has a protected
 * authentication path. Never retried here: a wrong PIN is reported once,
 * with the token's PIN state in err->message. On success the token's objects
 * are scanned again (private keys become visible) and a new snapshot of keys
 * is published. CKR_USER_ALREADY_LOGGED_IN counts as success. */
int token_login(struct token *t, const char *pin, size_t pin_len, struct token_error *err);

/* As token_login(), but when the token is already logged in it is logged
 * out first, so that the PIN is really checked (a PIN cache policy that
 * asks every time). A wrong PIN leaves the token logged out. */
int token_relogin(struct token *t, const char *pin, size_t pin_len, struct token_error *err);

/* C_Logout: the token's private keys need a login again. Operations in
 * progress on other threads finish first (login state changes wait for
 * them). Not logged in is not an error. */
int token_logout(struct token *t, struct token_error *err);

/* Our login flag, without a call into the module. */
bool token_is_logged_in(struct token *t);
/* False once the token was found removed (until it comes back). Its keys
 * stay in the snapshot meanwhile, so requests for them can say so. */
bool token_is_present(struct token *t);
/* Present, removed, or unresponsive (a call overran its deadline and has
 * not returned); no call into the module. */
enum token_state token_get_state(struct token *t);
/* CKF_LOGIN_REQUIRED as read when the token was found. */
bool token_login_required(const struct token *t);

/* ---- Private-key operations ---------------------------------------------- */

enum token_mech {
        TOKEN_MECH_RSA_PKCS,    /* CKM_RSA_PKCS; input: DER DigestInfo */
        TOKEN_MECH_RSA_PSS,     /* CKM_RSA_PKCS_PSS; input: the digest */
        TOKEN_MECH_ECDSA,       /* CKM_ECDSA; input: the digest; output: r || s */
        TOKEN_MECH_EDDSA,       /* CKM_EDDSA; input: the whole message (pure EdDSA) */
};

enum token_hash {
        TOKEN_HASH_SHA1,
        TOKEN_HASH_SHA224,
        TOKEN_HASH_SHA256,
        TOKEN_HASH_SHA384,
        TOKEN_HASH_SHA512,
};

/* A key with CKA_ALWAYS_AUTHENTICATE (PIV's signature key) needs a
 * context-specific login, C_Login(CKU_CONTEXT_SPECIFIC), between the
 * operation's Init and the operation itself, every time. This is the PIN for
 * it; pin NULL (pin_len 0) logs in on the token's PIN pad
 * (CKF_PROTECTED_AUTHENTICATION_PATH). Keys without the attribute ignore it. */
struct token_auth {
        const char *pin;
        size_t pin_len;
};

struct token_sign_params {
        const struct token_auth *auth;  /* CKA_ALWAYS_AUTHENTICATE keys only; NULL: fail with -EKEYREJECTED */
        enum token_mech mech;
        enum token_hash pss_hash;       /* PSS: hashAlg, also used for MGF1 */
        unsigned long pss_salt_len;     /* PSS: sLen in bytes */
};

/* True if the key's token lists the mechanism with CKF_SIGN and the private
 * key (when visible) has CKA_SIGN. */
bool token_key_can(const struct token_key *k, enum token_mech mech);

/* Signs with the private key of k on a pooled session. Waits (FIFO) for a
 * free session when the token's pool is exhausted. *sig_len is the size of
 * sig on entry and the signature length on return; -ENOBUFS if too small.
 * -ENOENT if no private key with k's CKA_ID is visible (log in first).
 * -EACCES with err->rv = CKR_USER_NOT_LOGGED_IN when the token is not
 * logged in. A CKA_ALWAYS_AUTHENTICATE key: -EKEYREJECTED when p->auth is
 * NULL; when the context-specific login fails, its error as token_login()
 * reports it (err->rv CKR_PIN_INCORRECT: -EACCES; CKR_PIN_LOCKED: -EPERM),
 * tried exactly once. Any other PKCS#11 failure: -EIO with err filled. */
/* True when err says the token was not logged in (CKR_USER_NOT_LOGGED_IN):
 * logged out under the caller, who may log in again and retry once. */
bool token_error_not_logged_in(const struct token_error *err);

int token_sign(const struct token_key *k, const struct token_sign_params *p,
               const uint8_t *in, size_t in_len, uint8_t *sig, size_t *sig_len,
               struct token_error *err);

/* ---- Decryption and key agreement ------------------------------------------ */

enum token_dec_mech {
        TOKEN_DEC_RSA_PKCS,     /* CKM_RSA_PKCS: PKCS#1 v1.5 unpadded by the token */
        TOKEN_DEC_RSA_OAEP,     /* CKM_RSA_PKCS_OAEP with the given hash, MGF1 hash and label */
        TOKEN_DEC_RSA_X509,     /* CKM_RSA_X_509: the raw RSA result; the caller removes the padding */
        TOKEN_DEC_ECDH,         /* CKM_ECDH1_DERIVE (token_ecdh) */
        TOKEN_DEC_COUNT
};

struct token_decrypt_params {
        const struct token_auth *auth;  /* as in token_sign_params */
        enum token_dec_mech mech;
        enum token_hash oaep_hash;      /* OAEP: hashAlg */
        enum token_hash oaep_mgf1;      /* OAEP: MGF1 hash */
        const uint8_t *label;           /* OAEP: pSourceData, may be NULL */
        size_t label_len;
};

/* True if the key's token lists the mechanism with CKF_DECRYPT (CKF_DERIVE
 * for ECDH) and the private key (when visible) has CKA_DECRYPT / CKA_DERIVE. */
bool token_key_can_decrypt(const struct token_key *k, enum token_dec_mech mech);

/* Decrypts in (one RSA block) with the private key of k on a pooled session.
 * *out_len is the size of out on entry (at least the modulus size) and the
 * result's length on return. -EBADMSG with err filled when the token says
 * the ciphertext or its padding is invalid; -EOPNOTSUPP when the token
 * refuses the mechanism or its parameters (the caller may fall back to
 * TOKEN_DEC_RSA_X509); otherwise as token_sign(). */
int token_decrypt(const struct token_key *k, const struct token_decrypt_params *p,
                  const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len,
                  struct token_error *err);

/* ECDH (CKM_ECDH1_DERIVE, CKD_NULL) between the private key of k and the
 * peer's public point (uncompressed, 04 || x || y). The shared secret Z is
 * derived into a session object that is read and destroyed at once; the
 * long-term key is only the base of the derivation. *z_len: size of z on
 * entry (the field size is enough), length of Z on return. auth as in
 * token_sign_params. Errors as token_decrypt(). */
int token_ecdh(const struct token_key *k, const struct token_auth *auth, const uint8_t *peer, size_t peer_len,
               uint8_t *z, size_t *z_len, struct token_error *err);

#endif
