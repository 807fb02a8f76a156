#!/usr/bin/env python3
"""Decryption: messages made in this run by independent tools (openssl cms,
gpgsm) to the fixture's certificates decrypt through smimectl to exactly the
original bytes; every bad message fails with a clear error and leaves no
output file; the agent keeps serving."""
import hashlib
import io
import os
import re
import subprocess

from harness import EMAIL, AgentTestCase, main, run
import smime_proto

# Content with every byte value, CR, LF and CRLF, and no final newline: the
# output must be these bytes exactly.
CONTENT = (b"Content-Type: application/octet-stream\r\n\r\n" + bytes(range(256)) * 3 +
           b"\nlf\r\ncrlf\rcr" + b"tail without newline")
TEXT = b"Content-Type: text/plain\r\n\r\nThis is a test message to the token.\r\n"


class DecryptTest(AgentTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.content = os.path.join(cls.tmp, "content.bin")
        with open(cls.content, "wb") as f:
            f.write(CONTENT)
        # Software recipients that are not on any token, issued by a CA of
        # this test (not the fixture's).
        cls.other = os.path.join(cls.tmp, "other")
        os.mkdir(cls.other)
        o = cls.other
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{o}/ca.key", "-out", f"{o}/ca.pem", "-subj", "/CN=Other Test CA", "-days", "2"])
        run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", f"{o}/rsa.key"])
        run(["openssl", "pkey", "-in", f"{o}/rsa.key", "-pubout", "-out", f"{o}/rsa.pub"])
        with open(f"{o}/ext.cnf", "w") as f:
            f.write("keyUsage=critical,keyEncipherment\nextendedKeyUsage=emailProtection\n")
        cls.others = []
        for i in range(4):
            run(["openssl", "req", "-new", "-key", f"{o}/rsa.key", "-subj", f"/CN=Other {i}/emailAddress=o{i}@example.net",
                 "-out", f"{o}/r{i}.csr"])
            run(["openssl", "x509", "-req", "-in", f"{o}/r{i}.csr", "-CA", f"{o}/ca.pem", "-CAkey", f"{o}/ca.key",
                 "-set_serial", str(1000 + i), "-days", "2", "-extfile", f"{o}/ext.cnf", "-out", f"{o}/r{i}.pem"])
            cls.others.append(f"{o}/r{i}.pem")

    # ---- helpers ----
    def encrypt(self, recips, cipher="-aes-256-cbc", form="SMIME", keyopts=(), infile=None, extra=()):
        """openssl cms -encrypt to recips (fixture labels or cert paths); returns the message bytes."""
        out = self.path("msg." + form.lower())
        cmd = ["openssl", "cms", "-encrypt", "-binary", "-in", infile or self.content, "-out", out, "-outform", form,
               cipher, *extra]
        for r in recips:
            cmd += ["-recip", r if os.path.sep in r else self.fx.cert(r)]
            cmd += [a for o in keyopts for a in ("-keyopt", o)]
        run(cmd)
        with open(out, "rb") as f:
            return f.read()

    def decrypt(self, msg, *args, expect=CONTENT):
        r = self.ctl("decrypt", "-v", *args, input=msg)
        self.assertEqual(r.returncode, 0, f"smimectl decrypt {' '.join(args)} failed: {r.stderr}")
        self.assertEqual(r.stdout, expect, "decrypted bytes differ from the original")
        return r.stderr

    def assert_decrypt_fails(self, name, msg, *args):
        """smimectl decrypt --out must exit 1 with [name] and leave no file behind."""
        out = self.path("must-not-exist")
        r = self.ctl("decrypt", "--out", out, *args, input=msg)
        self.assertEqual(r.returncode, 1, f"expected exit 1, got {r.returncode}: {r.stderr}")
        m = re.match(r"smimectl: decrypting failed: (.*) \[([A-Z_]+)\]\n", r.stderr, re.S)
        self.assertTrue(m, f"unexpected stderr: {r.stderr!r}")
        self.assertEqual(m.group(2), name, r.stderr)
        self.assertFalse(os.path.exists(out), "an output file was left after a failure")
        leftovers = [f for f in os.listdir(self.work) if f.startswith(os.path.basename(out))]
        self.assertEqual(leftovers, [], "a temporary output file was left behind")
        return m.group(1)

    # ---- independent encrypters, every key type and cipher ----
    def test_openssl_matrix(self):
        cases = [
            # recipient, cipher, output form, keyopts, expected key transport, authenticated
            ("rsa2048", "-aes-128-cbc", "SMIME", (), "rsa-pkcs1-v1.5", 0),
            ("rsa2048", "-aes-192-cbc", "DER", (), "rsa-pkcs1-v1.5", 0),
            ("rsa3072", "-aes-256-cbc", "PEM", ("rsa_padding_mode:oaep",), "rsa-oaep", 0),
            ("rsa3072", "-aes-256-cbc", "DER", ("rsa_padding_mode:oaep", "rsa_oaep_md:sha256"), "rsa-oaep", 0),
            ("rsa2048", "-aes-128-cbc", "SMIME", ("rsa_padding_mode:oaep", "rsa_oaep_md:sha512",
                                                  "rsa_mgf1_md:sha384", "rsa_oaep_label:0123456789abcdef"),
             "rsa-oaep", 0),
            ("rsa2048", "-aes-256-gcm", "SMIME", (), "rsa-pkcs1-v1.5", 1),
            ("rsa3072", "-aes-128-gcm", "DER", ("rsa_padding_mode:oaep", "rsa_oaep_md:sha256"), "rsa-oaep", 1),
            ("rsa2048", "-des3", "SMIME", (), "rsa-pkcs1-v1.5", 0),
            ("p256", "-aes-128-cbc", "SMIME", (), "dhSinglePass-stdDH-sha1kdf-scheme", 0),
            ("p256", "-aes-256-gcm", "PEM", ("ecdh_kdf_md:sha256",), "dhSinglePass-stdDH-sha256kdf-scheme", 1),
            ("p384", "-aes-256-cbc", "DER", ("ecdh_kdf_md:sha384",), "dhSinglePass-stdDH-sha384kdf-scheme", 0),
            ("p384", "-aes-128-gcm", "SMIME", ("ecdh_kdf_md:sha512",), "dhSinglePass-stdDH-sha512kdf-scheme", 1),
            ("p521", "-aes-256-cbc", "SMIME", ("ecdh_kdf_md:sha512",), "dhSinglePass-stdDH-sha512kdf-scheme", 0),
            ("encrypt-only", "-aes-256-cbc", "DER", (), "rsa-pkcs1-v1.5", 0),
        ]
        for label, cipher, form, keyopts, transport, auth in cases:
            with self.subTest(recipient=label, cipher=cipher, form=form, keyopts=keyopts):
                msg = self.encrypt([label], cipher, form, keyopts)
                out = io.BytesIO()
                with self.connect() as c:
                    done = c.decrypt(io.BytesIO(msg), out)
                self.assertEqual(out.getvalue(), CONTENT)
                self.assertEqual(smime_proto.field(done, "KEY_TRANSPORT"), transport)
                self.assertEqual(smime_proto.field(done, "AUTHENTICATED"), auth)
                self.assertEqual(smime_proto.field(done, "CIPHER"), {"-des3": "des-ede3-cbc"}.get(cipher, cipher[1:]))
                self.assertIn(f"object={label};", smime_proto.field(done, "URI"))
                self.assertEqual(smime_proto.field(done, "BYTES_OUT"), len(CONTENT))
                # smimectl too, for the formats a user would hand it
                self.decrypt(msg)

    def test_streamed_ber_with_indefinite_lengths(self):
        # -stream: indefinite lengths and the ciphertext in many OCTET STRING segments
        big = self.write("big.bin", os.urandom(3 * 1024 * 1024 + 17))
        with open(big, "rb") as f:
            data = f.read()
        for label, cipher in (("rsa2048", "-aes-256-cbc"), ("p256", "-aes-256-gcm")):
            with self.subTest(recipient=label, cipher=cipher):
                msg = self.encrypt([label], cipher, "DER", infile=big, extra=("-stream",))
                self.assertEqual(msg[1], 0x80, "expected an indefinite-length encoding from openssl -stream")
                self.decrypt(msg, expect=data)

    def test_subject_key_identifier_recipient(self):
        msg = self.encrypt(["rsa2048"], extra=("-keyid",))
        self.assertIn("alice@example.org", self.decrypt(msg))

    def test_gpgsm_rsa(self):
        msg = self.gpgsm_encrypt("rsa2048")
        self.assertIsNotNone(msg)
        self.decrypt(msg, expect=TEXT)

    def test_gpgsm_ec(self):
        msg = self.gpgsm_encrypt("p256")
        if msg is None:
            # Debian 12's gpgsm 2.2.40 cannot encrypt to EC certificates at
            # all ("ksba_cms_set_enc_val failed: Invalid S-expression", or
            # "Wrong key usage" for keyAgreement); OpenSSL covers ECDH above.
            self.skipTest(f"gpgsm cannot encrypt to an EC certificate here: {self.gpgsm_err.strip()[-200:]}")
        self.decrypt(msg, expect=TEXT)

    def gpgsm_encrypt(self, label):
        home = os.path.join(self.tmp, "gnupg")
        env = dict(os.environ, GNUPGHOME=home, LC_ALL="C")
        if not os.path.isdir(home):
            os.mkdir(home, 0o700)
            with open(os.path.join(home, "gpgsm.conf"), "w") as f:
                f.write("disable-crl-checks\ndisable-policy-checks\n")
            with open(os.path.join(home, "gpg-agent.conf"), "w") as f:
                f.write("disable-scdaemon\n")
            self.addCleanup(subprocess.run, ["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True,
                            timeout=30)
            fpr = run(["openssl", "x509", "-in", self.fx.ca, "-noout", "-fingerprint", "-sha1"], text=True).stdout
            with open(os.path.join(home, "trustlist.txt"), "w") as f:
                f.write(fpr.strip().split("=", 1)[1] + " S relax\n")
            run(["gpgsm", "--batch", "--import", self.fx.ca], env=env)
        run(["gpgsm", "--batch", "--import", self.fx.cert(label)], env=env)
        plain = self.write("plain.txt", TEXT)
        out = self.path("gpgsm.p7m")
        r = run(["gpgsm", "--batch", "--status-fd", "2", "-r", EMAIL[label], "-o", out, "--encrypt", plain], env=env,
                check=False)
        self.gpgsm_err = r.stderr.decode(errors="replace")
        if r.returncode != 0:
            return None
        with open(out, "rb") as f:
            return f.read()

    # ---- many recipients ----
    def test_five_recipients_token_key_third(self):
        msg = self.encrypt([self.others[0], self.others[1], "rsa3072", self.others[2], self.others[3]])
        self.assertIn("Bob RSA3072", self.decrypt(msg))

    def test_recipients_on_the_token_and_a_key_selector(self):
        msg = self.encrypt(["rsa2048", "p384"], cipher="-aes-128-gcm")
        self.assertIn("Dave P384", self.decrypt(msg, "--key", EMAIL["p384"]))
        self.assertIn("Alice RSA2048", self.decrypt(msg, "--key", "pkcs11:token=smime-test;object=rsa2048"))
        text = self.assert_decrypt_fails("NOT_RECIPIENT", msg, "--key", EMAIL["rsa3072"])
        self.assertIn(EMAIL["rsa3072"], text)
        # The recipients, named by the certificates the tokens hold.
        self.assertIn(f"({EMAIL['rsa2048']})", text)
        self.assertIn(f"({EMAIL['p384']})", text)

    def test_thousand_recipients(self):
        # 999 certificates of one software key under distinct issuer/serial
        # pairs, then the token's certificate last.
        o = self.other
        certs = []
        for i in range(999):
            p = f"{o}/m{i}.pem"
            run(["openssl", "x509", "-new", "-force_pubkey", f"{o}/rsa.pub", "-subj", f"/CN=Many {i}",
                 "-CA", f"{o}/ca.pem", "-CAkey", f"{o}/ca.key", "-set_serial", str(5000 + i), "-days", "2",
                 "-out", p], timeout=60)
            certs.append(p)
        msg = self.encrypt(certs + ["p384"], cipher="-aes-256-gcm", form="DER")
        self.assertIn("Dave P384", self.decrypt(msg))
        # Without the token's key: all 999 named in RECIPIENT fields, 20 in the sentence.
        msg = self.encrypt(certs, form="DER")
        with self.connect() as c:
            with self.assertRaises(smime_proto.AgentError) as cm:
                c.decrypt(io.BytesIO(msg), io.BytesIO())
        e = cm.exception
        self.assertEqual(e.name, "NOT_RECIPIENT")
        recips = [v for n, v in e.fields if n == "RECIPIENT"]
        self.assertEqual(len(recips), 999)
        self.assertIn("serial 1388", recips[0])  # 5000, the first
        self.assertIn("and 979 more", e.message)
        self.assert_agent_serves()

    # ---- NSS (Thunderbird) and pyca vectors are in VectorTest below ----

    # ---- refusals ----
    def test_not_a_recipient_lists_the_recipients(self):
        msg = self.encrypt([self.others[0], self.others[1]])
        text = self.assert_decrypt_fails("NOT_RECIPIENT", msg)
        self.assertIn("none of your tokens", text)
        self.assertIn("2 recipients", text)
        self.assertIn("Other Test CA", text)
        self.assertIn("serial 03E8", text)  # 1000
        self.assertIn("serial 03E9", text)
        self.assertNotIn("@example.net", text)
        # Once the address book knows a recipient's certificate, its address is named.
        r = self.ctl("import", self.others[1])
        self.assertEqual(r.returncode, 0, r.stderr)
        text = self.assert_decrypt_fails("NOT_RECIPIENT", msg)
        self.assertIn("serial 03E9 (o1@example.net)", text)
        self.assertNotIn("o0@example.net", text)
        self.assert_agent_serves()

    def test_certificate_without_key_encipherment(self):
        msg = self.encrypt(["sign-only"])
        text = self.assert_decrypt_fails("KEY_USAGE", msg)
        self.assertIn("Ivan SignOnly", text)
        self.assertIn("keyEncipherment", text)

    def test_truncated_message(self):
        msg = self.encrypt(["rsa2048"], form="DER", infile=self.write("p.bin", os.urandom(100000)))
        for cut in (len(msg) // 2, len(msg) - 5, 40):
            with self.subTest(cut=cut):
                text = self.assert_decrypt_fails("BAD_INPUT", msg[:cut])
                self.assertRegex(text, "ends early|truncated")
        pem = self.encrypt(["p256"], form="PEM")
        self.assert_decrypt_fails("BAD_INPUT", pem[:len(pem) // 2])
        self.assert_agent_serves()

    def test_bit_flips_and_tag_tampering(self):
        # CBC: flip the last byte of the next-to-last ciphertext block, which
        # changes the last plaintext byte: the padding no longer checks out.
        msg = bytearray(self.encrypt(["rsa2048"], "-aes-256-cbc", "DER"))
        msg[len(msg) - 17] ^= 0x01
        text = self.assert_decrypt_fails("INTEGRITY", bytes(msg))
        self.assertIn("discard", text)
        # GCM: a flipped ciphertext byte, then a flipped tag byte (the MAC is
        # the message's last 16 bytes).
        msg = self.encrypt(["p256"], "-aes-256-gcm", "DER")
        flipped = bytearray(msg)
        flipped[len(msg) - 19] ^= 0x80
        self.assertIn("authentication", self.assert_decrypt_fails("INTEGRITY", bytes(flipped)))
        tag = bytearray(msg)
        tag[-1] ^= 0x01
        self.assertIn("authentication", self.assert_decrypt_fails("INTEGRITY", bytes(tag)))
        # Through stdout: exit 1 and a warning that the output is not trustworthy.
        r = self.ctl("decrypt", input=bytes(tag))
        self.assertEqual(r.returncode, 1)
        self.assertIn("NOT trustworthy", r.stderr)
        # A flipped byte in the encrypted content key: the token refuses it.
        msg = bytearray(self.encrypt(["rsa2048"], "-aes-256-cbc", "DER"))
        ek = msg.find(bytes.fromhex("04820100"))  # the 256-byte encryptedKey OCTET STRING
        self.assertGreater(ek, 0)
        msg[ek + 4 + 100] ^= 0x01
        self.assertIn("rsa2048", self.assert_decrypt_fails("DECRYPT_FAILED", bytes(msg)))
        self.assert_agent_serves()

    def test_inputs_that_are_not_encrypted_messages(self):
        signed = self.sign(TEXT, "--key", EMAIL["rsa2048"])
        self.assertIn("signed", self.assert_decrypt_fails("BAD_INPUT", signed))
        opaque = self.sign(TEXT, "--key", EMAIL["rsa2048"], "--format", "der")
        self.assertIn("signed", self.assert_decrypt_fails("BAD_INPUT", opaque))
        self.assertIn("empty", self.assert_decrypt_fails("BAD_INPUT", b""))
        text = self.assert_decrypt_fails("BAD_INPUT", b"Subject: hi\r\n\r\nhello\r\n")
        self.assertIn("not an S/MIME encrypted message", text)
        self.assertIn("neither DER, PEM nor a MIME", self.assert_decrypt_fails("BAD_INPUT", b"just some text\n"))
        bad64 = b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n" \
                b"Content-Transfer-Encoding: base64\r\n\r\nMIAG*CSqG\r\n"
        self.assertIn("base64", self.assert_decrypt_fails("BAD_INPUT", bad64))
        self.assertIn("PEM", self.assert_decrypt_fails("BAD_INPUT", b"-----BEGIN CERTIFICATE-----\nAAAA\n"))
        self.assert_agent_serves()

    # ---- round trips ----
    def test_sign_then_encrypt_round_trip(self):
        signed = self.sign(TEXT, "--key", EMAIL["p256"])
        enc = self.encrypt(["rsa2048"], "-aes-256-gcm", infile=self.write("signed.eml", signed))
        back = self.ctl("decrypt", input=enc)
        self.assertEqual(back.returncode, 0, back.stderr)
        self.assertEqual(back.stdout, signed)
        self.verify(back.stdout, "smime")

    def test_sign_encrypt_in_one_pass(self):
        mail = (b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: one pass\r\n\r\n"
                b"signed, then encrypted\r\n")
        out = self.path("se.eml")
        r = self.ctl("sign", "--key", EMAIL["rsa2048"], "--encrypt", "-r", EMAIL["rsa3072"], "--out", out, input=mail)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(out, "rb") as f:
            enc = f.read()
        self.assertIn(b"Subject: one pass", enc, "the outer header stays outside, as a mail client sends it")
        self.assertIn(b"smime-type=authEnveloped-data", enc)
        self.assertNotIn(b"signed, then encrypted", enc)
        # Bob (and, by default, Alice herself) can read it; it holds Alice's signature.
        for key in (EMAIL["rsa3072"], EMAIL["rsa2048"]):
            back = self.ctl("decrypt", "--key", key, input=enc)
            self.assertEqual(back.returncode, 0, back.stderr)
            self.assertIn(b"smime-type=signed-data", back.stdout)
            self.verify(back.stdout, "smime")
        # A failed signature never comes out encrypted, and no file is left.
        r = self.ctl("sign", "--key", "nobody@example.org", "--encrypt", "-r", EMAIL["rsa3072"], "--out", out + "2",
                     input=mail)
        self.assertEqual(r.returncode, 1, r.stderr)
        # Both sides refuse the unknown key (the signer, and encrypt for the
        # sender's own copy); whichever answers first is reported.
        self.assertRegex(r.stderr, r"(?s)(signing failed: .*\[NO_KEY\]|encryption failed: .*nobody@example\.org)")
        self.assertIn("nobody@example.org", r.stderr)
        self.assertFalse(os.path.exists(out + "2"))
        # A recipient that cannot be encrypted to stops the signing too.
        r = self.ctl("sign", "--key", EMAIL["rsa2048"], "--encrypt", "-r", "nobody@example.net", "--out", out + "3",
                     input=mail * 2000)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("encryption failed", r.stderr)
        self.assertIn("nobody@example.net", r.stderr)
        self.assertFalse(os.path.exists(out + "3"))
        self.assertEqual([f for f in os.listdir(self.work) if ".XXXXXX" in f or f.startswith(os.path.basename(out) + "3")],
                         [])
        self.assert_agent_serves()

    def test_keys_shows_who_can_decrypt(self):
        with self.connect() as c:
            keys = {smime_proto.field(k, "LABEL"): [v for n, v in k if n == "USAGE"] for k in c.keys()}
        for label in ("rsa2048", "rsa3072", "p256", "p384", "p521", "encrypt-only"):
            self.assertIn("decrypt", keys[label], label)
        for label in ("sign-only", "ed25519"):
            self.assertNotIn("decrypt", keys[label], label)


class PinTest(AgentTestCase):
    """No PIN file: the agent asks for the PIN in the middle of the stream,
    once it knows which token holds the recipient's key."""
    AGENT_ARGS = ()

    def test_pin_asked_mid_stream_and_cancel(self):
        msg = self.write("m.der", b"")
        run(["openssl", "cms", "-encrypt", "-binary", "-outform", "DER", "-aes-128-gcm", "-in", self.fx.ca,
             "-out", msg, self.fx.cert("p256")])
        with open(msg, "rb") as f:
            msg = f.read()
        with open(self.fx.ca, "rb") as f:
            ca = f.read()
        # Not interactive: PIN_REQUIRED, clear error.
        with self.connect() as c, self.assertRaises(smime_proto.AgentError) as cm:
            c.decrypt(io.BytesIO(msg), io.BytesIO())
        self.assertEqual(cm.exception.name, "PIN_REQUIRED")
        # Cancelled
        asked = []
        with self.connect(interactive=True) as c, self.assertRaises(smime_proto.AgentError) as cm:
            c.decrypt(io.BytesIO(msg), io.BytesIO(), pin=lambda f: asked.append(f) or None)
        self.assertEqual(cm.exception.name, "CANCELLED")
        self.assertEqual(smime_proto.field(asked[0], "TOKEN_LABEL"), "smime-test")
        # Wrong PIN: reported once, not retried.
        asked.clear()
        with self.connect(interactive=True) as c, self.assertRaises(smime_proto.AgentError) as cm:
            c.decrypt(io.BytesIO(msg), io.BytesIO(), pin=lambda f: asked.append(f) or "0000")
        self.assertEqual(cm.exception.name, "PIN_INCORRECT")
        self.assertEqual(len(asked), 1)
        # Right PIN
        out = io.BytesIO()
        with self.connect(interactive=True) as c:
            done = c.decrypt(io.BytesIO(msg), out, pin=lambda f: "1234")
        self.assertEqual(out.getvalue(), ca)
        self.assertEqual(smime_proto.field(done, "AUTHENTICATED"), 1)


class VectorTest(AgentTestCase):
    """Messages made by NSS (Thunderbird) and pyca/cryptography, from
    ../shared/vectors, with their keys imported into a second token."""
    VECTORS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))), "shared", "vectors")

    @classmethod
    def setUpClass(cls):
        if not os.path.isdir(cls.VECTORS):
            raise unittest.SkipTest(f"no vectors at {cls.VECTORS}")
        super().setUpClass()
        cls.agent.check_exit()   # restarted below, once the second token exists
        env = cls.fx.env
        run(["softhsm2-util", "--init-token", "--free", "--label", "vectors", "--pin", "1234", "--so-pin", "5678"],
            env=env)
        tb = os.path.join(cls.VECTORS, "thunderbird-nss")
        keys = [("bob", "01", os.path.join(tb, "Bob.p12")), ("fran", "02", os.path.join(tb, "interop", "Fran.p12")),
                ("fran-ec", "03", os.path.join(tb, "interop", "Fran-ec.p12"))]
        for label, kid, p12 in keys:
            key = os.path.join(cls.tmp, label + ".key")
            crt = os.path.join(cls.tmp, label + ".der")
            run(["openssl", "pkcs12", "-in", p12, "-passin", "pass:nss", "-nocerts", "-nodes", "-out", key])
            pem = run(["openssl", "pkcs12", "-in", p12, "-passin", "pass:nss", "-clcerts", "-nokeys"]).stdout
            run(["openssl", "x509", "-outform", "DER", "-out", crt], input=pem)
            cls.import_key(key, crt, label, kid)
        pyca = os.path.join(cls.VECTORS, "pyca-cryptography")
        crt = os.path.join(cls.tmp, "pyca.der")
        run(["openssl", "x509", "-in", os.path.join(pyca, "certs", "rsa_ca.pem"), "-outform", "DER", "-out", crt])
        cls.import_key(os.path.join(pyca, "keys", "rsa_key.pem"), crt, "pyca", "04")
        cls.agent = cls.start_agent("agent2", cls.AGENT_ARGS)

    @classmethod
    def import_key(cls, key, crt, label, kid):
        # Sensitive and not extractable, as a key generated on a card would be.
        env = cls.fx.env
        p11 = ["pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "vectors", "--login",
               "--pin", "1234"]
        usage = "--usage-derive" if "-ec" in label else "--usage-decrypt"
        run(p11 + ["--write-object", key, "--type", "privkey", "--id", kid, "--label", label, usage, "--sensitive"],
            env=env)
        run(["pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "vectors", "--login",
             "--pin", "1234", "--write-object", crt, "--type", "cert", "--id", kid, "--label", label], env=env)

    def check(self, rel, sha256, expect_key):
        with open(os.path.join(self.VECTORS, rel), "rb") as f:
            msg = f.read()
        r = self.ctl("decrypt", "-v", input=msg)
        self.assertEqual(r.returncode, 0, f"{rel}: {r.stderr}")
        self.assertEqual(hashlib.sha256(r.stdout).hexdigest(), sha256, rel)
        self.assertIn(f"object={expect_key})", r.stderr.replace(";type=private", ""))
        return r.stdout

    def test_thunderbird_messages(self):
        bob = "b26b773cc335859057f335a0ae35feb7ca5ecfa1c789e4e873c6689a62c1f986"
        self.check("thunderbird-nss/alice.env.eml", bob, "bob")
        # Signed, then encrypted: the signed message comes out and verifies.
        for rel in ("thunderbird-nss/alice.sig.SHA256.opaque.env.eml", "thunderbird-nss/alice.dsig.SHA256.multipart.env.eml"):
            with open(os.path.join(self.VECTORS, rel), "rb") as f:
                r = self.ctl("decrypt", input=f.read())
            self.assertEqual(r.returncode, 0, f"{rel}: {r.stderr}")
            signed = self.write("signed.eml", r.stdout)
            v = run(["openssl", "cms", "-verify", "-in", signed, "-CAfile",
                     os.path.join(self.VECTORS, "thunderbird-nss", "TestCA.pem"), "-purpose", "smimesign"], check=False)
            self.assertEqual(v.returncode, 0, v.stderr)

    def test_openssl_interop_messages_for_fran(self):
        fran = "6e918dfc2bf8308870b4191b9400a1dd9bbb3f38893f4f83c30fa651b68937e9"
        for name in ("fran-oaep_ossl.env", "fran-oaep-label_ossl.env", "fran-oaep-sha256hash_ossl.env",
                     "fran-oaep-sha256hash-sha256mgf_ossl.env"):
            with self.subTest(name=name):
                self.check("thunderbird-nss/interop/" + name, fran, "fran")
        for name in ("fran-ec_ossl-aes128-sha256.env", "fran-ec_ossl-aes256-sha512.env"):
            with self.subTest(name=name):
                self.check("thunderbird-nss/interop/" + name, fran, "fran-ec")

    def test_pyca_messages(self):
        self.check("pyca-cryptography/enveloped-rsa-oaep.pem",
                   "315f5bdb76d078c43b8ac0064e4a0164612b1fce77c869345bfc94c75894edd3", "pyca")
        for name in ("enveloped-aes-256-cbc.pem", "enveloped-aes-192-cbc.pem"):
            self.check("pyca-cryptography/" + name,
                       "cfa4d4cfce44758ac0086307620661246bd5cb9a10234768a1530a6b6653edce", "pyca")


import unittest  # noqa: E402  (VectorTest raises unittest.SkipTest)

if __name__ == "__main__":
    main()
