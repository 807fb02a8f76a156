#!/usr/bin/env python3
"""Refusals: each one carries the right ERROR code and a message that says
why, smimectl exits 1 with `[CODE]`, and the same agent signs right after.
Also --out: a result file only on success, never a partial or temp file."""
import io
import os
import re
import signal
import subprocess
import time

from harness import EMAIL, AgentTestCase, main, parse_signed_data, run, sanitizer_env, sanitizer_report
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

    def test_ed25519_with_a_digest_other_than_sha512(self):
        for digest in ("sha256", "sha384"):
            with self.subTest(digest=digest):
                msg = self.assert_sign_fails("UNSUPPORTED", "--key", EMAIL["ed25519"], "--digest", digest)
                self.assertIn("SHA-512", msg)
        out = self.sign(b"ed25519\n", "--key", EMAIL["ed25519"], "--digest", "sha512", "--format", "der")
        self.assertEqual(parse_signed_data(out)["certs"], [self.fx.cert_der("ed25519")])
        self.assert_agent_serves()

    def test_no_key_and_no_default_is_ambiguous(self):
        msg = self.assert_sign_fails("AMBIGUOUS_KEY")
        for label in ("rsa2048", "rsa3072", "p256", "p384", "ed25519"):
            self.assertIn(EMAIL[label], msg, "the message must list the candidates")
        self.assertNotIn(EMAIL["expired"], msg, "an identity that cannot sign is no candidate")
        self.assert_agent_serves()

    def test_default_key(self):
        agent = self.start_agent("agent-default-key", ["--pin-file", self.fx.pin_file, "--default-key",
                                                       EMAIL["p256"]])
        try:
            out = self.sign(b"default key\n", "--format", "der", agent=agent)
            self.assertEqual(parse_signed_data(out)["certs"], [self.fx.cert_der("p256")])
            self.verify(out, "der", expect_content=b"default key\n")
            with self.connect(agent) as c:
                defaults = [smime_proto.field(k, "LABEL") for k in c.keys() if smime_proto.field(k, "DEFAULT")]
            self.assertEqual(defaults, ["p256"])
            # An explicit key still wins.
            out = self.sign(b"explicit\n", "--key", EMAIL["rsa3072"], "--format", "der", agent=agent)
            self.assertEqual(parse_signed_data(out)["certs"], [self.fx.cert_der("rsa3072")])
        finally:
            agent.check_exit()

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
            self.assertEqual(len(keys), 11)
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

    def test_out_file_that_cannot_be_renamed_is_a_local_failure(self):
        # The result is complete, but it cannot take the name (a directory
        # with something in it is there): exit 4, as for any local write
        # failure, for each command that writes --out, and no temporary file.
        d = os.path.join(self.work, "out-rename")
        target = os.path.join(d, "result")
        os.makedirs(os.path.join(target, "occupied"))
        plain = self.write("for-rename.txt", b"x\n")
        enc = self.path("for-rename.der")
        run(["openssl", "cms", "-encrypt", "-binary", "-in", plain, "-outform", "DER", "-out", enc, "-aes-256-cbc",
             os.path.join(self.fx.dir, "certs", "rsa2048.pem")])
        for args in (["sign", "--key", EMAIL["p256"], "--format", "der"], ["decrypt", "--in", enc]):
            with self.subTest(cmd=args[0]):
                r = self.ctl(*args, "--out", target, input=b"x\n")
                self.assertEqual(r.returncode, 4, r.stderr)
                self.assertIn(f"cannot write {target}", r.stderr)
                self.assertEqual(sorted(os.listdir(d)), ["result"], "a temporary file was left behind")

    def test_out_file_when_smimectl_is_killed_mid_stream(self):
        d = os.path.join(self.work, "out-killed")
        os.mkdir(d)
        target = os.path.join(d, "signed.p7m")
        env = self.ctl_env()
        with subprocess.Popen([self.ctl_bin, "sign", "--key", EMAIL["rsa2048"], "--format", "der", "--out", target],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True) as p:
            p.stdin.write(b"x" * 300000)  # more than a chunk: the request is streaming
            p.stdin.flush()
            deadline = time.monotonic() + 60
            while not os.listdir(d) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.assertTrue(os.listdir(d)[0].startswith("signed.p7m."), os.listdir(d))
            p.send_signal(signal.SIGTERM)
            p.stdin.close()
            p.wait(timeout=60)
        self.assertEqual(p.returncode, -signal.SIGTERM)
        self.assertEqual(os.listdir(d), [], "the temporary file was left behind")
        self.assert_agent_serves()

    # ---- the agent process ----
    def test_sighup_is_ignored(self):
        os.kill(self.agent.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "SIGHUP" not in self.agent.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIn("SIGHUP ignored", self.agent.log())
        self.assertTrue(os.path.exists(self.agent.socket))
        self.assert_agent_serves()

    def test_idle_agent_stops_cleanly(self):
        # SIGTERM before any request: exit status 0, socket removed, and under
        # the sanitizers no report (check_exit fails on either).
        agent = self.start_agent("agent-idle")
        agent.check_exit()
        self.assertFalse(os.path.exists(agent.socket), "the socket was left behind")

    def test_unknown_setting_in_the_configuration(self):
        conf = os.path.join(self.tmp, "typo.conf")
        with open(conf, "w") as f:
            f.write("pin-flie = /etc/pin\n")
        env = sanitizer_env(self.fx.env) if self.sanitize else self.fx.env
        r = subprocess.run([self.agent_bin, "--socket", os.path.join(self.tmp, "never", "socket"), "--config", conf],
                           capture_output=True, text=True, env=env, timeout=120)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("unknown setting 'pin-flie'", r.stderr)
        self.assertIn(f"{conf}:1", r.stderr)
        self.assertEqual(sanitizer_report(r.stderr), "")

    def test_refuses_a_socket_directory_writable_by_others(self):
        d = os.path.join(self.tmp, "open-dir")
        os.mkdir(d)
        os.chmod(d, 0o777)
        env = sanitizer_env(self.fx.env) if self.sanitize else self.fx.env
        r = subprocess.run([self.agent_bin, "--socket", os.path.join(d, "socket"), "--pin-file", self.fx.pin_file],
                           capture_output=True, text=True, env=env, timeout=120)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("refusing to listen in " + d, r.stderr)
        self.assertEqual(sanitizer_report(r.stderr), "")
        self.assertEqual(os.listdir(d), [])


if __name__ == "__main__":
    main()
