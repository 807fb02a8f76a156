/* config.c — the small "key = value" configuration file.
 *
 *   module = /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so
 *   default-key = alice@example.org
 *   pin-file = /etc/smime-agent/pin
 *   ca-file = /etc/ssl/certs/my-ca.pem      (repeatable)
 *   socket = /run/smime-agent/socket
 *   max-connections = 256
 *   address-book = ~/.local/state/smime-agent/addressbook
 *   crl-file = /etc/ssl/crl/my-ca.crl         (repeatable)
 *   system-ca = yes
 *   crl-fetch = no                          (yes: fetch CRLs from HTTP distribution points)
 *   ocsp = no                               (aia: ask the responder a certificate names)
 *   ocsp-responder = http://ocsp.example/   (ask this responder about every certificate)
 *   revocation-unknown = block              (allow: use a certificate whose status is unknown)
 *   revocation-timeout = 10                 (seconds one CRL or OCSP exchange may take)
 *   socket-mode = 0660                      (when others are granted keys)
 *   socket-group = smime
 *   idle-exit = 600                         (seconds; socket-activated only)
 *   allow = KEY OPERATIONS WHO...           (repeatable; see authz.h)
 *   pinentry = pinentry-gnome3              (a name in $PATH or an absolute path)
 *   pinentry-mode = fallback                (or always; see conn_ask_pin)
 *   pinentry-timeout = 60                   (seconds)
 *
 * The PIN cache policy and per-token settings (policy.c) follow the same
 * syntax, globally and in [token URI] / [key URI] sections:
 *
 *   cache-idle = 600
 *   [token pkcs11:token=smime-test]
 *   decrypt-cache-idle = ask
 *
 * Unknown keys are an error, so a typo does not silently change nothing.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "authz.h"
#include "log.h"
#include "pinentry.h"

static char *trim(char *s)
{
        char *e;

        while (isspace((unsigned char)*s))
                s++;
        e = s + strlen(s);
        while (e > s && isspace((unsigned char)e[-1]))
                *--e = '\0';
        return s;
}

static int set_str(char **dst, const char *v)
{
        char *d = strdup(v);

        if (!d)
                return -ENOMEM;
        free(*dst);
        *dst = d;
        return 0;
}

int config_load(struct agent_config *cfg, const char *path, bool must_exist)
{
        FILE *f = fopen(path, "re");
        char line[4096];
        unsigned lineno = 0;
        int r = 0;

        if (!f) {
                if (errno == ENOENT && !must_exist)
                        return 0;
                log_error("cannot open configuration %s: %m", path);
                return -errno;
        }
        while (r == 0 && fgets(line, sizeof(line), f)) {
                char *k, *v, *eq;

                lineno++;
                k = trim(line);
                if (*k == '\0' || *k == '#')
                        continue;
                if (*k == '[') {
                        char why[512], *end = strrchr(k, ']');

                        if (!end || end[1]) {
                                log_error("%s:%u: a section header is [token PKCS11-URI] or [key PKCS11-URI]", path,
                                          lineno);
                                r = -EINVAL;
                                break;
                        }
                        *end = '\0';
                        r = policy_config_section(cfg, trim(k + 1), why, sizeof(why));
                        if (r == -EINVAL)
                                log_error("%s:%u: %s", path, lineno, why);
                        continue;
                }
                eq = strchr(k, '=');
                if (!eq) {
                        log_error("%s:%u: expected 'key = value'", path, lineno);
                        r = -EINVAL;
                        break;
                }
                *eq = '\0';
                k = trim(k);
                v = trim(eq + 1);
                {
                        char why[512];
                        int p = policy_config_set(cfg, k, v, why, sizeof(why));

                        if (p != 0) {
                                if (p == -EINVAL)
                                        log_error("%s:%u: %s", path, lineno, why);
                                r = p < 0 ? p : 0;
                                continue;
                        }
                        if (cfg->in_section) {
                                log_error("%s:%u: '%s' is not a token or key setting (in a section: cache-idle, "
                                          "cache-lifetime, their sign- and decrypt- forms, pin-file, pin-credential); "
                                          "global settings go before the first section", path, lineno, k);
                                r = -EINVAL;
                                break;
                        }
                }
                if (strcmp(k, "module") == 0) {
                        r = set_str(&cfg->module, v);
                } else if (strcmp(k, "default-key") == 0) {
                        r = set_str(&cfg->default_key, v);
                } else if (strcmp(k, "pin-file") == 0) {
                        r = set_str(&cfg->pin_file, v);
                } else if (strcmp(k, "socket") == 0) {
                        r = set_str(&cfg->socket_path, v);
                } else if (strcmp(k, "ca-file") == 0) {
                        char **n = realloc(cfg->ca_files, (cfg->n_ca_files + 1) * sizeof(*n));

                        if (!n || !(n[cfg->n_ca_files] = strdup(v))) {
                                if (n)
                                        cfg->ca_files = n;
                                r = -ENOMEM;
                        } else {
                                cfg->ca_files = n;
                                cfg->n_ca_files++;
                        }
                } else if (strcmp(k, "address-book") == 0) {
                        r = set_str(&cfg->address_book, v);
                } else if (strcmp(k, "crl-file") == 0) {
                        char **n = realloc(cfg->crl_files, (cfg->n_crl_files + 1) * sizeof(*n));

                        if (!n || !(n[cfg->n_crl_files] = strdup(v))) {
                                if (n)
                                        cfg->crl_files = n;
                                r = -ENOMEM;
                        } else {
                                cfg->crl_files = n;
                                cfg->n_crl_files++;
                        }
                } else if (strcmp(k, "system-ca") == 0) {
                        if (strcmp(v, "yes") != 0 && strcmp(v, "no") != 0) {
                                log_error("%s:%u: system-ca must be yes or no", path, lineno);
                                r = -EINVAL;
                        } else {
                                cfg->no_system_ca = strcmp(v, "no") == 0;
                        }
                } else if (strcmp(k, "crl-fetch") == 0) {
                        if (strcmp(v, "yes") != 0 && strcmp(v, "no") != 0) {
                                log_error("%s:%u: crl-fetch must be yes or no", path, lineno);
                                r = -EINVAL;
                        } else {
                                cfg->crl_fetch = strcmp(v, "yes") == 0;
                        }
                } else if (strcmp(k, "ocsp") == 0) {
                        if (strcmp(v, "aia") != 0 && strcmp(v, "no") != 0) {
                                log_error("%s:%u: ocsp must be no or aia (ask the responder named in each "
                                          "certificate); for one responder for all, use ocsp-responder = URL",
                                          path, lineno);
                                r = -EINVAL;
                        } else {
                                cfg->ocsp_aia = strcmp(v, "aia") == 0;
                        }
                } else if (strcmp(k, "ocsp-responder") == 0) {
                        if (strncmp(v, "http://", 7) != 0 || !v[7]) {
                                log_error("%s:%u: ocsp-responder must be an http:// URL (OCSP answers are signed; "
                                          "https is not supported)", path, lineno);
                                r = -EINVAL;
                        } else {
                                r = set_str(&cfg->ocsp_responder, v);
                        }
                } else if (strcmp(k, "revocation-unknown") == 0) {
                        if (strcmp(v, "block") != 0 && strcmp(v, "allow") != 0) {
                                log_error("%s:%u: revocation-unknown must be block (a certificate whose revocation "
                                          "status cannot be learnt is not used) or allow", path, lineno);
                                r = -EINVAL;
                        } else {
                                cfg->revocation_unknown_allow = strcmp(v, "allow") == 0;
                        }
                } else if (strcmp(k, "revocation-timeout") == 0) {
                        char *end;
                        unsigned long n = strtoul(v, &end, 10);

                        if (*end || !*v || n == 0 || n > 300) {
                                log_error("%s:%u: revocation-timeout must be 1 to 300 seconds", path, lineno);
                                r = -EINVAL;
                        } else {
                                cfg->revocation_timeout = (unsigned)n;
                        }
                } else if (strcmp(k, "max-connections") == 0) {
                        char *end;
                        unsigned long n = strtoul(v, &end, 10);

                        if (*end || n == 0 || n > 65536) {
                                log_error("%s:%u: max-connections must be 1 to 65536", path, lineno);
                                r = -EINVAL;
                        } else {
                                cfg->max_connections = (unsigned)n;
                        }
                } else if (strcmp(k, "allow") == 0) {
                        char why[512] = "";

                        r = authz_config_add(cfg, v, why, sizeof(why));
                        if (r == -EINVAL)
                                log_error("%s:%u: allow: %s", path, lineno, why);
                } else if (strcmp(k, "socket-mode") == 0) {
                        char *end;
                        unsigned long m = strtoul(v, &end, 8);

                        /* Read and write go together on a socket; never execute bits. */
                        if (*end || !*v || m & ~0666ul || !(m & 0600)) {
                                log_error("%s:%u: socket-mode must be octal like 0600, 0660 or 0666 "
                                          "(owner read-write, no execute bits)", path, lineno);
                                r = -EINVAL;
                        } else {
                                cfg->socket_mode = (unsigned)m;
                        }
                } else if (strcmp(k, "socket-group") == 0) {
                        r = set_str(&cfg->socket_group, v);
                } else if (strcmp(k, "idle-exit") == 0) {
                        char *end;
                        unsigned long n = strtoul(v, &end, 10);

                        if (*end || !*v || n > 86400ul * 365) {
                                log_error("%s:%u: idle-exit must be a number of seconds (0 = never)", path, lineno);
                                r = -EINVAL;
                        } else {
                                cfg->idle_exit_sec = (unsigned)n;
                        }
                } else if (strcmp(k, "pinentry") == 0) {
                        char why[1024], *prog = NULL;

                        /* Checked now: a typo shows at start, not at the first PIN. */
                        r = pinentry_resolve(v, &prog, why, sizeof(why));
                        if (r < 0) {
                                log_error("%s:%u: %s", path, lineno, why);
                        } else {
                                free(cfg->pinentry);
                                cfg->pinentry = prog;
                        }
                } else if (strcmp(k, "pinentry-mode") == 0) {
                        if (strcmp(v, "fallback") != 0 && strcmp(v, "always") != 0) {
                                log_error("%s:%u: pinentry-mode must be 'fallback' (the pinentry asks when the client "
                                          "cannot) or 'always' (the pinentry asks for every PIN)", path, lineno);
                                r = -EINVAL;
                        } else {
                                cfg->pinentry_always = strcmp(v, "always") == 0;
                        }
                } else if (strcmp(k, "pin-timeout") == 0) {
                        char *end;
                        unsigned long n = strtoul(v, &end, 10);

                        if (*end || !*v || n == 0 || n > 3600) {
                                log_error("%s:%u: pin-timeout must be a number of seconds from 1 to 3600", path,
                                          lineno);
                                r = -EINVAL;
                        } else {
                                cfg->pin_timeout = (unsigned)n;
                        }
                } else if (strcmp(k, "pinentry-timeout") == 0) {
                        char *end;
                        unsigned long n = strtoul(v, &end, 10);

                        if (*end || !*v || n == 0 || n > PINENTRY_MAX_TIMEOUT) {
                                log_error("%s:%u: pinentry-timeout must be a number of seconds from 1 to %u", path,
                                          lineno, PINENTRY_MAX_TIMEOUT);
                                r = -EINVAL;
                        } else {
                                cfg->pinentry_timeout = (unsigned)n;
                        }
                } else {
                        log_error("%s:%u: unknown setting '%s' (known: module, default-key, pin-file, ca-file, "
                                  "socket, max-connections, address-book, crl-file, crl-fetch, ocsp, ocsp-responder, "
                                  "revocation-unknown, revocation-timeout, system-ca, socket-mode, "
                                  "socket-group, idle-exit, allow, cache-idle, cache-lifetime, "
                                  "sign-/decrypt-cache-idle, sign-/decrypt-cache-lifetime, pin-credential, "
                                  "hotplug-poll, call-timeout, always-authenticate, pinentry, pinentry-mode, "
                                  "pinentry-timeout, pin-timeout, and [token URI] / [key URI] sections)", path,
                                  lineno, k);
                        r = -EINVAL;
                }
        }
        fclose(f);
        return r;
}

void config_free(struct agent_config *cfg)
{
        free(cfg->socket_path);
        free(cfg->module);
        free(cfg->default_key);
        free(cfg->pin_file);
        for (size_t i = 0; i < cfg->n_ca_files; i++)
                free(cfg->ca_files[i]);
        free(cfg->ca_files);
        for (size_t i = 0; i < cfg->n_crl_files; i++)
                free(cfg->crl_files[i]);
        free(cfg->crl_files);
        free(cfg->address_book);
        free(cfg->ocsp_responder);
        free(cfg->socket_group);
        free(cfg->pinentry);
        authz_config_free(cfg);
        policy_config_free(cfg);
        memset(cfg, 0, sizeof(*cfg));
}
