/* main.c — smime-agent: options, the listening socket, the accept loop.
 *
 * The main thread runs an sd-event loop that accepts connections, checks
 * the peer (SO_PEERCRED: our own UID, or one the configuration grants a
 * key to; authz.h) and hands each connection to its own thread. It also
 * handles SIGTERM/SIGINT, tells systemd when it is ready and how it is
 * doing (sd_notify READY, STATUS, WATCHDOG, STOPPING), and exits when idle
 * if socket-activated with idle-exit set.
 *
 * Must never: accept a peer that neither is our UID nor is named by an
 * "allow" line, dump core, or block in anything slower than accept().
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <grp.h>
#include <time.h>
#include <unistd.h>

#include <openssl/pem.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>

#include "agent.h"
#include "certstore.h"
#include "audit.h"
#include "authz.h"
#include "hotplug.h"
#include "keyprov.h"
#include "log.h"

#define DEFAULT_MAX_CONNECTIONS 256
#define CONN_STACK_SIZE (512u * 1024u)
/* A token call that takes longer is abandoned (token.h, docs/MODULES.md). */
#define DEFAULT_CALL_TIMEOUT_SEC 30

static struct agent agent;
static atomic_uint active_connections;
static atomic_llong last_activity;      /* CLOCK_MONOTONIC seconds of the last connection start or end */
static bool notify_enabled;             /* NOTIFY_SOCKET is set: keep STATUS= current */

static void usage(FILE *f)
{
        fprintf(f,
                "Usage: smime-agent [OPTIONS]\n"
                "Keeps PKCS#11 tokens open and signs S/MIME and CMS messages for local clients.\n\n"
                "  -s, --socket PATH     listen here (default $XDG_RUNTIME_DIR/smime-agent/socket)\n"
                "  -c, --config FILE     configuration (default $XDG_CONFIG_HOME/smime-agent/smime-agent.conf)\n"
                "  -m, --module PATH     load this PKCS#11 module instead of p11-kit's configured ones\n"
                "  -k, --default-key SEL default key: PKCS#11 URI or e-mail address\n"
                "  -p, --pin-file FILE   read token PINs from FILE (headless use)\n"
                "  -v, --verbose         log every connection\n"
                "  -h, --help            this text\n"
                "  -V, --version         print the version\n");
}

static char *default_path(const char *env, const char *fallback_home_sub, const char *leaf)
{
        const char *base = getenv(env);
        char *p = NULL;

        if (base && *base) {
                if (asprintf(&p, "%s/smime-agent/%s", base, leaf) < 0)
                        p = NULL;
        } else if (fallback_home_sub && getenv("HOME")) {
                if (asprintf(&p, "%s/%s/smime-agent/%s", getenv("HOME"), fallback_home_sub, leaf) < 0)
                        p = NULL;
        }
        return p;
}

static int load_ca_files(void)
{
        agent.ca_certs = sk_X509_new_null();
        if (!agent.ca_certs)
                return -ENOMEM;
        for (size_t i = 0; i < agent.cfg.n_ca_files; i++) {
                FILE *f = fopen(agent.cfg.ca_files[i], "re");
                X509 *x;

                if (!f) {
                        log_error("cannot open ca-file %s: %m", agent.cfg.ca_files[i]);
                        return -errno;
                }
                while ((x = PEM_read_X509(f, NULL, NULL, NULL)))
                        if (!sk_X509_push(agent.ca_certs, x))
                                X509_free(x);
                fclose(f);
        }
        return 0;
}

/* The address book and the trust anchors for verify and encrypt. */
static int open_address_book(void)
{
        struct certstore_options o = {
                .ca_files = agent.cfg.ca_files, .n_ca_files = agent.cfg.n_ca_files,
                .crl_files = agent.cfg.crl_files, .n_crl_files = agent.cfg.n_crl_files,
                .no_system_ca = agent.cfg.no_system_ca,
                .crl_fetch = agent.cfg.crl_fetch, .ocsp_aia = agent.cfg.ocsp_aia,
                .ocsp_responder = agent.cfg.ocsp_responder, .revocation_timeout = agent.cfg.revocation_timeout,
                .revocation_unknown_allow = agent.cfg.revocation_unknown_allow,
        };
        char *def = NULL;
        int r;

        const char *state = getenv("STATE_DIRECTORY");

        /* Under systemd, StateDirectory= is the one place the sandbox
         * (ProtectSystem=strict, ProtectHome=) leaves writable. */
        if (!agent.cfg.address_book && state && *state && state[0] == '/' &&
            asprintf(&def, "%.*s/addressbook", (int)strcspn(state, ":"), state) < 0)
                def = NULL;
        if (!agent.cfg.address_book && !def && !(def = default_path("XDG_STATE_HOME", ".local/state", "addressbook")))
                log_error("neither XDG_STATE_HOME nor HOME is set: the address book is kept in memory only "
                          "(set address-book in the configuration)");
        o.path = agent.cfg.address_book ? agent.cfg.address_book : def;
        r = certstore_open(&agent.book, &o);
        free(def);
        return r;
}

