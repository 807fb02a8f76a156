/* mime.h — the header block of a message to be signed as S/MIME: where it
 * ends, and which fields go outside the signature and which inside.
 *
 * Pure functions over bytes the client sent (untrusted): no I/O, no
 * OpenSSL, every index checked against the length given. sign.c reads the
 * block from the stream and calls these; tests/fuzz/fuzz_mime.c feeds them
 * arbitrary bytes under ASan/UBSan.
 */
#ifndef SMIME_MIME_H
#define SMIME_MIME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The longest header block accepted (the block is held whole). */
#define MIME_MAX_HEADER (64u * 1024u)

/* Looks for the blank line (LF LF or LF CR LF) that ends a header block in
 * raw[from, len); true with *end just past it. A caller that reads in
 * pieces passes from = (bytes scanned before) - 3 so that a blank line split
 * across two reads is found. */
bool mime_header_end(const uint8_t *raw, size_t len, size_t from, size_t *end);

/* True when raw starts with a header field: a name of printable ASCII
 * without ':' or space, then ':' (RFC 5322 section 2.2). */
bool mime_starts_with_header(const uint8_t *raw, size_t len);

struct mime_split {
        uint8_t *outer;         /* fields other than Content-* and MIME-Version, CRLF line ends */
        size_t outer_len;
        uint8_t *inner;         /* Content-* fields (or Content-Type: text/plain), then CRLF */
        size_t inner_len;
};

/* Splits the header block raw[0, hdr_end): continuation lines follow their
 * field, MIME-Version is dropped (the signer writes its own), line ends
 * become CRLF. 0, or -ENOMEM. Free with mime_split_free. */
int mime_split_headers(const uint8_t *raw, size_t hdr_end, struct mime_split *out);
void mime_split_free(struct mime_split *s);

#endif
