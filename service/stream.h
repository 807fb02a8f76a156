/* stream.h — one request's content stream over the connection socket.
 *
 * Input arrives as DATA frames in lock-step (the agent sends MORE when it
 * wants the next chunk, END closes the input); output leaves as DATA frames
 * of at most PROTO_MAX_CHUNK bytes. Both sides are exposed as OpenSSL BIOs
 * so that CMS streaming reads and writes straight through them: memory per
 * request stays at about one chunk each way, whatever the message size.
 */
#ifndef SMIME_STREAM_H
#define SMIME_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <stdint.h>

#include <openssl/bio.h>
#include <openssl/evp.h>

#include "proto.h"

struct stream {
        int fd;
        struct proto_frame in;
        size_t in_pos;
        bool in_eof;
        bool need_more;         /* a DATA was consumed: ask for the next with MORE */
        int err;                /* first failure, negative errno; -EPROTO/-EMSGSIZE: client broke the protocol */
        uint8_t *pushback;      /* bytes given back to the input (parsed header block) */
        size_t pb_len, pb_pos;
        uint8_t *out;
        size_t out_len;
        bool crlf;              /* turn bare LF in the output into CRLF */
        bool more_early;        /* output only at the end: MORE as soon as a DATA is in */
        uint8_t last_out;
        uint64_t bytes_in, bytes_out;
        /* When set (by the caller, who owns them), every DATA payload
         * received / sent is also hashed here: the audit log's content
         * SHA-256 (audit.h). */
        EVP_MD_CTX *hash_in, *hash_out;
};

void stream_init(struct stream *s, int fd);
void stream_done(struct stream *s);

/* Up to n input bytes; 0 at END; negative on failure (s->err set). */
ssize_t stream_read(struct stream *s, void *buf, size_t n);
/* One line (up to and including LF) or size-1 bytes, NUL-terminated;
 * 0 at END; negative on failure. */
ssize_t stream_gets(struct stream *s, char *buf, size_t size);
/* 1 when the input ended before its first byte, 0 when bytes are waiting,
 * negative on failure. Consumes nothing. */
int stream_input_empty(struct stream *s);
/* Puts bytes back in front of the input (at most once, before reading on). */
int stream_unread(struct stream *s, const void *buf, size_t n);
int stream_write(struct stream *s, const void *buf, size_t n);
int stream_flush(struct stream *s);
/* Ends the request: the buffered output and then *done (DONE, with
 * stream_total_out() as its byte count) in one write. */
int stream_finish(struct stream *s, struct proto_msg *done);

/* Output bytes so far, sent or still buffered. */
static inline uint64_t stream_total_out(const struct stream *s)
{
        return s->bytes_out + s->out_len;
}

/* BIOs over the stream; freeing them does not touch the stream. */
BIO *stream_in_bio(struct stream *s);
BIO *stream_out_bio(struct stream *s);

#endif