static long long now_sec(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long long)ts.tv_sec;
}

/* Who else may reach the socket: socket-mode, socket-group. The directory
 * we create gets the search bit for exactly the classes the socket is
 * opened to. */
static mode_t socket_mode(void)
{
        return agent.cfg.socket_mode ? agent.cfg.socket_mode : 0600;
}

static mode_t socket_dir_mode(void)
{
        mode_t m = socket_mode();

        return 0700 | ((m & 0060) ? 0010 : 0) | ((m & 0006) ? 0001 : 0);
}

static int socket_gid(gid_t *gid)
{
        const char *name = agent.cfg.socket_group;
        struct group *gr;
        char *end;
        unsigned long n;

        *gid = (gid_t)-1;
        if (!name)
                return 0;
        n = strtoul(name, &end, 10);
        if (*name && !*end) {
                *gid = (gid_t)n;
                return 0;
        }
        gr = getgrnam(name);
        if (!gr) {
                log_error("socket-group: no group '%s'", name);
                return -EINVAL;
        }
        *gid = gr->gr_gid;
        return 0;
}

/* Creates the socket's directory (0700, plus search bits when socket-mode
 * opens the socket to others) when it is ours to create, and binds with a
 * umask that leaves the socket 0600 until it gets socket-mode and
 * socket-group. */
static int listen_socket(const char *path)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char dir[PATH_MAX];
        char *slash;
        mode_t old;
        gid_t gid;
        int fd, r;

        if (socket_gid(&gid) < 0)
                return -EINVAL;

        if (strlen(path) >= sizeof(sa.sun_path)) {
                log_error("socket path too long: %s", path);
                return -ENAMETOOLONG;
        }
        snprintf(dir, sizeof(dir), "%s", path);
        slash = strrchr(dir, '/');
        if (slash && slash != dir) {
                struct stat st;

                *slash = '\0';
                if (mkdir(dir, 0700) == 0) {
                        /* mkdir's mode is filtered by our umask (077). */
                        if (chmod(dir, socket_dir_mode()) < 0 || (gid != (gid_t)-1 && chown(dir, (uid_t)-1, gid) < 0)) {
                                log_error("cannot set the mode or group of %s: %m", dir);
                                return -errno;
                        }
                } else if (errno != EEXIST) {
                        log_error("cannot create %s: %m", dir);
                        return -errno;
                }
                /* A directory someone else controls could swap our socket. */
                if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode) || (st.st_uid != getuid() && st.st_uid != 0) ||
                    (st.st_mode & (S_IWGRP | S_IWOTH) && !(st.st_mode & S_ISVTX))) {
                        log_error("refusing to listen in %s: it must be a directory owned by us (or root) and "
                                  "not writable by others", dir);
                        return -EPERM;
                }
                if ((socket_mode() & 0066) && (st.st_mode & socket_dir_mode()) != socket_dir_mode())
                        log_info("socket-mode %04o opens the socket to others, but its directory %s is %04o: "
                                 "they cannot reach it until the directory lets them search it",
                                 (unsigned)socket_mode(), dir, (unsigned)(st.st_mode & 07777));
        }
        strcpy(sa.sun_path, path);

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        /* A stale socket from a crashed agent: remove it only if nobody answers. */
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
                log_error("another agent is already listening on %s", path);
                close(fd);
                return -EADDRINUSE;
        }
        {
                struct stat st;

                if (lstat(path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
                        log_error("%s exists and is not a socket; remove it or choose another --socket", path);
                        close(fd);
                        return -EEXIST;
                }
        }
        unlink(path);
        old = umask(0177);
        r = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
        umask(old);
        if (r == 0 && (chmod(path, socket_mode()) < 0 || (gid != (gid_t)-1 && chown(path, (uid_t)-1, gid) < 0))) {
                r = -errno;
                log_error("cannot give %s mode %04o%s%s: %m", path, (unsigned)socket_mode(),
                          gid != (gid_t)-1 ? " and group " : "", gid != (gid_t)-1 ? agent.cfg.socket_group : "");
                close(fd);
                return r;
        }
        if (r < 0 || listen(fd, SOMAXCONN) < 0) {
                r = -errno;
                log_error("cannot listen on %s: %m", path);
                close(fd);
                return r;
        }
        return fd;
}

