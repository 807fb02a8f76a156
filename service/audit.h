/* audit.h — one audit record per use (or refused use) of a private key.
 *
 * Under systemd (log.c found our stderr to be the journal stream) each
 * record is one journal entry with MESSAGE_ID=AUDIT_MESSAGE_ID and these
 * fields:
 *
 *   SMIME_OPERATION       sign | decrypt
 *   SMIME_RESULT          ok | denied | failed
 *   SMIME_ERROR           protocol error name when not ok (PERMISSION, PIN_INCORRECT, ...)
 *   SMIME_KEY_URI         RFC 7512 URI of the private key
 *   SMIME_CERT_SUBJECT    subject of the key's certificate
 *   SMIME_CONTENT_SHA256  SHA-256 (hex) of the content the client sent (sign)
 *                         or received (decrypt); absent when no content passed
 *   SMIME_DURATION_SEC    request duration, seconds (e.g. 0.012)
 *   SMIME_PEER_PID, SMIME_PEER_UID, SMIME_PEER_GID  from SO_PEERCRED
 *   SMIME_PEER_EXE        /proc/PID/exe at connect time ("" if unreadable)
 *   SMIME_PEER_COMM       /proc/PID/comm at connect time
 *
 * Otherwise it is one line on stderr starting "smime-agent: audit: " with
 * the same fields as key=value pairs (lower case, without the SMIME_
 * prefix; values with spaces are quoted).
 *
 *   journalctl MESSAGE_ID=4b5e3a1c9f2d4e6b8a7c0d1e2f3a4b5c
 *
 * Request handlers call audit_key_use() once per request that reached a
 * key, with the outcome (0 or the PE_* code sent), after authz_check()
 * passed; authz_check() audits its own denials. decrypt does it the same
 * way as sign:
 *
 *      double t0 = audit_now();
 *      ...
 *      audit_key_use(c, AUDIT_DECRYPT, id->tk->uri, id->subject,
 *                    have_content ? sha256 : NULL, r ? c->last_error : 0,
 *                    audit_now() - t0);
 *
 * Must never: record a PIN, content, or any key material — only the
 * content's SHA-256.
 */
#ifndef SMIME_AUDIT_H
#define SMIME_AUDIT_H

#include <stdint.h>
#include <sys/types.h>

#include "agent.h"

#define AUDIT_MESSAGE_ID "4b5e3a1c9f2d4e6b8a7c0d1e2f3a4b5c"

enum audit_op {
        AUDIT_SIGN = 1,
        AUDIT_DECRYPT = 2,
};

/* Monotonic clock in seconds, for durations. */
double audit_now(void);

/* result: 0 for success, else the proto error code the client was sent
 * (PE_PERMISSION counts as "denied"). sha256 may be NULL. */
void audit_key_use(const struct conn *c, enum audit_op op, const char *key_uri, const char *subject,
                   const unsigned char sha256[32], uint32_t result, double seconds);

/* A peer refused at connect time (no grant names its user or groups). */
void audit_connection_refused(pid_t pid, uid_t uid, gid_t gid, const char *exe, const char *comm);

#endif
