/* check.h — the tiny TAP-like checker the C unit tests share: each CHECK
 * prints "ok" or "FAIL" with its message (and where, on failure) and counts
 * into passed/failed, which the test's main() reports and turns into its
 * exit status. Include once, in the test's one source file. */
#ifndef SMIME_TEST_CHECK_H
#define SMIME_TEST_CHECK_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>

static unsigned passed, failed;

__attribute__((format(printf, 4, 5)))
static bool check(bool ok, const char *file, int line, const char *fmt, ...)
{
        va_list ap;

        printf("%s - ", ok ? "ok  " : "FAIL");
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        if (!ok)
                printf("  (%s:%d)", file, line);
        putchar('\n');
        if (ok)
                passed++;
        else
                failed++;
        return ok;
}

#define CHECK(cond, ...) check((cond), __FILE__, __LINE__, __VA_ARGS__)

#endif