/* STATUS= for systemctl status: tokens, logins, connections. Called when
 * ready and when a connection ends, never from the event loop's thread
 * after that (C_GetTokenInfo may wait for a busy token). */
static void notify_status(const char *prefix)
{
        size_t n = token_store_token_count(agent.store), logged_in = 0;
        struct token_keys *keys;
        size_t nkeys;

        if (!notify_enabled)
                return;
        keys = token_store_keys(agent.store);
        nkeys = keys ? keys->n : 0;
        token_keys_unref(keys);
        for (size_t i = 0; i < n; i++) {
                struct token_info ti;
                struct token_error e;

                if (token_get_info(token_store_token(agent.store, i), &ti, &e) == 0 && ti.logged_in)
                        logged_in++;
        }
        sd_notifyf(0, "%sSTATUS=%zu token(s), %zu logged in, %zu key(s); %u connection(s)", prefix, n, logged_in,
                   nkeys, atomic_load(&active_connections));
}

static void *conn_thread(void *arg)
{
        conn_main(arg);
        atomic_fetch_sub(&active_connections, 1);
        atomic_store(&last_activity, now_sec());
        notify_status("");
        return NULL;
}

/* The peer's executable and command name, for the audit log. /proc/PID/exe
 * is readable only for peers we could ptrace (our own UID, or all when
 * root); comm is readable for every peer. */
static void peer_proc_info(pid_t pid, char *exe, size_t exe_n, char *comm, size_t comm_n)
{
        char path[64];
        ssize_t k;
        FILE *f;

        exe[0] = comm[0] = '\0';
        snprintf(path, sizeof(path), "/proc/%d/exe", (int)pid);
        k = readlink(path, exe, exe_n - 1);
        exe[k > 0 ? k : 0] = '\0';
        snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
        f = fopen(path, "re");
        if (f) {
                if (fgets(comm, (int)comm_n, f))
                        comm[strcspn(comm, "\n")] = '\0';
                fclose(f);
        }
}

/* Supplementary groups of the peer at connect time (SO_PEERGROUPS). */
static int peer_groups(int fd, gid_t **out, size_t *n)
{
        socklen_t len = 32 * sizeof(gid_t);
        gid_t *g = NULL;

        *out = NULL;
        *n = 0;
        for (int i = 0; i < 4; i++) {
                gid_t *ng = realloc(g, len ? len : sizeof(gid_t));

                if (!ng) {
                        free(g);
                        return -ENOMEM;
                }
                g = ng;
                if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, g, &len) == 0) {
                        *out = g;
                        *n = len / sizeof(gid_t);
                        return 0;
                }
                if (errno != ERANGE)
                        break;
        }
        free(g);
        return -errno;
}

static int on_accept(sd_event_source *src, int lfd, uint32_t revents, void *userdata)
{
        struct ucred cred;
        socklen_t len = sizeof(cred);
        pthread_attr_t attr;
        pthread_t th;
        struct conn *c;
        int fd;

        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
                return 0;       /* EAGAIN, ECONNABORTED...: nothing to do */
        gid_t *groups = NULL;
        size_t n_groups = 0;
        char exe[256], comm[32];

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || peer_groups(fd, &groups, &n_groups) < 0) {
                close(fd);
                return 0;
        }
        atomic_store(&last_activity, now_sec());
        peer_proc_info(cred.pid, exe, sizeof(exe), comm, sizeof(comm));
        if (!authz_may_connect(&agent.cfg, cred.uid, cred.gid, groups, n_groups)) {
                log_error("refused a connection from pid %d (%s): uid %u is not the agent's uid %u and no 'allow' "
                          "line names it or its groups", (int)cred.pid, exe[0] ? exe : comm, (unsigned)cred.uid,
                          (unsigned)getuid());
                audit_connection_refused(cred.pid, cred.uid, cred.gid, exe, comm);
                proto_write_error(fd, PE_PERMISSION, agent.cfg.n_grants
                                  ? "this agent's configuration grants your user no key; ask its administrator"
                                  : "this agent serves only its own user; start your own smime-agent");
                free(groups);
                close(fd);
                return 0;
        }
        if (atomic_fetch_add(&active_connections, 1) >= agent.cfg.max_connections) {
                atomic_fetch_sub(&active_connections, 1);
                proto_write_error(fd, PE_BUSY, "the agent is at its connection limit; try again shortly");
                free(groups);
                close(fd);
                return 0;
        }
        c = calloc(1, sizeof(*c));
        if (!c) {
                atomic_fetch_sub(&active_connections, 1);
                free(groups);
                close(fd);
                return 0;
        }
        c->agent = &agent;
        c->fd = fd;
        c->uid = cred.uid;
        c->pid = cred.pid;
        c->gid = cred.gid;
        c->groups = groups;
        c->n_groups = n_groups;
        snprintf(c->exe, sizeof(c->exe), "%s", exe);
        snprintf(c->comm, sizeof(c->comm), "%s", comm);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, CONN_STACK_SIZE);
        if (pthread_create(&th, &attr, conn_thread, c) != 0) {
                atomic_fetch_sub(&active_connections, 1);
                proto_write_error(fd, PE_BUSY, "the agent cannot start a thread for this connection");
                close(fd);
                free(c->groups);
                free(c);
        }
        pthread_attr_destroy(&attr);
        return 0;
}

