/* token.c — PKCS#11 modules, tokens, key snapshots, session pools, login and
 * signing for smime-agent, all through p11-kit.
 *
 * This file is the only place in smime-agent that calls C_* functions.
 *
 * What it must never do: read a sensitive attribute of a private key (only
 * CKA_ID, CKA_LABEL, CKA_KEY_TYPE, CKA_SIGN, CKA_DECRYPT, CKA_DERIVE and
 * CKA_ALWAYS_AUTHENTICATE are ever asked of a private key), call C_WrapKey,
 * C_CopyObject or C_SetAttributeValue, copy or log a PIN, or retry a C_Login
 * (a retried wrong PIN burns the user's tries and can lock the token).
 *
 * Locking, from outside to inside (never take an outer lock while holding an
 * inner one):
 *   module->call_lock   read-held by every public function around its calls
 *                       into the module; write-held only to re-initialise
 *                       the module (C_Finalize + C_Initialize), which must
 *                       not race with any other call
 *   token->op_lock      read-held by private-key operations, write-held by
 *                       login and logout: a login state change never lands
 *                       in the middle of someone's signature
 *   token->login_lock   serialises C_Login and the rescan it triggers
 *   token->lock         the session pool, the login flag, presence
 *   store->keys_lock    the token list, each token's latest scan and the
 *                       published snapshot
 * token->lock and store->keys_lock are never held across a C_* call that
 * can block for long (C_Login, C_Sign, object searches).
 *
 * Tokens come and go (token_store_refresh). A struct token is never freed
 * before the store: a removed token stays in the list, marked not present,
 * and is reused when the same token comes back. Its generation counter
 * (gen) changes whenever object and session handles from before may be
 * stale, so a handle is only reused within the generation it came from:
 * after a module re-initialisation the same number may name another key.
 */
#include "token.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <p11-kit/p11-kit.h>
#include <p11-kit/uri.h>

#define _cleanup_(f) __attribute__((cleanup(f)))
#define ELEMENTSOF(a) (sizeof(a) / sizeof((a)[0]))

/* The header guarantees the enum values line up with our per-token table. */
#define TOKEN_MECH_COUNT 4

static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)

static inline void p11_kit_uri_freep(P11KitUri **u) {
        if (*u)
                p11_kit_uri_free(*u);
}

static inline void mutex_unlockp(pthread_mutex_t **m) {
        if (*m)
                pthread_mutex_unlock(*m);
}

/* Locks m and unlocks it when the returned guard goes out of scope. */
static inline pthread_mutex_t *mutex_lock(pthread_mutex_t *m) {
        pthread_mutex_lock(m);
        return m;
}
#define _cleanup_unlock_ _cleanup_(mutex_unlockp)

/* ---- Error names -------------------------------------------------------- */

#define RV(x) { x, #x }
static const struct {
        CK_RV rv;
        const char *name;
} rv_names[] = {
        RV(CKR_OK), RV(CKR_CANCEL), RV(CKR_HOST_MEMORY), RV(CKR_SLOT_ID_INVALID),
        RV(CKR_GENERAL_ERROR), RV(CKR_FUNCTION_FAILED), RV(CKR_ARGUMENTS_BAD),
        RV(CKR_NO_EVENT), RV(CKR_NEED_TO_CREATE_THREADS), RV(CKR_CANT_LOCK),
        RV(CKR_ATTRIBUTE_READ_ONLY), RV(CKR_ATTRIBUTE_SENSITIVE),
        RV(CKR_ATTRIBUTE_TYPE_INVALID), RV(CKR_ATTRIBUTE_VALUE_INVALID),
        RV(CKR_ACTION_PROHIBITED), RV(CKR_DATA_INVALID), RV(CKR_DATA_LEN_RANGE),
        RV(CKR_DEVICE_ERROR), RV(CKR_DEVICE_MEMORY), RV(CKR_DEVICE_REMOVED),
        RV(CKR_ENCRYPTED_DATA_INVALID), RV(CKR_ENCRYPTED_DATA_LEN_RANGE),
        RV(CKR_FUNCTION_CANCELED), RV(CKR_FUNCTION_NOT_PARALLEL),
        RV(CKR_FUNCTION_NOT_SUPPORTED), RV(CKR_KEY_HANDLE_INVALID),
        RV(CKR_KEY_SIZE_RANGE), RV(CKR_KEY_TYPE_INCONSISTENT), RV(CKR_KEY_NOT_NEEDED),
        RV(CKR_KEY_CHANGED), RV(CKR_KEY_NEEDED), RV(CKR_KEY_INDIGESTIBLE),
        RV(CKR_KEY_FUNCTION_NOT_PERMITTED), RV(CKR_KEY_NOT_WRAPPABLE),
        RV(CKR_KEY_UNEXTRACTABLE), RV(CKR_MECHANISM_INVALID),
        RV(CKR_MECHANISM_PARAM_INVALID), RV(CKR_OBJECT_HANDLE_INVALID),
        RV(CKR_OPERATION_ACTIVE), RV(CKR_OPERATION_NOT_INITIALIZED),
        RV(CKR_PIN_INCORRECT), RV(CKR_PIN_INVALID), RV(CKR_PIN_LEN_RANGE),
        RV(CKR_PIN_EXPIRED), RV(CKR_PIN_LOCKED), RV(CKR_SESSION_CLOSED),
        RV(CKR_SESSION_COUNT), RV(CKR_SESSION_HANDLE_INVALID),
        RV(CKR_SESSION_PARALLEL_NOT_SUPPORTED), RV(CKR_SESSION_READ_ONLY),
        RV(CKR_SESSION_EXISTS), RV(CKR_SESSION_READ_ONLY_EXISTS),
        RV(CKR_SESSION_READ_WRITE_SO_EXISTS), RV(CKR_SIGNATURE_INVALID),
        RV(CKR_SIGNATURE_LEN_RANGE), RV(CKR_TEMPLATE_INCOMPLETE),
        RV(CKR_TEMPLATE_INCONSISTENT), RV(CKR_TOKEN_NOT_PRESENT),
        RV(CKR_TOKEN_NOT_RECOGNIZED), RV(CKR_TOKEN_WRITE_PROTECTED),
        RV(CKR_UNWRAPPING_KEY_HANDLE_INVALID), RV(CKR_UNWRAPPING_KEY_SIZE_RANGE),
        RV(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT), RV(CKR_USER_ALREADY_LOGGED_IN),
        RV(CKR_USER_NOT_LOGGED_IN), RV(CKR_USER_PIN_NOT_INITIALIZED),
        RV(CKR_USER_TYPE_INVALID), RV(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
        RV(CKR_USER_TOO_MANY_TYPES), RV(CKR_WRAPPED_KEY_INVALID),
        RV(CKR_WRAPPED_KEY_LEN_RANGE), RV(CKR_WRAPPING_KEY_HANDLE_INVALID),
        RV(CKR_WRAPPING_KEY_SIZE_RANGE), RV(CKR_WRAPPING_KEY_TYPE_INCONSISTENT),
        RV(CKR_RANDOM_SEED_NOT_SUPPORTED), RV(CKR_RANDOM_NO_RNG),
        RV(CKR_DOMAIN_PARAMS_INVALID), RV(CKR_CURVE_NOT_SUPPORTED),
        RV(CKR_BUFFER_TOO_SMALL), RV(CKR_SAVED_STATE_INVALID),
        RV(CKR_INFORMATION_SENSITIVE), RV(CKR_STATE_UNSAVEABLE),
        RV(CKR_CRYPTOKI_NOT_INITIALIZED), RV(CKR_CRYPTOKI_ALREADY_INITIALIZED),
        RV(CKR_MUTEX_BAD), RV(CKR_MUTEX_NOT_LOCKED), RV(CKR_NEW_PIN_MODE),
        RV(CKR_NEXT_OTP), RV(CKR_EXCEEDED_MAX_ITERATIONS),
        RV(CKR_FIPS_SELF_TEST_FAILED), RV(CKR_LIBRARY_LOAD_FAILED),
        RV(CKR_PIN_TOO_WEAK), RV(CKR_PUBLIC_KEY_INVALID), RV(CKR_FUNCTION_REJECTED),
        /* PKCS#11 3.0 names, present in newer p11-kit headers. */
#ifdef CKR_AEAD_DECRYPT_FAILED
        RV(CKR_AEAD_DECRYPT_FAILED),
#endif
#ifdef CKR_TOKEN_RESOURCE_EXCEEDED
        RV(CKR_TOKEN_RESOURCE_EXCEEDED),
#endif
#ifdef CKR_OPERATION_CANCEL_FAILED
        RV(CKR_OPERATION_CANCEL_FAILED),
#endif
#ifdef CKR_KEY_EXHAUSTED
        RV(CKR_KEY_EXHAUSTED),
#endif
        RV(CKR_VENDOR_DEFINED),
};
#undef RV

const char *token_rv_name(unsigned long rv) {
        /* One buffer per thread: the result stays valid until this thread
         * next asks for an unnamed value, which is long enough to format one
         * message. Callers that need two unnamed values in one message must
         * copy the first. */
        static _Thread_local char unnamed[sizeof("CKR_0x") + 2 * sizeof(unsigned long)];

        for (size_t i = 0; i < ELEMENTSOF(rv_names); i++)
                if (rv_names[i].rv == rv)
                        return rv_names[i].name;
        snprintf(unnamed, sizeof(unnamed), "CKR_0x%lx", rv);
        return unnamed;
}

static void err_clear(struct token_error *err) {
        if (!err)
                return;
        err->rv = 0;
        err->message[0] = '\0';
}

/* Fills err (if any, and if not already holding an earlier, more relevant
 * failure when keep_first is set). Always returns r, so callers can write
 * `return err_set(err, -EIO, rv, ...)`. */
static int err_setv(struct token_error *err, bool keep_first, int r, CK_RV rv,
                    const char *fmt, va_list ap) {
        if (!err || (keep_first && err->message[0]))
                return r;
        err->rv = rv;
        vsnprintf(err->message, sizeof(err->message), fmt, ap);
        return r;
}

__attribute__((format(printf, 4, 5)))
static int err_set(struct token_error *err, int r, CK_RV rv, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        err_setv(err, false, r, rv, fmt, ap);
        va_end(ap);
        return r;
}

__attribute__((format(printf, 4, 5)))
static int err_set_first(struct token_error *err, int r, CK_RV rv, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        err_setv(err, true, r, rv, fmt, ap);
        va_end(ap);
        return r;
}

/* Copies a blank-padded, unterminated PKCS#11 string field. Some modules pad
 * with NULs instead of blanks, so both are trimmed. */
static void copy_trimmed(char *dst, size_t dst_size, const unsigned char *src, size_t src_len) {
        assert(dst_size > 0);
        while (src_len > 0 && (src[src_len - 1] == ' ' || src[src_len - 1] == '\0'))
                src_len--;
        if (src_len >= dst_size)
                src_len = dst_size - 1;
        memcpy(dst, src, src_len);
        dst[src_len] = '\0';
}

/* ---- Data structures ---------------------------------------------------- */

struct token_module {
        CK_FUNCTION_LIST *fl;
        char name[256];
        char *filename;         /* for module-path in URIs; may be NULL */
        CK_INFO info;
        pthread_rwlock_t call_lock;
        bool needs_reset;               /* it lost a token or failed C_GetSlotList */
        struct timespec next_reset;     /* CLOCK_MONOTONIC: not before */
        unsigned reset_backoff;         /* seconds until the next try after that */
        atomic_uint stuck;              /* calls into it that overran their deadline, still inside */
        struct slot_watch *watch;       /* its slot-event thread (see "Slot events"); NULL: none started */
        atomic_bool event_pending;      /* a slot event came since its last refresh */
        bool event_refresh;             /* this refresh was asked for by an event (hot-plug thread only) */
};

enum key_obj {
        OBJ_PRIVATE,
        OBJ_PUBLIC,
        OBJ_CERT,
        _OBJ_MAX,
};

struct key_object {
        bool present;
        uint8_t *label;         /* raw CKA_LABEL bytes; may be NULL with len 0 */
        size_t label_len;
};

/* One key as scanned. struct token_key comes first so the pointers handed out
 * in snapshots lead back here. */
struct key_entry {
        struct token_key key;
        uint8_t *id;            /* the full CKA_ID (key.id may be truncated) */
        size_t id_len;
        CK_OBJECT_HANDLE priv;  /* valid when key.has_private */
        /* No private key was seen, but the scan ran without a login on a
         * token that requires one: a private key may well exist. URI
         * matching then assumes one with this key's id and label. */
        bool private_maybe_hidden;
        struct key_object obj[_OBJ_MAX];
        uint8_t *cert;
        uint8_t *ec_params;
        unsigned long gen;      /* token generation of the scan: priv is valid only in it */
        struct token_scan *scan;        /* the scan holding this entry (a reference keeps k alive) */
};

/* Every key of one token, from one scan. Shared by every snapshot published
 * while it is the token's latest scan. */
struct token_scan {
        atomic_uint ref;
        size_t n;
        struct key_entry *entries;
};

struct snapshot {
        struct token_keys pub;  /* first: token_keys pointers lead back here */
        atomic_uint ref;
        size_t n_scans;
        struct token_scan **scans;
        const struct token_key **ptrs;
};

struct token {
        struct token_store *store;
        struct token_module *module;
        CK_SLOT_ID slot;
        CK_SLOT_INFO slot_info;
        /* As read at open. Label, manufacturer, model and serial identify the
         * token (URIs, messages); the flags are refreshed where they matter. */
        CK_TOKEN_INFO info;
        char label[33];
        char manufacturer[33];
        char uri[1024];
        bool mech_sign[TOKEN_MECH_COUNT];
        bool mech_dec[TOKEN_DEC_COUNT];

        pthread_rwlock_t op_lock;
        pthread_mutex_t login_lock;

        pthread_mutex_t lock;
        CK_SESSION_HANDLE *idle;
        size_t n_idle, idle_cap;
        unsigned n_open;                /* idle + lent out + being opened */
        unsigned max_sessions;
        struct session_waiter *wait_head, *wait_tail;   /* FIFO of threads waiting for a session */
        bool logged_in;
        bool present;                   /* false: removed; sessions fail at once */
        atomic_ulong gen;               /* see the top of the file */
        atomic_uint stuck;              /* calls that overran their deadline and have not returned */

        struct token_scan *scan;        /* guarded by store->keys_lock */
};

struct token_store {
        struct token_module *modules;
        size_t n_modules;
        CK_FUNCTION_LIST **p11_list;    /* module_path == NULL: p11-kit's array */
        CK_FUNCTION_LIST *p11_single;   /* module_path set */
        struct token **tokens;
        size_t n_tokens;
        unsigned max_sessions;

        pthread_mutex_t keys_lock;
        struct snapshot *current;

        unsigned call_timeout_ms;       /* 0: calls run on the caller's thread, unbounded */

        pthread_mutex_t suspect_lock;   /* a token may be gone: refresh soon */
        pthread_cond_t suspect_cond;
        bool suspect;
};

struct token_uri {
        P11KitUri *uri;
};

static bool token_check_present(struct token *t);
static void slot_watch_shutdown(struct token_store *s, const bool *finalize);
static enum token_hotplug module_hotplug(struct token_module *m, char *note, size_t note_size);

static struct key_entry *entry_of(const struct token_key *k) {
        /* Every token_key we hand out is the first member of a key_entry. */
        return (struct key_entry *) k;
}

/* ---- Scans and snapshots ------------------------------------------------ */

static void key_entry_done(struct key_entry *e) {
        free(e->id);
        free(e->cert);
        free(e->ec_params);
        for (size_t i = 0; i < _OBJ_MAX; i++)
                free(e->obj[i].label);
}

static struct token_scan *scan_ref(struct token_scan *sc) {
        if (sc)
                atomic_fetch_add(&sc->ref, 1);
        return sc;
}

static void scan_unref(struct token_scan *sc) {
        if (!sc || atomic_fetch_sub(&sc->ref, 1) != 1)
                return;
        for (size_t i = 0; i < sc->n; i++)
                key_entry_done(&sc->entries[i]);
        free(sc->entries);
        free(sc);
}

static inline void scan_unrefp(struct token_scan **sc) {
        scan_unref(*sc);
}

static void snapshot_unref(struct snapshot *snap) {
        if (!snap || atomic_fetch_sub(&snap->ref, 1) != 1)
                return;
        for (size_t i = 0; i < snap->n_scans; i++)
                scan_unref(snap->scans[i]);
        free(snap->scans);
        free(snap->ptrs);
        free(snap);
}

/* Builds a snapshot of every token's latest scan. Caller holds keys_lock. */
static struct snapshot *snapshot_build_locked(struct token_store *s) {
        struct snapshot *snap = calloc(1, sizeof(*snap));
        if (!snap)
                return NULL;
        atomic_init(&snap->ref, 1);

        size_t n = 0;
        for (size_t i = 0; i < s->n_tokens; i++)
                if (s->tokens[i]->scan)
                        n += s->tokens[i]->scan->n;

        snap->scans = calloc(s->n_tokens ? s->n_tokens : 1, sizeof(*snap->scans));
        snap->ptrs = calloc(n ? n : 1, sizeof(*snap->ptrs));
        if (!snap->scans || !snap->ptrs) {
                snapshot_unref(snap);
                return NULL;
        }

        for (size_t i = 0; i < s->n_tokens; i++) {
                struct token_scan *sc = s->tokens[i]->scan;
                if (!sc)
                        continue;
                snap->scans[snap->n_scans++] = scan_ref(sc);
                for (size_t j = 0; j < sc->n; j++)
                        snap->ptrs[snap->pub.n++] = &sc->entries[j].key;
        }
        snap->pub.keys = snap->ptrs;
        return snap;
}

/* Makes sc the token's latest scan and publishes a new snapshot. Takes over
 * the caller's reference to sc. */
static int store_publish(struct token *t, struct token_scan *sc) {
        struct token_store *s = t->store;
        struct token_scan *old_scan;
        struct snapshot *snap, *old_snap;

        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->keys_lock);
                old_scan = t->scan;
                t->scan = sc;
                snap = snapshot_build_locked(s);
                if (!snap) {
                        t->scan = old_scan;
                        scan_unref(sc);
                        return -ENOMEM;
                }
                old_snap = s->current;
                s->current = snap;
        }
        /* Outside the lock: the last reference may free a lot. */
        scan_unref(old_scan);
        snapshot_unref(old_snap);
        return 0;
}

