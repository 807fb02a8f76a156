#!/usr/bin/env python3
"""smimectl verify through the agent: messages signed by openssl cms, gpgsm,
the agent itself and NSS (Thunderbird) verify; altered content, a damaged
signature, a wrong sender, an expired, revoked, untrusted or distrusted
signer and a missing chain each give their named result and exit code;
clear-signed messages rewritten by a "gateway" are explained; good signers
are harvested into the address book with their capabilities."""
import base64
import hashlib
import io
import os
import re
import subprocess

from harness import EMAIL, flip_byte, multipart_parts, run, split_message
from pki import NSS, PkiTestCase, cert_der, fingerprint, main, signed_with_caps
import smime_proto

MARKER = b"VERIFY-MARKER-0123456789"
TEXT = b"Hello,\n\nthe report is attached. " + MARKER + b"\n-- \nVera\n"
MAIL = (b"From: Vera <vera@example.net>\nTo: Bob <bob@example.org>\nSubject: report\n"
        b"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n" + TEXT)


class VerifyTest(PkiTestCase):
    PEOPLE = (
        ("vera", "vera@example.net", {}),
        ("vera-ec", "vera@example.net", {"key": "p384"}),
        ("old", "old@example.net", {"start": "abs:20200101000000Z", "end": "abs:20210101000000Z"}),
        ("rex", "rex@example.net", {}),
        ("signonly", "signonly@example.net", {"usage": "sign"}),
        ("encronly", "encronly@example.net", {"usage": "encrypt"}),
    )
    REVOKED = ("rex",)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.ivan = cls.pki.person("ivan", "ivan@example.net", ca=cls.pki.sub)
        cls.ursula = cls.pki.self_signed("ursula", "ursula@example.net")

    def sign_mail(self, who, *extra, content=MAIL, certfile=None):
        pem, key = self.people[who] if isinstance(who, str) else who
        return self.openssl_sign(pem, key, content, *extra, certfile=certfile)

    @staticmethod
    def alter_opaque(msg):
        """An application/pkcs7-mime message with one byte of its content changed."""
        head, body = split_message(msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        der = base64.b64decode(body)
        return head + b"\r\n" + base64.encodebytes(flip_byte(der, MARKER)).replace(b"\n", b"\r\n")

    # ---- good signatures from every kind of signer ----
    def test_openssl_signed_opaque_and_clear_signed_in_every_format(self):
        pem, key = self.people["vera"]
        for fmt in ("SMIME", "DER", "PEM"):
            for detached in (False, True):
                with self.subTest(format=fmt, detached=detached):
                    extra = [] if detached else ["-nodetach"]
                    content = MAIL if fmt == "SMIME" else TEXT
                    sig = self.openssl_sign(pem, key, content, *extra, fmt=fmt)
                    if fmt != "SMIME" and detached:
                        sig_path = self.write("sig", sig)
                        res = self.assert_verdict("good", None, "--content", self.write("c", content),
                                                  path=sig_path)
                    else:
                        res = self.assert_verdict("good", sig, "--from", "vera@example.net")
                    self.assertEqual(res["email"], ["vera@example.net"])
                    self.assertEqual(res["trust"], ["anchor"])
                    self.assertEqual(res["fingerprint"], [fingerprint(pem)])

    def test_ecdsa_and_pss_signers(self):
        self.assert_verdict("good", self.sign_mail("vera-ec"))
        res = self.assert_verdict("good", self.sign_mail("vera", "-keyopt", "rsa_padding_mode:pss"))
        self.assertEqual(res["algorithm"], ["rsa-pss sha256"])
        res = self.assert_verdict("good", self.sign_mail("vera-ec", "-md", "sha384"))
        self.assertEqual(res["algorithm"], ["ecdsa sha384"])

    def test_verified_content_is_written_only_when_the_signature_is_intact(self):
        sig = self.sign_mail("vera", "-nodetach")
        out = self.path("content.out")
        res, r = self.smime_verify(sig, "--out", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(out, "rb") as f:
            # openssl cms -sign signs its whole input, canonicalised to CRLF.
            self.assertEqual(f.read(), MAIL.replace(b"\n", b"\r\n"))
        bad = self.path("content.out")
        res, r = self.smime_verify(self.alter_opaque(sig), "--out", bad)
        self.assertEqual(r.returncode, 5)
        self.assertFalse(os.path.exists(bad), "content of a bad message written")

    def test_gpgsm_signed_messages_verify(self):
        gnupghome = os.path.join(self.tmp, "gnupg")
        os.mkdir(gnupghome, 0o700)
        env = dict(os.environ, GNUPGHOME=gnupghome, LC_ALL="C")
        self.addCleanup(subprocess.run, ["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True)
        with open(os.path.join(gnupghome, "gpgsm.conf"), "w") as f:
            f.write("disable-crl-checks\ndisable-policy-checks\n")
        with open(os.path.join(gnupghome, "gpg-agent.conf"), "w") as f:
            f.write("disable-scdaemon\nallow-loopback-pinentry\n")
        pem, key = self.people["vera"]
        root = os.path.join(self.pki.root, "ca.pem")
        p12 = self.path("vera.p12")
        # gpgsm 2.2 reads only the legacy PKCS#12 encryption.
        run(["openssl", "pkcs12", "-export", "-inkey", key, "-in", pem, "-certfile", root, "-passout", "pass:pw",
             "-keypbe", "PBE-SHA1-3DES", "-certpbe", "PBE-SHA1-3DES", "-macalg", "sha1", "-out", p12])
        gpg = ["gpgsm", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0"]
        run(gpg + ["--import", p12], input=b"pw\n", env=env)
        fpr = run(["openssl", "x509", "-in", root, "-noout", "-fingerprint", "-sha1"], text=True).stdout
        with open(os.path.join(gnupghome, "trustlist.txt"), "w") as f:
            f.write(fpr.strip().split("=", 1)[1] + " S relax\n")
        content = self.write("gpg-content", TEXT)
        for mode in (["--sign"], ["--sign", "--armor"], ["--detach-sign"]):
            with self.subTest(mode=mode):
                out = self.path("gpgsm.sig")
                run(gpg + ["-u", "vera@example.net", "--include-certs", "1", *mode, "-o", out, content],
                    input=b"pw\n", env=env)
                if "--detach-sign" in mode:
                    res = self.assert_verdict("good", None, "--content", content, path=out)
                else:
                    res = self.assert_verdict("good", None, path=out)
                    if "--armor" not in mode:
                        with open(out, "rb") as f:
                            bad = self.write("gpgsm-bad", flip_byte(f.read(), MARKER))
                        self.assert_verdict("bad", None, path=bad, problems=["CONTENT_ALTERED"])
                self.assertEqual(res["email"], ["vera@example.net"])

    def test_signed_by_our_agent_every_key_type_including_ed25519(self):
        for label in ("rsa2048", "p256", "p384", "p521", "ed25519"):
            for args in (["--detached"], [], ["--format", "der"]):
                with self.subTest(key=label, args=args):
                    mail = MAIL.replace(b"vera@example.net", EMAIL[label].encode())
                    sig = self.sign(mail if "der" not in args else TEXT, "--key", EMAIL[label], *args)
                    res = self.assert_verdict("good", sig)
                    self.assertEqual(res["email"], [EMAIL[label]])
                    if label == "ed25519":
                        self.assertEqual(res["algorithm"], ["ed25519 sha512"])
                    if args == ["--detached"]:
                        self.assert_verdict("bad", flip_byte(sig, MARKER), problems=["CONTENT_ALTERED"])

    def test_nss_vectors(self):
        for name in ("alice.dsig.SHA1.multipart.eml", "alice.dsig.SHA256.multipart.eml",
                     "alice.dsig.SHA512.multipart.eml", "alice.sig.SHA256.opaque.eml",
                     "alice.sig.SHA384.opaque.eml"):
            with self.subTest(message=name):
                out = self.path("nss.out")
                res = self.assert_verdict("good", None, "--out", out, path=os.path.join(NSS, name))
                self.assertEqual(res["email"], ["Alice@example.com"])
                want = "890114101c8866a60b597caeb43d45fdd061b67c34aaa0b18be64ffb3faa0bac" if "opaque" in name \
                    else "b26b773cc335859057f335a0ae35feb7ca5ecfa1c789e4e873c6689a62c1f986"
                with open(out, "rb") as f:
                    self.assertEqual(hashlib.sha256(f.read()).hexdigest(), want)
        self.assert_verdict("bad", None, path=os.path.join(NSS, "alice.dsig.SHA256.multipart.bad.eml"),
                            problems=["CONTENT_ALTERED"])
        self.assert_verdict("bad", None, path=os.path.join(NSS, "alice.dsig.SHA256.multipart.mismatch-econtent.eml"),
                            problems=["CONTENT_ALTERED"])

    # ---- each failure by name ----
    def test_altered_content_and_damaged_signature(self):
        opaque = self.sign_mail("vera", "-nodetach")
        res = self.assert_verdict("bad", self.alter_opaque(opaque), problems=["CONTENT_ALTERED"])
        self.assertIn("altered", res["summary"][0])
        sig_der = self.openssl_sign(*self.people["vera"], TEXT, "-nodetach", fmt="DER")
        damaged = bytearray(sig_der)
        damaged[-40] ^= 0x01    # inside the RSA signature value, the last field
        self.assert_verdict("bad", bytes(damaged), problems=["BAD_SIGNATURE"])

    def test_wrong_sender(self):
        sig = self.sign_mail("vera")
        res = self.assert_verdict("untrusted", sig, "--from", "mallory@example.net", problems=["FROM_MISMATCH"])
        self.assertIn("mallory@example.net", res["status"][0])
        # The message's own From header is checked when --from is absent.
        forged = self.sign_mail("vera", content=MAIL.replace(b"From: Vera <vera@example.net>",
                                                             b"From: Boss <boss@example.net>"))
        # openssl keeps From inside the signed part; the outer From is what a reader sees.
        outer = b"From: Boss <boss@example.net>\n" + forged
        self.assert_verdict("untrusted", outer, problems=["FROM_MISMATCH"])

    def test_expired_signer(self):
        res = self.assert_verdict("untrusted", self.sign_mail("old"), "--from", "old@example.net",
                                  problems=["EXPIRED"])
        self.assertIn("expired on 2021-01-01", res["status"][0])

    def test_revoked_signer(self):
        res = self.assert_verdict("untrusted", self.sign_mail("rex"), problems=["REVOKED"])
        self.assertIn("revoked", res["status"][0])

    def test_signing_not_allowed_by_the_certificate(self):
        self.assert_verdict("good", self.sign_mail("signonly"), "--from", "signonly@example.net")
        self.assert_verdict("untrusted", self.sign_mail("encronly"), "--from", "encronly@example.net",
                            problems=["KEY_USAGE"])

    def test_untrusted_self_signed_then_trusted_then_distrusted(self):
        sig = self.sign_mail(self.ursula)
        res = self.assert_verdict("untrusted", sig, "--from", "ursula@example.net", problems=["UNTRUSTED"])
        self.assertIn("smimectl trust", res["status"][0])
        r = self.ctl("trust", fingerprint(self.ursula[0]))
        self.assertEqual(r.returncode, 0, r.stderr)   # harvested by the verify above
        res = self.assert_verdict("good", sig, "--from", "ursula@example.net")
        self.assertEqual(res["trust"], ["trusted-by-you"])
        r = self.ctl("distrust", self.ursula[0])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assert_verdict("untrusted", sig, "--from", "ursula@example.net", problems=["DISTRUSTED"])

    def test_missing_chain_then_imported_intermediate(self):
        sig = self.sign_mail(self.ivan)      # only ivan's certificate, not the sub CA's
        res = self.assert_verdict("untrusted", sig, "--from", "ivan@example.net", problems=["CHAIN_INCOMPLETE"])
        self.assertIn("Verify Test Sub CA", res["status"][0])
        with_chain = self.sign_mail(self.ivan, certfile=os.path.join(self.pki.sub, "ca.pem"))
        self.assert_verdict("good", with_chain, "--from", "ivan@example.net")
        r = self.ctl("import", os.path.join(self.pki.sub, "ca.pem"))
        self.assertEqual(r.returncode, 0, r.stderr)
        res = self.assert_verdict("good", sig, "--from", "ivan@example.net")
        self.assertEqual(len(res["chain"]), 3)

    def test_distrusting_a_ca_distrusts_what_it_issued(self):
        sig = self.sign_mail("vera")
        root = os.path.join(self.pki.root, "ca.pem")
        self.assertEqual(self.ctl("distrust", root).returncode, 0)
        try:
            self.assert_verdict("untrusted", sig, problems=["DISTRUSTED"])
        finally:
            self.assertEqual(self.ctl("untrust", root).returncode, 0)
        self.assert_verdict("good", sig)

    # ---- gateways ----
    def clear_signed_8bit(self):
        entity = ("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
                  "Grüße aus Köln,\nVera " + MARKER.decode() + "\n").encode()
        mail = b"From: Vera <vera@example.net>\nSubject: x\n" + entity
        sig = self.sign_mail("vera", content=mail, )
        return sig

    def test_gateway_rewrites_are_explained(self):
        sig = self.clear_signed_8bit()
        self.assert_verdict("good", sig)
        crlf = sig.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        part, _ = multipart_parts(crlf)
        # Quoted-printable re-encoding of the signed part.
        head, body = part.split(b"\r\n\r\n", 1)
        qp = head.replace(b"8bit", b"quoted-printable") + b"\r\n\r\n" + \
            body.replace("ü".encode(), b"=C3=BC").replace("ß".encode(), b"=C3=9F").replace("ö".encode(), b"=C3=B6")
        res = self.assert_verdict("bad", crlf.replace(part, qp), problems=["CONTENT_ALTERED"])
        self.assertTrue(any("quoted-printable" in h for h in res["hint"]), res)
        # Trailing whitespace added to a line.
        ws = crlf.replace(b"Vera " + MARKER + b"\r\n", b"Vera " + MARKER + b"   \r\n")
        res = self.assert_verdict("bad", ws, problems=["CONTENT_ALTERED"])
        self.assertTrue(any("trailing" in h for h in res["hint"]), res)
        # A word changed: no rewrite explains it.
        res = self.assert_verdict("bad", crlf.replace(b"Vera " + MARKER, b"Vera XERIFY-MARKER-0123456789"),
                                  problems=["CONTENT_ALTERED"])
        self.assertTrue(any("changed after it was signed" in h for h in res["hint"]), res)

    def test_mail_saved_with_lf_line_ends_verifies(self):
        sig = self.clear_signed_8bit().replace(b"\r\n", b"\n")
        res = self.assert_verdict("good", sig)
        self.assertTrue(any("CRLF" in h for h in res["hint"]), res)

    # ---- address book side effects and the protocol ----
    def test_good_signers_are_harvested_with_their_capabilities(self):
        pem, key = self.pki.person("hanna", "hanna@example.net")
        der = signed_with_caps(pem, key, TEXT, ["aes256-gcm", "aes256-cbc", "rsaes-oaep"], self.work)
        self.assert_verdict("good", der)
        r = self.ctl("certs", "hanna@example.net")
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.decode()
        self.assertIn(fingerprint(pem), out)
        self.assertRegex(out, r"caps\s+aes-256-gcm, aes-256-cbc, rsaes-oaep")
        self.assertIn("harvested", out)
        # A bad signature harvests nothing.
        pem2, key2 = self.pki.person("ingo", "ingo@example.net")
        der2 = signed_with_caps(pem2, key2, TEXT, ["aes256-cbc"], self.work)
        self.assert_verdict("bad", flip_byte(der2, MARKER), problems=["CONTENT_ALTERED"])
        self.assertNotIn(fingerprint(pem2), self.ctl("certs").stdout.decode())

    def test_raw_protocol_result_fields(self):
        sig = self.sign_mail("old")
        with self.connect() as c:
            done = c.verify(io.BytesIO(sig), io.BytesIO(), FROM="old@example.net", NO_CONTENT=1)
            self.assertEqual(smime_proto.field(done, "VERDICT"), "untrusted")
            (signer,) = [v for n, v in done if n == "SIGNER"]
            self.assertIn(("PROBLEM", "EXPIRED"), signer)
            self.assertEqual(smime_proto.field(signer, "SIG_ALG"), "rsa-pkcs1-v1.5")
            self.assertEqual(smime_proto.field(signer, "FINGERPRINT"), fingerprint(self.people["old"][0]))
            self.assertTrue(smime_proto.field(signer, "SIGNING_TIME"))
            # The same connection serves a detached DER signature next.
            sig = self.openssl_sign(*self.people["vera"], TEXT, "-binary", fmt="DER")
            out = io.BytesIO()
            done = c.verify(io.BytesIO(TEXT), out, SIGNATURE=sig)
            self.assertEqual(smime_proto.field(done, "VERDICT"), "good")
            self.assertEqual(out.getvalue(), TEXT)

    def test_large_clear_signed_message_verifies_in_bounded_memory(self):
        """96 MiB of content: the agent spools it to a file, so its peak RSS
        stays far below the message size (also under ASan, which peaks near
        45 MB for the agent itself)."""
        size = 96 * 1024 * 1024
        sparse = self.path("zeros")
        with open(sparse, "wb") as f:
            f.truncate(size)
        signed = self.path("big.eml")
        r = self.ctl("sign", "--key", EMAIL["p256"], "--detached", "--in", sparse, "--out", signed)
        self.assertEqual(r.returncode, 0, r.stderr)
        big = self.start_agent("big")
        r = self.ctl("verify", "--in", signed, agent=big)
        self.assertEqual(r.returncode, 0, r.stderr + r.stdout.decode())
        self.assertIn(b"verdict: good", r.stdout)
        bad = self.path("big-bad.eml")
        with open(signed, "rb") as f, open(bad, "wb") as g:
            data = f.read()
            i = data.index(b"\0" * 64) + 1000
            g.write(data[:i] + b"\1" + data[i + 1:])
        del data
        r = self.ctl("verify", "--in", bad, agent=big)
        self.assertEqual(r.returncode, 5, r.stderr + r.stdout.decode())
        hwm = big.vmhwm_kb()
        print(f"\nverify of {size >> 20} MiB clear-signed: agent peak RSS {hwm / 1024:.1f} MB", flush=True)
        self.assertLess(hwm, 64 * 1024, "the agent's memory grew with the message")
        big.check_exit()

    def test_unusable_input_is_bad_input(self):
        for data, what in ((b"just text\n", "header block"), (b"Subject: x\n\nhello\n", "no Content-Type"),
                           (b"Content-Type: text/plain\n\nhi\n", "not signed")):
            with self.subTest(what=what):
                res, r = self.smime_verify(data)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn("[BAD_INPUT]", r.stderr)
        # A detached signature without its content.
        sig = self.openssl_sign(*self.people["vera"], TEXT, fmt="DER")
        res, r = self.smime_verify(sig)
        self.assertIn("--content", r.stderr)
        self.assert_agent_serves()


if __name__ == "__main__":
    main()
