/* cms_in.h — reading an encrypted CMS message (EnvelopedData or
 * AuthEnvelopedData) as it streams in: DER/BER, PEM or an S/MIME entity,
 * with a small streaming BER reader for the outer layers.
 *
 * The parser knows nothing of sockets or tokens: bytes come from a
 * struct cms_in_io, so that the agent (decrypt.c, over the client's DATA
 * frames) and the fuzz harness (tests/fuzz/fuzz_cms.c, from memory) run the
 * same code on untrusted input. Use:
 *
 *   cms_in_init(&p, &io);
 *   cms_in_start(&p, CMS_IN_AUTO);     // format; S/MIME and PEM headers
 *   cms_in_header(&p);                 // up to the ciphertext
 *   cms = cms_in_build(&p, propq);     // everything before it, for OpenSSL
 *   cms_in_content(&p, feed, ctx);     // the ciphertext, chunk by chunk
 *   cms_in_trailer(&p, mac, &mac_len); // the rest; the GCM tag
 *   cms_in_done(&p);
 *
 * Every step returns 0, -EBADMSG with the reason for people in p.why,
 * -E2BIG when the recipient information is over CMS_IN_MAX_HEADER, -ENOMEM,
 * or the negative value the io callbacks or feed returned.
 *
 * Must never: hold more than CMS_IN_MAX_HEADER bytes of header plus one
 * chunk of content, or trust a length before checking it against the bytes
 * there are.
 */
#ifndef SMIME_CMS_IN_H
#define SMIME_CMS_IN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <openssl/cms.h>

#define CMS_IN_MAX_HEADER (16u * 1024u * 1024u)   /* recipientInfos & co: ~1 KiB per recipient */
#define CMS_IN_MAX_MIME_HEADER (64u * 1024u)
#define CMS_IN_CHUNK (64u * 1024u)

struct cms_in_io {
        ssize_t (*read)(void *ctx, void *buf, size_t n);        /* up to n bytes; 0 at the end */
        ssize_t (*gets)(void *ctx, char *buf, size_t size);     /* one line or size-1 bytes, NUL-terminated */
        int (*unread)(void *ctx, const void *buf, size_t n);    /* once, before reading on */
        void *ctx;
};

enum cms_in_format { CMS_IN_AUTO, CMS_IN_DER, CMS_IN_PEM, CMS_IN_SMIME };

struct cms_in_src {
        const struct cms_in_io *io;
        bool b64;
        bool pem;               /* base64 ends at a "-----END" line */
        bool end;               /* no more decoded bytes */
        bool padded;            /* '=' seen: the base64 text is complete */
        uint32_t quad;
        int nq;
        uint64_t line;          /* base64: lines read, for messages */
        char text[8192];        /* base64: the current line */
        size_t tpos, tlen;
        char *err;              /* where a decoding error is described */
        size_t errsz;
};

struct cms_in_ber {
        struct cms_in_src *src;
        uint8_t buf[16384];
        size_t pos, len;
        uint64_t off;           /* bytes of the DER/BER consumed */
        int io;                 /* the failure of the source, negative errno */
        char *err;
        size_t errsz;
};

struct cms_in_tlv {
        uint8_t id;             /* identifier octet: class, constructed bit, tag */
        bool indef;
        uint64_t len;           /* definite length */
        uint64_t end;           /* offset just past the content (definite) */
        uint8_t hdr[10];
        size_t hdr_len;
};

struct cms_in_buf {
        uint8_t *p;
        size_t len, cap, max;
};

struct cms_in {
        struct cms_in_io io;
        struct cms_in_src src;
        struct cms_in_ber ber;
        char why[1024];                 /* the reason of the first -EBADMSG */
        enum cms_in_format format;
        bool auth;                      /* AuthEnvelopedData */
        struct cms_in_tlv ci, explicit0, env, eci, content;
        struct cms_in_buf version, originator, rinfos, ctype, calg;
        bool has_originator;
        uint8_t *chunk;
};

int cms_in_init(struct cms_in *p, const struct cms_in_io *io);
void cms_in_done(struct cms_in *p);
/* Tells DER, PEM and S/MIME apart (unless format says which) and reads the
 * S/MIME header block or the PEM BEGIN line. */
int cms_in_start(struct cms_in *p, enum cms_in_format format);
/* ContentInfo, EnvelopedData or AuthEnvelopedData, up to the header of the
 * encrypted content. */
int cms_in_header(struct cms_in *p);
/* The part before the ciphertext as a CMS_ContentInfo without content (and,
 * for AuthEnvelopedData, an empty MAC: the real one follows the content).
 * NULL with OpenSSL's error queue set when it does not decode. */
CMS_ContentInfo *cms_in_build(struct cms_in *p, const char *propq);
/* Streams the encrypted content to feed(), at most CMS_IN_CHUNK at a time. */
int cms_in_content(struct cms_in *p, int (*feed)(void *ctx, const uint8_t *data, size_t n), void *ctx);
/* The rest of the structure; mac (16 bytes) gets the AuthEnvelopedData MAC. */
int cms_in_trailer(struct cms_in *p, uint8_t mac[16], size_t *mac_len);

#endif
