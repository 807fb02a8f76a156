#!/usr/bin/env python3
"""Several tokens, hot-plug and recovery, against SoftHSM while the agent runs.

A second token, smime-two (PIN 4321), holds a key with the same label and
CKA_ID as the fixture's alice key (rsa2048, id 01): URIs choose precisely,
and a PIN is only ever tried on the token it belongs to. Then the fixture
token is taken away (its directory moved out of SoftHSM's token store) and
brought back: requests for it fail with TOKEN_REMOVED meanwhile, the other
token keeps serving, and after the return the next request signs again
without a restart (module re-initialised, sessions and handles new, login
again from the per-token PIN files). Last, the token is deleted and
re-created with softhsm2-util and a new key: the agent finds the new one.

The tests run in the order of their names and share the agents."""
import io
import os
import shutil
import time

from harness import EMAIL, PIN, TOKEN, AgentTestCase, main, parse_signed_data, run
from smime_proto import AgentError, field

TWO = "smime-two"
TWO_PIN = "4321"
SO_PIN = "12345678"
TWO_EMAIL = "two@example.net"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def make_identity(fx, token, pin, label, key_id, cn, email, workdir):
    """A software RSA key imported into token (softhsm2-util) with a certificate
    from the fixture's CA written beside it (pkcs11-tool). Returns the DER."""
    key = os.path.join(workdir, f"{token}-{label}.key")
    run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key])
    ext = os.path.join(workdir, f"{token}-{label}.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation,keyEncipherment\n"
                f"extendedKeyUsage=emailProtection\nsubjectAltName=email:{email}\n")
    csr = key + ".csr"
    run(["openssl", "req", "-new", "-key", key, "-subj", f"/CN={cn}/emailAddress={email}", "-out", csr])
    der = key + ".crt.der"
    run(["openssl", "x509", "-req", "-in", csr, "-CA", fx.ca, "-CAkey", os.path.join(fx.dir, "ca", "ca.key"),
         "-set_serial", str(int.from_bytes(os.urandom(8), "big") >> 1), "-days", "30", "-sha256", "-extfile", ext,
         "-outform", "DER", "-out", der])
    run(["softhsm2-util", "--import", key, "--token", token, "--label", label, "--id", key_id, "--pin", pin],
        env=fx.env)
    run(["pkcs11-tool", "--module", MODULE, "--token-label", token, "--login", "--pin", pin, "--write-object", der,
         "--type", "cert", "--id", key_id, "--label", label], env=fx.env)
    with open(der, "rb") as f:
        return f.read()


def init_token(fx, label, pin):
    run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", pin], env=fx.env)


