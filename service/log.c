/* log.c — logging. Under systemd (JOURNAL_STREAM names our stderr) messages
 * go to the journal with their priority; otherwise to stderr. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include <systemd/sd-journal.h>

#include "log.h"

static bool use_journal, verbose_on;

void log_setup(bool verbose)
{
        const char *js = getenv("JOURNAL_STREAM");
        unsigned long dev, ino;
        struct stat st;

        verbose_on = verbose;
        /* Only when stderr really is the journal stream we were given. */
        if (js && sscanf(js, "%lu:%lu", &dev, &ino) == 2 && fstat(STDERR_FILENO, &st) == 0 &&
            st.st_dev == dev && st.st_ino == ino)
                use_journal = true;
}

static void log_v(int prio, const char *fmt, va_list ap)
{
        if (use_journal) {
                sd_journal_printv(prio, fmt, ap);
                return;
        }
        /* One write per line: stderr is unbuffered, and lines from several
         * connection threads must not interleave. */
        char line[4096];
        int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);

        if (n < 0)
                return;
        if ((size_t)n > sizeof(line) - 2)
                n = (int)sizeof(line) - 2;      /* cut, but still one line */
        line[n++] = '\n';
        fprintf(stderr, "smime-agent: %.*s", n, line);
}

#define LOG_FN(name, prio, cond)                    \
        void name(const char *fmt, ...)             \
        {                                           \
                va_list ap;                         \
                if (!(cond))                        \
                        return;                     \
                va_start(ap, fmt);                  \
                log_v(prio, fmt, ap);               \
                va_end(ap);                         \
        }

LOG_FN(log_error, LOG_ERR, true)
LOG_FN(log_info, LOG_INFO, true)
LOG_FN(log_debug, LOG_DEBUG, verbose_on)

bool log_to_journal(void)
{
        return use_journal;
}
