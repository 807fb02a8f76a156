/* slotevents.c — a test-only PKCS#11 module: SoftHSM with slot events.
 *
 * Why it exists: the agent watches modules that implement
 * C_WaitForSlotEvent with a thread blocked in it, and that needs a module
 * that really reports events. SoftHSM and p11-kit's RPC client answer
 * CKR_FUNCTION_NOT_SUPPORTED. The real smartcard stack (pcscd + the
 * vsmartcard virtual reader + OpenSC) was tried: OpenSC 0.23's wait does
 * block and does return on C_Finalize, but it reports an event only for a
 * card it recognises, and the card emulator in Debian 12 (vicc 0.8) offers
 * none that OpenSC 0.23 recognises (its cryptoflex emulation fails under
 * Python 3, OpenSC has no cryptoflex driver any more, and the nPA emulation
 * needs Python EAC bindings Debian does not ship). So this module forwards
 * every call to the real SoftHSM, unchanged, and adds what SoftHSM lacks:
 *
 *   C_WaitForSlotEvent  watches SoftHSM's token directory (directories.
 *                       tokendir of $SOFTHSM2_CONF) with inotify: a token
 *                       directory created, deleted or moved in or out is
 *                       an event. CKF_DONT_BLOCK: CKR_NO_EVENT when none is
 *                       pending. *pSlot is 0 (SoftHSM's slot ids are not
 *                       known here; the agent looks at every slot anyway).
 *   C_Finalize          ends a blocked wait with CKR_CRYPTOKI_NOT_INITIALIZED
 *                       (as PKCS#11 requires) before finalising SoftHSM.
 *
 * Misbehaviour on demand, for the agent's fallbacks (environment):
 *   SMIME_TEST_SLOTEVENTS=fail   a blocking wait fails at once with
 *                                CKR_DEVICE_ERROR (the probe still says
 *                                CKR_NO_EVENT): a broken module
 *   SMIME_TEST_SLOTEVENTS=hang   a blocking wait never returns, C_Finalize
 *                                included: a module that hangs
 *
 * Built by CMake for the tests only; never installed.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define SOFTHSM_MODULE "/usr/lib/softhsm/libsofthsm2.so"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t left = PTHREAD_COND_INITIALIZER;
static CK_FUNCTION_LIST *inner;         /* SoftHSM's */
static CK_FUNCTION_LIST outer;          /* ours: SoftHSM's with three entries replaced */
static bool initialized;
static int ino_fd = -1, wake_fd = -1;
static unsigned waiters;                /* threads inside C_WaitForSlotEvent */

static const char *mode(void)
{
        const char *m = getenv("SMIME_TEST_SLOTEVENTS");
        return m ? m : "";
}

/* directories.tokendir from SoftHSM's configuration file. */
static bool token_dir(char *out, size_t size)
{
        const char *conf = getenv("SOFTHSM2_CONF");
        char line[4096];
        bool found = false;
        FILE *f;

        f = fopen(conf ? conf : "/etc/softhsm/softhsm2.conf", "re");
        if (!f)
                return false;
        while (!found && fgets(line, sizeof(line), f)) {
                char *p = line, *v;
                while (*p == ' ' || *p == '\t')
                        p++;
                if (strncmp(p, "directories.tokendir", 20) != 0 || !(v = strchr(p, '=')))
                        continue;
                v++;
                while (*v == ' ' || *v == '\t')
                        v++;
                v[strcspn(v, " \t\r\n")] = '\0';
                found = snprintf(out, size, "%s", v) < (int)size && *v;
        }
        fclose(f);
        return found;
}

static CK_RV ev_Initialize(CK_VOID_PTR args)
{
        char dir[4096];
        CK_RV rv;

        pthread_mutex_lock(&lock);
        if (initialized) {
                pthread_mutex_unlock(&lock);
                return CKR_CRYPTOKI_ALREADY_INITIALIZED;
        }
        if (!token_dir(dir, sizeof(dir))) {
                pthread_mutex_unlock(&lock);
                return CKR_GENERAL_ERROR;
        }
        rv = inner->C_Initialize(args);
        if (rv == CKR_OK) {
                ino_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
                wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
                if (ino_fd < 0 || wake_fd < 0 ||
                    inotify_add_watch(ino_fd, dir, IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR) < 0) {
                        if (ino_fd >= 0)
                                close(ino_fd);
                        if (wake_fd >= 0)
                                close(wake_fd);
                        ino_fd = wake_fd = -1;
                        (void)inner->C_Finalize(NULL);
                        rv = CKR_GENERAL_ERROR;
                } else {
                        initialized = true;
                }
        }
        pthread_mutex_unlock(&lock);
        return rv;
}

