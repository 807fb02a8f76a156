/* stream.c — content streaming between a connection and OpenSSL BIOs.
 *
 * Must never: buffer more than one chunk in either direction, or send MORE
 * before the output produced from the previous chunk has been written.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "stream.h"

void stream_init(struct stream *s, int fd)
{
        memset(s, 0, sizeof(*s));
        s->fd = fd;
}

void stream_done(struct stream *s)
{
        proto_frame_free(&s->in);
        free(s->pushback);
        free(s->out);
        s->pushback = s->out = NULL;
}

static int stream_send_with(struct stream *s, uint8_t type, struct proto_msg *m);

static int stream_fail(struct stream *s, int r)
{
        if (!s->err)
                s->err = r;
        return s->err;
}

/* Makes input bytes available; 1 when some are, 0 at END. */
static int stream_fill(struct stream *s)
{
        int r;

        if (s->err)
                return s->err;
        if (s->pb_pos < s->pb_len || s->in_pos < s->in.len)
                return 1;
        if (s->in_eof)
                return 0;
        if (s->need_more) {
                /* The output of the last chunk and MORE in one write. */
                r = stream_send_with(s, PROTO_MORE, NULL);
                if (r < 0)
                        return r;
                s->need_more = false;
        }
        r = proto_read_frame(s->fd, &s->in);
        if (r == 0)
                return stream_fail(s, -ECONNRESET);
        if (r < 0)
                return stream_fail(s, r);
        s->in_pos = 0;
        switch (s->in.type) {
        case PROTO_DATA:
                s->need_more = true;
                s->bytes_in += s->in.len;
                if (s->hash_in && !EVP_DigestUpdate(s->hash_in, s->in.body, s->in.len))
                        return stream_fail(s, -ENOMEM);
                if (s->more_early && s->out_len == 0) {
                        /* Nothing to send back for this chunk: ask for the
                         * next one now, so that the client reads and sends
                         * it while this one is digested. */
                        r = stream_send_with(s, PROTO_MORE, NULL);
                        if (r < 0)
                                return r;
                        s->need_more = false;
                }
                return 1;
        case PROTO_END:
                s->in.len = 0;
                s->in_eof = true;
                return 0;
        default:
                s->in.len = 0;
                return stream_fail(s, -EPROTO);
        }
}

int stream_input_empty(struct stream *s)
{
        int r = stream_fill(s);

        return r < 0 ? r : r == 0;
}

/* The input bytes available now (after stream_fill returned 1). */
static const uint8_t *stream_peek(struct stream *s, size_t *avail)
{
        if (s->pb_pos < s->pb_len) {
                *avail = s->pb_len - s->pb_pos;
                return s->pushback + s->pb_pos;
        }
        *avail = s->in.len - s->in_pos;
        return s->in.body + s->in_pos;
}

static void stream_consume(struct stream *s, size_t k)
{
        if (s->pb_pos < s->pb_len)
                s->pb_pos += k;
        else
                s->in_pos += k;
}

ssize_t stream_read(struct stream *s, void *buf, size_t n)
{
        int r = stream_fill(s);
        const uint8_t *src;
        size_t k;

        if (r <= 0)
                return r;
        src = stream_peek(s, &k);
        if (k > n)
                k = n;
        memcpy(buf, src, k);
        stream_consume(s, k);
        return (ssize_t)k;
}

ssize_t stream_gets(struct stream *s, char *buf, size_t size)
{
        size_t n = 0;

        if (size == 0)
                return 0;
        while (n < size - 1) {
                int r = stream_fill(s);
                const uint8_t *src, *nl;
                size_t k;

                if (r < 0 && n == 0)
                        return r;
                if (r <= 0)
                        break;
                src = stream_peek(s, &k);
                if (k > size - 1 - n)
                        k = size - 1 - n;
                nl = memchr(src, '\n', k);
                if (nl)
                        k = (size_t)(nl - src) + 1;
                memcpy(buf + n, src, k);
                stream_consume(s, k);
                n += k;
                if (nl)
                        break;
        }
        buf[n] = '\0';
        return (ssize_t)n;
}

int stream_unread(struct stream *s, const void *buf, size_t n)
{
        uint8_t *p;
        size_t left = s->pb_len - s->pb_pos;

        p = malloc(n + left + 1);
        if (!p)
                return stream_fail(s, -ENOMEM);
        memcpy(p, buf, n);
        if (left)
                memcpy(p + n, s->pushback + s->pb_pos, left);
        free(s->pushback);
        s->pushback = p;
        s->pb_len = n + left;
        s->pb_pos = 0;
        return 0;
}

/* Sends the buffered output followed by an empty message of that type,
 * or by *m when m is set, in one write. */
static int stream_send_with(struct stream *s, uint8_t type, struct proto_msg *m)
{
        int r;

        if (s->err)
                return s->err;
        if (s->hash_out && s->out_len && !EVP_DigestUpdate(s->hash_out, s->out, s->out_len))
                return stream_fail(s, -ENOMEM);
        r = m ? proto_write_data_and_msg(s->fd, s->out, s->out_len, m)
              : proto_write_data_and_empty(s->fd, s->out, s->out_len, type);
        if (r < 0)
                return stream_fail(s, r);
        s->bytes_out += s->out_len;
        s->out_len = 0;
        return 0;
}

