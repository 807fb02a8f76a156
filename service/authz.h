/* authz.h — who may use which key for what.
 *
 * The agent always serves its own UID, for every key and operation. Other
 * local users and groups are served only where an "allow" line of the
 * configuration grants it:
 *
 *   allow = KEY OPERATIONS WHO [WHO...]
 *     KEY         a PKCS#11 URI (RFC 7512) naming a key or a whole token
 *                 (pkcs11:token=mail-hsm), an e-mail address of the key's
 *                 certificate, or * for every key
 *     OPERATIONS  sign, decrypt, sign,decrypt, or * for both
 *     WHO         user:NAME, user:UID, group:NAME, group:GID, or * (any
 *                 local user that can reach the socket)
 *
 * Peers are identified by the kernel (SO_PEERCRED, SO_PEERGROUPS) when they
 * connect; nothing a client says about itself counts.
 *
 * Request handlers call authz_check() once they know the identity and
 * before they log in or touch the key:
 *
 *      r = authz_check(c, id, AUTHZ_SIGN);
 *      if (r)
 *              goto done;      // ERROR PERMISSION sent and audited
 *
 * Must never: grant anything no "allow" line names, or let a client's own
 * claims (HELLO SOFTWARE, the executable path) decide.
 */
#ifndef SMIME_AUTHZ_H
#define SMIME_AUTHZ_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "agent.h"
#include "identity.h"

enum authz_op {
        AUTHZ_SIGN = 1u << 0,
        AUTHZ_DECRYPT = 1u << 1,
};

/* Parses the value of one "allow" line and appends it to cfg->grants. On a
 * bad line returns -EINVAL with the reason in err. */
int authz_config_add(struct agent_config *cfg, const char *value, char *err, size_t n);
void authz_config_free(struct agent_config *cfg);

/* True if the peer may connect at all: the agent's own UID, or a UID or
 * group named by some "allow" line (or an "allow" line for *). */
bool authz_may_connect(const struct agent_config *cfg, uid_t uid, gid_t gid, const gid_t *groups, size_t n_groups);

/* True if the peer of c may use id for op; no message, no audit (for
 * listings). */
bool authz_allowed(const struct conn *c, const struct identity *id, enum authz_op op);

/* True if the peer of c may use id for any operation (KEYS shows it). */
bool authz_visible(const struct conn *c, const struct identity *id);
/* authz_visible() as an identity_visible_fn (ctx: the connection), for identity_select(). */
bool authz_visible_fn(const void *c, const struct identity *id);

/* 0 if the peer of c may use id for op. Otherwise sends ERROR PERMISSION
 * saying who was refused what and how to grant it, writes the audit record
 * of the denial, and returns PE_PERMISSION (or a negative code when the
 * ERROR could not be sent and the connection must close). */
int authz_check(struct conn *c, const struct identity *id, enum authz_op op);

/* "sign", "decrypt". */
const char *authz_op_name(enum authz_op op);

#endif
