/* hotplug.c — the thread that notices tokens coming and going.
 *
 * PKCS#11 offers C_WaitForSlotEvent, but the modules this agent meets most
 * do not implement it (SoftHSM, p11-kit's RPC client answer
 * CKR_FUNCTION_NOT_SUPPORTED) and a blocking wait inside a module cannot be
 * interrupted portably. So the thread polls: every hotplug-poll seconds
 * (default 2) token_store_refresh() compares each module's slot list with
 * the tokens known, which costs one C_GetSlotList and one C_GetTokenInfo per
 * slot. It also wakes at once when a token operation saw a sign of removal
 * (CKR_DEVICE_REMOVED, a failed presence check), so requests after a
 * re-insertion rarely wait for the poll.
 *
 * Must never: call into a module itself (token/ does), or stop the agent
 * because a module misbehaves.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "agent.h"
#include "hotplug.h"
#include "log.h"

#define DEFAULT_POLL_SECONDS 2

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

static void *hotplug_main(void *arg)
{
        struct agent *a = arg;
        unsigned poll = a->cfg.hotplug_poll ? a->cfg.hotplug_poll - 1 : DEFAULT_POLL_SECONDS;
        char last_err[sizeof(((struct token_error *)0)->message)] = "";

        for (;;) {
                struct token_error e = { 0 };
                int r;

                /* poll 0: no polling, only the hints of failed operations. */
                (void)token_store_wait_suspect(a->store, poll ? poll * 1000u : 3600u * 1000u);
                r = token_store_refresh(a->store, &e);
                if (e.message[0] && strcmp(e.message, last_err) != 0)
                        log_info("hot-plug: %s", e.message);
                snprintf(last_err, sizeof(last_err), "%s", e.message);
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

        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        r = pthread_create(&th, &attr, hotplug_main, a);
        pthread_attr_destroy(&attr);
        return -r;
}