struct token_keys *token_store_keys(struct token_store *s) {
        assert(s);
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->keys_lock);
        atomic_fetch_add(&s->current->ref, 1);
        return &s->current->pub;
}

void token_keys_unref(struct token_keys *k) {
        if (k)
                snapshot_unref((struct snapshot *) k);
}

/* ---- Session pool ------------------------------------------------------- */

/* Return values that mean the session itself is gone; a pooled handle that
 * produced one of these must not be handed out again. CKR_DEVICE_REMOVED and
 * CKR_TOKEN_NOT_PRESENT are included because the token took its sessions
 * with it; recovering the token is left to the hot-plug code to come. */
static bool rv_session_gone(CK_RV rv) {
        return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
               rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT;
}

enum session_fate {
        SESSION_KEEP,           /* back to the pool */
        SESSION_DROP,           /* handle is dead: forget it */
        SESSION_CLOSE,          /* handle is in an unknown state: close and forget it */
};

/* A thread queued for a session. Each has its own condition variable so
 * that a release wakes exactly the thread whose turn it is, not all of them
 * (with 64 clients a shared broadcast woke dozens of threads per release). */
struct session_waiter {
        pthread_cond_t cond;
        struct session_waiter *next;
};

struct pooled_session {
        struct token *token;    /* NULL when nothing is held */
        CK_SESSION_HANDLE h;
        enum session_fate fate;
        unsigned long gen;      /* the token's generation when the handle was had */
};

static CK_FUNCTION_LIST *fl_of(struct token *t) {
        return t->module->fl;
}

static void module_enter(struct token_module *m) {
        pthread_rwlock_rdlock(&m->call_lock);
}

static void module_leave(struct token_module **m) {
        if (*m)
                pthread_rwlock_unlock(&(*m)->call_lock);
}

/* Holds the module's call lock for reading until the scope ends. */
#define _module_call_(t) \
        __attribute__((cleanup(module_leave))) struct token_module *_mod_guard = (module_enter((t)->module), (t)->module)

static void rwlock_leave(pthread_rwlock_t **l) {
        if (*l)
                pthread_rwlock_unlock(*l);
}

static inline pthread_rwlock_t *op_read(struct token *t) {
        pthread_rwlock_rdlock(&t->op_lock);
        return &t->op_lock;
}

static inline pthread_rwlock_t *op_write(struct token *t) {
        pthread_rwlock_wrlock(&t->op_lock);
        return &t->op_lock;
}
#define _cleanup_rwlock_ _cleanup_(rwlock_leave)

static void store_suspect(struct token_store *s) {
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->suspect_lock);
        s->suspect = true;
        pthread_cond_broadcast(&s->suspect_cond);
}

static int err_not_present(struct token *t, struct token_error *err) {
        return err_set(err, -ENODEV, CKR_TOKEN_NOT_PRESENT,
                       "token '%s' (%s) is not present: it was removed, or its module lost it (%s); insert it "
                       "again, and the agent takes it back within seconds without a restart",
                       t->label, t->manufacturer, token_rv_name(CKR_TOKEN_NOT_PRESENT));
}

static bool session_available(const struct token *t) {
        /* A token that went away: let the head through to hear so. */
        return !t->present || t->n_idle > 0 || t->n_open < t->max_sessions;
}

/* Wakes the first waiter when a session is there for it. Lock held. */
static void session_wake_head(struct token *t) {
        if (t->wait_head && session_available(t))
                pthread_cond_signal(&t->wait_head->cond);
}

/* Takes a session, waiting in FIFO order when the pool is exhausted. */
static int session_acquire(struct token *t, struct pooled_session *ps, struct token_error *err) {
        CK_SESSION_HANDLE h;
        CK_RV rv;

        assert(!ps->token);
        for (;;) {
                {
                        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);

                        if (t->wait_head || !session_available(t)) {
                                struct session_waiter w = { .next = NULL };

                                pthread_cond_init(&w.cond, NULL);
                                if (t->wait_tail)
                                        t->wait_tail->next = &w;
                                else
                                        t->wait_head = &w;
                                t->wait_tail = &w;
                                while (t->wait_head != &w || !session_available(t))
                                        pthread_cond_wait(&w.cond, &t->lock);
                                t->wait_head = w.next;
                                if (!t->wait_head)
                                        t->wait_tail = NULL;
                                pthread_cond_destroy(&w.cond);
                        }

                        if (!t->present) {
                                session_wake_head(t);   /* the next waiter hears it too */
                                return err_not_present(t, err);
                        }
                        ps->gen = atomic_load(&t->gen);
                        if (t->n_idle > 0) {
                                ps->token = t;
                                ps->h = t->idle[--t->n_idle];
                                ps->fate = SESSION_KEEP;
                                /* More than one session may have come back. */
                                session_wake_head(t);
                                return 0;
                        }
                        t->n_open++;    /* reserve the slot; open it unlocked */
                        session_wake_head(t);
                }

                rv = fl_of(t)->C_OpenSession(t->slot, CKF_SERIAL_SESSION, NULL, NULL, &h);
                if (rv == CKR_OK) {
                        ps->token = t;
                        ps->h = h;
                        ps->fate = SESSION_KEEP;
                        return 0;
                }

                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                t->n_open--;
                /* The token allows fewer sessions than it said: settle for
                 * the ones we have and queue for one of them. */
                if (rv == CKR_SESSION_COUNT && t->n_open > 0) {
                        t->max_sessions = t->n_open;
                        continue;
                }
                session_wake_head(t);
                if (rv_session_gone(rv) || rv == CKR_SLOT_ID_INVALID || rv == CKR_CRYPTOKI_NOT_INITIALIZED)
                        store_suspect(t->store);
                return err_set(err, rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT ? -ENODEV : -EIO, rv,
                               "C_OpenSession on token '%s' (%s): %s", t->label, t->manufacturer, token_rv_name(rv));
        }
}

static void session_release(struct pooled_session *ps) {
        struct token *t = ps->token;

        if (!t)
                return;
        /* A handle from an earlier generation may since name someone
         * else's session: forget it, never close it. */
        if (ps->gen != atomic_load(&t->gen))
                ps->fate = SESSION_DROP;
        else if (ps->fate == SESSION_KEEP && !t->present)
                ps->fate = SESSION_CLOSE;
        if (ps->fate == SESSION_CLOSE)
                (void) fl_of(t)->C_CloseSession(ps->h);

        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
        if (ps->fate == SESSION_KEEP) {
                assert(t->n_idle < t->idle_cap);
                t->idle[t->n_idle++] = ps->h;
        } else {
                t->n_open--;
                /* PKCS#11 login lives only as long as some session does. */
                if (t->n_open == 0)
                        t->logged_in = false;
        }
        session_wake_head(t);
        ps->token = NULL;
}

static inline void session_releasep(struct pooled_session *ps) {
        session_release(ps);
}
#define _cleanup_session_ _cleanup_(session_releasep)

/* Notes what a failed call says about the session it was made on. */
static void session_note_rv(struct pooled_session *ps, CK_RV rv) {
        if (rv_session_gone(rv))
                ps->fate = SESSION_DROP;
}

/* Borrows an idle session without queueing, for quick state checks. Fails
 * rather than jump ahead of threads already waiting. */
static bool session_try_acquire_idle(struct token *t, struct pooled_session *ps) {
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
        if (!t->present || t->n_idle == 0 || t->wait_head)
                return false;
        ps->gen = atomic_load(&t->gen);
        ps->token = t;
        ps->h = t->idle[--t->n_idle];
        ps->fate = SESSION_KEEP;
        return true;
}

static bool session_state_is_user(CK_STATE st) {
        return st == CKS_RO_USER_FUNCTIONS || st == CKS_RW_USER_FUNCTIONS;
}

/* Asks the token whether the session is logged in; updates our flag. */
static bool session_check_login(struct pooled_session *ps) {
        struct token *t = ps->token;
        CK_SESSION_INFO si;
        CK_RV rv;

        rv = fl_of(t)->C_GetSessionInfo(ps->h, &si);
        if (rv != CKR_OK) {
                session_note_rv(ps, rv);
                return false;
        }
        bool user = session_state_is_user(si.state);
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
        t->logged_in = user;
        return user;
}

static bool token_logged_in(struct token *t) {
        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                if (t->logged_in)
                        return true;
        }
        /* Unsure: login belongs to the whole application, so another user of
         * the same module in this process may have logged in. A session we
         * already hold tells the truth for free. */
        _cleanup_session_ struct pooled_session ps = {};
        if (!session_try_acquire_idle(t, &ps))
                return false;
        return session_check_login(&ps);
}

/* ---- Attributes and object search --------------------------------------- */

static bool attr_ok(CK_RV rv) {
        /* Per PKCS#11, these still fill in every other attribute. */
        return rv == CKR_OK || rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID;
}

static void attrs_free(CK_ATTRIBUTE *a, size_t n) {
        for (size_t i = 0; i < n; i++) {
                free(a[i].pValue);
                a[i].pValue = NULL;
        }
}

/* The two-call pattern: lengths first, then values. An attribute the object
 * does not have comes back with pValue NULL. Callers pass only the attribute
 * types this file is allowed to read (see the header comment). */
