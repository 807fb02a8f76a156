/* authz.c — per-key grants from the configuration's "allow" lines (see
 * authz.h for the syntax and the API).
 *
 * Must never: grant by anything but the kernel's view of the peer (UID,
 * primary and supplementary GIDs), or treat a line it did not understand
 * as a grant (a bad line stops the agent at start-up).
 */
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "audit.h"
#include "authz.h"
#include "log.h"

struct authz_grant {
        char *key;                      /* as written: URI, e-mail or "*" */
        struct token_uri *uri;          /* key is a URI */
        unsigned ops;                   /* enum authz_op bits */
        bool any_user;
        uid_t *uids;
        size_t n_uids;
        gid_t *gids;
        size_t n_gids;
};

const char *authz_op_name(enum authz_op op)
{
        return op == AUTHZ_DECRYPT ? "decrypt" : "sign";
}

static void grant_free(struct authz_grant *g)
{
        free(g->key);
        token_uri_free(g->uri);
        free(g->uids);
        free(g->gids);
}

void authz_config_free(struct agent_config *cfg)
{
        for (size_t i = 0; i < cfg->n_grants; i++)
                grant_free(&cfg->grants[i]);
        free(cfg->grants);
        cfg->grants = NULL;
        cfg->n_grants = 0;
}

static int parse_ops(const char *s, unsigned *ops)
{
        char buf[64], *save = NULL;

        if (strcmp(s, "*") == 0) {
                *ops = AUTHZ_SIGN | AUTHZ_DECRYPT;
                return 0;
        }
        if (strlen(s) >= sizeof(buf))
                return -EINVAL;
        strcpy(buf, s);
        *ops = 0;
        for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (strcmp(t, "sign") == 0)
                        *ops |= AUTHZ_SIGN;
                else if (strcmp(t, "decrypt") == 0)
                        *ops |= AUTHZ_DECRYPT;
                else
                        return -EINVAL;
        }
        return *ops ? 0 : -EINVAL;
}

static bool parse_id(const char *s, unsigned long *out)
{
        char *end;

        if (!*s || *s < '0' || *s > '9')
                return false;
        errno = 0;
        *out = strtoul(s, &end, 10);
        return !*end && errno == 0 && *out < (unsigned long)(uid_t)-1;
}

/* user:NAME|UID, group:NAME|GID, or *. Names are resolved now, so a typo
 * stops the agent instead of granting nothing silently. */
static int parse_who(struct authz_grant *g, const char *w, char *err, size_t n)
{
        unsigned long id;

        if (strcmp(w, "*") == 0) {
                g->any_user = true;
                return 0;
        }
        if (strncmp(w, "user:", 5) == 0) {
                const char *name = w + 5;
                uid_t *v;

                if (!parse_id(name, &id)) {
                        struct passwd *pw = getpwnam(name);

                        if (!pw) {
                                snprintf(err, n, "no user '%s' (in '%s')", name, w);
                                return -EINVAL;
                        }
                        id = pw->pw_uid;
                }
                v = realloc(g->uids, (g->n_uids + 1) * sizeof(*v));
                if (!v)
                        return -ENOMEM;
                g->uids = v;
                g->uids[g->n_uids++] = (uid_t)id;
                return 0;
        }
        if (strncmp(w, "group:", 6) == 0) {
                const char *name = w + 6;
                gid_t *v;

                if (!parse_id(name, &id)) {
                        struct group *gr = getgrnam(name);

                        if (!gr) {
                                snprintf(err, n, "no group '%s' (in '%s')", name, w);
                                return -EINVAL;
                        }
                        id = gr->gr_gid;
                }
                v = realloc(g->gids, (g->n_gids + 1) * sizeof(*v));
                if (!v)
                        return -ENOMEM;
                g->gids = v;
                g->gids[g->n_gids++] = (gid_t)id;
                return 0;
        }
        snprintf(err, n, "'%s' is not user:NAME, user:UID, group:NAME, group:GID or *", w);
        return -EINVAL;
}

