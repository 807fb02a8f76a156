#!/usr/bin/env python3
"""PIN handling with an agent that has no --pin-file: PIN_REQUIRED for a
client that cannot ask, NEED_PIN naming the token for one that can, CANCEL,
a wrong PIN reported and never retried by the agent, the right PIN, and a
token that then stays logged in. Then an agent whose --pin-file is wrong.

The tests run in the order of their names: the token is logged in from
test_3 on. Wrong PINs tried in all: two (SoftHSM does not lock, but a real
token would after three)."""
import io
import os
import time

from harness import EMAIL, PIN, TOKEN, AgentTestCase, main, parse_signed_data
import smime_proto
from smime_proto import AgentError, field

WRONG_PIN = "4711-not-the-pin"  # distinctive, to look for in logs


class PinTest(AgentTestCase):
    AGENT_ARGS = ()  # no --pin-file: the agent must ask

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.serial = cls.fx.token_serial()

    def token_status(self, c):
        tokens = [dict(g) for n, g in c.status() if n == "TOKEN"]
        (t,) = [t for t in tokens if t["TOKEN_LABEL"] == TOKEN]
        return t

    def check_need_pin(self, f):
        self.assertEqual(field(f, "TOKEN_LABEL"), TOKEN)
        self.assertEqual(field(f, "TOKEN_SERIAL"), self.serial)
        self.assertEqual(field(f, "MANUFACTURER"), "SoftHSM project")
        self.assertIn(f"serial={self.serial}", field(f, "URI"))
        self.assertIn(field(f, "PIN_STATE"), ("ok", "count-low", "final-try"))

    def test_1_client_that_cannot_ask_gets_pin_required(self):
        with self.connect(interactive=False) as c:
            self.assertEqual(self.token_status(c)["LOGGED_IN"], 0)
            with self.assertRaises(AgentError) as cm:
                c.start_sign(key=EMAIL["rsa2048"], format="der")
            self.assertEqual(cm.exception.name, "PIN_REQUIRED")
            self.assertIn(TOKEN, cm.exception.message)
            self.assertEqual(self.token_status(c)["LOGGED_IN"], 0)
            # KEYS never asks for a PIN, even from a client that could answer.
        with self.connect(interactive=True) as c:
            self.assertEqual(len(c.keys()), 11)
        # smimectl without a terminal cannot ask either.
        msg = self.assert_sign_fails("PIN_REQUIRED", "--key", EMAIL["p256"])
        self.assertIn(TOKEN, msg)

    def test_2_need_pin_names_the_token_and_cancel_is_cancelled(self):
        asked = []
        with self.connect(interactive=True) as c:
            with self.assertRaises(AgentError) as cm:
                c.start_sign(key=EMAIL["rsa2048"], format="der", pin=lambda f: asked.append(f))  # None: CANCEL
            self.assertEqual(cm.exception.name, "CANCELLED")
            self.assertEqual(len(asked), 1)
            self.check_need_pin(asked[0])
            # The connection goes on, and the token is still not logged in.
            self.assertEqual(self.token_status(c)["LOGGED_IN"], 0)

    def test_2b_need_pin_answered_with_something_else(self):
        for name, mtype, fields in (("DATA", smime_proto.DATA, None),
                                    ("PIN without a PIN field", smime_proto.PIN, [])):
            with self.subTest(name), self.connect(interactive=True) as c:
                c.send(smime_proto.SIGN, [("KEY", EMAIL["rsa2048"])])
                c.expect(smime_proto.NEED_PIN)
                if mtype == smime_proto.DATA:
                    c.send(mtype, data=b"content too early")
                else:
                    c.send(mtype, fields)
                with self.assertRaises(AgentError) as cm:
                    c.expect(smime_proto.READY)
                self.assertEqual(cm.exception.name, "PROTOCOL")
                self.assertIsNone(c.recv(), "the connection must be closed after PROTOCOL")
        with self.connect() as c:
            self.assertEqual(self.token_status(c)["LOGGED_IN"], 0)

    def test_3_wrong_pin_is_not_retried_then_right_pin_then_logged_in(self):
        asked = []

        def answer(pin):
            def f(fields):
                asked.append(fields)
                return pin
            return f

        with self.connect(interactive=True) as c:
            with self.assertRaises(AgentError) as cm:
                c.start_sign(key=EMAIL["rsa2048"], format="der", pin=answer(WRONG_PIN))
            self.assertEqual(cm.exception.name, "PIN_INCORRECT")
            self.assertIn("CKR_PIN_INCORRECT", cm.exception.message)
            self.assertEqual(len(asked), 1, "the agent asked again within one request")
            self.check_need_pin(asked[0])
            self.assertNotIn(WRONG_PIN, self.agent.log(), "the PIN went to the log")

            # The agent did not keep or retry the wrong PIN: the next request asks again.
            c.send(smime_proto.SIGN, [("KEY", EMAIL["rsa2048"]), ("FORMAT", "der")])
            mtype, f = c.expect(smime_proto.NEED_PIN, smime_proto.READY)
            self.assertEqual(mtype, smime_proto.NEED_PIN, "signed without asking for a PIN")
            self.check_need_pin(f)
            c.send(smime_proto.PIN, [("PIN", PIN)])
            c.expect(smime_proto.READY)
            out = io.BytesIO()
            done = c.stream(io.BytesIO(b"signed after the PIN\n"), out)
            self.assertEqual(field(done, "BYTES_IN"), len(b"signed after the PIN\n"))
            self.assertEqual(self.token_status(c)["LOGGED_IN"], 1)
        self.verify(out.getvalue(), "der", expect_content=b"signed after the PIN\n")

        # The token stays logged in: a client that cannot answer a PIN signs now,
        # with every key on the token.
        for label in ("rsa2048", "p384", "ed25519"):
            der = self.raw_sign(b"no PIN needed\n", key=EMAIL[label], format="der")
            self.assertTrue(der)
        self.verify(self.sign(b"no PIN needed\n", "--key", EMAIL["p256"], "--format", "der"), "der",
                    expect_content=b"no PIN needed\n")

    def test_4_pin_file_with_a_wrong_pin(self):
        pin_file = os.path.join(self.tmp, "wrong-pin")
        with open(pin_file, "w") as f:
            f.write(WRONG_PIN + "\n")
        agent = self.start_agent("agent-wrong-pin-file", ["--pin-file", pin_file])
        msg = self.assert_sign_fails("PIN_INCORRECT", "--key", EMAIL["rsa2048"], agent=agent)
        self.assertIn("CKR_PIN_INCORRECT", msg)
        self.assertIn(pin_file, msg)
        self.assertNotIn(WRONG_PIN, agent.log())
        # Not tried again while the file is unchanged (a token would lock).
        msg = self.assert_sign_fails("PIN_INCORRECT", "--key", EMAIL["p256"], agent=agent)
        # Fixed file: the agent tries it and signs.
        tmp = pin_file + ".new"
        with open(tmp, "w") as f:
            f.write(PIN + "\n")
        os.replace(tmp, pin_file)
        out = self.sign(b"pin file fixed\n", "--key", EMAIL["rsa2048"], "--format", "der", agent=agent)
        self.verify(out, "der", expect_content=b"pin file fixed\n")
        agent.check_exit()

    def test_4b_a_client_that_never_answers_is_given_up_on(self):
        conf = os.path.join(self.tmp, "pin-timeout.conf")
        with open(conf, "w") as f:
            f.write("pin-timeout = 2\n")
        agent = self.start_agent("agent-pin-timeout", ("--config", conf))  # not logged in
        with self.connect(agent, interactive=True) as c:
            c.send(smime_proto.SIGN, [("KEY", EMAIL["rsa2048"]), ("FORMAT", "der")])
            c.expect(smime_proto.NEED_PIN)
            t0 = time.monotonic()
            # Meanwhile the agent serves others.
            with self.connect(agent) as other:
                self.assertEqual(len(other.keys()), 11)
            with self.assertRaises(AgentError) as cm:
                c.expect(smime_proto.READY)
            waited = time.monotonic() - t0
            self.assertEqual(cm.exception.name, "PIN_REQUIRED")
            self.assertIn("pin-timeout", cm.exception.message)
            self.assertGreater(waited, 1.0)
            self.assertLess(waited, 30)
            # The connection is closed: an answer now would come out of turn.
            self.assertEqual(c.sock.recv(1), b"")
        # Nothing stuck: a client that answers signs.
        out = io.BytesIO()
        with self.connect(agent, interactive=True) as c:
            c.start_sign(key=EMAIL["rsa2048"], format="der", pin=lambda f: PIN)
            c.stream(io.BytesIO(b"after the timeout\n"), out)
        self.verify(out.getvalue(), "der", expect_content=b"after the timeout\n")
        agent.check_exit()

    def test_5_smimectl_asks_for_the_pin_on_its_terminal(self):
        agent = self.start_agent("agent-tty", ())  # a process of its own: not logged in
        data = self.write("tty-in", b"typed PIN\n")
        out = os.path.join(self.work, "tty-out.p7m")
        args = ["sign", "--key", EMAIL["p256"], "--format", "der", "--in", data, "--out", out]
        # End of file at the prompt cancels.
        rc, screen, typed = self.smimectl_on_a_pty(agent, args, b"\x04")
        self.assertTrue(typed, f"no PIN prompt with echo off: {screen!r}")
        self.assertEqual(rc, 1, screen)
        self.assertIn("[CANCELLED]", screen)
        self.assertFalse(os.path.exists(out))
        # The PIN typed: it is not echoed, and the result verifies.
        rc, screen, typed = self.smimectl_on_a_pty(agent, args, PIN.encode() + b"\n")
        self.assertEqual(rc, 0, screen)
        self.assertIn(f"PIN for token '{TOKEN}'", screen)
        self.assertIn(self.serial, screen)
        self.assertNotIn(PIN, screen, "the PIN was echoed")
        with open(out, "rb") as f:
            der = f.read()
        self.verify(der, "der", expect_content=b"typed PIN\n")
        self.assertEqual(parse_signed_data(der)["certs"], [self.fx.cert_der("p256")])
        agent.check_exit()


if __name__ == "__main__":
    main()