static CK_RV attrs_get(CK_FUNCTION_LIST *fl, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o,
                       CK_ATTRIBUTE *a, size_t n) {
        bool one_by_one = false;
        CK_RV rv;

        for (size_t i = 0; i < n; i++) {
                a[i].pValue = NULL;
                a[i].ulValueLen = 0;
        }
        rv = fl->C_GetAttributeValue(s, o, a, n);
        if (rv != CKR_OK && attr_ok(rv) && n > 1) {
                /* Some modules stop at the first attribute they cannot
                 * return; ask one by one so it does not hide the rest. */
                one_by_one = true;
                for (size_t i = 0; i < n; i++) {
                        a[i].ulValueLen = 0;
                        rv = fl->C_GetAttributeValue(s, o, &a[i], 1);
                        if (!attr_ok(rv))
                                return rv;
                        if (rv != CKR_OK)
                                a[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
                }
        } else if (!attr_ok(rv))
                return rv;

        for (size_t i = 0; i < n; i++) {
                if (a[i].ulValueLen == CK_UNAVAILABLE_INFORMATION)
                        continue;
                a[i].pValue = malloc(a[i].ulValueLen ? a[i].ulValueLen : 1);
                if (!a[i].pValue) {
                        attrs_free(a, n);
                        return CKR_HOST_MEMORY;
                }
        }

        for (size_t i = 0; i < n; i++) {
                size_t k = one_by_one ? 1 : n;
                if (one_by_one && !a[i].pValue)
                        continue;
                rv = fl->C_GetAttributeValue(s, o, &a[i], k);
                if (!attr_ok(rv)) {
                        attrs_free(a, n);
                        return rv;
                }
                if (!one_by_one)
                        break;
        }
        for (size_t i = 0; i < n; i++)
                if (a[i].ulValueLen == CK_UNAVAILABLE_INFORMATION) {
                        free(a[i].pValue);
                        a[i].pValue = NULL;
                }
        return CKR_OK;
}

static bool attr_bool(const CK_ATTRIBUTE *a) {
        return a->pValue && a->ulValueLen == sizeof(CK_BBOOL) && *(CK_BBOOL *) a->pValue == CK_TRUE;
}

static bool attr_ulong(const CK_ATTRIBUTE *a, CK_ULONG *out) {
        if (!a->pValue || a->ulValueLen != sizeof(CK_ULONG))
                return false;
        memcpy(out, a->pValue, sizeof(CK_ULONG));
        return true;
}

/* Moves a variable-length attribute value into *out (NULL with length 0 if
 * the object does not have it). */
static void attr_take(CK_ATTRIBUTE *a, uint8_t **out, size_t *out_len) {
        *out = a->pValue;
        *out_len = a->pValue ? a->ulValueLen : 0;
        a->pValue = NULL;
}

struct handle_list {
        CK_OBJECT_HANDLE *h;
        size_t n;
};

static void handle_list_done(struct handle_list *l) {
        free(l->h);
        l->h = NULL;
        l->n = 0;
}

static CK_RV find_objects(CK_FUNCTION_LIST *fl, CK_SESSION_HANDLE s, CK_ATTRIBUTE *tmpl,
                          size_t n_tmpl, size_t max, struct handle_list *out,
                          const char **failed_call) {
        CK_OBJECT_HANDLE batch[64];
        CK_ULONG got;
        CK_RV rv;

        out->h = NULL;
        out->n = 0;
        *failed_call = "C_FindObjectsInit";
        rv = fl->C_FindObjectsInit(s, tmpl, n_tmpl);
        if (rv != CKR_OK)
                return rv;

        *failed_call = "C_FindObjects";
        for (;;) {
                size_t want = ELEMENTSOF(batch);
                if (max && max - out->n < want)
                        want = max - out->n;
                if (want == 0)
                        break;
                rv = fl->C_FindObjects(s, batch, want, &got);
                if (rv != CKR_OK || got == 0)
                        break;
                CK_OBJECT_HANDLE *nh = realloc(out->h, (out->n + got) * sizeof(*nh));
                if (!nh) {
                        rv = CKR_HOST_MEMORY;
                        break;
                }
                out->h = nh;
                memcpy(out->h + out->n, batch, got * sizeof(*nh));
                out->n += got;
        }

        /* Always end the search: a session with an active search cannot start
         * another one, and pooled sessions must come back clean. */
        CK_RV rv2 = fl->C_FindObjectsFinal(s);
        if (rv == CKR_OK && rv2 != CKR_OK) {
                *failed_call = "C_FindObjectsFinal";
                rv = rv2;
        }
        if (rv != CKR_OK)
                handle_list_done(out);
        return rv;
}

/* ---- Object scan -------------------------------------------------------- */

struct scan_builder {
        struct key_entry *e;
        size_t n, cap;
};

static void scan_builder_done(struct scan_builder *b) {
        for (size_t i = 0; i < b->n; i++)
                key_entry_done(&b->e[i]);
        free(b->e);
        b->e = NULL;
        b->n = b->cap = 0;
}

/* The entry for CKA_ID id, created if needed. Objects without an id cannot be
 * paired with anything, so each gets an entry of its own. Takes over *id. */
static struct key_entry *builder_entry(struct scan_builder *b, struct token *t, uint8_t **id, size_t id_len) {
        if (id_len > 0)
                for (size_t i = 0; i < b->n; i++)
                        if (b->e[i].id_len == id_len && memcmp(b->e[i].id, *id, id_len) == 0) {
                                free(*id);
                                *id = NULL;
                                return &b->e[i];
                        }

        if (b->n == b->cap) {
                size_t cap = b->cap ? 2 * b->cap : 16;
                struct key_entry *ne = realloc(b->e, cap * sizeof(*ne));
                if (!ne)
                        return NULL;
                b->e = ne;
                b->cap = cap;
        }
        struct key_entry *e = &b->e[b->n++];
        memset(e, 0, sizeof(*e));
        e->key.token = t;
        e->id = *id;
        e->id_len = id_len;
        *id = NULL;
        e->key.id_len = id_len < sizeof(e->key.id) ? id_len : sizeof(e->key.id);
        if (e->key.id_len)
                memcpy(e->key.id, e->id, e->key.id_len);
        e->priv = CK_INVALID_HANDLE;
        return e;
}

/* Reads CKA_ID and CKA_LABEL of one object into its slot of the entry for
 * its id. */
static CK_RV scan_object_common(struct scan_builder *b, struct token *t, CK_ATTRIBUTE *id_label,
                                enum key_obj which, struct key_entry **out) {
        uint8_t *id;
        size_t id_len;
        struct key_entry *e;

        attr_take(&id_label[0], &id, &id_len);
        e = builder_entry(b, t, &id, id_len);
        if (!e) {
                free(id);
                return CKR_HOST_MEMORY;
        }
        if (e->obj[which].present) {
                /* A second object of the same class and id: keep the first,
                 * which is the one C_FindObjects reported first. */
                *out = NULL;
                return CKR_OK;
        }
        e->obj[which].present = true;
        attr_take(&id_label[1], &e->obj[which].label, &e->obj[which].label_len);
        *out = e;
        return CKR_OK;
}

static enum token_key_type key_type_from_ckk(CK_ULONG ckk) {
        switch (ckk) {
        case CKK_RSA:
                return TOKEN_KEY_RSA;
        case CKK_EC:
                return TOKEN_KEY_EC;
        case CKK_EC_EDWARDS:
                return TOKEN_KEY_EDDSA;
        default:
                return TOKEN_KEY_UNKNOWN;
        }
}

static CK_RV scan_private_key(struct scan_builder *b, struct token *t, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o) {
        /* The complete list of what is ever read from a private key. */
        CK_ATTRIBUTE a[] = {
                { CKA_ID, NULL, 0 },
                { CKA_LABEL, NULL, 0 },
                { CKA_KEY_TYPE, NULL, 0 },
                { CKA_SIGN, NULL, 0 },
                { CKA_DECRYPT, NULL, 0 },
                { CKA_DERIVE, NULL, 0 },
                { CKA_ALWAYS_AUTHENTICATE, NULL, 0 },
        };
        struct key_entry *e;
        CK_ULONG ckk;
        CK_RV rv;

        rv = attrs_get(fl_of(t), s, o, a, ELEMENTSOF(a));
        if (rv != CKR_OK)
                return rv;
        rv = scan_object_common(b, t, a, OBJ_PRIVATE, &e);
        if (rv == CKR_OK && e) {
                e->priv = o;
                e->key.has_private = true;
                if (attr_ulong(&a[2], &ckk))
                        e->key.type = key_type_from_ckk(ckk);
                e->key.can_sign = attr_bool(&a[3]);
                e->key.can_decrypt = attr_bool(&a[4]);
                e->key.can_derive = attr_bool(&a[5]);
                e->key.always_authenticate = attr_bool(&a[6]);
        }
        attrs_free(a, ELEMENTSOF(a));
        return rv;
}

static CK_RV scan_public_key(struct scan_builder *b, struct token *t, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o) {
        CK_ATTRIBUTE a[] = {
                { CKA_ID, NULL, 0 },
                { CKA_LABEL, NULL, 0 },
                { CKA_KEY_TYPE, NULL, 0 },
        };
        struct key_entry *e;
        CK_ULONG ckk = CKK_VENDOR_DEFINED;
        CK_RV rv;

        rv = attrs_get(fl_of(t), s, o, a, ELEMENTSOF(a));
        if (rv != CKR_OK)
                return rv;
        rv = scan_object_common(b, t, a, OBJ_PUBLIC, &e);
        (void) attr_ulong(&a[2], &ckk);
        attrs_free(a, ELEMENTSOF(a));
        if (rv != CKR_OK || !e)
                return rv;

        e->key.has_public = true;
        if (e->key.type == TOKEN_KEY_UNKNOWN)
                e->key.type = key_type_from_ckk(ckk);

        /* Only what the key type has: asking an EC key for CKA_MODULUS_BITS
         * is legal but needlessly noisy on some tokens. */
        if (ckk == CKK_RSA) {
                CK_ATTRIBUTE bits = { CKA_MODULUS_BITS, NULL, 0 };
                CK_ULONG v;
                rv = attrs_get(fl_of(t), s, o, &bits, 1);
                if (rv != CKR_OK)
                        return rv;
                if (attr_ulong(&bits, &v))
                        e->key.modulus_bits = v;
                attrs_free(&bits, 1);
                if (e->key.modulus_bits == 0) {
                        /* Some tokens omit CKA_MODULUS_BITS; the length of
                         * the (public) modulus says the same. */
                        CK_ATTRIBUTE mod = { CKA_MODULUS, NULL, 0 };
                        if (fl_of(t)->C_GetAttributeValue(s, o, &mod, 1) == CKR_OK &&
                            mod.ulValueLen != CK_UNAVAILABLE_INFORMATION)
                                e->key.modulus_bits = mod.ulValueLen * 8;
                }
        } else if (ckk == CKK_EC || ckk == CKK_EC_EDWARDS) {
                CK_ATTRIBUTE p = { CKA_EC_PARAMS, NULL, 0 };
                size_t len;
                rv = attrs_get(fl_of(t), s, o, &p, 1);
                if (rv != CKR_OK)
                        return rv;
                attr_take(&p, &e->ec_params, &len);
                e->key.ec_params = e->ec_params;
                e->key.ec_params_len = len;
        }
        return CKR_OK;
}

static CK_RV scan_certificate(struct scan_builder *b, struct token *t, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o) {
        CK_ATTRIBUTE a[] = {
                { CKA_ID, NULL, 0 },
                { CKA_LABEL, NULL, 0 },
                { CKA_VALUE, NULL, 0 },         /* of a certificate: public */
        };
        struct key_entry *e;
        CK_RV rv;

        rv = attrs_get(fl_of(t), s, o, a, ELEMENTSOF(a));
        if (rv != CKR_OK)
                return rv;
        if (!a[2].pValue || a[2].ulValueLen == 0) {
                /* A certificate without a value is of no use to anyone. */
                attrs_free(a, ELEMENTSOF(a));
                return CKR_OK;
        }
        rv = scan_object_common(b, t, a, OBJ_CERT, &e);
        if (rv == CKR_OK && e) {
                size_t len;
                attr_take(&a[2], &e->cert, &len);
                e->key.cert_der = e->cert;
                e->key.cert_len = len;
        }
        attrs_free(a, ELEMENTSOF(a));
        return rv;
}

static int key_format_uri(struct token *t, struct key_entry *e, bool with_label) {
        _cleanup_(p11_kit_uri_freep) P11KitUri *u = p11_kit_uri_new();
        _cleanup_free_ char *s = NULL;
        CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
        const struct key_object *lo = e->obj[OBJ_PRIVATE].present ? &e->obj[OBJ_PRIVATE] : NULL;

        if (!u)
                return -ENOMEM;
        memcpy(p11_kit_uri_get_token_info(u), &t->info, sizeof(t->info));

        CK_ATTRIBUTE attrs[] = {
                { CKA_CLASS, &cls, sizeof(cls) },
                { CKA_ID, e->id, e->id_len },
                { CKA_LABEL, NULL, 0 },
        };
        size_t n = 2;
        if (with_label) {
                /* Name the private key by its own label; before login it is
                 * not visible, and the pairing label (certificate's or public
                 * key's) is the best guess. */
                if (lo) {
                        attrs[2].pValue = lo->label;
                        attrs[2].ulValueLen = lo->label_len;
                } else {
                        attrs[2].pValue = e->key.label;
                        attrs[2].ulValueLen = strlen(e->key.label);
                }
                if (attrs[2].ulValueLen > 0)
                        n = 3;
        }
        if (p11_kit_uri_set_attributes(u, attrs, n) != P11_KIT_URI_OK)
                return -ENOMEM;
        if (p11_kit_uri_format(u, P11_KIT_URI_FOR_OBJECT_ON_TOKEN, &s) != P11_KIT_URI_OK)
                return -ENOMEM;
        if (strlen(s) >= sizeof(e->key.uri))
                return -ENAMETOOLONG;
        strcpy(e->key.uri, s);
        return 0;
}

static void key_finish(struct token *t, struct key_entry *e, bool private_maybe_hidden) {
        static const enum key_obj label_order[] = { OBJ_PRIVATE, OBJ_CERT, OBJ_PUBLIC };

        for (size_t i = 0; i < ELEMENTSOF(label_order); i++) {
                const struct key_object *o = &e->obj[label_order[i]];
                if (o->present) {
                        size_t len = o->label_len < sizeof(e->key.label) - 1 ? o->label_len : sizeof(e->key.label) - 1;
                        if (len)
                                memcpy(e->key.label, o->label, len);
                        e->key.label[len] = '\0';
                        break;
                }
        }
        e->private_maybe_hidden = !e->key.has_private && private_maybe_hidden;

        /* With a very long id and label the URI may not fit: drop the label
         * (the id and token still name the key), and failing that leave it
         * empty rather than hand out a truncated URI. */
        if (key_format_uri(t, e, true) < 0 && key_format_uri(t, e, false) < 0)
                e->key.uri[0] = '\0';
}

/* Scans every certificate, public key and private key visible on session s
 * and groups them into keys. */
static int token_scan_objects(struct token *t, struct pooled_session *ps, struct token_scan **out,
                              struct token_error *err) {
        static const struct {
                CK_OBJECT_CLASS cls;
                const char *what;
                CK_RV (*scan)(struct scan_builder *, struct token *, CK_SESSION_HANDLE, CK_OBJECT_HANDLE);
        } passes[] = {
                /* Private keys first: their labels and key types win. */
                { CKO_PRIVATE_KEY, "private keys", scan_private_key },
                { CKO_PUBLIC_KEY, "public keys", scan_public_key },
                { CKO_CERTIFICATE, "certificates", scan_certificate },
        };
        _cleanup_(scan_builder_done) struct scan_builder b = {};
        CK_FUNCTION_LIST *fl = fl_of(t);
        CK_SESSION_INFO si;
        bool hidden;
        CK_RV rv;

        rv = fl->C_GetSessionInfo(ps->h, &si);
        if (rv != CKR_OK) {
                session_note_rv(ps, rv);
                return err_set(err, -EIO, rv, "C_GetSessionInfo on token '%s' (%s): %s",
                               t->label, t->manufacturer, token_rv_name(rv));
        }
        hidden = (t->info.flags & CKF_LOGIN_REQUIRED) && !session_state_is_user(si.state);

        for (size_t p = 0; p < ELEMENTSOF(passes); p++) {
                CK_OBJECT_CLASS cls = passes[p].cls;
                CK_CERTIFICATE_TYPE ct = CKC_X_509;
                CK_ATTRIBUTE tmpl[] = {
                        { CKA_CLASS, &cls, sizeof(cls) },
                        { CKA_CERTIFICATE_TYPE, &ct, sizeof(ct) },
                };
                _cleanup_(handle_list_done) struct handle_list objs = {};
                const char *call;

                rv = find_objects(fl, ps->h, tmpl, cls == CKO_CERTIFICATE ? 2 : 1, 0, &objs, &call);
                if (rv != CKR_OK) {
                        session_note_rv(ps, rv);
                        return err_set(err, -EIO, rv, "%s for %s on token '%s' (%s): %s", call,
                                       passes[p].what, t->label, t->manufacturer, token_rv_name(rv));
                }
                for (size_t i = 0; i < objs.n; i++) {
                        rv = passes[p].scan(&b, t, ps->h, objs.h[i]);
                        if (rv == CKR_HOST_MEMORY)
                                return err_set(err, -ENOMEM, 0, "out of memory scanning token '%s'", t->label);
                        if (rv == CKR_OBJECT_HANDLE_INVALID)
                                continue;       /* deleted under us: not ours to worry about */
                        if (rv != CKR_OK) {
                                session_note_rv(ps, rv);
                                return err_set(err, -EIO, rv,
                                               "C_GetAttributeValue on one of the %s of token '%s' (%s): %s",
                                               passes[p].what, t->label, t->manufacturer, token_rv_name(rv));
                        }
                }
        }

        for (size_t i = 0; i < b.n; i++) {
                key_finish(t, &b.e[i], hidden);
                b.e[i].gen = ps->gen;
        }

        struct token_scan *sc = calloc(1, sizeof(*sc));
        if (!sc)
                return -ENOMEM;
        atomic_init(&sc->ref, 1);
        sc->n = b.n;
        sc->entries = b.e;
        for (size_t i = 0; i < sc->n; i++)
                sc->entries[i].scan = sc;
        b.e = NULL;
        b.n = b.cap = 0;
        *out = sc;
        return 0;
}

/* Scans the token on a session of its pool and publishes the result. */
static int token_rescan(struct token *t, struct pooled_session *ps, struct token_error *err) {
        struct token_scan *sc = NULL;
        int r;

        r = token_scan_objects(t, ps, &sc, err);
        if (r < 0)
                return r;
        return store_publish(t, sc);
}

/* ---- Tokens and modules ------------------------------------------------- */

static void token_read_mechanisms(struct token *t) {
        static const CK_MECHANISM_TYPE mech_of[TOKEN_MECH_COUNT] = {
                [TOKEN_MECH_RSA_PKCS] = CKM_RSA_PKCS,
                [TOKEN_MECH_RSA_PSS] = CKM_RSA_PKCS_PSS,
                [TOKEN_MECH_ECDSA] = CKM_ECDSA,
                [TOKEN_MECH_EDDSA] = CKM_EDDSA,
        };
        static const CK_MECHANISM_TYPE dec_of[TOKEN_DEC_COUNT] = {
                [TOKEN_DEC_RSA_PKCS] = CKM_RSA_PKCS,
                [TOKEN_DEC_RSA_OAEP] = CKM_RSA_PKCS_OAEP,
                [TOKEN_DEC_RSA_X509] = CKM_RSA_X_509,
                [TOKEN_DEC_ECDH] = CKM_ECDH1_DERIVE,
        };
        CK_FUNCTION_LIST *fl = fl_of(t);
        _cleanup_free_ CK_MECHANISM_TYPE *list = NULL;
        CK_ULONG n = 0;
        CK_RV rv;

        /* A token whose mechanism list cannot be read offers nothing we can
         * rely on; token_key_can() then says no and token_sign() lets the
         * token decide. */
        for (int tries = 0; tries < 3; tries++) {
                rv = fl->C_GetMechanismList(t->slot, NULL, &n);
                if (rv != CKR_OK || n == 0)
                        return;
                free(list);
                /* Room to spare: p11-kit 0.24's RPC client reads one entry
                 * past the array while it filters out mechanisms it cannot
                 * carry (fixed upstream, p11-kit pull request 454). */
                list = calloc(n + 8, sizeof(*list));
                if (!list)
                        return;
                rv = fl->C_GetMechanismList(t->slot, list, &n);
                if (rv != CKR_BUFFER_TOO_SMALL)
                        break;
        }
        if (rv != CKR_OK)
                return;

        for (size_t m = 0; m < TOKEN_MECH_COUNT; m++)
                for (CK_ULONG i = 0; i < n; i++)
                        if (list[i] == mech_of[m]) {
                                CK_MECHANISM_INFO mi;
                                if (fl->C_GetMechanismInfo(t->slot, mech_of[m], &mi) == CKR_OK)
                                        t->mech_sign[m] = mi.flags & CKF_SIGN;
                                break;
                        }
        for (size_t m = 0; m < TOKEN_DEC_COUNT; m++)
                for (CK_ULONG i = 0; i < n; i++)
                        if (list[i] == dec_of[m]) {
                                CK_MECHANISM_INFO mi;
                                if (fl->C_GetMechanismInfo(t->slot, dec_of[m], &mi) == CKR_OK)
                                        t->mech_dec[m] = mi.flags & (m == TOKEN_DEC_ECDH ? CKF_DERIVE : CKF_DECRYPT);
                                break;
                        }
}

static int token_format_uri(struct token *t) {
        _cleanup_(p11_kit_uri_freep) P11KitUri *u = p11_kit_uri_new();
        _cleanup_free_ char *s = NULL;

        if (!u)
                return -ENOMEM;
        memcpy(p11_kit_uri_get_token_info(u), &t->info, sizeof(t->info));
        if (p11_kit_uri_format(u, P11_KIT_URI_FOR_TOKEN, &s) != P11_KIT_URI_OK)
                return -ENOMEM;
        snprintf(t->uri, sizeof(t->uri), "%s", s);
        return 0;
}

/* Writers first: a login or a module re-initialisation waits only for the
 * calls already running, not for a stream of new ones. */
static void rwlock_init_writer_first(pthread_rwlock_t *l) {
        pthread_rwlockattr_t a;

        pthread_rwlockattr_init(&a);
        pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
        pthread_rwlock_init(l, &a);
        pthread_rwlockattr_destroy(&a);
}

static void token_free(struct token *t) {
        if (!t)
                return;
        /* Close what we opened; sessions lent out at this point would be a
         * caller bug (token_store_free while signing). */
        for (size_t i = 0; i < t->n_idle; i++)
                (void) fl_of(t)->C_CloseSession(t->idle[i]);
        scan_unref(t->scan);
        free(t->idle);
        pthread_mutex_destroy(&t->lock);
        pthread_mutex_destroy(&t->login_lock);
        pthread_rwlock_destroy(&t->op_lock);
        free(t);
}

/* Opens one token: its info, mechanisms, a first session and a first scan.
 * Returns 0 and *out NULL for slots whose token we skip. */
static int token_open(struct token_store *s, struct token_module *m, CK_SLOT_ID slot,
                      struct token **out, struct token_error *err) {
        CK_FUNCTION_LIST *fl = m->fl;
        struct token *t;
        CK_RV rv;
        int r;

        *out = NULL;
        t = calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        t->store = s;
        t->module = m;
        t->slot = slot;
        t->present = true;
        atomic_init(&t->gen, 1);
        rwlock_init_writer_first(&t->op_lock);
        pthread_mutex_init(&t->login_lock, NULL);
        pthread_mutex_init(&t->lock, NULL);

        rv = fl->C_GetTokenInfo(slot, &t->info);
        if (rv == CKR_OK)
                rv = fl->C_GetSlotInfo(slot, &t->slot_info);
        if (rv != CKR_OK) {
                /* Removed between C_GetSlotList and now, or broken: not fatal
                 * for the store. */
                err_set_first(err, 0, rv, "C_GetTokenInfo on slot %lu of module '%s': %s",
                              (unsigned long) slot, m->name, token_rv_name(rv));
                token_free(t);
                return 0;
        }
        /* An uninitialised token (SoftHSM always offers one) has no keys and
         * no PIN; listing it would only confuse. */
        if (!(t->info.flags & CKF_TOKEN_INITIALIZED)) {
                token_free(t);
                return 0;
        }
        copy_trimmed(t->label, sizeof(t->label), t->info.label, sizeof(t->info.label));
        copy_trimmed(t->manufacturer, sizeof(t->manufacturer), t->info.manufacturerID,
                     sizeof(t->info.manufacturerID));

        t->max_sessions = s->max_sessions;
        if (t->info.ulMaxSessionCount != CK_UNAVAILABLE_INFORMATION &&
            t->info.ulMaxSessionCount != CK_EFFECTIVELY_INFINITE &&
            t->info.ulMaxSessionCount < t->max_sessions)
                t->max_sessions = t->info.ulMaxSessionCount;
        t->idle_cap = t->max_sessions;
        t->idle = calloc(t->idle_cap, sizeof(*t->idle));
        if (!t->idle) {
                token_free(t);
                return -ENOMEM;
        }

        r = token_format_uri(t);
        if (r < 0) {
                token_free(t);
                return r;
        }
        token_read_mechanisms(t);
        *out = t;
        return 0;
}

/* The first scan, once the token is part of the store. A token that cannot be
 * scanned stays listed with no keys, so it can still be logged in to and
 * scanned again. */
static int token_first_scan(struct token *t, struct token_error *err) {
        _cleanup_session_ struct pooled_session ps = {};
        struct token_error e;
        int r;

        err_clear(&e);
        r = session_acquire(t, &ps, &e);
        if (r >= 0) {
                (void) session_check_login(&ps);
                r = token_rescan(t, &ps, &e);
        }
        if (r == -ENOMEM)
                return r;
        if (r < 0)
                err_set_first(err, 0, e.rv, "%s", e.message);
        return 0;
}

static int store_add_token(struct token_store *s, struct token *t) {
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->keys_lock);
        struct token **nt = realloc(s->tokens, (s->n_tokens + 1) * sizeof(*nt));
        if (!nt)
                return -ENOMEM;
        s->tokens = nt;
        s->tokens[s->n_tokens++] = t;
        return 0;
}

/* The slots with a token present; *slots is malloc'd (may be NULL if none). */
static CK_RV module_slot_list(struct token_module *m, CK_SLOT_ID **slots, CK_ULONG *n) {
        CK_RV rv = CKR_OK;

        *slots = NULL;
        *n = 0;
        for (int tries = 0; tries < 3; tries++) {
                rv = m->fl->C_GetSlotList(CK_TRUE, NULL, n);
                if (rv != CKR_OK || *n == 0)
                        break;
                free(*slots);
                *slots = calloc(*n, sizeof(**slots));
                if (!*slots)
                        return CKR_HOST_MEMORY;
                rv = m->fl->C_GetSlotList(CK_TRUE, *slots, n);
                if (rv != CKR_BUFFER_TOO_SMALL)
                        break;
        }
        if (rv != CKR_OK) {
                free(*slots);
                *slots = NULL;
                *n = 0;
        }
        return rv;
}

static int module_open_tokens(struct token_store *s, struct token_module *m, struct token_error *err) {
        _cleanup_free_ CK_SLOT_ID *slots = NULL;
        CK_ULONG n = 0;
        CK_RV rv;
        int r;

        rv = module_slot_list(m, &slots, &n);
        if (rv == CKR_HOST_MEMORY)
                return -ENOMEM;
        if (rv != CKR_OK) {
                /* A module without usable slots is not a reason to fail. */
                err_set_first(err, 0, rv, "C_GetSlotList of module '%s': %s", m->name, token_rv_name(rv));
                return 0;
        }

        for (CK_ULONG i = 0; i < n; i++) {
                struct token *t;
                r = token_open(s, m, slots[i], &t, err);
                if (r < 0)
                        return r;
                if (!t)
                        continue;
                r = store_add_token(s, t);
                if (r < 0) {
                        token_free(t);
                        return r;
                }
        }
        return 0;
}

