/* hotplug.c — the thread that notices tokens coming and going.
 *
 * Two ways, per module (token/ decides which; `smimectl status` shows it):
 *
 *   - Slot events. A module that implements C_WaitForSlotEvent (OpenSC and
 *     most smartcard middleware) gets a thread of its own in token/ blocked
 *     in it; each event wakes this thread, which refreshes that module at
 *     once. Such a module is not polled, except for a slow safety poll every
 *     SAFETY_POLL_SECONDS (events can be missed: a module re-initialised
 *     after a lost token drops the ones that come meanwhile, and some
 *     modules report only the slots they recognise).
 *   - Polling. The modules this agent meets most do not implement it
 *     (SoftHSM, p11-kit's RPC client answer CKR_FUNCTION_NOT_SUPPORTED), and
 *     a module whose wait keeps failing is put back to polling: every
 *     hotplug-poll seconds (default 2) token_store_refresh_due() compares
 *     each polled module's slot list with the tokens known, which costs one
 *     C_GetSlotList and one C_GetTokenInfo per slot.
 *
 * Either way it also wakes at once when a token operation saw a sign of
 * removal (CKR_DEVICE_REMOVED, a failed presence check), so requests after
 * a re-insertion rarely wait, and when a module's re-initialisation after a
 * lost token falls due. hotplug-poll = 0 turns off every timed poll,
 * the safety poll included: then only events and those signs count.
 *
 * Must never: call into a module itself (token/ does), or stop the agent
 * because a module misbehaves.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "agent.h"
#include "hotplug.h"
#include "log.h"

#define DEFAULT_POLL_SECONDS 2
#define SAFETY_POLL_SECONDS 60
#define MAX_MODULES_LOGGED 64

static void log_tokens(struct agent *a)
{
        size_t n = token_store_token_count(a->store);

        for (size_t i = 0; i < n; i++) {
                struct token *t = token_store_token(a->store, i);
                struct token_info ti;
                struct token_error e;

                if (t && token_get_info(t, &ti, &e) == 0)
                        log_info("token '%s' (%s, serial %s): %s", ti.label, ti.manufacturer, ti.serial,
                                 ti.state == TOKEN_STATE_PRESENT ? "present" :
                                 ti.state == TOKEN_STATE_REMOVED ? "removed" : "unresponsive");
        }
}

/* Logs a module's way of hot-plug when it changes (once per change, so a
 * module that falls back to polling says so once). */
static void log_modes(struct agent *a, unsigned poll, int *last)
{
        size_t n = token_store_module_count(a->store);

        for (size_t i = 0; i < n && i < MAX_MODULES_LOGGED; i++) {
                struct token_module_info mi;

                if (token_store_module_info(a->store, i, &mi) < 0 || (int)mi.hotplug == last[i])
                        continue;
                /* Before the probe answered: not worth a line. */
                if (last[i] < 0 && mi.hotplug == TOKEN_HOTPLUG_POLL &&
                    strncmp(mi.hotplug_note, "asking", 6) == 0)
                        continue;
                last[i] = (int)mi.hotplug;
                if (mi.hotplug == TOKEN_HOTPLUG_EVENTS)
                        log_info("hot-plug: module '%s' reports slot events (C_WaitForSlotEvent); not polled", mi.name);
                else if (poll)
                        log_info("hot-plug: module '%s' is polled every %u s (%s)", mi.name, poll, mi.hotplug_note);
                else
                        log_info("hot-plug: module '%s' is not polled (hotplug-poll = 0) and reports no slot "
                                 "events (%s); only failed requests make the agent look again", mi.name,
                                 mi.hotplug_note);
        }
}

static unsigned min_u(unsigned x, unsigned y)
{
        return x < y ? x : y;
}

static bool passed(const struct timespec *now, const struct timespec *t)
{
        return now->tv_sec > t->tv_sec || (now->tv_sec == t->tv_sec && now->tv_nsec >= t->tv_nsec);
}

static unsigned ms_until(const struct timespec *now, const struct timespec *t)
{
        long long ms = (long long)(t->tv_sec - now->tv_sec) * 1000 + (t->tv_nsec - now->tv_nsec) / 1000000;
        return ms < 0 ? 0 : ms > 3600000 ? 3600000u : (unsigned)ms;
}

static void *hotplug_main(void *arg)
{
        struct agent *a = arg;
        unsigned poll = a->cfg.hotplug_poll ? a->cfg.hotplug_poll - 1 : DEFAULT_POLL_SECONDS;
        char last_err[sizeof(((struct token_error *)0)->message)] = "";
        int last_mode[MAX_MODULES_LOGGED];
        struct timespec now, next_poll, next_safety;

        for (size_t i = 0; i < MAX_MODULES_LOGGED; i++)
                last_mode[i] = -1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        next_poll = next_safety = now;
        next_poll.tv_sec += poll;
        next_safety.tv_sec += SAFETY_POLL_SECONDS;
        for (;;) {
                struct token_error e = { 0 };
                enum token_refresh which = TOKEN_REFRESH_DUE;
                unsigned wait_ms = poll ? ms_until(&now, &next_poll) : 3600u * 1000u;
                int r;

                /* poll 0: no timed polling, only events and hints. A watched
                 * module's re-initialisation that falls due is not left to
                 * the poll. */
                wait_ms = min_u(wait_ms, token_store_next_due_ms(a->store));
                /* A hint of removal (or a slot event): the polled modules
                 * are looked at too, as they always were. */
                if (token_store_wait_suspect(a->store, wait_ms))
                        which = TOKEN_REFRESH_POLLED;
                clock_gettime(CLOCK_MONOTONIC, &now);
                if (poll && passed(&now, &next_poll)) {
                        which = TOKEN_REFRESH_POLLED;
                        next_poll = now;
                        next_poll.tv_sec += poll;
                }
                if (poll && passed(&now, &next_safety)) {
                        which = TOKEN_REFRESH_ALL;
                        next_safety = now;
                        next_safety.tv_sec += SAFETY_POLL_SECONDS;
                }
                r = token_store_refresh_due(a->store, which, &e);
                if (e.message[0] && strcmp(e.message, last_err) != 0)
                        log_info("hot-plug: %s", e.message);
                snprintf(last_err, sizeof(last_err), "%s", e.message);
                log_modes(a, poll, last_mode);
                if (r > 0)
                        log_tokens(a);
        }
        return NULL;
}

int hotplug_start(struct agent *a)
{
        pthread_attr_t attr;
        pthread_t th;
        int r;

        /* Slot-event threads first: their probes' answers wake the loop. */
        (void)token_store_watch_slots(a->store);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        r = pthread_create(&th, &attr, hotplug_main, a);
        pthread_attr_destroy(&attr);
        return -r;
}
