/* pinentry.h — asks the user for a PIN through a pinentry program (the
 * GnuPG pinentry family: pinentry-gnome3, -qt, -gtk2, -curses, -tty...),
 * which the agent starts itself and talks to in the Assuan protocol on the
 * program's stdin and stdout. This is how clients without a terminal
 * (plugins, mail filters) still get a PIN dialog.
 *
 * Knows nothing about sockets, tokens or the wire protocol: the caller
 * (conn_ask_pin) writes the texts and decides what the result means, so
 * the exchange can be tested against any stand-in program.
 *
 * The child sees: its stdin and stdout (one end of a socket pair, so that
 * a crashed pinentry is an EPIPE for us and never a SIGPIPE), the agent's
 * stderr (its diagnostics go to the agent's log), the environment the
 * caller gives, default signal dispositions and an empty signal mask; no
 * other descriptor (everything from 3 up is closed in the child).
 *
 * Must never: log, keep or copy a PIN outside struct secret (every buffer
 * the answer passes through is a locked secret buffer, wiped after use);
 * wait for the program longer than the timeout; leave a child process
 * behind (it is reaped on every path; after a dialog it gets BYE and a
 * second to exit, else, and at once after a failure, SIGTERM and 200 ms,
 * then SIGKILL); send
 * SETKEYINFO or OPTION allow-external-password-cache (the pinentry must
 * not offer to store the PIN in a password manager).
 */
#ifndef SMIME_PINENTRY_H
#define SMIME_PINENTRY_H

#include <stddef.h>

#include "secret.h"

#define PINENTRY_DEFAULT_TIMEOUT 60u    /* seconds */
#define PINENTRY_MAX_TIMEOUT 3600u
/* After the timeout the pinentry has this long to say so itself (its own
 * SETTIMEOUT) before the agent kills it. */
#define PINENTRY_GRACE_SEC 2u
#define PINENTRY_MAX_PIN 256u           /* bytes; PKCS#11 PINs are short */

struct pinentry_dialog {
        const char *program;            /* absolute path (pinentry_resolve) */
        char *const *envp;              /* the child's environment, NULL-terminated */
        unsigned timeout_sec;           /* for the user (SETTIMEOUT); the whole exchange gets PINENTRY_GRACE_SEC more */
        const char *title;              /* plain text, escaped here; NULL: not sent */
        const char *description;        /* plain text, lines separated by '\n' */
        const char *prompt;
        const char *ttyname;            /* OPTION ttyname= (curses/tty pinentries); NULL: not sent */
        const char *ttytype;            /* OPTION ttytype= (TERM) */
        const char *lc_ctype;           /* OPTION lc-ctype= */
        const char *lc_messages;        /* OPTION lc-messages= */
        const char *owner;              /* who the dialog is for, for "another dialog is open" errors */
        int watch_fd;                   /* -1, or a socket whose hang-up ends the dialog at once */
};

/* Runs one dialog: starts the program, sends the options and texts,
 * GETPIN, BYE, and reaps the child. Only one dialog runs at a time in the
 * whole process (one screen, one keyboard, and graphical pinentries grab
 * the keyboard); a caller waits for the one in front of it for at most
 * timeout_sec + PINENTRY_GRACE_SEC.
 *
 * Returns 0 with pin filled (possibly empty: the user pressed OK on an
 * empty field; the caller frees it), or negative with why filled, a
 * sentence naming the program:
 *   -ECANCELED   the user cancelled (or closed) the dialog
 *   -ETIMEDOUT   no PIN within the timeout: the pinentry said so, or did
 *                not answer and was killed
 *   -ECONNRESET  watch_fd hung up (the client went away); the dialog was closed
 *   -EBUSY       another dialog stayed open for the whole wait
 *   -EPROTO      the program failed: an ERR, an exit or crash in the
 *                middle of the dialogue, or something that is not Assuan
 *   -ENOENT, -EACCES, ...  the program could not be started
 *   -ENOMEM */
int pinentry_getpin(const struct pinentry_dialog *d, struct secret *pin, char *why, size_t wn);

/* The program to run for name: an absolute path that must be an
 * executable file, or a bare name looked up in $PATH now (the agent's
 * PATH at start, not at the time of the dialog). 0 with *path malloc'd, or
 * negative with why filled. */
int pinentry_resolve(const char *name, char **path, char *why, size_t wn);

/* Assuan's percent-escaping of a parameter (%, CR, LF and every other
 * control character become %XX), truncated at a character boundary so
 * that the result fits in n bytes with its NUL. Returns the length. */
size_t pinentry_escape(const char *in, char *out, size_t n);

/* Decodes the %XX escapes of the data of a D line, appending the bytes to
 * pin (whose cap bounds them). 0, -EPROTO for a malformed escape, or
 * -EMSGSIZE when the result would not fit. */
int pinentry_unescape_append(const char *data, size_t len, struct secret *pin);

#endif