static int module_describe(struct token_module *m, const char *path, struct token_error *err) {
        _cleanup_free_ char *name = p11_kit_module_get_name(m->fl);
        CK_RV rv;

        snprintf(m->name, sizeof(m->name), "%s", name ? name : path ? path : "(unnamed module)");
        m->filename = path ? strdup(path) : p11_kit_module_get_filename(m->fl);
        rv = m->fl->C_GetInfo(&m->info);
        if (rv != CKR_OK)
                return err_set(err, -EIO, rv, "C_GetInfo of module '%s': %s", m->name, token_rv_name(rv));
        return 0;
}

/* p11-kit's trust module (and any module marked trust-policy) holds the
 * system's CA anchors: hundreds of certificates and never a key. They are no
 * identities to sign with, so they are not loaded at all. */
static bool module_is_trust_store(CK_FUNCTION_LIST *fl) {
        _cleanup_free_ char *v = p11_kit_config_option(fl, "trust-policy");
        return v && (strcmp(v, "yes") == 0 || strcmp(v, "true") == 0);
}

static int store_load_modules(struct token_store *s, const char *path, struct token_error *err) {
        CK_RV rv;

        if (path) {
                s->p11_single = p11_kit_module_load(path, 0);
                if (!s->p11_single) {
                        const char *why = p11_kit_message();
                        return err_set(err, -ENOENT, 0, "cannot load PKCS#11 module %s: %s", path,
                                       why ? why : "p11-kit could not load it");
                }
                rv = p11_kit_module_initialize(s->p11_single);
                if (rv != CKR_OK) {
                        p11_kit_module_release(s->p11_single);
                        s->p11_single = NULL;
                        return err_set(err, -EIO, rv, "C_Initialize of module %s: %s", path, token_rv_name(rv));
                }
                s->modules = calloc(1, sizeof(*s->modules));
                if (!s->modules)
                        return -ENOMEM;
                s->modules[0].fl = s->p11_single;
                rwlock_init_writer_first(&s->modules[0].call_lock);
                s->n_modules = 1;
                return module_describe(&s->modules[0], path, err);
        }

        /* p11_kit_modules_load_and_initialize() would do the same, but it
         * drops a failing module without telling which or why; we want the
         * first failure in err. Same rules: skip failures, honour
         * "critical". */
        s->p11_list = p11_kit_modules_load(NULL, 0);
        if (!s->p11_list) {
                const char *why = p11_kit_message();
                return err_set(err, -EIO, 0, "cannot load the PKCS#11 modules configured for p11-kit: %s",
                               why ? why : "unknown error");
        }

        size_t n = 0, failed = 0, out = 0;
        while (s->p11_list[n])
                n++;
        s->modules = calloc(n ? n : 1, sizeof(*s->modules));
        if (!s->modules)
                return -ENOMEM;

        int fatal = 0;
        for (size_t i = 0; i < n; i++) {
                CK_FUNCTION_LIST *fl = s->p11_list[i];
                if (fatal || module_is_trust_store(fl)) {
                        p11_kit_module_release(fl);
                        continue;
                }
                rv = p11_kit_module_initialize(fl);
                if (rv != CKR_OK) {
                        _cleanup_free_ char *name = p11_kit_module_get_name(fl);
                        bool critical = p11_kit_module_get_flags(fl) & P11_KIT_MODULE_CRITICAL;
                        err_set_first(err, 0, rv, "C_Initialize of module '%s': %s%s", name ? name : "(unnamed)",
                                      token_rv_name(rv), critical ? "" : "; module skipped");
                        if (critical)
                                fatal = err_set(err, -EIO, rv, "C_Initialize of critical module '%s': %s",
                                                name ? name : "(unnamed)", token_rv_name(rv));
                        p11_kit_module_release(fl);
                        failed++;
                        continue;
                }
                s->p11_list[out] = fl;
                s->modules[out].fl = fl;
                rwlock_init_writer_first(&s->modules[out].call_lock);
                out++;
                s->n_modules = out;
        }
        s->p11_list[out] = NULL;
        if (fatal < 0)
                return fatal;
        if (out == 0 && failed > 0)
                return -EIO;    /* err holds the first failure */

        for (size_t i = 0; i < s->n_modules; i++) {
                int r = module_describe(&s->modules[i], NULL, err);
                if (r < 0)
                        return r;
        }
        return 0;
}

void token_store_free(struct token_store *s) {
        if (!s)
                return;
        /* Slot-event threads out of the modules before anything goes (no
         * other call is running now: finalising is safe). */
        {
                bool *all = calloc(s->n_modules ? s->n_modules : 1, sizeof(*all));
                for (size_t i = 0; all && i < s->n_modules; i++)
                        all[i] = true;
                slot_watch_shutdown(s, all);
                free(all);
        }
        /* Sessions first (they belong to the modules), then the modules. */
        for (size_t i = 0; i < s->n_tokens; i++)
                token_free(s->tokens[i]);
        free(s->tokens);
        snapshot_unref(s->current);

        if (s->p11_list)
                p11_kit_modules_finalize_and_release(s->p11_list);
        if (s->p11_single) {
                (void) p11_kit_module_finalize(s->p11_single);
                p11_kit_module_release(s->p11_single);
        }
        for (size_t i = 0; i < s->n_modules; i++) {
                free(s->modules[i].filename);
                pthread_rwlock_destroy(&s->modules[i].call_lock);
        }
        free(s->modules);
        pthread_mutex_destroy(&s->keys_lock);
        pthread_mutex_destroy(&s->suspect_lock);
        pthread_cond_destroy(&s->suspect_cond);
        free(s);
}

void token_store_stop(struct token_store *s) {
        if (!s)
                return;
        /* Which modules no other thread is inside: those may be finalised
         * to end a slot-event wait. */
        bool *locked = calloc(s->n_modules ? s->n_modules : 1, sizeof(*locked));
        for (size_t i = 0; i < s->n_modules; i++) {
                struct timespec deadline;
                clock_gettime(CLOCK_REALTIME, &deadline);
                deadline.tv_sec += 2;
                /* Never released: the process is about to exit. */
                int r = pthread_rwlock_timedwrlock(&s->modules[i].call_lock, &deadline);
                if (locked)
                        locked[i] = r == 0;
        }
        slot_watch_shutdown(s, locked);
        free(locked);
}

static inline void token_store_freep(struct token_store **s) {
        token_store_free(*s);
}

int token_store_open(struct token_store **out, const struct token_store_options *opt,
                     struct token_error *err) {
        _cleanup_(token_store_freep) struct token_store *s = NULL;
        int r;

        assert(out);
        err_clear(err);

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        pthread_mutex_init(&s->keys_lock, NULL);
        pthread_mutex_init(&s->suspect_lock, NULL);
        {
                pthread_condattr_t ca;
                pthread_condattr_init(&ca);
                pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
                pthread_cond_init(&s->suspect_cond, &ca);
                pthread_condattr_destroy(&ca);
        }
        s->max_sessions = opt && opt->max_sessions ? opt->max_sessions : 8;
        s->call_timeout_ms = opt ? opt->call_timeout_ms : 0;

        r = store_load_modules(s, opt ? opt->module_path : NULL, err);
        if (r < 0)
                return r;

        for (size_t i = 0; i < s->n_modules; i++) {
                r = module_open_tokens(s, &s->modules[i], err);
                if (r < 0)
                        return r;
        }

        /* Publish an empty snapshot first so the store always has one, then
         * scan each token. */
        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->keys_lock);
                s->current = snapshot_build_locked(s);
                if (!s->current)
                        return -ENOMEM;
        }
        for (size_t i = 0; i < s->n_tokens; i++) {
                r = token_first_scan(s->tokens[i], err);
                if (r < 0)
                        return r;
        }

        *out = s;
        s = NULL;
        return 0;
}


/* ---- Hot-plug ------------------------------------------------------------- */

static bool same_token(const CK_TOKEN_INFO *a, const CK_TOKEN_INFO *b) {
        return memcmp(a->label, b->label, sizeof(a->label)) == 0 &&
               memcmp(a->manufacturerID, b->manufacturerID, sizeof(a->manufacturerID)) == 0 &&
               memcmp(a->model, b->model, sizeof(a->model)) == 0 &&
               memcmp(a->serialNumber, b->serialNumber, sizeof(a->serialNumber)) == 0;
}

/* The token is gone: drop its sessions and login, and its keys leave the
 * snapshot. Sessions lent out come back to a new generation and are
 * forgotten. Returns false if it was already marked. */
static bool token_mark_removed(struct token *t) {
        CK_SESSION_HANDLE *idle = NULL;
        size_t n_idle;

        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                if (!t->present)
                        return false;
                t->present = false;
                t->logged_in = false;
                n_idle = t->n_idle;
                if (n_idle) {
                        idle = malloc(n_idle * sizeof(*idle));
                        if (idle)
                                memcpy(idle, t->idle, n_idle * sizeof(*idle));
                }
                t->n_open -= t->n_idle;
                t->n_idle = 0;
                atomic_fetch_add(&t->gen, 1);
                session_wake_head(t);   /* waiters fail now, one after the other */
        }
        /* Still this generation's handles: closing them is safe. */
        for (size_t i = 0; idle && i < n_idle; i++)
                (void) fl_of(t)->C_CloseSession(idle[i]);
        free(idle);
        /* Its keys stay in the snapshot, so that a request for one hears
         * "removed" rather than "no such key"; token_is_present() says. */
        return true;
}

/* After a failure that may mean the token went away: is it still in its
 * slot? If not, it is marked removed and the hot-plug thread is told.
 * Caller holds the module's call lock. */
static bool token_check_present(struct token *t) {
        CK_TOKEN_INFO ti;
        CK_RV rv;

        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                if (!t->present)
                        return false;
        }
        rv = fl_of(t)->C_GetTokenInfo(t->slot, &ti);
        if (rv == CKR_OK && same_token(&ti, &t->info))
                return true;
        token_mark_removed(t);
        t->module->needs_reset = true;
        store_suspect(t->store);
        return false;
}

/* Rewrites err for a failure on a token that turned out to be gone, so the
 * client hears TOKEN_REMOVED rather than what the module made of it. */
static int err_if_removed(struct token *t, int r, struct token_error *err) {
        if (token_check_present(t))
                return r;
        char was[sizeof(err->message)];
        snprintf(was, sizeof(was), "%s", err && err->message[0] ? err->message : "");
        return err_set(err, -ENODEV, CKR_TOKEN_NOT_PRESENT,
                       "token '%s' (%s) was removed, or its module lost it, during the request%s%s%s; insert it "
                       "again (or restart its server) and retry", t->label, t->manufacturer, was[0] ? " (" : "",
                       was[0] ? was : "", was[0] ? ")" : "");
}

/* Brings a token that came back into its (possibly new) slot: new
 * generation, mechanisms and keys read again. Caller holds the call lock. */
static void token_revive(struct token *t, CK_SLOT_ID slot, const CK_TOKEN_INFO *ti) {
        struct token_error e;

        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                t->slot = slot;
                t->info = *ti;
                (void) fl_of(t)->C_GetSlotInfo(slot, &t->slot_info);
                t->logged_in = false;
                atomic_fetch_add(&t->gen, 1);
                t->present = true;
        }
        memset(t->mech_sign, 0, sizeof(t->mech_sign));
        memset(t->mech_dec, 0, sizeof(t->mech_dec));
        token_read_mechanisms(t);
        err_clear(&e);
        (void) token_first_scan(t, &e);
}

static void timespec_after(struct timespec *ts, unsigned sec) {
        clock_gettime(CLOCK_MONOTONIC, ts);
        ts->tv_sec += sec;
}

static bool timespec_passed(const struct timespec *ts) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        return now.tv_sec > ts->tv_sec || (now.tv_sec == ts->tv_sec && now.tv_nsec >= ts->tv_nsec);
}

/* C_Finalize + C_Initialize, when no other thread is inside the module (the
 * call lock, taken for writing with a deadline: a call that hangs in the
 * module keeps it, and then the reset waits for the next round). */
static int module_reset(struct token_store *s, struct token_module *m, struct token_error *err) {
        struct timespec deadline;
        CK_RV rv;
        int r;

        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 2;
        r = pthread_rwlock_timedwrlock(&m->call_lock, &deadline);
        if (r != 0)
                return err_set(err, -r, 0, "module '%s' is busy (a call into it has not returned); "
                               "re-initialising it waits for the next round", m->name);

        /* No call is running: every session is idle, so dropping the
         * handles loses nothing, and the tokens come back in the pass
         * after this with new generations. */
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->keys_lock);
        for (size_t i = 0; i < s->n_tokens; i++) {
                struct token *t = s->tokens[i];
                if (t->module != m)
                        continue;
                _cleanup_unlock_ pthread_mutex_t *g2 = mutex_lock(&t->lock);
                t->n_open -= t->n_idle;
                t->n_idle = 0;
                t->logged_in = false;
                atomic_fetch_add(&t->gen, 1);
                session_wake_head(t);
        }
        pthread_mutex_unlock(g);
        g = NULL;

        (void) p11_kit_module_finalize(m->fl);
        rv = p11_kit_module_initialize(m->fl);
        pthread_rwlock_unlock(&m->call_lock);
        if (rv != CKR_OK)
                return err_set(err, -EIO, rv, "C_Initialize of module '%s' (re-initialising it): %s", m->name,
                               token_rv_name(rv));
        return 0;
}

/* Tokens of one module: removed, back, new. Returns 1 if anything changed. */
static int module_refresh(struct token_store *s, struct token_module *m, struct token_error *err) {
        _cleanup_free_ CK_SLOT_ID *slots = NULL;
        _cleanup_free_ struct token **known = NULL;
        _cleanup_free_ bool *slot_taken = NULL;
        size_t n_known = 0;
        bool changed = false, missing = false;
        CK_ULONG n = 0;
        CK_RV rv;

        if (atomic_load(&m->stuck) > 0)
                return err_set_first(err, 0, 0, "module '%s' is not answering (a call into it has not returned); "
                                     "its tokens are marked unresponsive until it does", m->name);
        /* A slot event is news from the module itself: re-initialise for it
         * without waiting out the back-off meant for polls. */
        if (m->needs_reset && (timespec_passed(&m->next_reset) || m->event_refresh)) {
                int r = module_reset(s, m, err);
                m->reset_backoff = m->reset_backoff ? (m->reset_backoff < 60 ? 2 * m->reset_backoff : 60) : 1;
                timespec_after(&m->next_reset, m->reset_backoff);
                if (r == 0) {
                        m->needs_reset = false;
                        changed = true;
                }
        }

        pthread_rwlock_rdlock(&m->call_lock);
        rv = module_slot_list(m, &slots, &n);
        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->keys_lock);
                known = calloc(s->n_tokens ? s->n_tokens : 1, sizeof(*known));
                for (size_t i = 0; known && i < s->n_tokens; i++)
                        if (s->tokens[i]->module == m)
                                known[n_known++] = s->tokens[i];
        }
        slot_taken = calloc(n ? n : 1, sizeof(*slot_taken));
        if (!known || !slot_taken || rv == CKR_HOST_MEMORY) {
                pthread_rwlock_unlock(&m->call_lock);
                return -ENOMEM;
        }
        if (rv != CKR_OK) {
                err_set_first(err, 0, rv, "C_GetSlotList of module '%s': %s", m->name, token_rv_name(rv));
                n = 0;
                missing = true;
        }

        /* Known tokens still where they were? */
        for (size_t i = 0; i < n_known; i++) {
                struct token *t = known[i];
                bool present;
                {
                        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                        present = t->present;
                }
                if (!present)
                        continue;
                bool found = false;
                for (CK_ULONG j = 0; j < n && !found; j++) {
                        CK_TOKEN_INFO ti;
                        if (slots[j] != t->slot || slot_taken[j])
                                continue;
                        if (fl_of(t)->C_GetTokenInfo(slots[j], &ti) == CKR_OK && same_token(&ti, &t->info)) {
                                found = slot_taken[j] = true;
                                /* The flags change (PIN count, login required...). */
                                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                                t->info.flags = ti.flags;
                        }
                }
                if (!found) {
                        changed |= token_mark_removed(t);
                        missing = true;
                }
        }

        /* Slots with a token we do not have present: one coming back, or new. */
        for (CK_ULONG j = 0; j < n; j++) {
                CK_TOKEN_INFO ti;
                struct token *back = NULL;
                if (slot_taken[j])
                        continue;
                if (m->fl->C_GetTokenInfo(slots[j], &ti) != CKR_OK || !(ti.flags & CKF_TOKEN_INITIALIZED))
                        continue;
                for (size_t i = 0; i < n_known && !back; i++) {
                        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&known[i]->lock);
                        if (!known[i]->present && same_token(&ti, &known[i]->info))
                                back = known[i];
                }
                if (back) {
                        token_revive(back, slots[j], &ti);
                        changed = true;
                        continue;
                }
                struct token *t;
                int r = token_open(s, m, slots[j], &t, err);
                if (r < 0 || !t)
                        continue;
                if (store_add_token(s, t) < 0) {
                        token_free(t);
                        continue;
                }
                (void) token_first_scan(t, err);
                changed = true;
        }

        /* Still missing after all that: a module that cannot see a token
         * come back until it is re-initialised gets that, with back-off. */
        for (size_t i = 0; i < n_known && !missing; i++) {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&known[i]->lock);
                missing = !known[i]->present;
        }
        pthread_rwlock_unlock(&m->call_lock);
        if (missing && !m->needs_reset) {
                m->needs_reset = true;
                if (!m->reset_backoff)
                        timespec_after(&m->next_reset, 0);
        } else if (!missing) {
                m->needs_reset = false;
                m->reset_backoff = 0;
        }
        return changed;
}

static bool module_due(struct token_module *m, enum token_refresh which);

static int refresh_direct(struct token_store *s, enum token_refresh which, struct token_error *err) {
        int changed = 0;

        assert(s);
        err_clear(err);
        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->suspect_lock);
                s->suspect = false;
        }
        for (size_t i = 0; i < s->n_modules; i++) {
                if (!module_due(&s->modules[i], which))
                        continue;
                int r = module_refresh(s, &s->modules[i], err);
                if (r < 0)
                        return r;
                changed |= r;
        }
        return changed;
}