int authz_config_add(struct agent_config *cfg, const char *value, char *err, size_t n)
{
        struct authz_grant g = { 0 }, *v;
        char *copy = strdup(value), *save = NULL, *key, *ops, *w;
        int r = 0;

        if (!copy)
                return -ENOMEM;
        key = strtok_r(copy, " \t", &save);
        ops = key ? strtok_r(NULL, " \t", &save) : NULL;
        w = ops ? strtok_r(NULL, " \t", &save) : NULL;
        if (!w) {
                snprintf(err, n, "expected 'allow = KEY OPERATIONS WHO...', e.g. 'allow = alice@example.org sign "
                         "user:mail group:smime'");
                r = -EINVAL;
                goto out;
        }
        if (!(g.key = strdup(key))) {
                r = -ENOMEM;
                goto out;
        }
        if (strncmp(key, "pkcs11:", 7) == 0 && token_uri_parse(key, &g.uri) < 0) {
                snprintf(err, n, "'%s' is not a valid PKCS#11 URI (RFC 7512)", key);
                r = -EINVAL;
                goto out;
        }
        if (!g.uri && strcmp(key, "*") != 0 && !strchr(key, '@')) {
                snprintf(err, n, "'%s' is neither a PKCS#11 URI, an e-mail address nor *", key);
                r = -EINVAL;
                goto out;
        }
        if (parse_ops(ops, &g.ops) < 0) {
                snprintf(err, n, "unknown operations '%s'; use sign, decrypt, sign,decrypt or *", ops);
                r = -EINVAL;
                goto out;
        }
        for (; w && r == 0; w = strtok_r(NULL, " \t", &save))
                r = parse_who(&g, w, err, n);
        if (r < 0)
                goto out;
        v = realloc(cfg->grants, (cfg->n_grants + 1) * sizeof(*v));
        if (!v) {
                r = -ENOMEM;
                goto out;
        }
        cfg->grants = v;
        cfg->grants[cfg->n_grants++] = g;
        memset(&g, 0, sizeof(g));
out:
        grant_free(&g);
        free(copy);
        return r;
}

static bool grant_names_peer(const struct authz_grant *g, uid_t uid, gid_t gid, const gid_t *groups, size_t n_groups)
{
        if (g->any_user)
                return true;
        for (size_t i = 0; i < g->n_uids; i++)
                if (g->uids[i] == uid)
                        return true;
        for (size_t i = 0; i < g->n_gids; i++) {
                if (g->gids[i] == gid)
                        return true;
                for (size_t k = 0; k < n_groups; k++)
                        if (g->gids[i] == groups[k])
                                return true;
        }
        return false;
}

static bool grant_names_key(const struct authz_grant *g, const struct identity *id)
{
        if (g->uri)
                return token_key_match_uri(id->tk, g->uri);
        if (strcmp(g->key, "*") == 0)
                return true;
        for (size_t i = 0; i < id->n_emails; i++)
                if (strcasecmp(id->emails[i], g->key) == 0)
                        return true;
        return false;
}

bool authz_may_connect(const struct agent_config *cfg, uid_t uid, gid_t gid, const gid_t *groups, size_t n_groups)
{
        if (uid == getuid())
                return true;
        for (size_t i = 0; i < cfg->n_grants; i++)
                if (grant_names_peer(&cfg->grants[i], uid, gid, groups, n_groups))
                        return true;
        return false;
}

static unsigned allowed_ops(const struct conn *c, const struct identity *id)
{
        const struct agent_config *cfg = &c->agent->cfg;
        unsigned ops = 0;

        if (c->uid == getuid())
                return AUTHZ_SIGN | AUTHZ_DECRYPT;
        for (size_t i = 0; i < cfg->n_grants; i++) {
                const struct authz_grant *g = &cfg->grants[i];

                if (grant_names_peer(g, c->uid, c->gid, c->groups, c->n_groups) && grant_names_key(g, id))
                        ops |= g->ops;
        }
        return ops;
}

bool authz_allowed(const struct conn *c, const struct identity *id, enum authz_op op)
{
        return (allowed_ops(c, id) & op) != 0;
}

bool authz_visible(const struct conn *c, const struct identity *id)
{
        return allowed_ops(c, id) != 0;
}

bool authz_visible_fn(const void *c, const struct identity *id)
{
        return authz_visible(c, id);
}

int authz_check(struct conn *c, const struct identity *id, enum authz_op op)
{
        char user[64];
        struct passwd pw, *res = NULL;
        char pwbuf[1024];
        const char *key = id->n_emails ? id->emails[0] : id->tk->uri;
        int r;

        if (authz_allowed(c, id, op))
                return 0;
        if (getpwuid_r(c->uid, &pw, pwbuf, sizeof(pwbuf), &res) == 0 && res)
                snprintf(user, sizeof(user), "user:%s", pw.pw_name);
        else
                snprintf(user, sizeof(user), "user:%u", (unsigned)c->uid);
        audit_key_use(c, op == AUTHZ_DECRYPT ? AUDIT_DECRYPT : AUDIT_SIGN, id->tk->uri, id->subject, NULL,
                      PE_PERMISSION, 0.0);
        r = conn_error(c, PE_PERMISSION,
                       "uid %u may not %s with '%s' (%s): no 'allow' line of the agent's configuration grants it; "
                       "the agent's administrator can add 'allow = %s %s %s'",
                       (unsigned)c->uid, authz_op_name(op), id->subject[0] ? id->subject : id->tk->label,
                       id->tk->uri, key, authz_op_name(op), user);
        return r < 0 ? r : PE_PERMISSION;
}