int stream_finish(struct stream *s, struct proto_msg *done)
{
        return stream_send_with(s, 0, done);
}

int stream_flush(struct stream *s)
{
        int r;

        if (s->err)
                return s->err;
        if (s->out_len == 0)
                return 0;
        if (s->hash_out && !EVP_DigestUpdate(s->hash_out, s->out, s->out_len))
                return stream_fail(s, -ENOMEM);
        r = proto_write_data(s->fd, s->out, s->out_len);
        if (r < 0)
                return stream_fail(s, r);
        s->bytes_out += s->out_len;
        s->out_len = 0;
        return 0;
}

static int stream_copy_out(struct stream *s, const uint8_t *p, size_t n)
{
        while (n > 0) {
                size_t k = PROTO_MAX_CHUNK - s->out_len;

                if (k == 0) {
                        int r = stream_flush(s);

                        if (r < 0)
                                return r;
                        continue;
                }
                if (k > n)
                        k = n;
                memcpy(s->out + s->out_len, p, k);
                s->out_len += k;
                p += k;
                n -= k;
        }
        return 0;
}

int stream_write(struct stream *s, const void *buf, size_t n)
{
        const uint8_t *p = buf;
        int r;

        if (s->err)
                return s->err;
        if (!s->out && !(s->out = malloc(PROTO_MAX_CHUNK)))
                return stream_fail(s, -ENOMEM);
        if (!s->crlf)
                return stream_copy_out(s, p, n);
        /* Copy whole runs; add CR before an LF that lacks one. */
        while (n > 0) {
                const uint8_t *nl = memchr(p, '\n', n);
                size_t run = nl ? (size_t)(nl - p) : n;

                if (run > 0) {
                        if ((r = stream_copy_out(s, p, run)) < 0)
                                return r;
                        s->last_out = p[run - 1];
                        p += run;
                        n -= run;
                }
                if (nl) {
                        if (s->last_out != '\r' && (r = stream_copy_out(s, (const uint8_t *)"\r", 1)) < 0)
                                return r;
                        if ((r = stream_copy_out(s, p, 1)) < 0)
                                return r;
                        s->last_out = '\n';
                        p++;
                        n--;
                }
        }
        return 0;
}

/* ---- BIO glue ------------------------------------------------------------ */

static int bio_in_read(BIO *b, char *buf, int n)
{
        ssize_t r = stream_read(BIO_get_data(b), buf, (size_t)n);

        return r < 0 ? -1 : (int)r;
}

/* SMIME canonicalisation reads lines. */
static int bio_in_gets(BIO *b, char *buf, int size)
{
        ssize_t r = size > 0 ? stream_gets(BIO_get_data(b), buf, (size_t)size) : 0;

        return r < 0 ? -1 : (int)r;
}

static int bio_out_write(BIO *b, const char *buf, int n)
{
        return stream_write(BIO_get_data(b), buf, (size_t)n) < 0 ? -1 : n;
}

static int bio_out_puts(BIO *b, const char *str)
{
        return bio_out_write(b, str, (int)strlen(str));
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
        struct stream *s = BIO_get_data(b);

        switch (cmd) {
        case BIO_CTRL_FLUSH:
                /* Not a write of its own: buffered output goes out with the
                 * next MORE or the final DONE (stream_finish), or when a
                 * whole chunk is full, so the client wakes once per step.
                 * OpenSSL flushes several times per S/MIME message. */
                return s->err ? 0 : 1;
        case BIO_CTRL_EOF:
                return s->in_eof && s->pb_pos == s->pb_len && s->in_pos == s->in.len;
        case BIO_CTRL_PENDING:
        case BIO_CTRL_WPENDING:
                return 0;
        }
        return 0;
}

static int bio_create(BIO *b)
{
        BIO_set_init(b, 1);
        return 1;
}

static BIO_METHOD *bio_in_method, *bio_out_method;
static pthread_once_t bio_once = PTHREAD_ONCE_INIT;

static void bio_methods_init(void)
{
        bio_in_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "smime-agent input");
        bio_out_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "smime-agent output");
        if (bio_in_method) {
                BIO_meth_set_read(bio_in_method, bio_in_read);
                BIO_meth_set_gets(bio_in_method, bio_in_gets);
                BIO_meth_set_ctrl(bio_in_method, bio_ctrl);
                BIO_meth_set_create(bio_in_method, bio_create);
        }
        if (bio_out_method) {
                BIO_meth_set_write(bio_out_method, bio_out_write);
                BIO_meth_set_puts(bio_out_method, bio_out_puts);
                BIO_meth_set_ctrl(bio_out_method, bio_ctrl);
                BIO_meth_set_create(bio_out_method, bio_create);
        }
}

static BIO *stream_bio(struct stream *s, BIO_METHOD **m)
{
        BIO *b;

        pthread_once(&bio_once, bio_methods_init);
        if (!*m || !(b = BIO_new(*m)))
                return NULL;
        BIO_set_data(b, s);
        return b;
}

BIO *stream_in_bio(struct stream *s) { return stream_bio(s, &bio_in_method); }
BIO *stream_out_bio(struct stream *s) { return stream_bio(s, &bio_out_method); }