bool token_store_wait_suspect(struct token_store *s, unsigned timeout_ms) {
        struct timespec until;

        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long) (timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
        }
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->suspect_lock);
        while (!s->suspect)
                if (pthread_cond_timedwait(&s->suspect_cond, &s->suspect_lock, &until) != 0)
                        break;
        return s->suspect;
}

size_t token_store_module_count(struct token_store *s) {
        assert(s);
        return s->n_modules;
}

int token_store_module_info(struct token_store *s, size_t i, struct token_module_info *out) {
        assert(s && out);
        if (i >= s->n_modules)
                return -ERANGE;
        const struct token_module *m = &s->modules[i];
        memset(out, 0, sizeof(*out));
        snprintf(out->name, sizeof(out->name), "%s", m->name);
        copy_trimmed(out->library, sizeof(out->library), m->info.libraryDescription,
                     sizeof(m->info.libraryDescription));
        copy_trimmed(out->manufacturer, sizeof(out->manufacturer), m->info.manufacturerID,
                     sizeof(m->info.manufacturerID));
        out->version_major = m->info.libraryVersion.major;
        out->version_minor = m->info.libraryVersion.minor;
        out->hotplug = module_hotplug(&s->modules[i], out->hotplug_note, sizeof(out->hotplug_note));
        return 0;
}

size_t token_store_token_count(struct token_store *s) {
        assert(s);
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->keys_lock);
        return s->n_tokens;
}

struct token *token_store_token(struct token_store *s, size_t i) {
        assert(s);
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->keys_lock);
        return i < s->n_tokens ? s->tokens[i] : NULL;
}

static enum token_pin_state pin_state_of(CK_FLAGS f) {
        if (f & CKF_USER_PIN_LOCKED)
                return TOKEN_PIN_LOCKED;
        if (f & CKF_USER_PIN_FINAL_TRY)
                return TOKEN_PIN_FINAL_TRY;
        if (f & CKF_USER_PIN_COUNT_LOW)
                return TOKEN_PIN_COUNT_LOW;
        return TOKEN_PIN_OK;
}

/* Looks at the objects of a present token again: keys and certificates
 * another program added or deleted since the last scan (a new card being
 * set up while the agent runs). Under login_lock, like a login's rescan. */
static int rescan_direct(struct token *t, struct token_error *err) {
        bool present;

        err_clear(err);
        _module_call_(t);
        _cleanup_rwlock_ pthread_rwlock_t *ol = op_read(t);
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->login_lock);
        {
                _cleanup_unlock_ pthread_mutex_t *g2 = mutex_lock(&t->lock);
                present = t->present;
        }
        if (!present)
                return err_not_present(t, err);
        _cleanup_session_ struct pooled_session ps = {};
        int r = session_acquire(t, &ps, err);
        if (r < 0)
                return r;
        (void) session_check_login(&ps);
        return token_rescan(t, &ps, err);
}

static int info_direct(struct token *t, struct token_info *out, struct token_error *err) {
        CK_TOKEN_INFO ti;
        CK_RV rv = CKR_TOKEN_NOT_PRESENT;
        bool present;

        assert(t && out);
        err_clear(err);
        _module_call_(t);
        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                present = t->present;
                ti = t->info;
        }
        if (present) {
                rv = fl_of(t)->C_GetTokenInfo(t->slot, &ti);
                if (rv != CKR_OK) {
                        if (!token_check_present(t))
                                ti = t->info;
                        else
                                return err_set(err, -EIO, rv, "C_GetTokenInfo on token '%s' (%s): %s", t->label,
                                               t->manufacturer, token_rv_name(rv));
                }
        }

        memset(out, 0, sizeof(*out));
        copy_trimmed(out->label, sizeof(out->label), ti.label, sizeof(ti.label));
        copy_trimmed(out->manufacturer, sizeof(out->manufacturer), ti.manufacturerID, sizeof(ti.manufacturerID));
        copy_trimmed(out->model, sizeof(out->model), ti.model, sizeof(ti.model));
        copy_trimmed(out->serial, sizeof(out->serial), ti.serialNumber, sizeof(ti.serialNumber));
        snprintf(out->module_name, sizeof(out->module_name), "%s", t->module->name);
        snprintf(out->uri, sizeof(out->uri), "%s", t->uri);
        out->login_required = ti.flags & CKF_LOGIN_REQUIRED;
        out->protected_auth_path = ti.flags & CKF_PROTECTED_AUTHENTICATION_PATH;
        out->pin_state = pin_state_of(ti.flags);
        out->state = rv == CKR_OK ? TOKEN_STATE_PRESENT : TOKEN_STATE_REMOVED;
        out->logged_in = rv == CKR_OK && token_logged_in(t);
        return 0;
}

const char *token_label(const struct token *t) {
        return t->label;
}

bool token_login_required(const struct token *t) {
        return t->info.flags & CKF_LOGIN_REQUIRED;
}

bool token_is_present(struct token *t) {
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
        return t->present;
}

bool token_is_logged_in(struct token *t) {
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
        return t->present && t->logged_in;
}

/* ---- URIs --------------------------------------------------------------- */

int token_uri_parse(const char *s, struct token_uri **out) {
        _cleanup_(p11_kit_uri_freep) P11KitUri *u = NULL;
        struct token_uri *tu;

        assert(out);
        if (!s)
                return -EINVAL;
        u = p11_kit_uri_new();
        if (!u)
                return -ENOMEM;
        if (p11_kit_uri_parse(s, P11_KIT_URI_FOR_ANY, u) != P11_KIT_URI_OK)
                return -EINVAL;
        /* p11-kit accepts unknown path attributes (a typo like "tokn=") but
         * then never matches anything; say so now instead of silently
         * finding no key. */
        if (p11_kit_uri_any_unrecognized(u))
                return -EINVAL;

        tu = malloc(sizeof(*tu));
        if (!tu)
                return -ENOMEM;
        tu->uri = u;
        u = NULL;
        *out = tu;
        return 0;
}

void token_uri_free(struct token_uri *u) {
        if (!u)
                return;
        p11_kit_uri_free(u->uri);
        free(u);
}

bool token_match_uri(struct token *t, const struct token_uri *u) {
        assert(t && u);
        const char *name = p11_kit_uri_get_module_name(u->uri);
        const char *path = p11_kit_uri_get_module_path(u->uri);
        CK_SLOT_ID slot_id = p11_kit_uri_get_slot_id(u->uri);

        if (name && strcmp(name, t->module->name) != 0)
                return false;
        if (path && (!t->module->filename || strcmp(path, t->module->filename) != 0))
                return false;
        if (slot_id != (CK_SLOT_ID) -1 && slot_id != t->slot)
                return false;
        return p11_kit_uri_match_module_info(u->uri, &t->module->info) &&
               p11_kit_uri_match_slot_info(u->uri, &t->slot_info) &&
               p11_kit_uri_match_token_info(u->uri, &t->info);
}

static bool object_matches(const struct token_uri *u, const struct key_entry *e, CK_OBJECT_CLASS cls,
                           const void *label, size_t label_len) {
        CK_ATTRIBUTE a[] = {
                { CKA_CLASS, &cls, sizeof(cls) },
                { CKA_ID, e->id, e->id_len },
                { CKA_LABEL, (void *) label, label_len },
        };
        return p11_kit_uri_match_attributes(u->uri, a, ELEMENTSOF(a));
}

bool token_key_match_uri(const struct token_key *k, const struct token_uri *u) {
        static const CK_OBJECT_CLASS class_of[_OBJ_MAX] = {
                [OBJ_PRIVATE] = CKO_PRIVATE_KEY,
                [OBJ_PUBLIC] = CKO_PUBLIC_KEY,
                [OBJ_CERT] = CKO_CERTIFICATE,
        };
        const struct key_entry *e;

        assert(k && u);
        e = entry_of(k);
        if (!token_match_uri(k->token, u))
                return false;

        /* All object attributes of the URI must hold for one object: a URI
         * with object=X;type=cert names a certificate labelled X. */
        for (size_t i = 0; i < _OBJ_MAX; i++)
                if (e->obj[i].present &&
                    object_matches(u, e, class_of[i], e->obj[i].label, e->obj[i].label_len))
                        return true;

        /* Before login the private key cannot be seen; assume the one our own
         * key URI names, so that URI (and URIs like it) still find the key. */
        if (e->private_maybe_hidden &&
            object_matches(u, e, CKO_PRIVATE_KEY, k->label, strlen(k->label)))
                return true;
        return false;
}

/* ---- Login -------------------------------------------------------------- */

static bool needs_login_direct(struct token *t) {
        assert(t);
        if (!(t->info.flags & CKF_LOGIN_REQUIRED))
                return false;
        _module_call_(t);
        /* token_login holds login_lock from C_Login until its rescan has
         * published the keys the login unlocked. Deciding under the same
         * lock means "logged in" never comes with a snapshot from before. */
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->login_lock);
        return !token_logged_in(t);
}

static const char *pin_state_sentence(CK_FLAGS f) {
        switch (pin_state_of(f)) {
        case TOKEN_PIN_LOCKED:
                return "the token reports the PIN is locked; it must be unlocked with the SO PIN";
        case TOKEN_PIN_FINAL_TRY:
                return "the token reports only one try is left before the PIN locks";
        case TOKEN_PIN_COUNT_LOW:
                return "the token reports the PIN count is low";
        default:
                return "the token does not say how many tries are left";
        }
}

static int login_errno(CK_RV rv) {
        switch (rv) {
        case CKR_PIN_INCORRECT:
        case CKR_PIN_INVALID:
        case CKR_PIN_LEN_RANGE:
        case CKR_PIN_EXPIRED:
                return -EACCES;
        case CKR_PIN_LOCKED:
                return -EPERM;  /* no PIN will do: retrying is pointless */
        case CKR_ARGUMENTS_BAD:
                return -EINVAL;
        default:
                return -EIO;
        }
}

static int login_locked(struct token *t, const char *pin, size_t pin_len, bool fresh, struct token_error *err) {
        _cleanup_session_ struct pooled_session ps = {};
        CK_TOKEN_INFO ti;
        CK_RV rv;
        int r;

        assert(t);
        err_clear(err);

        if (!pin && !(t->info.flags & CKF_PROTECTED_AUTHENTICATION_PATH))
                return err_set(err, -EINVAL, 0,
                               "token '%s' (%s) has no protected authentication path (PIN pad); a PIN is needed",
                               t->label, t->manufacturer);

        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->login_lock);
        r = session_acquire(t, &ps, err);
        if (r < 0)
                return r;
        if (fresh) {
                /* The only way to have a PIN checked while logged in. */
                rv = fl_of(t)->C_Logout(ps.h);
                session_note_rv(&ps, rv);
                _cleanup_unlock_ pthread_mutex_t *g2 = mutex_lock(&t->lock);
                t->logged_in = false;
        }

        /* Exactly one C_Login per call, whatever it returns. The PIN is
         * handed over in place: PKCS#11 declares it non-const but does not
         * write to it. */
        rv = fl_of(t)->C_Login(ps.h, CKU_USER, pin ? (CK_UTF8CHAR_PTR) pin : NULL, pin ? pin_len : 0);
        if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) {
                {
                        _cleanup_unlock_ pthread_mutex_t *g2 = mutex_lock(&t->lock);
                        t->logged_in = true;
                }
                struct token_error e;
                err_clear(&e);
                r = token_rescan(t, &ps, &e);
                if (r < 0)
                        return err_set(err, r, e.rv, "logged in to token '%s', but rescanning its keys failed: %s",
                                       t->label, e.message[0] ? e.message : strerror(-r));
                return 0;
        }

        session_note_rv(&ps, rv);
        if (fl_of(t)->C_GetTokenInfo(t->slot, &ti) != CKR_OK)
                ti.flags = 0;
        if (rv_session_gone(rv))
                store_suspect(t->store);
        return err_set(err, login_errno(rv), rv, "C_Login on token '%s' (%s): %s; %s", t->label,
                       t->manufacturer, token_rv_name(rv), pin_state_sentence(ti.flags));
}

static int login_direct(struct token *t, const char *pin, size_t pin_len, struct token_error *err) {
        _module_call_(t);
        _cleanup_rwlock_ pthread_rwlock_t *ol = op_write(t);
        return login_locked(t, pin, pin_len, false, err);
}

static int relogin_direct(struct token *t, const char *pin, size_t pin_len, struct token_error *err) {
        _module_call_(t);
        _cleanup_rwlock_ pthread_rwlock_t *ol = op_write(t);
        return login_locked(t, pin, pin_len, true, err);
}

static int logout_direct(struct token *t, struct token_error *err) {
        _cleanup_session_ struct pooled_session ps = {};
        CK_RV rv;
        int r;

        assert(t);
        err_clear(err);
        _module_call_(t);
        _cleanup_rwlock_ pthread_rwlock_t *ol = op_write(t);
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->login_lock);
        {
                _cleanup_unlock_ pthread_mutex_t *g2 = mutex_lock(&t->lock);
                if (!t->present) {
                        t->logged_in = false;
                        return 0;
                }
        }
        r = session_acquire(t, &ps, err);
        if (r < 0)
                return r;
        rv = fl_of(t)->C_Logout(ps.h);
        session_note_rv(&ps, rv);
        {
                _cleanup_unlock_ pthread_mutex_t *g2 = mutex_lock(&t->lock);
                if (rv == CKR_OK || rv == CKR_USER_NOT_LOGGED_IN || rv_session_gone(rv))
                        t->logged_in = false;
        }
        if (rv == CKR_OK || rv == CKR_USER_NOT_LOGGED_IN)
                return 0;
        if (rv_session_gone(rv)) {
                store_suspect(t->store);
                return 0;       /* gone with the token, which is logged out all the same */
        }
        return err_set(err, -EIO, rv, "C_Logout on token '%s' (%s): %s", t->label, t->manufacturer, token_rv_name(rv));
}

/* ---- Signing ------------------------------------------------------------ */

static bool key_type_fits(enum token_key_type type, enum token_mech mech) {
        switch (type) {
        case TOKEN_KEY_RSA:
                return mech == TOKEN_MECH_RSA_PKCS || mech == TOKEN_MECH_RSA_PSS;
        case TOKEN_KEY_EC:
                return mech == TOKEN_MECH_ECDSA;
        case TOKEN_KEY_EDDSA:
                return mech == TOKEN_MECH_EDDSA;
        default:
                return true;    /* unknown: let the token decide */
        }
}

bool token_key_can(const struct token_key *k, enum token_mech mech) {
        assert(k);
        if ((unsigned) mech >= TOKEN_MECH_COUNT || !k->token->mech_sign[mech])
                return false;
        if (!key_type_fits(k->type, mech))
                return false;
        return !k->has_private || k->can_sign;
}

static int pss_params(enum token_hash h, CK_RSA_PKCS_PSS_PARAMS *p) {
        static const struct {
                CK_MECHANISM_TYPE hash;
                CK_RSA_PKCS_MGF_TYPE mgf;
        } map[] = {
                [TOKEN_HASH_SHA1] = { CKM_SHA_1, CKG_MGF1_SHA1 },
                [TOKEN_HASH_SHA224] = { CKM_SHA224, CKG_MGF1_SHA224 },
                [TOKEN_HASH_SHA256] = { CKM_SHA256, CKG_MGF1_SHA256 },
                [TOKEN_HASH_SHA384] = { CKM_SHA384, CKG_MGF1_SHA384 },
                [TOKEN_HASH_SHA512] = { CKM_SHA512, CKG_MGF1_SHA512 },
        };
        if ((unsigned) h >= ELEMENTSOF(map))
                return -EINVAL;
        p->hashAlg = map[h].hash;
        p->mgf = map[h].mgf;
        return 0;
}

/* The signature size, when the key tells us without asking the token; 0 if
 * only the token knows. Saves a C_Sign length query on every call. */
static size_t expected_sig_len(const struct token_key *k, enum token_mech mech) {
        static const struct {
                const char *der;
                size_t len, sig;
        } curves[] = {
                { "\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07", 10, 64 },  /* P-256 */
                { "\x06\x05\x2b\x81\x04\x00\x0a", 7, 64 },               /* secp256k1 */
                { "\x06\x05\x2b\x81\x04\x00\x22", 7, 96 },               /* P-384 */
                { "\x06\x05\x2b\x81\x04\x00\x23", 7, 132 },              /* P-521 */
                { "\x06\x03\x2b\x65\x70", 5, 64 },                       /* Ed25519 */
                { "\x13\x0c" "edwards25519", 14, 64 },                   /* Ed25519, PKCS#11 3.0 style */
                { "\x06\x03\x2b\x65\x71", 5, 114 },                      /* Ed448 */
                { "\x13\x0a" "edwards448", 12, 114 },
        };

        switch (mech) {
        case TOKEN_MECH_RSA_PKCS:
        case TOKEN_MECH_RSA_PSS:
                return k->type == TOKEN_KEY_RSA ? (k->modulus_bits + 7) / 8 : 0;
        case TOKEN_MECH_ECDSA:
        case TOKEN_MECH_EDDSA:
                if (!k->ec_params || (k->type != TOKEN_KEY_EC && k->type != TOKEN_KEY_EDDSA))
                        return 0;
                for (size_t i = 0; i < ELEMENTSOF(curves); i++)
                        if (k->ec_params_len == curves[i].len && memcmp(k->ec_params, curves[i].der, curves[i].len) == 0)
                                return curves[i].sig;
                return 0;
        }
        return 0;
}

static void hex_id(char *buf, size_t size, const uint8_t *id, size_t len) {
        size_t o = 0;
        buf[0] = '\0';
        for (size_t i = 0; i < len && o + 3 <= size; i++)
                o += snprintf(buf + o, size - o, "%02x", id[i]);
}

/* Maps a failed call during signing to the header's errors. */
static int sign_fail(const struct token_key *k, struct pooled_session *ps, const char *call, CK_RV rv,
                     struct token_error *err) {
        struct token *t = k->token;
        int r = -EIO;

        session_note_rv(ps, rv);
        if (rv == CKR_USER_NOT_LOGGED_IN) {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                t->logged_in = false;
                r = -EACCES;
        }
        return err_set(err, r, rv, "%s with key '%s' on token '%s': %s%s", call, k->label, t->label,
                       token_rv_name(rv),
                       rv == CKR_USER_NOT_LOGGED_IN ? "; log in to the token first" :
                       rv == CKR_KEY_FUNCTION_NOT_PERMITTED ? "; the key is not allowed to sign" : "");
}

