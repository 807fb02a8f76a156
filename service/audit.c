/* audit.c — audit records of private-key use: journal fields, or one line
 * on stderr. See audit.h for the fields.
 *
 * Must never: record a PIN, content bytes or key material.
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <time.h>

#include <systemd/sd-journal.h>

#include "audit.h"
#include "log.h"

double audit_now(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *op_name(enum audit_op op)
{
        return op == AUDIT_DECRYPT ? "decrypt" : "sign";
}

static const char *result_name(uint32_t result)
{
        return result == 0 ? "ok" : result == PE_PERMISSION ? "denied" : "failed";
}

/* Appends " key=value" to line; the value quoted when it holds a space or
 * a quote, control characters and non-ASCII as \xNN so that one record is
 * one line whatever a certificate subject contains. */
static void add_kv(char *line, size_t cap, const char *key, const char *v)
{
        size_t used = strlen(line);
        bool quote = !*v || strpbrk(v, " \"\\=") != NULL;

        if (used + strlen(key) + 3 >= cap)
                return;
        used += (size_t)snprintf(line + used, cap - used, " %s=%s", key, quote ? "\"" : "");
        for (const unsigned char *p = (const unsigned char *)v; *p && used + 6 < cap; p++) {
                if (*p < 0x20 || *p >= 0x7f)
                        used += (size_t)snprintf(line + used, cap - used, "\\x%02x", *p);
                else if (*p == '"' || *p == '\\')
                        used += (size_t)snprintf(line + used, cap - used, "\\%c", *p);
                else
                        line[used++] = (char)*p;
        }
        if (quote && used + 1 < cap)
                line[used++] = '"';
        line[used] = '\0';
}

static void hex(char out[65], const unsigned char sha256[32])
{
        for (int i = 0; i < 32; i++)
                snprintf(out + 2 * i, 3, "%02x", sha256[i]);
}

/* The MESSAGE of a journal entry: like a stderr line, without the
 * SMIME_CONTENT_SHA256 and exe details (those are fields of their own). */
static void emit(int prio, const char *line, const char *op, const char *result, const char *error, const char *uri,
                 const char *subject, const char *sha, const char *duration, long pid, unsigned long uid,
                 unsigned long gid, const char *exe, const char *comm)
{
        if (!log_to_journal()) {
                /* One write per record: threads must not interleave. */
                fprintf(stderr, "smime-agent: audit:%s\n", line);
                return;
        }
        sd_journal_send("MESSAGE=audit:%s", line,
                        "MESSAGE_ID=" AUDIT_MESSAGE_ID,
                        "PRIORITY=%d", prio,
                        "SMIME_OPERATION=%s", op,
                        "SMIME_RESULT=%s", result,
                        "SMIME_ERROR=%s", error,
                        "SMIME_KEY_URI=%s", uri,
                        "SMIME_CERT_SUBJECT=%s", subject,
                        "SMIME_CONTENT_SHA256=%s", sha,
                        "SMIME_DURATION_SEC=%s", duration,
                        "SMIME_PEER_PID=%ld", pid,
                        "SMIME_PEER_UID=%lu", uid,
                        "SMIME_PEER_GID=%lu", gid,
                        "SMIME_PEER_EXE=%s", exe,
                        "SMIME_PEER_COMM=%s", comm,
                        NULL);
}

void audit_key_use(const struct conn *c, enum audit_op op, const char *key_uri, const char *subject,
                   const unsigned char sha256[32], uint32_t result, double seconds)
{
        char line[4096] = "", sha[65] = "", dur[32], num[32];
        const char *error = result ? proto_error_name(result) : "";

        if (sha256)
                hex(sha, sha256);
        snprintf(dur, sizeof(dur), "%.6f", seconds < 0 ? 0.0 : seconds);
        add_kv(line, sizeof(line), "operation", op_name(op));
        add_kv(line, sizeof(line), "result", result_name(result));
        if (result)
                add_kv(line, sizeof(line), "error", error);
        add_kv(line, sizeof(line), "key_uri", key_uri ? key_uri : "");
        add_kv(line, sizeof(line), "cert_subject", subject ? subject : "");
        if (sha256)
                add_kv(line, sizeof(line), "content_sha256", sha);
        add_kv(line, sizeof(line), "duration_sec", dur);
        snprintf(num, sizeof(num), "%ld", (long)c->pid);
        add_kv(line, sizeof(line), "peer_pid", num);
        snprintf(num, sizeof(num), "%lu", (unsigned long)c->uid);
        add_kv(line, sizeof(line), "peer_uid", num);
        snprintf(num, sizeof(num), "%lu", (unsigned long)c->gid);
        add_kv(line, sizeof(line), "peer_gid", num);
        add_kv(line, sizeof(line), "peer_exe", c->exe);
        add_kv(line, sizeof(line), "peer_comm", c->comm);
        emit(result == 0 ? LOG_NOTICE : LOG_WARNING, line, op_name(op), result_name(result), error,
             key_uri ? key_uri : "", subject ? subject : "", sha, dur, (long)c->pid, (unsigned long)c->uid,
             (unsigned long)c->gid, c->exe, c->comm);
}

void audit_connection_refused(pid_t pid, uid_t uid, gid_t gid, const char *exe, const char *comm)
{
        char line[2048] = "", num[32];

        add_kv(line, sizeof(line), "operation", "connect");
        add_kv(line, sizeof(line), "result", "denied");
        add_kv(line, sizeof(line), "error", "PERMISSION");
        snprintf(num, sizeof(num), "%ld", (long)pid);
        add_kv(line, sizeof(line), "peer_pid", num);
        snprintf(num, sizeof(num), "%lu", (unsigned long)uid);
        add_kv(line, sizeof(line), "peer_uid", num);
        snprintf(num, sizeof(num), "%lu", (unsigned long)gid);
        add_kv(line, sizeof(line), "peer_gid", num);
        add_kv(line, sizeof(line), "peer_exe", exe);
        add_kv(line, sizeof(line), "peer_comm", comm);
        emit(LOG_WARNING, line, "connect", "denied", "PERMISSION", "", "", "", "0", (long)pid,
             (unsigned long)uid, (unsigned long)gid, exe, comm);
}
