/* log.h — messages to stderr, or to the journal when running under systemd.
 * Never pass a PIN or message content to these functions. */
#ifndef SMIME_LOG_H
#define SMIME_LOG_H

#include <stdbool.h>

void log_setup(bool verbose);
void log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* True when messages go to the journal (stderr is our JOURNAL_STREAM). */
bool log_to_journal(void);

#endif
