#!/usr/bin/env python3
"""Tokens with a protected authentication path (PIN pad readers).

No PIN pad reader can exist here, so the agent loads the fixture's SoftHSM
token through tests/softhsm/pinpad.c: a module that forwards to SoftHSM,
reports CKF_PROTECTED_AUTHENTICATION_PATH, refuses any C_Login that carries
a PIN (so a passing test proves the agent sent none) and takes the PIN "typed
on the pad" from the file $PINPAD_FILE, waiting for it to appear; each pad
login adds a line to $PINPAD_FILE.log.

Checked: the agent logs in without a PIN; a client that asked for it in HELLO
(PIN_PAD_NOTICE) is told first (NEED_PIN with PROTECTED_AUTH = 1) and can
cancel; smimectl prints "on the reader's PIN pad"; a wrong PIN typed on the
pad is PIN_INCORRECT, once; a CKA_ALWAYS_AUTHENTICATE key logs in on the pad
for each use.

The tests run in the order of their names and share the agent."""
import io
import os
import threading
import time

from harness import EMAIL, TOKEN, PIN, AgentTestCase, main, run
from smime_proto import AgentError, field

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PAD_KEY = f"pkcs11:token={TOKEN};object=pad-sign"


class PinPadTest(AgentTestCase):
    AGENT_ARGS = ()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        shim = os.environ.get("SMIME_TEST_PINPAD") or os.path.join(os.environ.get("SMIME_BUILD_DIR", "build"),
                                                                     "tests", "test_pinpad.so")
        cls.pad = os.path.join(cls.tmp, "pad")
        cls.fx.env["PINPAD_FILE"] = cls.pad
        cls.fx.env["PINPAD_MODULE"] = MODULE
        # An always-authenticate signing key on the fixture token, with a certificate.
        p11 = ["pkcs11-tool", "--module", MODULE, "--token-label", TOKEN, "--login", "--pin", PIN]
        run(p11 + ["--keypairgen", "--key-type", "rsa:2048", "--id", "20", "--label", "pad-sign", "--usage-sign",
                   "--always-auth"], env=cls.fx.env)
        raw, pub = os.path.join(cls.work, "pad.pub.der"), os.path.join(cls.work, "pad.pub.pem")
        run(p11 + ["--read-object", "--type", "pubkey", "--id", "20", "-o", raw], env=cls.fx.env)
        run(["openssl", "pkey", "-pubin", "-inform", "DER", "-in", raw, "-out", pub])
        ext = os.path.join(cls.work, "pad.ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=emailProtection\n"
                    "subjectAltName=email:pad@example.net\n")
        der = os.path.join(cls.work, "pad.crt.der")
        run(["openssl", "x509", "-new", "-force_pubkey", pub, "-subj", "/CN=Pad Sign", "-CA", cls.fx.ca, "-CAkey",
             os.path.join(cls.fx.dir, "ca", "ca.key"), "-days", "30", "-set_serial", "4242", "-extfile", ext,
             "-outform", "DER", "-out", der])
        run(p11 + ["--write-object", der, "--type", "cert", "--id", "20", "--label", "pad-sign"], env=cls.fx.env)
        cls.padded = cls.start_agent("padded", ["--module", shim])

    # ---- helpers ----
    def type_on_pad(self, pin, delay=0.0):
        """The person at the reader types pin (after delay seconds)."""
        def typing():
            time.sleep(delay)
            with open(self.pad + ".tmp", "w") as f:
                f.write(pin + "\n")
            os.rename(self.pad + ".tmp", self.pad)
        th = threading.Thread(target=typing)
        th.start()
        return th

    def pad_log(self):
        try:
            with open(self.pad + ".log") as f:
                return f.read().split()
        except FileNotFoundError:
            return []

    def sign(self, key=EMAIL["rsa2048"], answer=None, notice=True, data=b"pin pad\n"):
        asked = []

        def pin(f):
            asked.append(f)
            return answer(f) if answer else None

        out = io.BytesIO()
        with self.connect(self.padded, interactive=True, pin_pad_notice=notice) as c:
            c.start_sign(key=key, format="der", pin=pin)
            c.stream(io.BytesIO(data), out, pin)
        self.verify(out.getvalue(), "der", expect_content=data)
        return asked

    def logged_in(self):
        with self.connect(self.padded) as c:
            (t,) = [dict(g) for n, g in c.status() if n == "TOKEN" and dict(g)["TOKEN_LABEL"] == TOKEN]
        return t

    def lock(self):
        with self.connect(self.padded) as c:
            c.lock()

    # ---- tests ----
    def test_1_status_shows_the_pin_pad(self):
        t = self.logged_in()
        self.assertEqual(t["PROTECTED_AUTH"], 1)
        self.assertEqual(t["LOGGED_IN"], 0)

    def test_2_login_on_the_pad_without_a_notice(self):
        # A client that did not ask to be told: no NEED_PIN at all; the
        # login waits for the pad.
        typing = self.type_on_pad(PIN, delay=0.5)
        asked = self.sign(notice=False)
        typing.join()
        self.assertEqual(asked, [])
        self.assertEqual(self.pad_log(), ["user"])
        self.assertEqual(self.logged_in()["LOGGED_IN"], 1)
        self.lock()

    def test_3_a_client_that_asked_is_told_first(self):
        typed = []

        def notice(f):
            self.assertEqual(field(f, "PROTECTED_AUTH"), 1)
            self.assertEqual(field(f, "TOKEN_LABEL"), TOKEN)
            self.assertIsNone(field(f, "CONTEXT_KEY"))
            typed.append(self.type_on_pad(PIN, delay=0.3))
            return ""
        asked = self.sign(answer=notice)
        typed[0].join()
        self.assertEqual(len(asked), 1)
        self.assertEqual(self.pad_log(), ["user", "user"])
        self.lock()

    def test_4_cancel_at_the_notice_makes_no_login(self):
        with self.assertRaises(AgentError) as cm:
            self.sign(answer=lambda f: None)
        self.assertEqual(cm.exception.name, "CANCELLED")
        self.assertEqual(self.pad_log(), ["user", "user"])

    def test_5_wrong_pin_on_the_pad(self):
        typing = self.type_on_pad("0000")
        with self.assertRaises(AgentError) as cm:
            self.sign(notice=False)
        typing.join()
        self.assertEqual(cm.exception.name, "PIN_INCORRECT", cm.exception.message)
        self.assertEqual(self.pad_log(), ["user"] * 3)
        self.assertEqual(self.logged_in()["LOGGED_IN"], 0)

    def test_6_always_authenticate_key_on_the_pad(self):
        # Login on the pad, then the context-specific login on the pad too:
        # the PIN is typed twice, as on a real PIV reader.
        notices = []

        def notice(f):
            notices.append(field(f, "CONTEXT_KEY"))
            self.type_on_pad(PIN).join()
            return ""
        self.sign(key=PAD_KEY, answer=notice)
        self.assertEqual(notices, [None, "pad-sign"])
        self.assertEqual(self.pad_log()[3:], ["user", "context"])
        # Logged in now: only the context-specific login, on the pad.
        notices.clear()
        self.sign(key=PAD_KEY, answer=notice)
        self.assertEqual(notices, ["pad-sign"])
        self.assertEqual(self.pad_log()[5:], ["context"])
        self.lock()

    def test_7_smimectl_says_to_use_the_reader(self):
        data = self.write("in", b"typed on the pad\n")
        out = os.path.join(self.work, "pad-out.p7m")
        typing = self.type_on_pad(PIN, delay=0.5)
        rc, screen, _ = self.smimectl_on_a_pty(
            self.padded, ["sign", "--key", EMAIL["rsa2048"], "--format", "der", "--in", data, "--out", out], b"")
        typing.join()
        self.assertEqual(rc, 0, screen)
        self.assertIn(f"Enter the PIN for token '{TOKEN}'", screen)
        self.assertIn("on the reader's PIN pad", screen)
        with open(out, "rb") as f:
            self.verify(f.read(), "der", expect_content=b"typed on the pad\n")


if __name__ == "__main__":
    main()
