#!/usr/bin/env python3
"""smimectl encrypt through the agent: each recipient's certificate is chosen
from the address book (the newest valid one; never an expired, revoked,
untrusted or signing-only one), RSA recipients get OAEP only when all of
them advertise it, EC recipients get ECDH, AES-256-GCM only when every
recipient can read it; any failing recipient stops everything and every
failure is named. Every message decrypts with `openssl cms -decrypt` and
each recipient's software key; the sender's own certificate is a recipient
unless --no-self."""
import io
import os
import re
import subprocess

from harness import EMAIL, run, sanitizer_env
from pki import PkiTestCase, cert_der, decrypt, fingerprint, main, signed_with_caps
import smime_proto

TEXT = b"Confidential: the numbers for Q3.\nSecond line.\n"
MAIL = b"From: Alice <alice@example.org>\nTo: Bob\nSubject: numbers\n\n" + TEXT


class EncryptTest(PkiTestCase):
    PEOPLE = (
        ("bob-old", "bob@example.net", {"start": "abs:20200101000000Z", "end": "abs:20210101000000Z"}),
        ("bob-new", "bob@example.net", {}),
        ("carl", "carl@example.net", {}),
        ("dora", "dora@example.net", {"key": "p256"}),
        ("pete", "pete@example.net", {"key": "p384"}),
        ("sam", "sam@example.net", {"usage": "sign"}),
        ("nina", "nina@example.net", {}),
        ("olga", "olga@example.net", {}),
        ("otto", "otto@example.net", {}),
        ("gina", "gina@example.net", {}),
    )
    REVOKED = ("carl",)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.ursula = cls.pki.self_signed("ursula", "ursula@example.net")
        # The address book learns certificates and capabilities as a mail
        # client does: from signed messages (and imports).
        caps = {"nina": ["aes128-gcm"], "olga": ["aes256-gcm", "aes256-cbc", "rsaes-oaep"],
                "otto": ["aes256-gcm", "aes256-cbc", "rsaes-oaep"], "gina": ["aes256-gcm", "aes128-cbc"],
                "dora": ["aes256-gcm", "aes256-cbc"], "pete": ["aes256-gcm", "aes256-cbc"]}
        for name, (pem, key) in cls.people.items():
            if name in caps:
                msg = signed_with_caps(pem, key, b"hello\n", caps[name], cls.work, ec=name in ("dora", "pete"))
            else:
                msg = cert_der(pem)
            r = cls._ctl_class("import", input=msg)
            if r.returncode != 0:
                raise AssertionError(f"import of {name} failed: {r.stderr}")
        r = cls._ctl_class("import", cls.ursula[0])
        if r.returncode != 0:
            raise AssertionError(r.stderr)

    @classmethod
    def _ctl_class(cls, *args, input=None):
        env = sanitizer_env(cls.fx.env) if cls.sanitize else dict(cls.fx.env)
        env["SMIME_AGENT_SOCKET"] = cls.agent.socket
        return subprocess.run([cls.ctl_bin, *args], input=input, capture_output=True, env=env, timeout=120)

    def key_of(self, name):
        return self.people[name] if name in self.people else self.ursula

    def assert_decrypts(self, path, names, plain=None, inform="SMIME"):
        for name in names:
            pem, key = self.key_of(name)
            rc, out, err = decrypt(path, pem, key, inform)
            self.assertEqual(rc, 0, f"{name} cannot decrypt: {err}")
            if plain is not None:
                self.assertEqual(out.replace(b"\r\n", b"\n"), plain)

    def printed(self, path, inform="SMIME"):
        return run(["openssl", "cms", "-cmsout", "-print", "-in", path, "-inform", inform], text=True).stdout

    # ---- choosing certificates ----
    def test_the_newer_valid_certificate_wins_over_the_expired_one(self):
        out, err = self.encrypt_ok(MAIL, "-r", "bob@example.net", "--no-self")
        self.assertIn(fingerprint(self.people["bob-new"][0])[:16], err)
        self.assert_decrypts(out, ["bob-new"], plain=b"Content-Type: text/plain\n\n" + TEXT)
        rc, _, _ = decrypt(out, *self.people["bob-old"])
        self.assertNotEqual(rc, 0, "the expired certificate was used")

    def test_only_an_expired_certificate_says_so_with_its_date(self):
        pem, key = self.pki.person("eve", "eve@example.net", start="abs:20200101000000Z", end="abs:20210101000000Z")
        self.assertEqual(self.ctl("import", pem).returncode, 0)
        err = self.encrypt_fails(TEXT, "-r", "eve@example.net", "--no-self")
        self.assertRegex(err, r"eve@example.net: EXPIRED — .*expired on 2021-01-01")

    def test_revoked_untrusted_signing_only_and_unknown_recipients_all_reported(self):
        err = self.encrypt_fails(TEXT, "-r", "carl@example.net", "-r", "ursula@example.net", "-r", "sam@example.net",
                                 "-r", "nobody@example.net", "-r", "bob@example.net", "-r", EMAIL["ed25519"])
        self.assertIn("5 of 7 recipient(s)", err)      # bob and yourself are fine
        self.assertRegex(err, r"carl@example.net: REVOKED — .*revoked")
        self.assertRegex(err, r"ursula@example.net: UNTRUSTED — .*smimectl trust")
        self.assertRegex(err, r"sam@example.net: KEY_USAGE — .*does not allow encryption")
        self.assertRegex(err, r"nobody@example.net: NO_CERT — .*smimectl import")
        self.assertRegex(err, r"erin@example.org: UNSUPPORTED_KEY — .*Ed25519")
        self.assertNotRegex(err, r"bob@example.net:")

    def test_raw_error_names_every_failing_recipient(self):
        with self.connect() as c:
            with self.assertRaises(smime_proto.AgentError) as cm:
                c.encrypt(io.BytesIO(TEXT), io.BytesIO(), recipients=["carl@example.net", "nobody@example.net"],
                          NO_SELF=1)
            self.assertEqual(cm.exception.name, "RECIPIENT")
            failed = [dict(v) for n, v in cm.exception.fields if n == "FAILED"]
            self.assertEqual([(f["RECIPIENT"], f["PROBLEM"]) for f in failed],
                             [("carl@example.net", "REVOKED"), ("nobody@example.net", "NO_CERT")])
            # The connection serves the next request.
            ready, done = c.encrypt(io.BytesIO(TEXT), io.BytesIO(), recipients=["bob@example.net"], NO_SELF=1,
                                    FORMAT="der")
            self.assertEqual(smime_proto.field(done, "BYTES_IN"), len(TEXT))

    def test_untrusted_self_signed_recipient_after_trust(self):
        self.encrypt_fails(TEXT, "-r", "ursula@example.net", "--no-self")
        self.assertEqual(self.ctl("trust", self.ursula[0]).returncode, 0)
        try:
            out, _ = self.encrypt_ok(TEXT, "-r", "ursula@example.net", "--no-self")
            self.assert_decrypts(out, ["ursula"])
        finally:
            self.assertEqual(self.ctl("untrust", self.ursula[0]).returncode, 0)

    def test_certificate_file_as_recipient(self):
        out, err = self.encrypt_ok(TEXT, "-r", self.people["bob-new"][0], "--no-self", "--format", "pem")
        self.assert_decrypts(out, ["bob-new"], plain=TEXT, inform="PEM")
        self.encrypt_fails(TEXT, "-r", self.people["carl"][0], "--no-self")
        err = self.encrypt_fails(TEXT, "-r", self.people["bob-old"][0], "--no-self")
        self.assertIn("EXPIRED", err)

    # ---- algorithms ----
    def test_mixed_rsa_and_ec_recipients(self):
        out, err = self.encrypt_ok(MAIL, "-r", "bob@example.net", "-r", "dora@example.net", "-r", "pete@example.net",
                                   "--no-self")
        self.assertRegex(err, r"dora@example.net: dhSinglePass-stdDH-sha256kdf-scheme")
        self.assertRegex(err, r"bob@example.net: rsa-pkcs1-v1.5")
        self.assert_decrypts(out, ["bob-new", "dora", "pete"])
        printed = self.printed(out)
        self.assertIn("dhSinglePass-stdDH-sha256kdf-scheme", printed)
        self.assertIn("dhSinglePass-stdDH-sha384kdf-scheme", printed)
        self.assertIn("rsaEncryption", printed)

    def test_gcm_only_when_every_recipient_advertises_it(self):
        out, err = self.encrypt_ok(MAIL, "-r", "olga@example.net", "-r", "dora@example.net", "--no-self")
        self.assertIn("AES-256-GCM (AuthEnvelopedData)", err)
        with open(out, "rb") as f:
            self.assertIn(b"smime-type=authEnveloped-data", f.read())
        self.assert_decrypts(out, ["olga", "dora"])
        self.assertIn("aes-256-gcm", self.printed(out))
        # bob's capabilities are unknown: CBC.
        out, err = self.encrypt_ok(MAIL, "-r", "olga@example.net", "-r", "bob@example.net", "--no-self")
        self.assertIn("AES-256-CBC (EnvelopedData)", err)
        self.assertIn("aes-256-cbc", self.printed(out))
        self.assert_decrypts(out, ["olga", "bob-new"])

    def test_no_cipher_common_to_all(self):
        # nina reads only AES-128-GCM; bob is assumed to read AES-CBC only.
        err = self.encrypt_fails(TEXT, "-r", "nina@example.net", "-r", "bob@example.net", "--no-self")
        self.assertRegex(err, r"nina@example.net: NO_COMMON_CIPHER — .*advertises aes-128-gcm")
        self.assertRegex(err, r"bob@example.net: NO_COMMON_CIPHER — .*no capabilities known")
        # gina lists AES-256-GCM and AES-128-CBC: with bob, AES-128-CBC is common.
        out, err = self.encrypt_ok(TEXT, "-r", "gina@example.net", "-r", "bob@example.net", "--no-self")
        self.assertIn("AES-128-CBC", err)
        self.assert_decrypts(out, ["gina", "bob-new"])

    def test_oaep_only_when_every_rsa_recipient_advertises_it(self):
        out, err = self.encrypt_ok(TEXT, "-r", "olga@example.net", "-r", "otto@example.net", "-r", "dora@example.net",
                                   "--no-self", "--format", "der")
        self.assertRegex(err, r"olga@example.net: rsa-oaep")
        printed = self.printed(out, "DER")
        self.assertIn("rsaesOaep", printed)
        self.assertNotIn("rsaEncryption", printed)
        self.assert_decrypts(out, ["olga", "otto", "dora"], plain=TEXT, inform="DER")
        out, err = self.encrypt_ok(TEXT, "-r", "olga@example.net", "-r", "bob@example.net", "--no-self",
                                   "--format", "der")
        self.assertRegex(err, r"olga@example.net: rsa-pkcs1-v1.5")
        self.assertNotIn("rsaesOaep", self.printed(out, "DER"))
        self.assert_decrypts(out, ["olga", "bob-new"], inform="DER")

    # ---- the sender's copy ----
    def test_sender_is_a_recipient_unless_no_self(self):
        alice = run(["openssl", "x509", "-in", self.fx.cert("rsa2048"), "-noout", "-serial"], text=True).stdout
        serial = alice.strip().split("=")[1].lower().lstrip("0")
        out, err = self.encrypt_ok(TEXT, "-r", "bob@example.net", "--format", "der")
        self.assertRegex(err, r"yourself \(alice@example.org\): rsa-pkcs1-v1.5")
        printed = self.printed(out, "DER")
        serials = {int(v, 16) if v.lower().startswith("0x") else int(v)
                   for v in re.findall(r"serialNumber: (\S+)", printed)}
        self.assertIn(int(serial, 16), serials, printed)
        self.assertEqual(len(serials), 2)
        out, err = self.encrypt_ok(TEXT, "-r", "bob@example.net", "--format", "der", "--no-self")
        self.assertNotIn("yourself", err)
        self.assertEqual(self.printed(out, "DER").count("issuerAndSerialNumber"), 1)
        # Another identity as "self": carol's EC certificate.
        out, err = self.encrypt_ok(TEXT, "-r", "bob@example.net", "--key", EMAIL["p256"])
        self.assertRegex(err, r"yourself \(carol@example.org\): dhSinglePass-stdDH-sha256kdf-scheme")
        # An identity whose certificate cannot receive mail is refused, naming --no-self.
        err = self.encrypt_fails(TEXT, "-r", "bob@example.net", "--key", EMAIL["ed25519"])
        self.assertIn("--no-self", err)

    def test_round_trip_through_the_token(self):
        """The sender's copy decrypts on the token with smimectl decrypt (RSA
        and EC identities, EnvelopedData and AuthEnvelopedData, every format)."""
        for key, others, fmt in ((EMAIL["rsa2048"], ["olga@example.net"], "smime"),
                                 (EMAIL["rsa2048"], ["bob@example.net"], "der"),
                                 (EMAIL["p256"], ["dora@example.net"], "pem"),
                                 (EMAIL["p384"], ["bob@example.net", "pete@example.net"], "smime"),
                                 (EMAIL["rsa3072"], ["olga@example.net", "otto@example.net"], "der")):
            with self.subTest(self_key=key, recipients=others, format=fmt):
                args = [a for o in others for a in ("-r", o)]
                data = MAIL if fmt == "smime" else TEXT
                out, err = self.encrypt_ok(data, *args, "--key", key, "--format", fmt)
                if "olga@example.net" in others and "otto@example.net" in others:
                    # Every RSA recipient, the token's own key included, reads OAEP.
                    self.assertRegex(err, r"yourself \(bob@example.org\): rsa-oaep")
                r = self.ctl("decrypt", "--in", out, "--key", key)
                self.assertEqual(r.returncode, 0, r.stderr)
                want = b"Content-Type: text/plain\r\n\r\n" + TEXT.replace(b"\n", b"\r\n") if fmt == "smime" else TEXT
                self.assertEqual(r.stdout, want)

    def test_formats_and_empty_and_large_content(self):
        for fmt, inform in (("der", "DER"), ("pem", "PEM"), ("smime", "SMIME")):
            for data in (b"", TEXT, os.urandom(3 * 1024 * 1024 + 17)):
                with self.subTest(format=fmt, size=len(data)):
                    if fmt == "smime" and data and data != TEXT:
                        continue    # binary content goes in der/pem
                    out, _ = self.encrypt_ok(data, "-r", "olga@example.net", "-r", "dora@example.net", "--no-self",
                                             "--format", fmt)
                    for name in ("olga", "dora"):
                        rc, plain, err = decrypt(out, *self.people[name], inform)
                        self.assertEqual(rc, 0, err)
                        if fmt != "smime":
                            self.assertEqual(plain, data)


if __name__ == "__main__":
    main()
