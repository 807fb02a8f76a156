/* fuzz_cms.c — libFuzzer harness for decrypt's input path (service/cms_in.c):
 * format detection, the S/MIME header block, PEM and base64, the streaming
 * BER reader over ContentInfo / EnvelopedData / AuthEnvelopedData, the
 * re-encoded header handed to OpenSSL's d2i, the segmented ciphertext and
 * the trailer — everything the agent does with a message's bytes before a
 * key is involved. The input arrives in pieces whose size comes from the
 * first byte, as DATA frames would cut it. Checks what decrypt relies on:
 * no more ciphertext than input, every failure has a reason, nothing leaks.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include <openssl/cms.h>

#include "cms_in.h"

struct mem {
        const uint8_t *p;
        size_t len, pos, step;
        uint8_t *back;          /* one unread, like the stream's pushback */
        size_t back_len, back_pos;
};

static size_t take(struct mem *m, size_t n)
{
        size_t left = m->len - m->pos;

        if (n > m->step)
                n = m->step;
        return n < left ? n : left;
}

static ssize_t mem_read(void *ctx, void *buf, size_t n)
{
        struct mem *m = ctx;
        size_t k;

        if (m->back_pos < m->back_len) {
                k = m->back_len - m->back_pos < n ? m->back_len - m->back_pos : n;
                memcpy(buf, m->back + m->back_pos, k);
                m->back_pos += k;
                return (ssize_t)k;
        }
        k = take(m, n);
        memcpy(buf, m->p + m->pos, k);
        m->pos += k;
        return (ssize_t)k;
}

static ssize_t mem_gets(void *ctx, char *buf, size_t size)
{
        size_t n = 0;

        while (n + 1 < size) {
                char ch;
                ssize_t k = mem_read(ctx, &ch, 1);

                if (k <= 0)
                        break;
                buf[n++] = ch;
                if (ch == '\n')
                        break;
        }
        buf[n] = '\0';
        return (ssize_t)n;
}

static int mem_unread(void *ctx, const void *buf, size_t n)
{
        struct mem *m = ctx;

        if (m->back_len || !(m->back = malloc(n ? n : 1)))
                return -ENOMEM;
        memcpy(m->back, buf, n);
        m->back_len = n;
        return 0;
}

static int count(void *ctx, const uint8_t *data, size_t n)
{
        size_t *total = ctx;

        if (n == 0 || n > CMS_IN_CHUNK)
                abort();
        (void)data[n - 1];      /* ASan: the whole piece is readable */
        *total += n;
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        struct mem m = { .p = data, .len = size, .step = size ? (size_t)data[0] * 37 + 1 : 1 };
        struct cms_in_io io = { .read = mem_read, .gets = mem_gets, .unread = mem_unread, .ctx = &m };
        struct cms_in p;
        CMS_ContentInfo *cms = NULL;
        uint8_t mac[16];
        size_t mac_len = 0, total = 0;
        int r;

        if (cms_in_init(&p, &io) < 0)
                return 0;
        r = cms_in_start(&p, CMS_IN_AUTO);
        if (r == 0)
                r = cms_in_header(&p);
        if (r == 0) {
                cms = cms_in_build(&p, NULL);
                if (cms)
                        (void)CMS_get0_RecipientInfos(cms);
                r = cms_in_content(&p, count, &total);
        }
        if (r == 0)
                r = cms_in_trailer(&p, mac, &mac_len);
        /* Base64 input is 4/3 of its bytes; DER never yields more than it has. */
        if (total > size || (r == 0 && p.auth && (mac_len < 4 || mac_len > 16)))
                abort();
        if (r == -EBADMSG && !p.why[0])
                abort();        /* every refusal says why */
        CMS_ContentInfo_free(cms);
        cms_in_done(&p);
        free(m.back);
        return 0;
}
