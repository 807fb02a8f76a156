#!/usr/bin/env python3
"""Signing through the real agent on a SoftHSM token: every key type and
output format verifies with openssl (Ed25519 independently, since OpenSSL
3.0's cms -verify cannot), tampering breaks it, and the signed attributes,
certificates, digests and RSA-PSS parameters are what was asked for."""
import datetime
import hashlib
import os
import subprocess
import sys

from harness import (EMAIL, OID_CONTENT_TYPE, OID_DATA, OID_ED25519, OID_MESSAGE_DIGEST, OID_RSASSA_PSS, OID_SHA,
                     OID_SIGNING_CERT_V2, OID_SIGNING_TIME, OID_SMIME_CAPS, AgentTestCase, ber_parse, flip_byte,
                     main, multipart_parts, oid_str, opaque_der, parse_signed_data, pem_to_der, run, split_message,
                     utc_time, der_to_smime_opaque)
import smime_proto

MARKER = b"TAMPER-ME-0123456789"
CONTENT = b"Signed by smime-agent on a SoftHSM token.\n" + MARKER + b"\nLast line.\n"
# What an S/MIME signature covers for CONTENT: it has no header block, so it
# is signed as text/plain with CRLF line ends.
CANONICAL = b"Content-Type: text/plain\r\n\r\n" + CONTENT.replace(b"\n", b"\r\n")