/* idle-exit: when systemd holds the listening socket, exiting while nobody
 * is connected costs nothing but the login state; the next connection
 * starts the agent again. */
static int on_idle_check(sd_event_source *src, uint64_t usec, void *userdata)
{
        long long idle = now_sec() - atomic_load(&last_activity);
        long long left = (long long)agent.cfg.idle_exit_sec - idle;

        if (atomic_load(&active_connections) == 0 && left <= 0) {
                log_info("idle for %lld s with no connection: exiting (idle-exit = %u; systemd starts the agent "
                         "again on the next connection)", idle, agent.cfg.idle_exit_sec);
                return sd_event_exit(sd_event_source_get_event(src), 0);
        }
        if (left < 1 || atomic_load(&active_connections) > 0)
                left = 1;
        sd_event_source_set_time_relative(src, (uint64_t)left * 1000000u);
        return sd_event_source_set_enabled(src, SD_EVENT_ONESHOT);
}

static int on_sighup(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata)
{
        log_info("SIGHUP ignored: this version does not reload its configuration; restart the agent instead");
        return 0;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                { "socket", required_argument, NULL, 's' },
                { "config", required_argument, NULL, 'c' },
                { "module", required_argument, NULL, 'm' },
                { "default-key", required_argument, NULL, 'k' },
                { "pin-file", required_argument, NULL, 'p' },
                { "verbose", no_argument, NULL, 'v' },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },
                { NULL, 0, NULL, 0 },
        };
        const char *opt_socket = NULL, *opt_config = NULL, *opt_module = NULL, *opt_key = NULL, *opt_pin = NULL;
        struct token_store_options so = { 0 };
        struct token_error terr = { 0 };
        sd_event *ev = NULL;
        char *cfg_path = NULL;
        bool verbose = false, activated = false;
        int ch, r, lfd;
        sigset_t ss;

        while ((ch = getopt_long(argc, argv, "s:c:m:k:p:vhV", opts, NULL)) != -1) {
                switch (ch) {
                case 's': opt_socket = optarg; break;
                case 'c': opt_config = optarg; break;
                case 'm': opt_module = optarg; break;
                case 'k': opt_key = optarg; break;
                case 'p': opt_pin = optarg; break;
                case 'v': verbose = true; break;
                case 'h': usage(stdout); return 0;
                case 'V': printf("smime-agent %s\n", SMIME_VERSION); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (optind != argc) {
                usage(stderr);
                return 2;
        }
        log_setup(verbose);
        umask(077);
        signal(SIGPIPE, SIG_IGN);
        /* No core dumps with PINs or content in them, and no ptrace or
         * /proc/PID/mem access by other processes of our user. */
        prctl(PR_SET_DUMPABLE, 0);
        setrlimit(RLIMIT_CORE, &(struct rlimit){ 0, 0 });
        notify_enabled = getenv("NOTIFY_SOCKET") != NULL;
        atomic_store(&last_activity, now_sec());

        cfg_path = opt_config ? strdup(opt_config) : default_path("XDG_CONFIG_HOME", ".config", "smime-agent.conf");
        r = cfg_path ? config_load(&agent.cfg, cfg_path, opt_config != NULL) : 0;
        free(cfg_path);
        if (r < 0)
                return 1;
#define OVERRIDE(field, v) do { if (v) { free(agent.cfg.field); agent.cfg.field = strdup(v); } } while (0)
        OVERRIDE(socket_path, opt_socket);
        OVERRIDE(module, opt_module);
        OVERRIDE(default_key, opt_key);
        OVERRIDE(pin_file, opt_pin);
        agent.cfg.verbose = verbose;
        if (!agent.cfg.max_connections)
                agent.cfg.max_connections = DEFAULT_MAX_CONNECTIONS;
        activated = sd_listen_fds(1) == 1;
        if (!activated && !agent.cfg.socket_path &&
            !(agent.cfg.socket_path = default_path("XDG_RUNTIME_DIR", NULL, "socket"))) {
                log_error("XDG_RUNTIME_DIR is not set; pass --socket PATH");
                return 1;
        }

        r = keyprov_init();
        if (r < 0) {
                log_error("cannot set up OpenSSL's providers");
                return 1;
        }
        if (load_ca_files() < 0)
                return 1;
        if (open_address_book() < 0)
                return 1;
        so.module_path = agent.cfg.module;
        /* call-timeout: configured seconds + 1 (0: not configured). */
        so.call_timeout_ms = agent.cfg.call_timeout ? (agent.cfg.call_timeout - 1) * 1000u
                                                    : DEFAULT_CALL_TIMEOUT_SEC * 1000u;
        r = token_store_open(&agent.store, &so, &terr);
        if (r < 0) {
                log_error("cannot load PKCS#11 modules: %s", terr.message[0] ? terr.message : strerror(-r));
                return 1;
        }
        if (terr.message[0])
                log_error("%s", terr.message);
        log_info("%zu module(s), %zu token(s)", token_store_module_count(agent.store),
                 token_store_token_count(agent.store));

        /* Socket activation when systemd passes one socket, else our own. */
        if (activated) {
                lfd = SD_LISTEN_FDS_START;
        } else {
                lfd = listen_socket(agent.cfg.socket_path);
                if (lfd < 0)
                        return 1;
        }

        sigemptyset(&ss);
        sigaddset(&ss, SIGTERM);
        sigaddset(&ss, SIGINT);
        sigaddset(&ss, SIGHUP);
        pthread_sigmask(SIG_BLOCK, &ss, NULL);  /* before any thread exists */
        /* The PIN cache expiry and hot-plug threads (they inherit the mask). */
        if (policy_start(&agent) < 0 || hotplug_start(&agent) < 0) {
                log_error("cannot start the agent's threads");
                return 1;
        }
        if (sd_event_default(&ev) < 0 ||
            sd_event_add_io(ev, NULL, lfd, EPOLLIN, on_accept, NULL) < 0 ||
            sd_event_add_signal(ev, NULL, SIGTERM, NULL, NULL) < 0 ||
            sd_event_add_signal(ev, NULL, SIGINT, NULL, NULL) < 0 ||
            sd_event_add_signal(ev, NULL, SIGHUP, on_sighup, NULL) < 0 ||
            /* WATCHDOG=1 at half of WatchdogSec while the loop runs. */
            sd_event_set_watchdog(ev, true) < 0) {
                log_error("cannot set up the event loop");
                return 1;
        }
        if (activated && agent.cfg.idle_exit_sec &&
            sd_event_add_time_relative(ev, NULL, CLOCK_MONOTONIC, (uint64_t)agent.cfg.idle_exit_sec * 1000000u,
                                       0, on_idle_check, NULL) < 0) {
                log_error("cannot set up the idle-exit timer");
                return 1;
        }
        log_info("listening on %s", activated ? "the socket passed by systemd" : agent.cfg.socket_path);
        notify_status("READY=1\n");
        r = sd_event_loop(ev);
        sd_notify(0, "STOPPING=1\nSTATUS=shutting down");
        /* Connections whose clients just closed are still ending their
         * threads: give them a moment, so that nothing they hold (OpenSSL's
         * per-thread state included) is cut off by exit(). Idle clients that
         * keep their connection open are not waited for beyond that. */
        for (int i = 0; i < 50 && atomic_load(&active_connections) > 0; i++)
                usleep(100 * 1000);
        log_info("shutting down");
        /* No thread may be inside a module when its destructors run at exit. */
        token_store_stop(agent.store);
        if (!activated)
                unlink(agent.cfg.socket_path);
        sd_event_unref(ev);
        /* With connections still being served, their threads keep using the
         * provider until the process exits under them; release it only when
         * none is. The PKCS#11 modules stay loaded: exiting releases them
         * anyway, and unloading first would hide the modules' own frames
         * from LeakSanitizer (see tests/lsan.supp). */
        if (atomic_load(&active_connections) == 0) {
                keyprov_done();
                sk_X509_pop_free(agent.ca_certs, X509_free);
                certstore_free(agent.book);
                config_free(&agent.cfg);
        }
        return r < 0 ? 1 : 0;
}
