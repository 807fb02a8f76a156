/* mime.c — header block parsing for S/MIME signing (see mime.h).
 *
 * Must never: read outside the bytes given, or hold more than
 * MIME_MAX_HEADER plus a line of slack per output buffer.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "mime.h"

bool mime_header_end(const uint8_t *raw, size_t len, size_t from, size_t *end)
{
        for (size_t i = from; i + 1 < len; i++) {
                if (raw[i] != '\n')
                        continue;
                if (raw[i + 1] == '\n') {
                        *end = i + 2;
                        return true;
                }
                if (raw[i + 1] == '\r' && i + 2 < len && raw[i + 2] == '\n') {
                        *end = i + 3;
                        return true;
                }
        }
        return false;
}

static bool is_field_name_char(uint8_t ch)
{
        return ch > 32 && ch < 127 && ch != ':';
}

bool mime_starts_with_header(const uint8_t *raw, size_t len)
{
        size_t i = 0;

        while (i < len && is_field_name_char(raw[i]))
                i++;
        return i > 0 && i < len && raw[i] == ':';
}

static bool is_entity_field(const uint8_t *line, size_t len)
{
        return len >= 8 && strncasecmp((const char *)line, "Content-", 8) == 0;
}

static bool is_mime_version(const uint8_t *line, size_t len)
{
        return len >= 13 && strncasecmp((const char *)line, "MIME-Version:", 13) == 0;
}

/* Appends one header line with its EOL normalised to CRLF. */
static int buf_add_line(uint8_t *dst, size_t *used, size_t cap, const uint8_t *line, size_t len)
{
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
                len--;
        if (*used + len + 2 > cap)
                return -EMSGSIZE;
        memcpy(dst + *used, line, len);
        *used += len;
        dst[(*used)++] = '\r';
        dst[(*used)++] = '\n';
        return 0;
}

void mime_split_free(struct mime_split *s)
{
        free(s->outer);
        free(s->inner);
        memset(s, 0, sizeof(*s));
}

int mime_split_headers(const uint8_t *raw, size_t hdr_end, struct mime_split *out)
{
        static const char text_plain[] = "Content-Type: text/plain\r\n";
        /* Every line grows by at most one byte (LF to CRLF); the inner block
         * also gets text/plain and the blank line. */
        size_t cap = 2 * hdr_end + sizeof(text_plain) + 2;
        bool to_inner = false, skip = false, any_entity = false;
        int r;

        memset(out, 0, sizeof(*out));
        out->outer = malloc(cap);
        out->inner = malloc(cap);
        if (!out->outer || !out->inner) {
                mime_split_free(out);
                return -ENOMEM;
        }
        /* Walk the fields; continuation lines follow their field. */
        for (size_t pos = 0; pos < hdr_end;) {
                const uint8_t *line = raw + pos;
                size_t e = pos, ll;

                while (e < hdr_end && raw[e] != '\n')
                        e++;
                if (e < hdr_end)
                        e++;
                ll = e - pos;
                if (ll <= 2 && (line[0] == '\n' || line[0] == '\r'))
                        break;  /* the blank line */
                if (line[0] != ' ' && line[0] != '\t') {
                        skip = is_mime_version(line, ll);
                        to_inner = is_entity_field(line, ll);
                        any_entity |= to_inner;
                }
                if (!skip) {
                        r = to_inner ? buf_add_line(out->inner, &out->inner_len, cap, line, ll)
                                     : buf_add_line(out->outer, &out->outer_len, cap, line, ll);
                        if (r < 0) {
                                mime_split_free(out);
                                return r;
                        }
                }
                pos = e;
        }
        if (!any_entity) {
                memcpy(out->inner + out->inner_len, text_plain, sizeof(text_plain) - 1);
                out->inner_len += sizeof(text_plain) - 1;
        }
        out->inner[out->inner_len++] = '\r';
        out->inner[out->inner_len++] = '\n';
        return 0;
}