/* The context-specific login a CKA_ALWAYS_AUTHENTICATE key needs right
 * after C_SignInit / C_DecryptInit (PKCS#11 3.0, 5.5 and 4.9): exactly one
 * C_Login per call, never retried here. derive: there is no Init for
 * C_DeriveKey; a token that does not ask for the login there answers
 * CKR_OPERATION_NOT_INITIALIZED, which means "not needed". On failure the
 * session is closed: the operation it started is still active. */
static int context_login(const struct token_key *k, struct pooled_session *ps, const struct token_auth *auth,
                         bool derive, struct token_error *err) {
        struct token *t = k->token;
        CK_TOKEN_INFO ti;
        CK_RV rv;

        if (!k->always_authenticate)
                return 0;
        if (!auth) {
                ps->fate = SESSION_CLOSE;
                return err_set(err, -EKEYREJECTED, 0,
                               "key '%s' on token '%s' needs its PIN for every use (CKA_ALWAYS_AUTHENTICATE) "
                               "and none was given", k->label, t->label);
        }
        if (!auth->pin && !(t->info.flags & CKF_PROTECTED_AUTHENTICATION_PATH)) {
                ps->fate = SESSION_CLOSE;
                return err_set(err, -EINVAL, 0, "token '%s' has no PIN pad; key '%s' needs a PIN", t->label, k->label);
        }
        rv = fl_of(t)->C_Login(ps->h, CKU_CONTEXT_SPECIFIC, auth->pin ? (CK_UTF8CHAR_PTR) auth->pin : NULL,
                               auth->pin ? auth->pin_len : 0);
        if (rv == CKR_OK || (derive && rv == CKR_OPERATION_NOT_INITIALIZED))
                return 0;
        session_note_rv(ps, rv);
        ps->fate = SESSION_CLOSE;
        if (fl_of(t)->C_GetTokenInfo(t->slot, &ti) != CKR_OK)
                ti.flags = 0;
        if (rv_session_gone(rv))
                store_suspect(t->store);
        return err_set(err, login_errno(rv), rv,
                       "C_Login(CKU_CONTEXT_SPECIFIC) for key '%s' on token '%s' (%s): %s; %s", k->label, t->label,
                       t->manufacturer, token_rv_name(rv),
                       rv == CKR_USER_TYPE_INVALID || rv == CKR_OPERATION_NOT_INITIALIZED
                               ? "the module does not support context-specific login for this key"
                               : pin_state_sentence(ti.flags));
}

/* The private key's handle: from the snapshot entry, else from the token's
 * latest scan (the caller may hold a snapshot from before login), else from
 * the token itself. */
static int resolve_private_key(const struct token_key *k, struct pooled_session *ps, bool fresh,
                               CK_OBJECT_HANDLE *h, bool *cached, struct token_error *err) {
        const struct key_entry *e = entry_of(k);
        struct token *t = k->token;

        *cached = false;
        if (!fresh && e->key.has_private && e->gen == ps->gen) {
                *h = e->priv;
                *cached = true;
                return 0;
        }
        if (!fresh && e->id_len > 0) {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->store->keys_lock);
                struct token_scan *sc = t->scan;
                for (size_t i = 0; sc && i < sc->n; i++) {
                        const struct key_entry *o = &sc->entries[i];
                        if (o->key.has_private && o->gen == ps->gen && o->id_len == e->id_len &&
                            memcmp(o->id, e->id, e->id_len) == 0) {
                                *h = o->priv;
                                *cached = true;
                                return 0;
                        }
                }
        }

        char idhex[2 * 32 + 1];
        hex_id(idhex, sizeof(idhex), e->id, e->id_len);

        /* Without an id there is nothing to pair by: any private key with
         * an empty CKA_ID would do, and signing with the wrong key is worse
         * than not signing. */
        if (e->id_len == 0)
                return err_set(err, -ENOENT, 0,
                               "key '%s' on token '%s' has no CKA_ID, so its private key can only be used "
                               "from a snapshot of keys taken after login", k->label, t->label);

        CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
        CK_ATTRIBUTE tmpl[] = {
                { CKA_CLASS, &cls, sizeof(cls) },
                { CKA_ID, e->id, e->id_len },
        };
        _cleanup_(handle_list_done) struct handle_list found = {};
        const char *call;
        CK_RV rv = find_objects(fl_of(t), ps->h, tmpl, ELEMENTSOF(tmpl), 1, &found, &call);
        if (rv != CKR_OK)
                return sign_fail(k, ps, call, rv, err);
        if (found.n > 0) {
                *h = found.h[0];
                return 0;
        }

        if ((t->info.flags & CKF_LOGIN_REQUIRED) && !session_check_login(ps))
                return err_set(err, -EACCES, CKR_USER_NOT_LOGGED_IN,
                               "no private key for key '%s' (id %s) is visible on token '%s' before login: "
                               "%s; log in to the token first",
                               k->label, idhex, t->label, token_rv_name(CKR_USER_NOT_LOGGED_IN));
        return err_set(err, -ENOENT, 0, "token '%s' has no private key for key '%s' (id %s)", t->label, k->label,
                       idhex);
}

/* Ends an active signing operation whose result we cannot use, so the session
 * goes back to the pool clean. PKCS#11 2.40 has no way to cancel except
 * finishing it (or closing the session, which could log the token out). */
static void sign_discard(CK_FUNCTION_LIST *fl, struct pooled_session *ps, const uint8_t *in, size_t in_len,
                         CK_ULONG len) {
        _cleanup_free_ uint8_t *scratch = malloc(len ? len : 1);
        CK_RV rv;

        if (!scratch) {
                ps->fate = SESSION_CLOSE;
                return;
        }
        rv = fl->C_Sign(ps->h, (CK_BYTE_PTR) in, in_len, scratch, &len);
        if (rv == CKR_BUFFER_TOO_SMALL)
                ps->fate = SESSION_CLOSE;  /* still active: only closing ends it */
        else
                session_note_rv(ps, rv);
}

static int sign_once(const struct token_key *k, const struct token_sign_params *p, const uint8_t *in, size_t in_len,
                     uint8_t *sig, size_t *sig_len, struct token_error *err) {
        _cleanup_session_ struct pooled_session ps = {};
        CK_RSA_PKCS_PSS_PARAMS pss = {};
        CK_MECHANISM m = {};
        CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
        struct token *t;
        CK_FUNCTION_LIST *fl;
        bool cached;
        CK_ULONG len;
        size_t expected;
        CK_RV rv;
        int r;

        assert(k && p && sig_len && (in || in_len == 0) && (sig || *sig_len == 0));
        err_clear(err);
        t = k->token;
        fl = fl_of(t);

        switch (p->mech) {
        case TOKEN_MECH_RSA_PKCS:
                m.mechanism = CKM_RSA_PKCS;
                break;
        case TOKEN_MECH_RSA_PSS:
                if (pss_params(p->pss_hash, &pss) < 0)
                        return err_set(err, -EINVAL, 0, "unknown hash %d for RSA-PSS", (int) p->pss_hash);
                pss.sLen = p->pss_salt_len;
                m.mechanism = CKM_RSA_PKCS_PSS;
                m.pParameter = &pss;
                m.ulParameterLen = sizeof(pss);
                break;
        case TOKEN_MECH_ECDSA:
                m.mechanism = CKM_ECDSA;
                break;
        case TOKEN_MECH_EDDSA:
                /* No parameters: pure Ed25519 (or Ed448 without context). */
                m.mechanism = CKM_EDDSA;
                break;
        default:
                return err_set(err, -EINVAL, 0, "unknown signature mechanism %d", (int) p->mech);
        }

        expected = expected_sig_len(k, p->mech);
        if (expected > *sig_len) {
                size_t have = *sig_len;
                *sig_len = expected;
                return err_set(err, -ENOBUFS, 0, "signature with key '%s' on token '%s' needs %zu bytes, buffer has %zu",
                               k->label, t->label, expected, have);
        }

        r = session_acquire(t, &ps, err);
        if (r < 0)
                return r;
        r = resolve_private_key(k, &ps, false, &h, &cached, err);
        if (r < 0)
                return r;

        rv = fl->C_SignInit(ps.h, &m, h);
        if ((rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID) && cached) {
                /* The object was deleted and recreated, or the handle came
                 * from a scan before a logout: look it up again, once. */
                r = resolve_private_key(k, &ps, true, &h, &cached, err);
                if (r < 0)
                        return r;
                rv = fl->C_SignInit(ps.h, &m, h);
        }
        if (rv != CKR_OK)
                return sign_fail(k, &ps, "C_SignInit", rv, err);
        r = context_login(k, &ps, p->auth, false, err);
        if (r < 0)
                return r;

        if (expected == 0) {
                /* Size unknown: ask first, so a short buffer is reported
                 * before the signature is made. */
                rv = fl->C_Sign(ps.h, (CK_BYTE_PTR) in, in_len, NULL, &len);
                if (rv != CKR_OK)
                        return sign_fail(k, &ps, "C_Sign", rv, err);
                if (len > *sig_len) {
                        size_t have = *sig_len;
                        sign_discard(fl, &ps, in, in_len, len);
                        *sig_len = len;
                        return err_set(err, -ENOBUFS, 0,
                                       "signature with key '%s' on token '%s' needs %lu bytes, buffer has %zu",
                                       k->label, t->label, (unsigned long) len, have);
                }
        }

        len = *sig_len;
        rv = fl->C_Sign(ps.h, (CK_BYTE_PTR) in, in_len, sig, &len);
        if (rv == CKR_BUFFER_TOO_SMALL) {
                /* Our size estimate was wrong; the operation is still active. */
                size_t have = *sig_len;
                sign_discard(fl, &ps, in, in_len, len);
                *sig_len = len;
                return err_set(err, -ENOBUFS, rv, "C_Sign with key '%s' on token '%s': %s (needs %lu bytes, buffer has %zu)",
                               k->label, t->label, token_rv_name(rv), (unsigned long) len, have);
        }
        if (rv != CKR_OK)
                return sign_fail(k, &ps, "C_Sign", rv, err);
        *sig_len = len;
        return 0;
}

/* ---- Decryption and key agreement ------------------------------------------ */

bool token_key_can_decrypt(const struct token_key *k, enum token_dec_mech mech) {
        assert(k);
        if ((unsigned) mech >= TOKEN_DEC_COUNT || !k->token->mech_dec[mech])
                return false;
        if (mech == TOKEN_DEC_ECDH) {
                if (k->type != TOKEN_KEY_EC && k->type != TOKEN_KEY_UNKNOWN)
                        return false;
                return !k->has_private || k->can_derive;
        }
        if (k->type != TOKEN_KEY_RSA && k->type != TOKEN_KEY_UNKNOWN)
                return false;
        return !k->has_private || k->can_decrypt;
}

/* Maps a failed call during decryption or derivation to the header's errors. */
static int dec_fail(const struct token_key *k, struct pooled_session *ps, const char *call, CK_RV rv,
                    struct token_error *err) {
        struct token *t = k->token;
        int r = -EIO;

        session_note_rv(ps, rv);
        switch (rv) {
        case CKR_USER_NOT_LOGGED_IN: {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&t->lock);
                t->logged_in = false;
                r = -EACCES;
                break;
        }
        case CKR_ENCRYPTED_DATA_INVALID:
        case CKR_ENCRYPTED_DATA_LEN_RANGE:
        case CKR_DATA_INVALID:
        case CKR_DATA_LEN_RANGE:
        case CKR_DOMAIN_PARAMS_INVALID:
                r = -EBADMSG;
                break;
        case CKR_MECHANISM_INVALID:
        case CKR_MECHANISM_PARAM_INVALID:
        case CKR_ARGUMENTS_BAD:
        case CKR_TEMPLATE_INCONSISTENT:
        case CKR_ATTRIBUTE_VALUE_INVALID:
                r = -EOPNOTSUPP;
                break;
        }
        return err_set(err, r, rv, "%s with key '%s' on token '%s': %s%s", call, k->label, t->label,
                       token_rv_name(rv),
                       rv == CKR_USER_NOT_LOGGED_IN ? "; log in to the token first" :
                       rv == CKR_KEY_FUNCTION_NOT_PERMITTED ? "; the key is not allowed to decrypt or derive" :
                       r == -EBADMSG ? "; the encrypted key in the message does not fit this key or is damaged" : "");
}

static int oaep_params(const struct token_decrypt_params *p, CK_RSA_PKCS_OAEP_PARAMS *o) {
        CK_RSA_PKCS_PSS_PARAMS h, m;

        if (pss_params(p->oaep_hash, &h) < 0 || pss_params(p->oaep_mgf1, &m) < 0)
                return -EINVAL;
        o->hashAlg = h.hashAlg;
        o->mgf = m.mgf;
        o->source = CKZ_DATA_SPECIFIED;
        o->pSourceData = p->label_len ? (CK_VOID_PTR) p->label : NULL;
        o->ulSourceDataLen = p->label_len;
        return 0;
}

static int decrypt_once(const struct token_key *k, const struct token_decrypt_params *p, const uint8_t *in,
                        size_t in_len, uint8_t *out, size_t *out_len, struct token_error *err) {
        _cleanup_session_ struct pooled_session ps = {};
        CK_RSA_PKCS_OAEP_PARAMS oaep = {};
        CK_MECHANISM m = {};
        CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
        struct token *t;
        CK_FUNCTION_LIST *fl;
        size_t need;
        bool cached;
        CK_ULONG len;
        CK_RV rv;
        int r;

        assert(k && p && in && out && out_len);
        err_clear(err);
        t = k->token;
        fl = fl_of(t);

        switch (p->mech) {
        case TOKEN_DEC_RSA_PKCS:
                m.mechanism = CKM_RSA_PKCS;
                break;
        case TOKEN_DEC_RSA_X509:
                m.mechanism = CKM_RSA_X_509;
                break;
        case TOKEN_DEC_RSA_OAEP:
                if (oaep_params(p, &oaep) < 0)
                        return err_set(err, -EINVAL, 0, "unknown hash for RSA-OAEP");
                m.mechanism = CKM_RSA_PKCS_OAEP;
                m.pParameter = &oaep;
                m.ulParameterLen = sizeof(oaep);
                break;
        default:
                return err_set(err, -EINVAL, 0, "mechanism %d does not decrypt", (int) p->mech);
        }

        /* The result is never longer than the modulus; a buffer that size
         * avoids the length query and a CKR_BUFFER_TOO_SMALL half-way. */
        need = k->modulus_bits ? (k->modulus_bits + 7) / 8 : in_len;
        if (*out_len < need) {
                size_t have = *out_len;
                *out_len = need;
                return err_set(err, -ENOBUFS, 0, "decryption with key '%s' on token '%s' needs %zu bytes, buffer has %zu",
                               k->label, t->label, need, have);
        }

        r = session_acquire(t, &ps, err);
        if (r < 0)
                return r;
        r = resolve_private_key(k, &ps, false, &h, &cached, err);
        if (r < 0)
                return r;
        rv = fl->C_DecryptInit(ps.h, &m, h);
        if ((rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID) && cached) {
                r = resolve_private_key(k, &ps, true, &h, &cached, err);
                if (r < 0)
                        return r;
                rv = fl->C_DecryptInit(ps.h, &m, h);
        }
        if (rv != CKR_OK)
                return dec_fail(k, &ps, "C_DecryptInit", rv, err);
        r = context_login(k, &ps, p->auth, false, err);
        if (r < 0)
                return r;

        len = *out_len;
        rv = fl->C_Decrypt(ps.h, (CK_BYTE_PTR) in, in_len, out, &len);
        if (rv == CKR_BUFFER_TOO_SMALL) {
                /* Still active and no way to end it but closing the session. */
                ps.fate = SESSION_CLOSE;
                return err_set(err, -ENOBUFS, rv, "C_Decrypt with key '%s' on token '%s': %s (needs %lu bytes)",
                               k->label, t->label, token_rv_name(rv), (unsigned long) len);
        }
        if (rv != CKR_OK)
                return dec_fail(k, &ps, "C_Decrypt", rv, err);
        *out_len = len;
        return 0;
}

static int ecdh_once(const struct token_key *k, const struct token_auth *auth, const uint8_t *peer, size_t peer_len,
                     uint8_t *z, size_t *z_len, struct token_error *err) {
        _cleanup_session_ struct pooled_session ps = {};
        CK_OBJECT_HANDLE h = CK_INVALID_HANDLE, secret = CK_INVALID_HANDLE;
        CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
        CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
        CK_ECDH1_DERIVE_PARAMS dp = {};
        CK_MECHANISM m = {};
        struct token *t;
        CK_FUNCTION_LIST *fl;
        bool cached;
        CK_RV rv;
        int r;

        assert(k && peer && z && z_len);
        err_clear(err);
        t = k->token;
        fl = fl_of(t);

        dp.kdf = CKD_NULL;
        dp.pPublicData = (CK_BYTE_PTR) peer;
        dp.ulPublicDataLen = peer_len;
        m.mechanism = CKM_ECDH1_DERIVE;
        m.pParameter = &dp;
        m.ulParameterLen = sizeof(dp);

        /* A session object (CKA_TOKEN false) that only this session sees,
         * readable so that the KDF can run here, destroyed right after. */
        CK_ATTRIBUTE tmpl[] = {
                { CKA_CLASS, &cls, sizeof(cls) },
                { CKA_KEY_TYPE, &kt, sizeof(kt) },
                { CKA_TOKEN, &no, sizeof(no) },
                { CKA_SENSITIVE, &no, sizeof(no) },
                { CKA_EXTRACTABLE, &yes, sizeof(yes) },
        };

        r = session_acquire(t, &ps, err);
        if (r < 0)
                return r;
        r = resolve_private_key(k, &ps, false, &h, &cached, err);
        if (r < 0)
                return r;
        r = context_login(k, &ps, auth, true, err);
        if (r < 0)
                return r;
        rv = fl->C_DeriveKey(ps.h, &m, h, tmpl, ELEMENTSOF(tmpl), &secret);
        if ((rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID) && cached) {
                r = resolve_private_key(k, &ps, true, &h, &cached, err);
                if (r < 0)
                        return r;
                rv = fl->C_DeriveKey(ps.h, &m, h, tmpl, ELEMENTSOF(tmpl), &secret);
        }
        if (rv != CKR_OK)
                return dec_fail(k, &ps, "C_DeriveKey(CKM_ECDH1_DERIVE)", rv, err);

        CK_ATTRIBUTE val = { CKA_VALUE, z, *z_len };
        rv = fl->C_GetAttributeValue(ps.h, secret, &val, 1);
        CK_RV drv = fl->C_DestroyObject(ps.h, secret);
        if (rv != CKR_OK) {
                explicit_bzero(z, *z_len);
                return dec_fail(k, &ps, "C_GetAttributeValue(CKA_VALUE) of the derived ECDH secret", rv, err);
        }
        if (drv != CKR_OK) {
                /* A session object goes with its session: close it rather
                 * than leave the secret behind for the next user. */
                ps.fate = SESSION_CLOSE;
        }
        *z_len = val.ulValueLen;
        return 0;
}

