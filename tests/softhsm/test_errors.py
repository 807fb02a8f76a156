#!/usr/bin/env python3
"""Refusals: each one carries the right ERROR code and a message that says
why, smimectl exits 1 with `[CODE]`, and the same agent signs right after.
Also --out: a result file only on success, never a partial or temp file."""
import io
import os
import re

from harness import EMAIL, AgentTestCase, main, parse_signed_data
import smime_proto


class ErrorTest(AgentTestCase):
    def test_unknown_key_lists_the_available_keys(self):
        msg = self.assert_sign_fails("NO_KEY", "--key", "nobody@example.org")
        self.assertIn("nobody@example.org", msg)
        for email in ("alice@example.org", "bob@example.org", "carol@example.org", "dave@example.org",
                      "erin@example.org"):
            self.assertIn(email, msg, "the message must list the available keys")
        self.assertIn("pkcs11:", msg)
        self.assert_agent_serves()

    def test_key_without_certificate(self):
        msg = self.assert_sign_fails("NO_CERT", "--key", "pkcs11:token=smime-test;object=nocert")
        self.assertIn("nocert", msg)
        self.assertIn("no certificate", msg)
        self.assert_agent_serves()

    def test_expired_certificate(self):
        msg = self.assert_sign_fails("CERT_EXPIRED", "--key", EMAIL["expired"])
        self.assertIn("expired", msg)
        self.assertIn("2021-01-01", msg)
        self.assertIn("Frank Expired", msg)
        self.assert_agent_serves()

    def test_certificate_that_forbids_signing(self):
        msg = self.assert_sign_fails("KEY_USAGE", "--key", EMAIL["encrypt-only"])
        self.assertIn("Grace EncryptOnly", msg)
        self.assertIn("digitalSignature", msg)
        self.assert_agent_serves()

    def test_invalid_pkcs11_uri(self):
        msg = self.assert_sign_fails("UNSUPPORTED", "--key", "pkcs11:%%%")
        self.assertIn("pkcs11:%%%", msg)
        self.assertIn("URI", msg)
        self.assert_agent_serves()

    def test_uri_matching_nothing(self):
        self.assert_sign_fails("NO_KEY", "--key", "pkcs11:token=no-such-token")
        self.assert_agent_serves()

    def test_pss_with_an_ec_key(self):
        msg = self.assert_sign_fails("UNSUPPORTED", "--key", EMAIL["p256"], "--pss")
        self.assertIn("PSS", msg)
        self.assert_agent_serves()

    def test_bad_format_is_a_usage_error_of_smimectl(self):
        r = self.ctl("sign", "--key", EMAIL["rsa2048"], "--format", "xml", input=b"x\n")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--format", r.stderr)
        self.assertEqual(r.stdout, b"")
        # Had smimectl connected, the agent would have logged it before answering HELLO.
        self.assertNotIn(f"pid {r.pid} ", self.agent.log(), "smimectl contacted the agent anyway")

    def test_no_agent_is_exit_3(self):
        env_socket = os.path.join(self.tmp, "no-such-dir", "socket")
        r = self.ctl("--socket", env_socket, "sign", "--key", EMAIL["rsa2048"], input=b"x\n")
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn(env_socket, r.stderr)

    def test_raw_client_unknown_digest(self):
        with self.connect() as c:
            with self.assertRaises(smime_proto.AgentError) as cm:
                c.start_sign(key=EMAIL["rsa2048"], digest="md5")
            self.assertEqual(cm.exception.name, "UNSUPPORTED")
            self.assertIn("md5", cm.exception.message)
            # UNSUPPORTED does not end the connection: it still signs.
            out = io.BytesIO()
            c.sign(io.BytesIO(b"after the refusal\n"), out, key=EMAIL["rsa2048"], format="der")
        self.verify(out.getvalue(), "der", expect_content=b"after the refusal\n")

    def test_raw_client_unknown_format(self):
        # smimectl checks --format itself; other clients rely on the agent.
        with self.connect() as c:
            with self.assertRaises(smime_proto.AgentError) as cm:
                c.start_sign(key=EMAIL["rsa2048"], format="xml")
            self.assertEqual(cm.exception.name, "UNSUPPORTED")
            self.assertIn("xml", cm.exception.message)
            # The ERROR is the whole answer: no READY may follow it, and the
            # connection serves the next request.
            keys = c.keys()
            self.assertEqual(len(keys), 9)
            out = io.BytesIO()
            c.sign(io.BytesIO(b"after the refusal\n"), out, key=EMAIL["rsa2048"], format="der")
        self.verify(out.getvalue(), "der", expect_content=b"after the refusal\n")

    def test_unknown_request_type_is_unsupported_and_keeps_the_connection(self):
        with self.connect() as c:
            c.send(0x55)
            with self.assertRaises(smime_proto.AgentError) as cm:
                c.expect(smime_proto.DONE)
            self.assertEqual(cm.exception.name, "UNSUPPORTED")
            self.assertTrue(c.keys(), "the connection must go on after UNSUPPORTED")

    # ---- --out ----
    def test_out_file_on_success(self):
        d = os.path.join(self.work, "out-ok")
        os.mkdir(d)
        target = os.path.join(d, "signed.p7m")
        r = self.ctl("sign", "--key", EMAIL["p256"], "--format", "der", "--out", target, input=b"to a file\n")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, b"", "with --out nothing goes to stdout")
        self.assertEqual(os.listdir(d), ["signed.p7m"], "a temporary file was left behind")
        with open(target, "rb") as f:
            der = f.read()
        self.verify(der, "der", expect_content=b"to a file\n")
        self.assertEqual(parse_signed_data(der)["certs"], [self.fx.cert_der("p256")])

    def test_out_file_on_failure(self):
        d = os.path.join(self.work, "out-fail")
        os.mkdir(d)
        target = os.path.join(d, "signed.p7m")
        for key, code in (("nobody@example.org", "NO_KEY"), (EMAIL["expired"], "CERT_EXPIRED")):
            with self.subTest(key=key):
                r = self.ctl("sign", "--key", key, "--out", target, input=b"x\n")
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn(f"[{code}]", r.stderr)
                self.assertEqual(os.listdir(d), [], "a result or temporary file was left behind")
        # A failure after output started (header block too long) leaves nothing either.
        big = b"Subject: big\n" + b"X-Filler: " + b"v" * 70000 + b"\n\nbody\n"
        r = self.ctl("sign", "--key", EMAIL["rsa2048"], "--out", target, input=big)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("[BAD_INPUT]", r.stderr)
        self.assertEqual(os.listdir(d), [])

    def test_out_file_failure_keeps_an_existing_file(self):
        d = os.path.join(self.work, "out-keep")
        os.mkdir(d)
        target = os.path.join(d, "signed.eml")
        with open(target, "wb") as f:
            f.write(b"previous result\n")
        r = self.ctl("sign", "--key", "nobody@example.org", "--out", target, input=b"x\n")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(os.listdir(d), ["signed.eml"])
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"previous result\n")
        self.assertTrue(re.search(r"\[NO_KEY\]", r.stderr))


if __name__ == "__main__":
    main()
