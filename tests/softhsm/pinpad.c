/* pinpad.c — a test-only PKCS#11 module: SoftHSM behind a simulated PIN pad.
 *
 * No PIN pad reader (CKF_PROTECTED_AUTHENTICATION_PATH) can exist on a CI
 * machine, so this module stands in for one: it forwards every call to the
 * module named by $PINPAD_MODULE (SoftHSM), reports
 * CKF_PROTECTED_AUTHENTICATION_PATH in C_GetTokenInfo, and answers a
 * C_Login without a PIN like a reader would: it waits for the person to
 * "type" — a file $PINPAD_FILE appearing, up to 60 s — takes the PIN from
 * its first line, deletes the file and logs in to SoftHSM with it. Every
 * pad login appends one line ("user" or "context") to $PINPAD_FILE.log so a
 * test can count them. A C_Login with a PIN is refused
 * (CKR_ARGUMENTS_BAD), as strict readers do, so the test also proves the
 * agent never sends a PIN to a pad token.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST *real;
static CK_FUNCTION_LIST shim;

static CK_RV shim_get_token_info(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
        CK_RV rv = real->C_GetTokenInfo(slot, info);

        if (rv == CKR_OK)
                info->flags |= CKF_PROTECTED_AUTHENTICATION_PATH;
        return rv;
}

/* The person at the reader: waits for the pad file, reads its first line. */
static CK_RV pad_read(char *pin, size_t size, CK_ULONG *len)
{
        const char *path = getenv("PINPAD_FILE");
        struct timespec step = { 0, 20 * 1000 * 1000 };
        FILE *f = NULL;

        if (!path)
                return CKR_GENERAL_ERROR;
        for (int i = 0; i < 3000 && !(f = fopen(path, "r")); i++)
                nanosleep(&step, NULL);
        if (!f)
                return CKR_FUNCTION_CANCELED;   /* nobody typed: a reader times out like this */
        if (!fgets(pin, (int)size, f))
                pin[0] = '\0';
        fclose(f);
        unlink(path);
        *len = (CK_ULONG)strcspn(pin, "\r\n");
        pin[*len] = '\0';
        return CKR_OK;
}

static void pad_log(CK_USER_TYPE type)
{
        const char *path = getenv("PINPAD_FILE");
        char log[4096];
        FILE *f;

        if (!path || snprintf(log, sizeof(log), "%s.log", path) >= (int)sizeof(log) || !(f = fopen(log, "a")))
                return;
        fprintf(f, "%s\n", type == CKU_CONTEXT_SPECIFIC ? "context" : "user");
        fclose(f);
}

static CK_RV shim_login(CK_SESSION_HANDLE h, CK_USER_TYPE type, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
        char typed[256];
        CK_ULONG n = 0;
        CK_RV rv;

        if (pin || len)
                return CKR_ARGUMENTS_BAD;
        pad_log(type);
        rv = pad_read(typed, sizeof(typed), &n);
        if (rv != CKR_OK)
                return rv;
        rv = real->C_Login(h, type, (CK_UTF8CHAR_PTR)typed, n);
        memset(typed, 0, sizeof(typed));
        return rv;
}

static CK_RV shim_get_function_list(CK_FUNCTION_LIST_PTR_PTR list)
{
        *list = &shim;
        return CKR_OK;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
        const char *path = getenv("PINPAD_MODULE");
        CK_RV (*get)(CK_FUNCTION_LIST_PTR_PTR);
        void *dl;

        if (!list)
                return CKR_ARGUMENTS_BAD;
        if (!real) {
                dl = dlopen(path ? path : "/usr/lib/softhsm/libsofthsm2.so", RTLD_NOW | RTLD_LOCAL);
                if (!dl)
                        return CKR_GENERAL_ERROR;
                *(void **)&get = dlsym(dl, "C_GetFunctionList");
                if (!get || get(&real) != CKR_OK)
                        return CKR_GENERAL_ERROR;
                shim = *real;
                shim.C_GetFunctionList = shim_get_function_list;
                shim.C_GetTokenInfo = shim_get_token_info;
                shim.C_Login = shim_login;
        }
        *list = &shim;
        return CKR_OK;
}