/* ---- Recovery around the private-key operations ------------------------------ */

/* A session the token closed under us (CKR_SESSION_HANDLE_INVALID,
 * CKR_SESSION_CLOSED) was dropped from the pool: one more try on another
 * session is safe, nothing was produced. */
static bool err_session_lost(const struct token_error *err) {
        return err->rv == CKR_SESSION_HANDLE_INVALID || err->rv == CKR_SESSION_CLOSED;
}

/* Failures that may mean the token is gone; a presence check tells. */
static bool err_may_be_removal(int r) {
        return r == -EIO || r == -ENOENT || r == -ENODEV;
}

#define RECOVERING_CALL(k, err, call)                                                   \
        ({                                                                              \
                struct token *t_ = (k)->token;                                          \
                struct token_error e_;                                                  \
                struct token_error *ep_ = (err) ? (err) : &e_;                          \
                int r_;                                                                 \
                _module_call_(t_);                                                      \
                _cleanup_rwlock_ pthread_rwlock_t *ol_ = op_read(t_);                   \
                err_clear(ep_);                                                         \
                r_ = (call);                                                            \
                if (r_ < 0 && err_session_lost(ep_)) {                                  \
                        err_clear(ep_);                                                 \
                        r_ = (call);                                                    \
                }                                                                       \
                if (r_ < 0 && err_may_be_removal(r_))                                   \
                        r_ = err_if_removed(t_, r_, ep_);                               \
                r_;                                                                     \
        })

static int sign_direct(const struct token_key *k, const struct token_sign_params *p, const uint8_t *in, size_t in_len,
                       uint8_t *sig, size_t *sig_len, struct token_error *err) {
        assert(k && sig_len);
        size_t want = *sig_len;
        return RECOVERING_CALL(k, err, (*sig_len = want, sign_once(k, p, in, in_len, sig, sig_len, ep_)));
}

static int decrypt_direct(const struct token_key *k, const struct token_decrypt_params *p, const uint8_t *in,
                          size_t in_len, uint8_t *out, size_t *out_len, struct token_error *err) {
        assert(k && out_len);
        size_t want = *out_len;
        return RECOVERING_CALL(k, err, (*out_len = want, decrypt_once(k, p, in, in_len, out, out_len, ep_)));
}

static int ecdh_direct(const struct token_key *k, const struct token_auth *auth, const uint8_t *peer,
                       size_t peer_len, uint8_t *z, size_t *z_len, struct token_error *err) {
        assert(k && z_len);
        size_t want = *z_len;
        return RECOVERING_CALL(k, err, (*z_len = want, ecdh_once(k, auth, peer, peer_len, z, z_len, ep_)));
}

/* ---- Deadlines: every call into a module on a worker thread ------------------ *
 *
 * A module that hangs (a card reader that stops answering, a p11-kit server
 * that is stopped) would otherwise hold the requesting thread forever, and
 * with it every lock that thread holds. With a call timeout, the public
 * functions below hand the work to a pool of worker threads and wait for at
 * most the deadline. A call that overruns is abandoned: its caller gets
 * -ETIMEDOUT, the job keeps copies of everything it touches (input, output
 * buffer, PIN, a reference on the key's scan) so that nothing the caller
 * frees is used later, and the token and module count it as stuck. While
 * a token has a stuck call, every request for it fails at once without a
 * call into its module; when the call finally returns, the token is usable
 * again (and if the module died meanwhile, the hot-plug code recovers it).
 * The worker thread itself cannot be freed from a module that never
 * returns: that is the price of loading modules in-process (see
 * docs/MODULES.md for why, and for p11-kit's remote mode that isolates a
 * module in a process of its own).
 */

enum job_op { JOB_SIGN, JOB_DECRYPT, JOB_ECDH, JOB_LOGIN, JOB_RELOGIN, JOB_LOGOUT, JOB_INFO, JOB_NEEDS_LOGIN,
              JOB_REFRESH, JOB_RESCAN };

struct job {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        bool done, abandoned;
        int refs;                       /* caller and worker, under lock */
        struct job *next;

        enum job_op op;
        struct token_store *store;
        struct token *t;                /* may be NULL (refresh) */
        struct token_module *m;         /* refresh: the module */
        const struct token_key *k;
        struct token_scan *scan;        /* keeps k alive */
        struct token_sign_params sp;
        struct token_decrypt_params dp;
        uint8_t *in, *label, *out;
        size_t in_len, out_len;
        char *pin;
        size_t pin_len, pin_cap;
        struct token_auth auth;         /* sign, decrypt, ECDH: points into pin */
        bool auth_set;
        struct token_info info;
        struct token_error err;
        int r;
        bool b;
};

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cond = PTHREAD_COND_INITIALIZER;
static struct job *queue_head, *queue_tail;
static unsigned n_workers, n_idle_workers, n_queued;

static void job_free(struct job *j) {
        free(j->in);
        free(j->label);
        if (j->out)
                explicit_bzero(j->out, j->out_len);    /* may be a decrypted key or an ECDH secret */
        free(j->out);
        if (j->pin) {
                explicit_bzero(j->pin, j->pin_cap);
                munlock(j->pin, j->pin_cap);
                free(j->pin);
        }
        scan_unref(j->scan);
        pthread_mutex_destroy(&j->lock);
        pthread_cond_destroy(&j->cond);
        free(j);
}

/* The PIN's copy for the worker: locked in memory, wiped with the job. */
static bool job_copy_pin(struct job *j, const char *pin, size_t pin_len) {
        j->pin_cap = pin_len + 1;
        j->pin = calloc(1, j->pin_cap);
        if (!j->pin)
                return false;
        (void) mlock(j->pin, j->pin_cap);
        memcpy(j->pin, pin, pin_len);
        j->pin[pin_len] = '\0';
        j->pin_len = pin_len;
        return true;
}

/* The job's copy of the caller's token_auth, or NULL when it had none. */
static const struct token_auth *job_auth(const struct job *j) {
        return j->auth_set ? &j->auth : NULL;
}

/* A context-specific login's PIN (token_auth) for the worker, copied like a login's. */
static bool job_copy_auth(struct job *j, const struct token_auth *auth) {
        if (!auth)
                return true;
        j->auth_set = true;
        if (auth->pin && !job_copy_pin(j, auth->pin, auth->pin_len))
                return false;
        j->auth.pin = j->pin;
        j->auth.pin_len = j->pin_len;
        return true;
}

static struct job *job_new(enum job_op op, struct token_store *s, struct token *t) {
        struct job *j = calloc(1, sizeof(*j));
        pthread_condattr_t ca;

        if (!j)
                return NULL;
        pthread_mutex_init(&j->lock, NULL);
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&j->cond, &ca);
        pthread_condattr_destroy(&ca);
        j->refs = 2;
        j->op = op;
        j->store = s;
        j->t = t;
        return j;
}

static void job_run(struct job *j) {
        switch (j->op) {
        case JOB_SIGN:
                j->r = sign_direct(j->k, &j->sp, j->in, j->in_len, j->out, &j->out_len, &j->err);
                break;
        case JOB_DECRYPT:
                j->r = decrypt_direct(j->k, &j->dp, j->in, j->in_len, j->out, &j->out_len, &j->err);
                break;
        case JOB_ECDH:
                j->r = ecdh_direct(j->k, job_auth(j), j->in, j->in_len, j->out, &j->out_len, &j->err);
                break;
        case JOB_LOGIN:
                j->r = login_direct(j->t, j->pin, j->pin_len, &j->err);
                break;
        case JOB_RELOGIN:
                j->r = relogin_direct(j->t, j->pin, j->pin_len, &j->err);
                break;
        case JOB_LOGOUT:
                j->r = logout_direct(j->t, &j->err);
                break;
        case JOB_INFO:
                j->r = info_direct(j->t, &j->info, &j->err);
                break;
        case JOB_NEEDS_LOGIN:
                j->b = needs_login_direct(j->t);
                break;
        case JOB_REFRESH:
                j->r = module_refresh(j->store, j->m, &j->err);
                break;
        case JOB_RESCAN:
                j->r = rescan_direct(j->t, &j->err);
                break;
        }
}

/* The stuck counts an abandoned job holds: its token's, and its module's
 * (for a refresh: every module's, since it walks them all). */
static void job_stick(struct job *j, int delta) {
        if (j->m)
                atomic_fetch_add(&j->m->stuck, (unsigned) delta);
        if (j->t) {
                atomic_fetch_add(&j->t->stuck, (unsigned) delta);
                atomic_fetch_add(&j->t->module->stuck, (unsigned) delta);
        }
}

static void job_finish(struct job *j) {
        int refs;

        pthread_mutex_lock(&j->lock);
        j->done = true;
        if (j->abandoned)
                job_stick(j, -1);
        refs = --j->refs;
        pthread_cond_signal(&j->cond);
        pthread_mutex_unlock(&j->lock);
        if (refs == 0)
                job_free(j);
}

static void *worker_main(void *arg) {
        (void) arg;
        pthread_mutex_lock(&pool_lock);
        for (;;) {
                while (!queue_head) {
                        struct timespec until;
                        clock_gettime(CLOCK_REALTIME, &until);
                        until.tv_sec += 30;
                        n_idle_workers++;
                        int r = pthread_cond_timedwait(&pool_cond, &pool_lock, &until);
                        n_idle_workers--;
                        /* Keep a few for the next burst; let the rest go. */
                        if (r == ETIMEDOUT && !queue_head && n_workers > 4) {
                                n_workers--;
                                pthread_mutex_unlock(&pool_lock);
                                return NULL;
                        }
                }
                struct job *j = queue_head;
                queue_head = j->next;
                if (!queue_head)
                        queue_tail = NULL;
                n_queued--;
                pthread_mutex_unlock(&pool_lock);
                job_run(j);
                job_finish(j);
                pthread_mutex_lock(&pool_lock);
        }
}

static int job_submit(struct job *j) {
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&pool_lock);
        j->next = NULL;
        if (queue_tail)
                queue_tail->next = j;
        else
                queue_head = j;
        queue_tail = j;
        n_queued++;
        if (n_idle_workers < n_queued) {
                pthread_attr_t attr;
                pthread_t th;
                pthread_attr_init(&attr);
                pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
                pthread_attr_setstacksize(&attr, 512u * 1024u);
                if (pthread_create(&th, &attr, worker_main, NULL) == 0)
                        n_workers++;
                pthread_attr_destroy(&attr);
                if (n_workers == 0) {
                        /* No thread at all: take the job back. */
                        queue_head = queue_tail = NULL;
                        n_queued = 0;
                        return -EAGAIN;
                }
        }
        pthread_cond_signal(&pool_cond);
        return 0;
}

static const char *job_what(enum job_op op) {
        switch (op) {
        case JOB_SIGN: return "a signature";
        case JOB_DECRYPT: return "a decryption";
        case JOB_ECDH: return "a key agreement";
        case JOB_LOGIN:
        case JOB_RELOGIN: return "the login";
        case JOB_LOGOUT: return "the logout";
        case JOB_INFO:
        case JOB_NEEDS_LOGIN: return "a status query";
        case JOB_REFRESH: return "the slot list";
        case JOB_RESCAN: return "a key list scan";
        }
        return "a call";
}

static int err_unresponsive(struct token *t, struct token_error *err) {
        return err_set(err, -ETIMEDOUT, 0,
                       "token '%s' (module '%s') is not answering: an earlier call into its module has not returned "
                       "within the call timeout; requests for it fail at once until it does (check the reader or "
                       "the remote token server)", t->label, t->module->name);
}

/* Runs j within the deadline. 0: done, results in j (caller frees it);
 * negative: abandoned or not run (j is no longer the caller's). */
static int job_wait(struct job *j, unsigned timeout_ms, struct token_error *err) {
        struct timespec until;
        int r;

        if (job_submit(j) < 0) {
                /* Run it here rather than fail: no worse than no deadline. */
                job_run(j);
                return 0;
        }
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long) (timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&j->lock);
        while (!j->done) {
                r = pthread_cond_timedwait(&j->cond, &j->lock, &until);
                if (r == ETIMEDOUT && !j->done) {
                        j->abandoned = true;
                        job_stick(j, +1);
                        j->refs--;
                        pthread_mutex_unlock(&j->lock);
                        if (j->t)
                                return err_set(err, -ETIMEDOUT, 0,
                                               "token '%s' (module '%s') did not answer %s within %u s; it is marked "
                                               "unresponsive until the call returns", j->t->label,
                                               j->t->module->name, job_what(j->op), timeout_ms / 1000);
                        return err_set(err, -ETIMEDOUT, 0, "a module did not answer %s within %u s",
                                       job_what(j->op), timeout_ms / 1000);
                }
        }
        j->refs--;
        pthread_mutex_unlock(&j->lock);
        return 0;
}

static bool token_stuck(struct token *t) {
        return atomic_load(&t->stuck) > 0;
}

/* Copies n bytes (NULL stays NULL). */
static bool dup_bytes(uint8_t **dst, const void *src, size_t n) {
        *dst = NULL;
        if (!src)
                return true;
        *dst = malloc(n ? n : 1);
        if (*dst && n)
                memcpy(*dst, src, n);
        return *dst != NULL;
}

/* The job's own reference on the scan holding k, so k outlives an
 * abandoned caller. */
static void job_hold_key(struct job *j, const struct token_key *k) {
        j->k = k;
        j->scan = scan_ref(entry_of(k)->scan);
}

bool token_error_not_logged_in(const struct token_error *err) {
        return err && err->rv == CKR_USER_NOT_LOGGED_IN;
}

/* A context-specific login on a PIN pad waits for a person, as a login does. */
static unsigned op_timeout(const struct token_store *s, const struct token_key *k, const struct token_auth *auth) {
        if (k->always_authenticate && auth && !auth->pin && s->call_timeout_ms < 300000)
                return 300000;
        return s->call_timeout_ms;
}

/* A private-key operation for a worker thread. The job owns copies of the
 * input, the output buffer and the context-specific PIN, so that an
 * abandoned job never touches what its caller freed. 0 and *out, or an
 * error (out of memory; the token is stuck). */
static int key_job_new(enum job_op op, const struct token_key *k, const struct token_auth *auth, const uint8_t *in,
                       size_t in_len, size_t out_len, struct job **out, struct token_error *err) {
        struct job *j;

        err_clear(err);
        if (token_stuck(k->token))
                return err_unresponsive(k->token, err);
        j = job_new(op, k->token->store, k->token);
        if (!j || !dup_bytes(&j->in, in, in_len) || !(j->out = malloc(out_len ? out_len : 1)) ||
            !job_copy_auth(j, auth)) {
                if (j)
                        job_free(j);
                return err_set(err, -ENOMEM, 0, "out of memory");
        }
        job_hold_key(j, k);
        j->in_len = in_len;
        j->out_len = out_len;
        *out = j;
        return 0;
}

/* Waits for a job of key_job_new() and hands its result over: the output
 * into out (*out_len: its length), the error into err. */
static int key_job_wait(struct job *j, const struct token_key *k, const struct token_auth *auth, uint8_t *out,
                        size_t *out_len, struct token_error *err) {
        int r = job_wait(j, op_timeout(k->token->store, k, auth), err);

        if (r < 0)
                return r;       /* abandoned: the worker frees the job */
        *out_len = j->out_len;
        if (j->r == 0)
                memcpy(out, j->out, j->out_len);
        if (err)
                *err = j->err;
        r = j->r;
        job_free(j);
        return r;
}

int token_sign(const struct token_key *k, const struct token_sign_params *p, const uint8_t *in, size_t in_len,
               uint8_t *sig, size_t *sig_len, struct token_error *err) {
        struct job *j;
        int r;

        if (!k->token->store->call_timeout_ms)
                return sign_direct(k, p, in, in_len, sig, sig_len, err);
        r = key_job_new(JOB_SIGN, k, p->auth, in, in_len, *sig_len, &j, err);
        if (r < 0)
                return r;
        j->sp = *p;
        j->sp.auth = job_auth(j);
        return key_job_wait(j, k, p->auth, sig, sig_len, err);
}

int token_decrypt(const struct token_key *k, const struct token_decrypt_params *p, const uint8_t *in,
                  size_t in_len, uint8_t *out, size_t *out_len, struct token_error *err) {
        struct job *j;
        int r;

        if (!k->token->store->call_timeout_ms)
                return decrypt_direct(k, p, in, in_len, out, out_len, err);
        r = key_job_new(JOB_DECRYPT, k, p->auth, in, in_len, *out_len, &j, err);
        if (r < 0)
                return r;
        if (!dup_bytes(&j->label, p->label, p->label_len)) {
                job_free(j);
                return err_set(err, -ENOMEM, 0, "out of memory");
        }
        j->dp = *p;
        j->dp.auth = job_auth(j);
        j->dp.label = j->label;
        return key_job_wait(j, k, p->auth, out, out_len, err);
}

int token_ecdh(const struct token_key *k, const struct token_auth *auth, const uint8_t *peer, size_t peer_len,
               uint8_t *z, size_t *z_len, struct token_error *err) {
        struct job *j;
        int r;

        if (!k->token->store->call_timeout_ms)
                return ecdh_direct(k, auth, peer, peer_len, z, z_len, err);
        r = key_job_new(JOB_ECDH, k, auth, peer, peer_len, *z_len, &j, err);
        if (r < 0)
                return r;
        return key_job_wait(j, k, auth, z, z_len, err);
}

