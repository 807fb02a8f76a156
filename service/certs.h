/* certs.h — helpers shared by the address book requests (certs.c, verify.c,
 * encrypt.c). */
#ifndef SMIME_CERTS_H
#define SMIME_CERTS_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/x509.h>

#include "certstore.h"

struct agent;

/* One certificate from DER or PEM bytes; NULL if they hold none. */
X509 *certs_parse_one(const uint8_t *p, size_t n);
/* Judges x for encryption now (chain, CRLs, usage, key type) into *chk. */
void certs_status(struct agent *a, X509 *x, const struct cert_facts *f, enum cs_trust decision, struct cs_check *chk);

#endif
