#!/usr/bin/env python3
"""The PIN cache policy: a login is reused while the policy allows and then
logged out (idle time, maximum lifetime), separately for signing and
decryption and per key; LOGIN unlocks ahead of time and LOCK logs out at
once; STATUS says when each cached login expires; a request that holds the
login is not cut off by the expiry. Each test starts agents of its own
(every agent process has its own login state) with short timeouts."""
import io
import os
import subprocess
import time

from harness import EMAIL, PIN, TOKEN, AgentTestCase, main, run
import smime_proto
from smime_proto import AgentError, field

WRONG_PIN = "7654-wrong"


class CacheTest(AgentTestCase):
    AGENT_ARGS = ()  # the base agent has no PIN file and the default policy

    def agent_with(self, name, conf):
        path = os.path.join(self.tmp, name + ".conf")
        with open(path, "w") as f:
            f.write(conf)
        return self.start_agent(name, ["--config", path])

    def token(self, agent, c=None):
        def get(c):
            tokens = [dict(g) for n, g in c.status() if n == "TOKEN"]
            (t,) = [t for t in tokens if t["TOKEN_LABEL"] == TOKEN]
            return t
        if c:
            return get(c)
        with self.connect(agent) as c:
            return get(c)

    def sign_asks(self, agent, key=EMAIL["rsa2048"], pin=PIN, c=None):
        """Signs once; True if the agent asked for a PIN (which is then given)."""
        asked = []

        def answer(f):
            asked.append(f)
            return pin

        def go(c):
            c.start_sign(key=key, format="der", pin=answer)
            done = c.stream(io.BytesIO(b"cache\n"), io.BytesIO())
            self.assertEqual(field(done, "BYTES_IN"), 6)
        if c:
            go(c)
        else:
            with self.connect(agent, interactive=True) as c2:
                go(c2)
        return bool(asked)

    def encrypt_to(self, label, data=b"secret content\n"):
        src = self.write("plain", data)
        out = src + ".p7m"
        run(["openssl", "cms", "-encrypt", "-binary", "-aes-256-cbc", "-outform", "DER", "-in", src, "-out", out,
             self.fx.cert(label)])
        with open(out, "rb") as f:
            return f.read()

    def decrypt_asks(self, agent, der, pin=PIN):
        asked = []

        def answer(f):
            asked.append(f)
            return pin

        out = io.BytesIO()
        with self.connect(agent, interactive=True) as c:
            c.decrypt(io.BytesIO(der), out, pin=answer)
        return bool(asked), out.getvalue()

    def wait_logged_out(self, agent, within):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.token(agent)["LOGGED_IN"] == 0:
                return time.monotonic()
            time.sleep(0.1)
        self.fail(f"token still logged in {within} s later: {self.token(agent)}")

    def test_default_policy_is_600_seconds_idle(self):
        agent = self.agent_with("default", "")
        self.assertTrue(self.sign_asks(agent))
        t = self.token(agent)
        self.assertEqual(t["LOGGED_IN"], 1)
        self.assertAlmostEqual(t["LOGIN_EXPIRES"], time.time() + 600, delta=5)
        self.assertEqual(t["SIGN_EXPIRES"], t["LOGIN_EXPIRES"])
        self.assertIn("600 s idle", t["LOGIN_POLICY"])
        self.assertFalse(self.sign_asks(agent), "asked for the PIN again within the idle time")

    def test_idle_expiry_logs_out_and_the_next_request_asks(self):
        agent = self.agent_with("idle", "cache-idle = 2\n")
        self.assertTrue(self.sign_asks(agent))
        t0 = time.monotonic()
        t = self.token(agent)
        self.assertEqual(t["LOGGED_IN"], 1)
        self.assertAlmostEqual(t["LOGIN_EXPIRES"], time.time() + 2, delta=1.5)
        # Use within the idle time keeps it: two signatures 1 s apart, no PIN.
        time.sleep(1)
        self.assertFalse(self.sign_asks(agent))
        time.sleep(1)
        self.assertFalse(self.sign_asks(agent))
        used = time.monotonic()
        gone = self.wait_logged_out(agent, 6)
        self.assertGreaterEqual(gone - used, 1.5, "logged out before the idle time")
        self.assertGreater(gone - t0, 3.5, "the uses did not extend the login")
        self.assertIn("its cached login expired", agent.log())
        # A client that cannot answer gets PIN_REQUIRED, one that can is asked.
        with self.connect(agent, interactive=False) as c:
            with self.assertRaises(AgentError) as cm:
                c.start_sign(key=EMAIL["rsa2048"], format="der")
            self.assertEqual(cm.exception.name, "PIN_REQUIRED")
        self.assertTrue(self.sign_asks(agent))

    def test_lifetime_ends_a_login_in_use(self):
        agent = self.agent_with("lifetime", "cache-idle = 600\ncache-lifetime = 3\n")
        self.assertTrue(self.sign_asks(agent))
        start = time.monotonic()
        asked_at = None
        while time.monotonic() - start < 8:
            time.sleep(0.5)
            if self.sign_asks(agent):
                asked_at = time.monotonic() - start
                break
        self.assertIsNotNone(asked_at, "never asked again although the lifetime is 3 s")
        self.assertGreater(asked_at, 2.5)
        self.assertIn("3 s after the login", self.token(agent)["LOGIN_POLICY"])

    def test_a_request_holding_the_login_is_not_cut_off(self):
        agent = self.agent_with("hold", "cache-idle = 1\n")
        with self.connect(agent, interactive=True) as c:
            c.start_sign(key=EMAIL["p256"], format="der", pin=lambda f: PIN)
            time.sleep(2.5)  # longer than the idle time, inside the request
            self.assertEqual(self.token(agent)["LOGGED_IN"], 1, "logged out under a running request")
            out = io.BytesIO()
            done = c.stream(io.BytesIO(b"slow client\n"), out)
            self.assertEqual(field(done, "BYTES_IN"), 12)
        self.verify(out.getvalue(), "der", expect_content=b"slow client\n")
        self.wait_logged_out(agent, 4)

    def test_separate_policies_for_signing_and_decryption(self):
        agent = self.agent_with("split", "sign-cache-idle = 600\ndecrypt-cache-idle = ask\n")
        der = self.encrypt_to("rsa2048")
        self.assertTrue(self.sign_asks(agent))
        self.assertFalse(self.sign_asks(agent))
        t = self.token(agent)
        self.assertIn("decrypt: ask for the PIN every time", t["LOGIN_POLICY"])
        # Logged in for signing, but decryption asks every time ...
        asked, out = self.decrypt_asks(agent, der)
        self.assertTrue(asked, "decryption reused the cached login")
        self.assertEqual(out, b"secret content\n")
        asked, _ = self.decrypt_asks(agent, der)
        self.assertTrue(asked, "the second decryption reused the login")
        # ... and signing still reuses it.
        self.assertFalse(self.sign_asks(agent))
        # A wrong PIN for decryption is not retried, and is checked for real
        # (the token was logged in: the agent logged out first).
        with self.assertRaises(AgentError) as cm:
            self.decrypt_asks(agent, der, pin=WRONG_PIN)
        self.assertEqual(cm.exception.name, "PIN_INCORRECT")
        self.assertNotIn(WRONG_PIN, agent.log())
        self.assertEqual(self.token(agent)["LOGGED_IN"], 0)
        self.assertTrue(self.sign_asks(agent))

    def test_ask_every_time_for_one_key(self):
        agent = self.agent_with("perkey", "[key pkcs11:token=smime-test;object=p256]\nsign-cache-idle = ask\n")
        self.assertTrue(self.sign_asks(agent, EMAIL["rsa2048"]))
        self.assertFalse(self.sign_asks(agent, EMAIL["rsa2048"]))
        self.assertTrue(self.sign_asks(agent, EMAIL["p256"]), "the ask-every-time key did not ask")
        self.assertTrue(self.sign_asks(agent, EMAIL["p256"]), "the ask-every-time key did not ask twice")
        self.assertFalse(self.sign_asks(agent, EMAIL["p384"]))

    def test_token_section_overrides_global(self):
        agent = self.agent_with("section", "cache-idle = 600\n[token pkcs11:token=smime-test]\ncache-idle = 2\n")
        self.assertTrue(self.sign_asks(agent))
        self.assertAlmostEqual(self.token(agent)["LOGIN_EXPIRES"], time.time() + 2, delta=1.5)
        self.wait_logged_out(agent, 6)

    def test_login_ahead_and_lock(self):
        agent = self.agent_with("lock", "")
        asked = []
        with self.connect(agent, interactive=True) as c:
            done = c.login(pin=lambda f: asked.append(f) or PIN)
        self.assertEqual(len(asked), 1)
        self.assertEqual(field(asked[0], "TOKEN_LABEL"), TOKEN)
        (t,) = [dict(g) for n, g in done if n == "TOKEN" and dict(g)["TOKEN_LABEL"] == TOKEN]
        self.assertEqual(t["LOGGED_IN"], 1)
        self.assertGreater(t["LOGIN_EXPIRES"], time.time())
        # A client that cannot answer a PIN now signs.
        der = self.raw_sign(b"after login\n", agent=agent, key=EMAIL["p384"], format="der")
        self.verify(der, "der", expect_content=b"after login\n")
        # LOGIN again asks nothing.
        with self.connect(agent, interactive=True) as c:
            c.login(key="pkcs11:token=smime-test", pin=lambda f: self.fail("asked for a PIN while logged in"))
        # LOCK: logged out at once, the next request needs the PIN.
        with self.connect(agent) as c:
            done = c.lock()
            self.assertEqual(field(done, "LOGGED_OUT"), 1)
            self.assertEqual(self.token(agent, c)["LOGGED_IN"], 0)
            with self.assertRaises(AgentError) as cm:
                c.start_sign(key=EMAIL["p384"], format="der")
            self.assertEqual(cm.exception.name, "PIN_REQUIRED")
            self.assertEqual(field(c.lock(), "LOGGED_OUT"), 0)
            with self.assertRaises(AgentError) as cm:
                c.lock(key="pkcs11:token=no-such-token")
            self.assertEqual(cm.exception.name, "NO_KEY")
        self.assertIn("locked token 'smime-test'", agent.log())
        # LOGIN by e-mail address; a cancelled PIN is CANCELLED.
        with self.connect(agent, interactive=True) as c:
            with self.assertRaises(AgentError) as cm:
                c.login(key=EMAIL["rsa2048"], pin=lambda f: None)
            self.assertEqual(cm.exception.name, "CANCELLED")
            c.login(key=EMAIL["rsa2048"], pin=lambda f: PIN)
            self.assertEqual(self.token(agent, c)["LOGGED_IN"], 1)

    # ---- smimectl ----
    def test_smimectl_login_status_lock(self):
        agent = self.agent_with("ctl", "cache-idle = 300\n")
        rc, screen, _ = self.smimectl_on_a_pty(agent, ["login"], PIN.encode() + b"\n")
        self.assertEqual(rc, 0, screen)
        self.assertIn(f"PIN for token '{TOKEN}'", screen)
        self.assertNotIn(PIN + "\r", screen, "the PIN was echoed")
        self.assertIn("logged in", screen)
        r = self.ctl("status", agent=agent)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.decode()
        self.assertIn("cached login expires", out)
        self.assertRegex(out, r"\(in (29\d|300) s\)")  # 300 s, give or take a few
        self.assertIn("PIN cache: sign and decrypt: log out after 300 s idle", out)
        # Without a terminal: signs with the cached login.
        self.sign(b"x\n", "--key", EMAIL["rsa2048"], agent=agent)
        r = self.ctl("lock", agent=agent)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("logged out of 1 token(s)", r.stdout.decode())
        self.assert_sign_fails("PIN_REQUIRED", "--key", EMAIL["rsa2048"], agent=agent)
        r = self.ctl("status", agent=agent)
        self.assertNotIn("cached login expires", r.stdout.decode())
        # login without a terminal cannot ask.
        r = self.ctl("login", agent=agent)
        self.assertEqual(r.returncode, 1)
        self.assertIn("[PIN_REQUIRED]", r.stderr)
        r = self.ctl("login", "--token", "pkcs11:token=nope", agent=agent)
        self.assertEqual(r.returncode, 1)
        self.assertIn("[NO_KEY]", r.stderr)

    def test_pin_from_a_systemd_credential_per_token(self):
        creds = os.path.join(self.tmp, "credentials")
        os.makedirs(creds, exist_ok=True)
        with open(os.path.join(creds, "smime-test-pin"), "w") as f:
            f.write(PIN + "\n")
        conf = "[token pkcs11:token=smime-test]\npin-credential = smime-test-pin\n"
        # Without $CREDENTIALS_DIRECTORY the error says what is missing.
        agent = self.agent_with("nocred", conf)
        msg = self.assert_sign_fails("PIN_REQUIRED", "--key", EMAIL["rsa2048"], agent=agent)
        self.assertIn("CREDENTIALS_DIRECTORY", msg)
        self.assertIn("smime-test-pin", msg)
        # With it (as systemd's LoadCredential= sets it), a client that cannot
        # answer NEED_PIN signs.
        saved = dict(self.fx.env)
        self.fx.env["CREDENTIALS_DIRECTORY"] = creds
        try:
            agent = self.agent_with("cred", conf)
        finally:
            self.fx.env.clear()
            self.fx.env.update(saved)
        out = self.sign(b"credential\n", "--key", EMAIL["rsa2048"], "--format", "der", agent=agent)
        self.verify(out, "der", expect_content=b"credential\n")
        self.assertNotIn(PIN + "\n", agent.log())

    def test_bad_policy_configuration_is_refused(self):
        for conf, needle in (("cache-idle = soon\n", "cache-idle must be a number of seconds"),
                             ("[token smime-test]\n", "is not a PKCS#11 URI"),
                             ("[token pkcs11:token=x]\nmodule = /x.so\n", "is not a token or key setting"),
                             ("[key pkcs11:id=%01]\npin-file = /x\n", "belongs in a [token URI] section"),
                             ("[token pkcs11:token=x]\nhotplug-poll = 1\n", "is a global setting"),
                             ("[wallet x]\n", "unknown section")):
            with self.subTest(conf):
                path = os.path.join(self.tmp, "bad.conf")
                with open(path, "w") as f:
                    f.write(conf)
                r = subprocess.run([self.agent_bin, "--config", path, "--socket", os.path.join(self.tmp, "bad.sock")],
                                   capture_output=True, text=True, env=self.fx.env, timeout=60)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn(needle, r.stderr)
                self.assertIn("bad.conf:", r.stderr)


if __name__ == "__main__":
    main()