static int login_job(struct token *t, enum job_op op, const char *pin, size_t pin_len, struct token_error *err) {
        struct token_store *s = t->store;
        unsigned timeout = s->call_timeout_ms;
        struct job *j;
        int r;

        if (!timeout)
                return op == JOB_LOGIN ? login_direct(t, pin, pin_len, err) : op == JOB_RELOGIN ?
                       relogin_direct(t, pin, pin_len, err) : logout_direct(t, err);
        err_clear(err);
        if (token_stuck(t))
                return err_unresponsive(t, err);
        j = job_new(op, s, t);
        if (!j)
                return err_set(err, -ENOMEM, 0, "out of memory");
        if (pin && !job_copy_pin(j, pin, pin_len)) {
                job_free(j);
                return err_set(err, -ENOMEM, 0, "out of memory");
        }
        /* A PIN pad waits for a person. */
        if (op != JOB_LOGOUT && !pin && timeout < 300000)
                timeout = 300000;
        r = job_wait(j, timeout, err);
        if (r < 0)
                return r;
        if (err)
                *err = j->err;
        r = j->r;
        job_free(j);
        return r;
}

int token_login(struct token *t, const char *pin, size_t pin_len, struct token_error *err) {
        return login_job(t, JOB_LOGIN, pin, pin_len, err);
}

int token_relogin(struct token *t, const char *pin, size_t pin_len, struct token_error *err) {
        return login_job(t, JOB_RELOGIN, pin, pin_len, err);
}

int token_logout(struct token *t, struct token_error *err) {
        return login_job(t, JOB_LOGOUT, NULL, 0, err);
}

int token_get_info(struct token *t, struct token_info *out, struct token_error *err) {
        struct token_store *s = t->store;
        struct job *j;
        int r;

        if (token_stuck(t)) {
                /* What we know, without asking the module. */
                err_clear(err);
                memset(out, 0, sizeof(*out));
                snprintf(out->label, sizeof(out->label), "%s", t->label);
                snprintf(out->manufacturer, sizeof(out->manufacturer), "%s", t->manufacturer);
                copy_trimmed(out->model, sizeof(out->model), t->info.model, sizeof(t->info.model));
                copy_trimmed(out->serial, sizeof(out->serial), t->info.serialNumber, sizeof(t->info.serialNumber));
                snprintf(out->module_name, sizeof(out->module_name), "%s", t->module->name);
                snprintf(out->uri, sizeof(out->uri), "%s", t->uri);
                out->login_required = t->info.flags & CKF_LOGIN_REQUIRED;
                out->protected_auth_path = t->info.flags & CKF_PROTECTED_AUTHENTICATION_PATH;
                out->state = TOKEN_STATE_UNRESPONSIVE;
                return 0;
        }
        if (!s->call_timeout_ms)
                return info_direct(t, out, err);
        j = job_new(JOB_INFO, s, t);
        if (!j)
                return err_set(err, -ENOMEM, 0, "out of memory");
        r = job_wait(j, s->call_timeout_ms, err);
        if (r < 0)
                return token_get_info(t, out, err);     /* now stuck: the cached answer */
        *out = j->info;
        if (err)
                *err = j->err;
        r = j->r;
        job_free(j);
        return r;
}

int token_store_rescan(struct token_store *s) {
        size_t n = token_store_token_count(s);
        int done = 0;

        for (size_t i = 0; i < n; i++) {
                struct token *t = token_store_token(s, i);
                struct token_error e;
                int r;

                if (!t || token_stuck(t) || !token_is_present(t))
                        continue;
                if (!s->call_timeout_ms) {
                        r = rescan_direct(t, &e);
                } else {
                        struct job *j = job_new(JOB_RESCAN, s, t);

                        if (!j)
                                return done;
                        r = job_wait(j, s->call_timeout_ms, &e);
                        if (r < 0)
                                continue;       /* abandoned: the worker frees it */
                        r = j->r;
                        job_free(j);
                }
                if (r >= 0)
                        done++;
        }
        return done;
}

bool token_needs_login(struct token *t) {
        struct token_store *s = t->store;
        struct job *j;
        bool b;

        if (!(t->info.flags & CKF_LOGIN_REQUIRED))
                return false;
        if (token_stuck(t))
                return true;    /* the login attempt then reports it */
        if (!s->call_timeout_ms)
                return needs_login_direct(t);
        j = job_new(JOB_NEEDS_LOGIN, s, t);
        if (!j)
                return true;
        if (job_wait(j, s->call_timeout_ms, NULL) < 0)
                return true;
        b = j->b;
        job_free(j);
        return b;
}

enum token_state token_get_state(struct token *t) {
        if (token_stuck(t))
                return TOKEN_STATE_UNRESPONSIVE;
        return token_is_present(t) ? TOKEN_STATE_PRESENT : TOKEN_STATE_REMOVED;
}

int token_store_refresh(struct token_store *s, struct token_error *err) {
        return token_store_refresh_due(s, TOKEN_REFRESH_ALL, err);
}

int token_store_refresh_due(struct token_store *s, enum token_refresh which, struct token_error *err) {
        int changed = 0;

        if (!s->call_timeout_ms)
                return refresh_direct(s, which, err);
        err_clear(err);
        {
                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&s->suspect_lock);
                s->suspect = false;
        }
        /* One job per module: a module that hangs holds up only itself
         * (module_refresh skips it while its call is stuck). */
        for (size_t i = 0; i < s->n_modules; i++) {
                struct token_module *m = &s->modules[i];
                struct token_error e;
                struct job *j;
                int r;

                err_clear(&e);
                if (!module_due(m, which))
                        continue;
                if (atomic_load(&m->stuck) > 0) {
                        err_set_first(err, 0, 0, "module '%s' is not answering (a call into it has not returned)",
                                      m->name);
                        continue;
                }
                j = job_new(JOB_REFRESH, s, NULL);
                if (!j)
                        return err_set(err, -ENOMEM, 0, "out of memory");
                j->m = m;
                /* A slot list and token info per slot: a few calls, one deadline. */
                r = job_wait(j, s->call_timeout_ms, &e);
                if (r < 0) {
                        err_set_first(err, 0, e.rv, "module '%s': %s", m->name, e.message);
                        continue;
                }
                if (j->err.message[0])
                        err_set_first(err, 0, j->err.rv, "%s", j->err.message);
                if (j->r < 0) {
                        r = j->r;
                        job_free(j);
                        return r;
                }
                changed |= j->r;
                job_free(j);
        }
        return changed;
}

/* ---- Slot events ------------------------------------------------------------ *
 *
 * One thread per module that supports C_WaitForSlotEvent, blocked in it, so
 * that a token inserted or removed is noticed at once instead of at the
 * next poll. Rules that keep it safe:
 *
 *   - The thread holds no lock while it waits: the wait may last forever,
 *     and module_reset() needs the module's call lock for writing. Before
 *     each wait it checks (tryrdlock) that no re-initialisation is under
 *     way; PKCS#11 says a C_Finalize makes a blocked C_WaitForSlotEvent
 *     return CKR_CRYPTOKI_NOT_INITIALIZED, after which it waits again.
 *   - Everything it shares with the store is in struct slot_watch, which it
 *     co-owns (refs): after the module returns it looks at w->stop, under
 *     w->lock, before touching the store or the module, so a store that is
 *     stopping or freed is never touched.
 *   - It is not a "call" bounded by call-timeout (blocking is its purpose)
 *     and never marks a token unresponsive. A module that never returns
 *     from the wait keeps the thread; the thread is detached, so process
 *     exit does not wait for it.
 *   - A module whose wait fails at once again and again, or that reports
 *     events without pause, is polled from then on (the note says why).
 */

#define WATCH_MAX_FAILURES 5            /* waits that failed at once, in a row */
#define WATCH_STORM_EVENTS 100          /* more events than this ... */
#define WATCH_STORM_SECONDS 10          /* ... within this long: not real events */
#define WATCH_CONFIRM_MS 500            /* a blocking wait this long: the module does events */

struct slot_watch {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        int refs;                       /* the store's and the thread's, under lock */
        bool stop;                      /* under lock: the store is going, touch none of it */
        bool gone;                      /* under lock: the thread is out of the module for good */
        /* Under lock: since when the thread is in a blocking wait (0: not).
         * The probe is no proof: SoftHSM answers CKR_NO_EVENT to
         * CKF_DONT_BLOCK and CKR_FUNCTION_NOT_SUPPORTED to a blocking wait.
         * A module counts as watched (mode) once a blocking wait has lasted
         * WATCH_CONFIRM_MS, or reported an event; polled until then. */
        double wait_since;
        atomic_int mode;                /* enum token_hotplug */
        char note[256];                 /* under lock: why it is polled */
        struct token_store *store;      /* only while !stop, under lock */
        struct token_module *m;         /* same */
        CK_FUNCTION_LIST *fl;
};

static void slot_watch_unref_locked(struct slot_watch *w) {
        /* Called with w->lock held; releases it. */
        bool last = --w->refs == 0;
        pthread_mutex_unlock(&w->lock);
        if (last) {
                pthread_mutex_destroy(&w->lock);
                pthread_cond_destroy(&w->cond);
                free(w);
        }
}

static void ms_sleep(unsigned ms) {
        struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long) (ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
                ;
}

static double mono_seconds(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* Falls back to polling with a reason, and wakes the hot-plug thread so
 * that the slots are looked at now (an event may have been missed) and the
 * change is logged. w->lock held, !w->stop. */
static void slot_watch_give_up_locked(struct slot_watch *w, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(w->note, sizeof(w->note), fmt, ap);
        va_end(ap);
        atomic_store(&w->mode, TOKEN_HOTPLUG_POLL);
        atomic_store(&w->m->event_pending, true);
        store_suspect(w->store);
}

/* Until no re-initialisation holds the module's call lock. False: stop. */
static bool slot_watch_await_module(struct slot_watch *w) {
        for (;;) {
                {
                        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&w->lock);
                        if (w->stop)
                                return false;
                        if (pthread_rwlock_tryrdlock(&w->m->call_lock) == 0) {
                                pthread_rwlock_unlock(&w->m->call_lock);
                                return true;
                        }
                }
                ms_sleep(50);
        }
}

static void *slot_watch_main(void *arg) {
        struct slot_watch *w = arg;
        unsigned failures = 0, burst = 0;
        double burst_start = mono_seconds();
        CK_SLOT_ID slot;
        CK_RV rv;

        /* The probe: does the module do slot events at all? */
        if (!slot_watch_await_module(w))
                goto out;
        rv = w->fl->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, NULL);
        pthread_mutex_lock(&w->lock);
        if (w->stop) {
                pthread_mutex_unlock(&w->lock);
                goto out;
        }
        if (rv != CKR_OK && rv != CKR_NO_EVENT) {
                slot_watch_give_up_locked(w, "C_WaitForSlotEvent: %s", token_rv_name(rv));
                pthread_mutex_unlock(&w->lock);
                goto out;
        }
        /* CKR_OK: an event was already waiting. */
        if (rv == CKR_OK) {
                atomic_store(&w->m->event_pending, true);
                store_suspect(w->store);
        }
        pthread_mutex_unlock(&w->lock);

        for (;;) {
                if (!slot_watch_await_module(w))
                        break;
                double t0 = mono_seconds();
                {
                        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&w->lock);
                        w->wait_since = t0;
                }
                rv = w->fl->C_WaitForSlotEvent(0, &slot, NULL);
                double now = mono_seconds();

                _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&w->lock);
                w->wait_since = 0;
                if (w->stop)
                        break;
                if (rv == CKR_FUNCTION_NOT_SUPPORTED) {
                        slot_watch_give_up_locked(w, "C_WaitForSlotEvent: %s", token_rv_name(rv));
                        break;
                }
                if (rv == CKR_OK) {
                        failures = 0;
                        if (atomic_load(&w->mode) != TOKEN_HOTPLUG_EVENTS) {
                                atomic_store(&w->mode, TOKEN_HOTPLUG_EVENTS);
                                w->note[0] = '\0';
                        }
                        if (now - burst_start > WATCH_STORM_SECONDS) {
                                burst_start = now;
                                burst = 0;
                        }
                        if (++burst > WATCH_STORM_EVENTS) {
                                slot_watch_give_up_locked(w, "C_WaitForSlotEvent reported more than %d events "
                                                          "within %d s; taken as broken", WATCH_STORM_EVENTS,
                                                          WATCH_STORM_SECONDS);
                                break;
                        }
                        atomic_store(&w->m->event_pending, true);
                        store_suspect(w->store);
                        continue;
                }
                /* An error after a real wait (a re-initialisation's C_Finalize
                 * ends it with CKR_CRYPTOKI_NOT_INITIALIZED) is no sign of a
                 * broken module; one that comes at once, again and again, is. */
                if (now - t0 >= 1.0)
                        failures = 0;
                else if (++failures >= WATCH_MAX_FAILURES) {
                        slot_watch_give_up_locked(w, "C_WaitForSlotEvent failed %u times in a row (%s)",
                                                  failures, token_rv_name(rv));
                        break;
                }
                pthread_mutex_unlock(g);
                g = NULL;
                ms_sleep(200u * (failures + 1));
        }
out:
        pthread_mutex_lock(&w->lock);
        w->gone = true;
        pthread_cond_broadcast(&w->cond);
        slot_watch_unref_locked(w);
        return NULL;
}

int token_store_watch_slots(struct token_store *s) {
        int started = 0;

        assert(s);
        for (size_t i = 0; i < s->n_modules; i++) {
                struct token_module *m = &s->modules[i];
                struct slot_watch *w;
                pthread_attr_t attr;
                pthread_t th;

                if (m->watch)
                        continue;
                w = calloc(1, sizeof(*w));
                if (!w)
                        return started;
                pthread_mutex_init(&w->lock, NULL);
                {
                        pthread_condattr_t ca;
                        pthread_condattr_init(&ca);
                        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
                        pthread_cond_init(&w->cond, &ca);
                        pthread_condattr_destroy(&ca);
                }
                w->refs = 2;
                w->store = s;
                w->m = m;
                w->fl = m->fl;
                atomic_init(&w->mode, TOKEN_HOTPLUG_POLL);
                snprintf(w->note, sizeof(w->note), "asking whether it reports slot events");
                pthread_attr_init(&attr);
                pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
                pthread_attr_setstacksize(&attr, 256u * 1024u);
                if (pthread_create(&th, &attr, slot_watch_main, w) != 0) {
                        pthread_attr_destroy(&attr);
                        pthread_mutex_destroy(&w->lock);
                        pthread_cond_destroy(&w->cond);
                        free(w);
                        continue;
                }
                pthread_attr_destroy(&attr);
                m->watch = w;
                started++;
        }
        return started;
}

/* Stops every slot-event thread from touching the store again. A module
 * whose thread may be blocked in C_WaitForSlotEvent is finalised when
 * finalize[i] says no other call can be inside it (NULL: none is), which
 * ends the wait; then up to 2 s in all for the threads to leave. A module
 * that ignores C_Finalize keeps its thread, which is harmless: it is
 * detached and touches only its own struct slot_watch. */
static void slot_watch_shutdown(struct token_store *s, const bool *finalize) {
        struct timespec until;

        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += 2;
        for (size_t i = 0; i < s->n_modules; i++) {
                struct slot_watch *w = s->modules[i].watch;
                bool blocked;

                if (!w)
                        continue;
                pthread_mutex_lock(&w->lock);
                w->stop = true;
                blocked = !w->gone && atomic_load(&w->mode) == TOKEN_HOTPLUG_EVENTS;
                pthread_mutex_unlock(&w->lock);
                if (finalize && finalize[i] && blocked)
                        (void) p11_kit_module_finalize(s->modules[i].fl);
        }
        for (size_t i = 0; i < s->n_modules; i++) {
                struct slot_watch *w = s->modules[i].watch;

                if (!w)
                        continue;
                pthread_mutex_lock(&w->lock);
                while (!w->gone)
                        if (pthread_cond_timedwait(&w->cond, &w->lock, &until) != 0)
                                break;
                s->modules[i].watch = NULL;
                slot_watch_unref_locked(w);
        }
}

/* A module whose blocking wait has lasted long enough is watched from now
 * on. Returns the ms until that can be said of a wait in progress (0: it
 * can be, or no wait is in progress). w->lock held. */
static unsigned slot_watch_confirm_locked(struct slot_watch *w) {
        if (w->stop || !w->wait_since || atomic_load(&w->mode) == TOKEN_HOTPLUG_EVENTS)
                return 0;
        double waited_ms = (mono_seconds() - w->wait_since) * 1000.0;
        if (waited_ms < WATCH_CONFIRM_MS)
                return (unsigned) (WATCH_CONFIRM_MS - waited_ms) + 1;
        atomic_store(&w->mode, TOKEN_HOTPLUG_EVENTS);
        w->note[0] = '\0';
        store_suspect(w->store);        /* the hot-plug thread logs the change */
        return 0;
}

static enum token_hotplug module_hotplug(struct token_module *m, char *note, size_t note_size) {
        struct slot_watch *w = m->watch;

        if (!w) {
                snprintf(note, note_size, "slot events not asked for");
                return TOKEN_HOTPLUG_POLL;
        }
        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&w->lock);
        (void) slot_watch_confirm_locked(w);
        snprintf(note, note_size, "%s", w->note);
        return (enum token_hotplug) atomic_load(&w->mode);
}

static bool module_watched(const struct token_module *m) {
        return m->watch && atomic_load(&m->watch->mode) == TOKEN_HOTPLUG_EVENTS;
}

/* Does this refresh look at module m? See enum token_refresh. */
static bool module_due(struct token_module *m, enum token_refresh which) {
        bool pending = atomic_exchange(&m->event_pending, false);
        bool watched = module_watched(m);

        m->event_refresh = pending && watched;
        if (which == TOKEN_REFRESH_ALL || pending)
                return true;
        if (!watched)
                return which == TOKEN_REFRESH_POLLED;
        return m->needs_reset && timespec_passed(&m->next_reset);
}

uint32_t token_store_next_due_ms(struct token_store *s) {
        uint32_t best = UINT32_MAX;
        struct timespec now;

        clock_gettime(CLOCK_MONOTONIC, &now);
        for (size_t i = 0; i < s->n_modules; i++) {
                const struct token_module *m = &s->modules[i];
                if (m->watch) {
                        /* Wake when a wait in progress makes the module
                         * watched, so that the change shows (and is logged). */
                        _cleanup_unlock_ pthread_mutex_t *g = mutex_lock(&m->watch->lock);
                        unsigned ms = slot_watch_confirm_locked(m->watch);
                        if (ms && ms < best)
                                best = ms;
                }
                if (!m->needs_reset || !module_watched(m))
                        continue;
                int64_t ms = (int64_t) (m->next_reset.tv_sec - now.tv_sec) * 1000 +
                             (m->next_reset.tv_nsec - now.tv_nsec) / 1000000;
                if (ms < 0)
                        ms = 0;
                if ((uint64_t) ms < best)
                        best = (uint32_t) ms;
        }
        return best;
}
