/* fuzz_proto.c — libFuzzer harness for the wire protocol decoder (proto/).
 *
 * The input is used two ways, as the agent meets untrusted bytes:
 *  1. as a field payload: proto_validate, then every field walked and read
 *     as uint/string (groups recursively), and the lookups the agent does;
 *  2. as a byte stream on a pipe: proto_read_frame until it stops, each
 *     frame's fields read the same way.
 * Then whatever validated is encoded again with the proto_put_* builders
 * and must validate again (the writer and the reader agree).
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "proto.h"

static void walk(const uint8_t *p, size_t n, unsigned depth, struct proto_msg *copy)
{
        struct proto_iter it;
        struct proto_field f;

        proto_iter_init(&it, p, n);
        while (proto_iter_next(&it, &f) > 0) {
                uint64_t v;
                char *s = NULL;

                if (proto_field_uint(&f, &v) == 0 && copy)
                        proto_put_uint(copy, f.tag, v);
                if (proto_field_string(&f, &s) == 0) {
                        if (copy)
                                proto_put_string(copy, f.tag, s);
                        free(s);
                }
                if ((f.tag == PT_TOKEN || f.tag == PT_MODULE) && depth < 8) {
                        if (copy)
                                proto_begin_group(copy, f.tag);
                        walk(f.val, f.len, depth + 1, copy);
                        if (copy)
                                proto_end_group(copy);
                }
        }
}

static void lookups(const uint8_t *p, size_t n)
{
        static const uint16_t tags[] = { PT_VERSION, PT_SOFTWARE, PT_KEY, PT_FORMAT, PT_DIGEST, PT_CODE,
                                         PT_MESSAGE, PT_PIN, PT_URI, PT_TOKEN, 0xffff };
        for (size_t i = 0; i < sizeof(tags) / sizeof(tags[0]); i++) {
                uint64_t v;
                char *s = NULL;
                const uint8_t *raw;
                size_t len;

                (void)proto_get_uint(p, n, tags[i], &v);
                if (proto_get_string(p, n, tags[i], &s) == 0)
                        free(s);
                (void)proto_get_raw(p, n, tags[i], &raw, &len);
        }
}

static void payload(const uint8_t *p, size_t n)
{
        struct proto_msg copy;

        if (proto_validate(p, n) != 0) {
                walk(p, n, 0, NULL);    /* the iterator must stop cleanly on bad input too */
                return;
        }
        lookups(p, n);
        proto_msg_init(&copy, PROTO_STATUS_OK);
        walk(p, n, 0, &copy);
        if (proto_msg_error(&copy) == 0 && proto_validate(copy.buf + 5, copy.len - 5) != 0)
                abort();        /* we built something we cannot read */
        proto_msg_free(&copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        struct proto_frame f = { 0 };
        int fds[2];

        payload(data, size);

        /* A pipe holds 64 KiB: enough for many frames, never blocks. */
        if (size > 65536 || pipe2(fds, O_CLOEXEC) < 0)
                return 0;
        if (write(fds[1], data, size) != (ssize_t)size)
                abort();
        close(fds[1]);
        while (proto_read_frame(fds[0], &f) > 0) {
                if (f.type != PROTO_DATA)
                        payload(f.body, f.len);
        }
        proto_frame_free(&f);
        close(fds[0]);
        return 0;
}
