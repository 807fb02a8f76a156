/* policy.h — the PIN cache policy: how long a token login may be reused,
 * per token, per key and separately for signing and decryption, and the
 * thread that logs tokens out when their cached login expires.
 *
 * A PKCS#11 login belongs to the whole token, so "cached" means: the agent
 * stays logged in and lets later requests use the login without a PIN.
 * Each request asks policy_try_reuse() whether it may; when it may not,
 * it logs in again (token_relogin: C_Logout, then C_Login with a PIN just
 * asked for). Expiry is a C_Logout. The only PIN ever kept is the one
 * always-authenticate = reuse asks for (policy_keep_pin).
 *
 * Must never: keep a PIN (except the one always-authenticate = reuse
 * explicitly asks for, locked and wiped with the login), or log a token
 * out in the middle of a request
 * that holds its login (expiry waits until the request ends; `lock` does
 * not wait for requests, only for the token call in progress).
 */
#ifndef SMIME_POLICY_H
#define SMIME_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"
#include "token.h"

struct agent;
struct agent_config;

enum policy_use {
        POLICY_SIGN = 0,
        POLICY_DECRYPT = 1,
        POLICY_USES
};

#define POLICY_DEFAULT_IDLE 600         /* seconds */
#define POLICY_UNSET (-1L)

/* One section of the configuration: the global settings (selector NULL),
 * a [token URI] or a [key URI] section. Later sections override earlier
 * ones where both apply; per-use settings (sign-cache-idle) override the
 * general one (cache-idle) of the same section. */
struct policy_rule {
        char *selector;                 /* PKCS#11 URI; NULL for the global settings */
        bool key_section;
        struct token_uri *uri;
        long idle_all, idle[POLICY_USES];               /* seconds; 0 = ask every time */
        long lifetime_all, lifetime[POLICY_USES];       /* seconds; 0 = no limit */
        char *pin_file;                 /* [token] only: this token's PIN file */
        char *pin_credential;           /* [token] only: name of a systemd credential holding the PIN */
        int always_auth;                /* POLICY_AUTH_*: CKA_ALWAYS_AUTHENTICATE keys */
};

/* always-authenticate = ask | reuse */
enum { POLICY_AUTH_UNSET = 0, POLICY_AUTH_ASK = 1, POLICY_AUTH_REUSE = 2 };

/* Configuration: a section header line "[token URI]" or "[key URI]"
 * (without the brackets in header). 0, or -EINVAL with why filled. */
int policy_config_section(struct agent_config *cfg, const char *header, char *why, size_t n);
/* A "key = value" line in the current section (global when none started).
 * 1 when it was a policy setting, 0 when the key is not one, -EINVAL with
 * why filled when the value is bad or the setting is not allowed here. */
int policy_config_set(struct agent_config *cfg, const char *key, const char *value, char *why, size_t n);
void policy_config_free(struct agent_config *cfg);

/* Where token t's PIN comes from without asking: a [token] section's
 * pin-file or pin-credential (the file $CREDENTIALS_DIRECTORY/NAME that
 * systemd's LoadCredential= provides), else the global pin-credential,
 * else the global pin-file. 1 with path filled; 0 when none is configured
 * (ask the client); -ENOENT with why filled when a credential is
 * configured but $CREDENTIALS_DIRECTORY is not set. */
int policy_pin_source(const struct agent_config *cfg, struct token *t, char *path, size_t n, char *why, size_t wn);

/* True when the policy lets the agent log in to CKA_ALWAYS_AUTHENTICATE
 * key k (context-specific login) with a PIN it already has, instead of
 * asking for it (always-authenticate = reuse; the default is ask). */
bool policy_context_reuse(const struct agent_config *cfg, const struct token_key *k);
/* True when always-authenticate = reuse applies to some key of token t:
 * the agent then keeps the PIN typed for t's login (policy_keep_pin). */
bool policy_keeps_pin(const struct agent_config *cfg, struct token *t);
/* The PIN of token t's current login, kept in locked memory for
 * context-specific logins until the login ends (expiry, lock, logout,
 * removal, or the next login). */
void policy_keep_pin(struct token *t, const char *pin, size_t len);
/* Copies the kept PIN of t into pin (allocated here). 1 when there was
 * one, 0 when not, -ENOMEM. */
struct secret;
int policy_copy_pin(struct token *t, struct secret *pin);

/* The expiry thread. */
int policy_start(struct agent *a);

/* The settings that apply to key k (NULL: the token's own) for use u. */
void policy_resolve(const struct agent_config *cfg, struct token *t, const struct token_key *k,
                    enum policy_use u, long *idle, long *lifetime);

/* When the policy lets this request use the token's current login for k,
 * holds the login (no expiry until policy_release) and returns true. False
 * when the token is not logged in, or the policy wants the PIN again. */
bool policy_try_reuse(struct agent *a, const struct token_key *k, enum policy_use u);
/* Holds the login without asking the policy (the request just logged in). */
void policy_hold(struct agent *a, const struct token_key *k, enum policy_use u);
/* The end of a request that held the login of token t (for key id). */
void policy_release(struct agent *a, struct token *t, const uint8_t *id, size_t id_len, enum policy_use u);

/* A login just happened (any use). */
void policy_note_login(struct token *t);
/* The token was logged out (lock): forget its cached login. */
void policy_forget(struct token *t);

/* Adds LOGIN_EXPIRES, SIGN_EXPIRES, DECRYPT_EXPIRES (when logged in) and
 * LOGIN_POLICY for token t to a TOKEN group being built. */
void policy_put_status(struct agent *a, struct proto_msg *m, struct token *t, bool logged_in);

#endif