static CK_RV ev_Finalize(CK_VOID_PTR reserved)
{
        bool hang = strcmp(mode(), "hang") == 0;

        pthread_mutex_lock(&lock);
        if (!initialized) {
                pthread_mutex_unlock(&lock);
                return CKR_CRYPTOKI_NOT_INITIALIZED;
        }
        initialized = false;
        if (!hang) {
                /* End the waits, and let them leave before their fds go. */
                (void)eventfd_write(wake_fd, 1);
                while (waiters > 0)
                        pthread_cond_wait(&left, &lock);
                close(ino_fd);
                close(wake_fd);
        }
        /* hang: the waiter keeps its fds; they are leaked on purpose. */
        ino_fd = wake_fd = -1;
        pthread_mutex_unlock(&lock);
        return inner->C_Finalize(reserved);
}

/* True if an inotify event was read. */
static bool drain(int fd)
{
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        bool any = false;

        while (read(fd, buf, sizeof(buf)) > 0)
                any = true;
        return any;
}

static CK_RV ev_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved)
{
        bool block = !(flags & CKF_DONT_BLOCK);
        CK_RV rv = CKR_NO_EVENT;
        int ifd, wfd;

        if (reserved)
                return CKR_ARGUMENTS_BAD;
        pthread_mutex_lock(&lock);
        if (!initialized) {
                pthread_mutex_unlock(&lock);
                return CKR_CRYPTOKI_NOT_INITIALIZED;
        }
        if (block && strcmp(mode(), "fail") == 0) {
                pthread_mutex_unlock(&lock);
                return CKR_DEVICE_ERROR;
        }
        waiters++;
        ifd = ino_fd;
        wfd = wake_fd;
        pthread_mutex_unlock(&lock);

        if (block && strcmp(mode(), "hang") == 0) {
                for (;;)
                        (void)poll(NULL, 0, -1);
        }
        for (;;) {
                struct pollfd p[2] = { { .fd = ifd, .events = POLLIN }, { .fd = wfd, .events = POLLIN } };
                if (drain(ifd)) {
                        rv = CKR_OK;
                        break;
                }
                if (!block)
                        break;
                if (poll(p, 2, -1) < 0 && errno != EINTR) {
                        rv = CKR_GENERAL_ERROR;
                        break;
                }
                if (p[1].revents) {
                        rv = CKR_CRYPTOKI_NOT_INITIALIZED;
                        break;
                }
        }
        if (rv == CKR_OK && slot)
                *slot = 0;

        pthread_mutex_lock(&lock);
        waiters--;
        pthread_cond_broadcast(&left);
        pthread_mutex_unlock(&lock);
        return rv;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out)
{
        static pthread_mutex_t once = PTHREAD_MUTEX_INITIALIZER;
        CK_RV rv = CKR_OK;

        if (!out)
                return CKR_ARGUMENTS_BAD;
        pthread_mutex_lock(&once);
        if (!inner) {
                /* Never dlclose()d: SoftHSM stays for the life of the process. */
                void *h = dlopen(SOFTHSM_MODULE, RTLD_NOW | RTLD_LOCAL);
                CK_C_GetFunctionList get = h ? (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList") : NULL;
                if (!get || get(&inner) != CKR_OK || !inner) {
                        inner = NULL;
                        rv = CKR_GENERAL_ERROR;
                } else {
                        outer = *inner;
                        outer.C_Initialize = ev_Initialize;
                        outer.C_Finalize = ev_Finalize;
                        outer.C_WaitForSlotEvent = ev_WaitForSlotEvent;
                        outer.C_GetFunctionList = C_GetFunctionList;
                }
        }
        pthread_mutex_unlock(&once);
        if (rv == CKR_OK)
                *out = &outer;
        return rv;
}