class SignTest(AgentTestCase):
    AGENT_ARGS = ("--pin-file", "{pin}", "--config", "{tmp}/agent.conf")

    @classmethod
    def start_agent(cls, name, args=AGENT_ARGS):
        # --chain takes the CA from the configuration's ca-file.
        with open(os.path.join(cls.tmp, "agent.conf"), "w") as f:
            f.write(f"# written by {__file__}\nca-file = {cls.fx.ca}\n")
        return super().start_agent(name, args)

    # ---- helpers ----
    def sign_and_check(self, label, fmt, detached, extra=()):
        """Signs CONTENT, verifies it with openssl, then checks that a one-byte
        change of the signed content makes the verification fail."""
        args = ["--key", EMAIL[label], "--format", fmt, *extra] + (["--detached"] if detached else [])
        out = self.sign(CONTENT, *args)
        if fmt == "smime" and detached:
            self.assertIn(b"multipart/signed", split_message(out)[0])
            self.verify(out, "smime")
            self.verify(flip_byte(out, MARKER), "smime", ok=False)
        elif fmt == "smime":
            self.assertIn(b"application/pkcs7-mime", split_message(out)[0])
            self.verify(out, "smime", expect_content=CANONICAL)
            headers = split_message(out)[0]
            self.verify(der_to_smime_opaque(headers, flip_byte(opaque_der(out), MARKER)), "smime", ok=False)
        else:
            der = pem_to_der(out) if fmt == "pem" else out
            if fmt == "pem":
                self.assertTrue(out.startswith(b"-----BEGIN CMS-----\n"), out[:40])
            if detached:
                self.assertNotIn(MARKER, der, "detached signature contains the content")
                self.verify(out, fmt, content=CONTENT)
                self.verify(out, fmt, content=flip_byte(CONTENT, MARKER), ok=False)
            else:
                self.verify(out, fmt, expect_content=CONTENT)
                self.verify(flip_byte(der, MARKER), "der", ok=False)
        return out

    def der_of(self, out, fmt, detached=False):
        if fmt == "der":
            return out
        if fmt == "pem":
            return pem_to_der(out)
        return multipart_parts(out)[1] if detached else opaque_der(out)

    # ---- every key type and format ----
    def test_rsa_and_ec_keys_in_every_format_verify_and_detect_tampering(self):
        for label in ("rsa2048", "rsa3072", "p256", "p384", "p521"):
            for fmt in ("der", "pem", "smime"):
                for detached in (False, True):
                    with self.subTest(key=label, format=fmt, detached=detached):
                        out = self.sign_and_check(label, fmt, detached)
                        sd = parse_signed_data(self.der_of(out, fmt, detached))
                        self.assertEqual(sd["certs"], [self.fx.cert_der(label)], "signer certificate")
                        self.assertEqual(sd["econtent"] is None, detached)

    def ed25519_valid(self, der, content, pub):
        """Independent Ed25519 check (RFC 8419): id-Ed25519 without parameters,
        messageDigest = SHA-512(content), and the signature over the DER SET
        of the signed attributes verifies with the certificate's key."""
        sd = parse_signed_data(der)
        (si,) = sd["signers"]
        self.assertEqual(si["sig_alg"], OID_ED25519)
        self.assertIsNone(si["sig_alg_params"], "id-Ed25519 must have absent parameters")
        self.assertEqual(si["digest_alg"], OID_SHA["sha512"])
        self.assertEqual(sd["digest_algs"], [OID_SHA["sha512"]])
        (md,) = si["attrs"][OID_MESSAGE_DIGEST]
        attrs = self.write("ed-attrs.der", si["signed_attrs"])
        sig = self.write("ed-sig.bin", si["signature"])
        r = run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin", "-in", attrs, "-sigfile", sig],
                check=False)
        sig_ok = r.returncode == 0 and b"Signature Verified Successfully" in r.stdout
        return sig_ok and md.content() == hashlib.sha512(content).digest()

    def test_ed25519_in_every_format_verifies_independently(self):
        pub = self.write("erin.pub.pem", run(["openssl", "x509", "-in", self.fx.cert("ed25519"), "-noout",
                                               "-pubkey"]).stdout)
        for fmt in ("der", "pem", "smime"):
            for detached in (False, True):
                with self.subTest(format=fmt, detached=detached):
                    args = ["--key", EMAIL["ed25519"], "--format", fmt] + (["--detached"] if detached else [])
                    out = self.sign(CONTENT, *args)
                    der = self.der_of(out, fmt, detached)
                    sd = parse_signed_data(der)
                    self.assertEqual(sd["certs"], [self.fx.cert_der("ed25519")])
                    if fmt == "smime" and detached:
                        content = multipart_parts(out)[0]
                        self.assertEqual(content, CANONICAL)
                    elif fmt == "smime":
                        content = sd["econtent"]
                        self.assertEqual(content, CANONICAL)
                    elif detached:
                        content = CONTENT
                        self.assertIsNone(sd["econtent"])
                    else:
                        content = sd["econtent"]
                        self.assertEqual(content, CONTENT)
                    self.assertTrue(self.ed25519_valid(der, content, pub), "Ed25519 signature does not verify")
                    self.assertFalse(self.ed25519_valid(der, flip_byte(content, MARKER), pub),
                                     "Ed25519 signature verifies for tampered content")
                    bad = bytearray(der)
                    s = parse_signed_data(der)["signers"][0]["signature"]
                    i = der.rindex(s) + 10
                    bad[i] ^= 0x01
                    self.assertFalse(self.ed25519_valid(bytes(bad), content, pub),
                                     "a damaged Ed25519 signature verifies")

    # ---- RSA-PSS ----
    def test_rsa_pss_with_each_digest(self):
        for digest in ("sha256", "sha384", "sha512"):
            with self.subTest(digest=digest):
                out = self.sign_and_check("rsa2048", "der", False, ["--pss", "--digest", digest])
                (si,) = parse_signed_data(out)["signers"]
                self.assertEqual(si["sig_alg"], OID_RSASSA_PSS)
                self.assertEqual(si["digest_alg"], OID_SHA[digest])
                # RSASSA-PSS-params: hashAlgorithm [0], maskGenAlgorithm [1] (MGF1 with
                # the same hash), saltLength [2] = digest length.
                params = ber_parse(si["sig_alg_params"])
                fields = {c.tag: c for c in params.children}
                self.assertEqual(oid_str(fields[0xA0].children[0].children[0]), OID_SHA[digest])
                mgf = fields[0xA1].children[0]
                self.assertEqual(oid_str(mgf.children[0]), "1.2.840.113549.1.1.8")
                self.assertEqual(oid_str(mgf.children[1].children[0]), OID_SHA[digest])
                salt = int.from_bytes(fields[0xA2].children[0].content(), "big")
                self.assertEqual(salt, hashlib.new(digest).digest_size)
                printed = self.cms_print(out)
                self.assertIn("rsassaPss", printed)

    def test_pss_also_in_smime_detached(self):
        out = self.sign_and_check("rsa3072", "smime", True, ["--pss"])
        (si,) = parse_signed_data(multipart_parts(out)[1])["signers"]
        self.assertEqual(si["sig_alg"], OID_RSASSA_PSS)

    # ---- signed attributes, certificates, digests ----
    def test_signed_attributes(self):
        before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        out = self.sign(CONTENT, "--key", EMAIL["p256"], "--format", "der")
        after = datetime.datetime.now(datetime.timezone.utc)
        printed = self.cms_print(out)
        for name in ("contentType", "messageDigest", "signingTime", "S/MIME Capabilities",
                     "id-smime-aa-signingCertificateV2"):
            self.assertIn(f"object: {name} (", printed)
        (si,) = parse_signed_data(out)["signers"]
        attrs = si["attrs"]
        self.assertEqual(set(attrs), {OID_CONTENT_TYPE, OID_MESSAGE_DIGEST, OID_SIGNING_TIME, OID_SMIME_CAPS,
                                      OID_SIGNING_CERT_V2})
        self.assertEqual(oid_str(attrs[OID_CONTENT_TYPE][0]), OID_DATA)
        self.assertEqual(attrs[OID_MESSAGE_DIGEST][0].content(), hashlib.sha256(CONTENT).digest())
        t = utc_time(attrs[OID_SIGNING_TIME][0])
        self.assertTrue(before - datetime.timedelta(seconds=2) <= t <= after, f"signingTime {t} not now")
        # SMIMECapabilities: the ciphers, strongest first, then RSA-OAEP with
        # SHA-256 (RFC 8551 2.7.1), which DECRYPT reads.
        caps = [oid_str(c.children[0]) for c in attrs[OID_SMIME_CAPS][0].children]
        self.assertEqual(caps, ["2.16.840.1.101.3.4.1.46", "2.16.840.1.101.3.4.1.6", "2.16.840.1.101.3.4.1.42",
                                "2.16.840.1.101.3.4.1.22", "2.16.840.1.101.3.4.1.2", "1.2.840.113549.1.1.7"])
        self.assertIn(bytes.fromhex("0609608648016503040201"), attrs[OID_SMIME_CAPS][0].children[-1].raw())
        # ESSCertIDv2: the hash of the signer's certificate.
        cert = self.fx.cert_der("p256")
        self.assertIn(hashlib.sha256(cert).digest(), attrs[OID_SIGNING_CERT_V2][0].raw())

    def test_no_certs(self):
        out = self.sign(CONTENT, "--key", EMAIL["rsa2048"], "--format", "der", "--no-certs")
        self.assertEqual(parse_signed_data(out)["certs"], [])
        self.assertNotIn("cert_info:", self.cms_print(out))
        self.verify(out, "der", ok=False)  # the signer's certificate is not there
        self.verify(out, "der", extra=["-certfile", self.fx.cert("rsa2048")], expect_content=CONTENT)
        self.verify(flip_byte(out, MARKER), "der", ok=False, extra=["-certfile", self.fx.cert("rsa2048")])

    def test_chain_includes_the_ca_from_the_configuration(self):
        out = self.sign(CONTENT, "--key", EMAIL["p384"], "--format", "der", "--chain")
        certs = parse_signed_data(out)["certs"]
        ca = run(["openssl", "x509", "-in", self.fx.ca, "-outform", "DER"]).stdout
        self.assertEqual(len(certs), 2, "expected the signer and the CA certificate")
        self.assertCountEqual(certs, [self.fx.cert_der("p384"), ca])
        self.assertEqual(self.cms_print(out).count("cert_info:"), 2)
        self.verify(out, "der", expect_content=CONTENT)
        without = self.sign(CONTENT, "--key", EMAIL["p384"], "--format", "der")
        self.assertEqual(parse_signed_data(without)["certs"], [self.fx.cert_der("p384")])

    def test_digests_and_micalg(self):
        for label in ("rsa2048", "p256", "p384"):
            for digest, micalg in (("sha256", b"sha-256"), ("sha384", b"sha-384"), ("sha512", b"sha-512")):
                with self.subTest(key=label, digest=digest):
                    out = self.sign_and_check(label, "smime", True, ["--digest", digest])
                    headers = split_message(out)[0]
                    self.assertIn(b'micalg="' + micalg + b'"', headers)
                    sd = parse_signed_data(multipart_parts(out)[1])
                    self.assertEqual(sd["digest_algs"], [OID_SHA[digest]])
                    self.assertEqual(sd["signers"][0]["digest_alg"], OID_SHA[digest])
                    (md,) = sd["signers"][0]["attrs"][OID_MESSAGE_DIGEST]
                    self.assertEqual(md.content(), hashlib.new(digest, multipart_parts(out)[0]).digest())
                    der = self.sign(CONTENT, "--key", EMAIL[label], "--format", "der", "--digest", digest)
                    self.assertIn(f"algorithm: {digest} (", self.cms_print(der))
                    self.verify(der, "der", expect_content=CONTENT)

    def test_empty_content_in_every_format(self):
        # An empty message is valid content (RFC 5652 allows a zero-length
        # eContent); OpenSSL's own cms -verify accepts every one of these.
        for fmt in ("der", "pem", "smime"):
            for detached in (False, True):
                with self.subTest(format=fmt, detached=detached):
                    out = self.sign(b"", "--key", EMAIL["rsa2048"], "--format", fmt,
                                    *(["--detached"] if detached else []))
                    if fmt == "smime":
                        self.verify(out, "smime")
                    elif detached:
                        self.verify(out, fmt, content=b"")
                    else:
                        self.verify(out, fmt, expect_content=b"")

    # ---- key selection, clients ----
    def test_key_by_pkcs11_uri_and_without_email(self):
        out = self.sign(CONTENT, "--key", "pkcs11:token=smime-test;object=noemail", "--format", "der")
        self.assertEqual(parse_signed_data(out)["certs"], [self.fx.cert_der("noemail")])
        self.verify(out, "der", expect_content=CONTENT)
        out = self.sign(CONTENT, "--key", "pkcs11:token=smime-test;id=%02", "--format", "der")
        self.assertEqual(parse_signed_data(out)["certs"], [self.fx.cert_der("rsa3072")])

    def test_python_raw_client(self):
        env = dict(self.fx.env)
        r = subprocess.run([sys.executable, smime_proto.__file__, "--socket", self.agent.socket, "sign", "--key",
                            EMAIL["rsa2048"], "--format", "der"], input=CONTENT, capture_output=True, env=env,
                           timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.verify(r.stdout, "der", expect_content=CONTENT)
        self.assertEqual(parse_signed_data(r.stdout)["certs"], [self.fx.cert_der("rsa2048")])
        for fmt in ("pem", "smime"):
            with self.subTest(format=fmt):
                out = self.raw_sign(CONTENT, key=EMAIL["rsa2048"], format=fmt, detached=True)
                self.verify(out, fmt, content=CONTENT if fmt == "pem" else None)

    def test_raw_client_lists_keys_and_status(self):
        with self.connect() as c:
            keys = c.keys()
            status = c.status()
        emails = {smime_proto.field(k, "EMAIL") for k in keys}
        self.assertTrue(set(EMAIL.values()) <= emails, emails)
        self.assertEqual(len(keys), 11)
        usable = {smime_proto.field(k, "LABEL"): smime_proto.field(k, "USABLE") for k in keys}
        self.assertEqual(usable, {"rsa2048": 1, "rsa3072": 1, "p256": 1, "p384": 1, "p521": 1, "ed25519": 1, "noemail": 1,
                                  "nocert": 0, "expired": 0, "encrypt-only": 0, "sign-only": 1})
        tokens = [dict(g) for n, g in status if n == "TOKEN"]
        self.assertIn("smime-test", [t["TOKEN_LABEL"] for t in tokens])
        self.assertEqual(smime_proto.field(status, "KEY_COUNT"), 11)

    def test_smimectl_keys(self):
        r = self.ctl("keys")
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.decode()
        for email in EMAIL.values():
            self.assertIn(email + "\n", out)
        self.assertRegex(out, r"frank@example.org\n(  .*\n)*  status:   certificate .* expired on 2021-01-01")


if __name__ == "__main__":
    main()