class HotplugTest(AgentTestCase):
    AGENT_ARGS = ()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tokdir = os.path.join(cls.fx.dir, "tokens")
        (cls.fixture_tokdir,) = os.listdir(cls.tokdir)
        init_token(cls.fx, TWO, TWO_PIN)
        cls.two_cert = make_identity(cls.fx, TWO, TWO_PIN, "rsa2048", "01", "Two RSA", TWO_EMAIL, cls.work)
        # The base agent started before smime-two existed: SoftHSM shows a new
        # token to a running process only after re-initialisation, so these
        # tests use agents started now.
        cls.pins = {}
        for label, pin in ((TOKEN, PIN), (TWO, TWO_PIN)):
            cls.pins[label] = os.path.join(cls.tmp, label + ".pin")
            with open(cls.pins[label], "w") as f:
                f.write(pin + "\n")
        conf = os.path.join(cls.tmp, "headless.conf")
        with open(conf, "w") as f:
            f.write(f"hotplug-poll = 1\n[token pkcs11:token={TOKEN}]\npin-file = {cls.pins[TOKEN]}\n"
                    f"[token pkcs11:token={TWO}]\npin-file = {cls.pins[TWO]}\n")
        cls.headless = cls.start_agent("headless", ["--config", conf])
        cls.asking = cls.start_agent("asking", ())

    def tokens(self, agent):
        with self.connect(agent) as c:
            return [dict(g) for n, g in c.status() if n == "TOKEN"]

    def token(self, agent, label, state=None):
        found = [t for t in self.tokens(agent) if t["TOKEN_LABEL"] == label and (state is None or
                                                                              t.get("TOKEN_STATE") == state)]
        return found[0] if found else None

    def wait_for(self, what, cond, within=30):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(0.2)
        self.fail(f"{what}: not within {within} s")

    def signer_cert(self, agent, key, data=b"which key?\n"):
        with self.connect(agent) as c:
            ready = c.start_sign(key=key, format="der")
            out = io.BytesIO()
            c.stream(io.BytesIO(data), out)
        self.verify(out.getvalue(), "der", expect_content=data)
        return field(ready, "URI"), parse_signed_data(out.getvalue())["certs"][0]

    def test_1_same_labels_on_two_tokens_chosen_by_uri(self):
        with self.connect(self.headless) as c:
            keys = [dict(k) for k in c.keys()]
        alike = sorted(k["TOKEN_LABEL"] for k in keys if k.get("LABEL") == "rsa2048")
        self.assertEqual(alike, [TOKEN, TWO])
        uri, cert = self.signer_cert(self.headless, f"pkcs11:token={TWO};object=rsa2048")
        self.assertIn(f"token={TWO}", uri)
        self.assertEqual(cert, self.two_cert)
        uri, cert = self.signer_cert(self.headless, f"pkcs11:token={TOKEN};object=rsa2048")
        self.assertIn(f"token={TOKEN}", uri)
        self.assertEqual(cert, self.fx.cert_der("rsa2048"))
        with self.connect(self.headless) as c, self.assertRaises(AgentError) as cm:
            c.start_sign(key="pkcs11:object=rsa2048;type=private", format="der")
        self.assertEqual(cm.exception.name, "AMBIGUOUS_KEY")
        self.assertIn(TWO, cm.exception.message)

    def test_2_a_pin_is_asked_for_and_tried_on_its_own_token_only(self):
        asked = []
        with self.connect(self.asking, interactive=True) as c:
            c.start_sign(key=f"pkcs11:token={TWO};id=%01", format="der",
                         pin=lambda f: asked.append(f) or TWO_PIN)
            c.stream(io.BytesIO(b"two\n"), io.BytesIO())
        self.assertEqual([field(f, "TOKEN_LABEL") for f in asked], [TWO])
        self.assertIn(f"token={TWO}", field(asked[0], "URI"))
        self.assertEqual(self.token(self.asking, TWO)["LOGGED_IN"], 1)
        self.assertEqual(self.token(self.asking, TOKEN)["LOGGED_IN"], 0, "the other token was logged in too")
        # The fixture token's PIN is asked for the fixture token, and works there.
        asked.clear()
        with self.connect(self.asking, interactive=True) as c:
            c.start_sign(key=f"pkcs11:token={TOKEN};id=%01", format="der", pin=lambda f: asked.append(f) or PIN)
            c.stream(io.BytesIO(b"one\n"), io.BytesIO())
        self.assertEqual([field(f, "TOKEN_LABEL") for f in asked], [TOKEN])

    def test_3_token_taken_away_and_brought_back(self):
        agent = self.headless
        self.signer_cert(agent, EMAIL["rsa2048"])
        before = self.token(agent, TOKEN, "present")
        tdir = self.fixture_tokdir
        away = os.path.join(self.tmp, "token-away")
        shutil.move(os.path.join(self.tokdir, tdir), away)
        try:
            # Noticed by the poll (hotplug-poll = 1), or by the request itself.
            self.wait_for("token marked removed", lambda: self.token(agent, TOKEN, "removed"))
            with self.connect(agent) as c:
                keys = [dict(k) for k in c.keys() if dict(k)["TOKEN_LABEL"] == TOKEN]
            self.assertTrue(keys, "the removed token's keys should stay listed, as unusable")
            self.assertTrue(all(k["USABLE"] == 0 and "removed" in k["STATUS_TEXT"] for k in keys), keys)
            for key in (EMAIL["rsa2048"], f"pkcs11:token={TOKEN};id=%03"):
                with self.connect(agent) as c, self.assertRaises(AgentError) as cm:
                    c.start_sign(key=key, format="der")
                self.assertEqual(cm.exception.name, "TOKEN_REMOVED", cm.exception.message)
                self.assertIn("insert it again", cm.exception.message)
            # LOGIN on the removed token says so; no PIN is asked for it.
            with self.connect(agent, interactive=True) as c, self.assertRaises(AgentError) as cm:
                c.login(key=f"pkcs11:token={TOKEN}", pin=lambda f: self.fail("PIN asked for a removed token"))
            self.assertEqual(cm.exception.name, "TOKEN_REMOVED")
            # The other token of the module keeps serving (logging in again from
            # its PIN file after the module's re-initialisation). A request
            # that races with a re-initialisation may fail and is retried, as
            # README says; most do not.
            failures = []
            for _ in range(3):
                try:
                    uri, cert = self.signer_cert(agent, f"pkcs11:token={TWO};id=%01")
                    break
                except AgentError as e:
                    failures.append(e)
                    self.assertIn(e.name, ("PIN_REQUIRED", "TOKEN", "TOKEN_REMOVED"), e.message)
            else:
                self.fail(f"token {TWO} did not sign in 3 tries: {failures}")
            self.assertEqual(cert, self.two_cert)
        finally:
            shutil.move(away, os.path.join(self.tokdir, tdir))
        # Back: the next requests work, with the same keys, without a restart.
        self.wait_for("token present again", lambda: self.token(agent, TOKEN, "present"), within=90)
        for label in ("rsa2048", "p256", "p384"):  # (OpenSSL 3.0 cannot verify Ed25519 CMS)
            uri, cert = self.signer_cert(agent, EMAIL[label])
            self.assertEqual(cert, self.fx.cert_der(label))
        self.assertEqual(self.token(agent, TOKEN)["TOKEN_SERIAL"], before["TOKEN_SERIAL"])
        log = agent.log()
        self.assertRegex(log, r"token 'smime-test' .*: removed")
        self.assertRegex(log, r"token 'smime-test' .*: present")
        # An interactive agent: after the return, asked for the PIN again.
        asked = []
        self.wait_for("asking agent sees the token", lambda: self.token(self.asking, TOKEN, "present"), within=90)
        with self.connect(self.asking, interactive=True) as c:
            c.start_sign(key=EMAIL["p384"], format="der", pin=lambda f: asked.append(f) or PIN)
            c.stream(io.BytesIO(b"after\n"), io.BytesIO())

    def test_4_token_deleted_and_created_again(self):
        agent = self.headless
        old = self.token(agent, TOKEN, "present")
        run(["softhsm2-util", "--delete-token", "--token", TOKEN], env=self.fx.env)
        self.wait_for("deleted token marked removed", lambda: self.token(agent, TOKEN, "removed"))
        with self.connect(agent) as c, self.assertRaises(AgentError) as cm:
            c.start_sign(key=EMAIL["rsa3072"], format="der")
        self.assertEqual(cm.exception.name, "TOKEN_REMOVED")
        init_token(self.fx, TOKEN, PIN)
        new_cert = make_identity(self.fx, TOKEN, PIN, "rsa2048", "01", "Alice Again", EMAIL["rsa2048"], self.work)
        new = self.wait_for("the new token", lambda: self.token(agent, TOKEN, "present"), within=120)
        self.assertNotEqual(new["TOKEN_SERIAL"], old["TOKEN_SERIAL"])
        # alice@ is on the removed token and on the new one: the usable one wins.
        uri, cert = self.signer_cert(agent, EMAIL["rsa2048"])
        self.assertEqual(cert, new_cert)
        self.assertIn(f"serial={new['TOKEN_SERIAL']}", uri)
        uri, cert = self.signer_cert(agent, f"pkcs11:token={TWO};id=%01")
        self.assertEqual(cert, self.two_cert)

    def test_5_key_added_to_a_present_token_is_found(self):
        # Another program puts a new key and certificate on a token the agent
        # already scanned (a card being set up): the first request for it
        # makes the agent look again, instead of answering NO_KEY until a
        # restart or a login.
        agent = self.headless
        self.wait_for("the token", lambda: self.token(agent, TWO, "present"))
        self.signer_cert(agent, f"pkcs11:token={TWO};id=%01")   # scanned, logged in
        late = make_identity(self.fx, TWO, TWO_PIN, "late", "30", "Late Key", "late@example.net", self.work)
        uri, cert = self.signer_cert(agent, "late@example.net")
        self.assertEqual(cert, late)
        self.assertIn(f"token={TWO}", uri)


if __name__ == "__main__":
    main()
