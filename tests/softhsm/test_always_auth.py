#!/usr/bin/env python3
"""Keys with CKA_ALWAYS_AUTHENTICATE (PIV's signature key): a context-specific
login, C_Login(CKU_CONTEXT_SPECIFIC), right before every use.

A second token, smime-piv (PIN 2468), holds three such keys generated on the
token with pkcs11-tool --always-auth: an RSA signing key, an RSA decryption
key and an EC P-256 key-agreement key, with certificates from the fixture's
CA. SoftHSM enforces the attribute for signing and decryption: C_Sign and
C_Decrypt fail with CKR_USER_NOT_LOGGED_IN unless the context-specific login
came between Init and the operation, and a wrong PIN there fails with
CKR_PIN_INCORRECT, so a test that passes proves the PIN reached the token at
that moment.

Policies: the default (always-authenticate = ask) asks the client for every
use, except that the PIN just typed for the token's login in the same request
is used rather than asking twice in a row; always-authenticate = reuse with a
PIN file (gateway) or with the PIN kept from the login (until the login ends).

The tests run in the order of their names and share the agents."""
import io
import os
import subprocess

from harness import AgentTestCase, main, parse_signed_data, run
from smime_proto import AgentError, field

PIV = "smime-piv"
PIV_PIN = "2468"
SO_PIN = "12345678"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SIGN_EMAIL = "piv-sign@example.net"
DEC_EMAIL = "piv-dec@example.net"
EC_EMAIL = "piv-ec@example.net"
SIGN_URI = f"pkcs11:token={PIV};object=piv-sign"


def p11(fx, *args):
    return run(["pkcs11-tool", "--module", MODULE, "--token-label", PIV, "--login", "--pin", PIV_PIN, *args],
               env=fx.env)


def make_key(fx, workdir, label, key_id, key_type, usage, cn, email, ku):
    """A key pair generated on smime-piv with CKA_ALWAYS_AUTHENTICATE, and a
    certificate for it from the fixture's CA written beside it. Returns the cert PEM path."""
    p11(fx, "--keypairgen", "--key-type", key_type, "--id", key_id, "--label", label, usage, "--always-auth")
    raw = os.path.join(workdir, f"{label}.pub.der")
    p11(fx, "--read-object", "--type", "pubkey", "--id", key_id, "-o", raw)
    pub = os.path.join(workdir, f"{label}.pub.pem")
    run(["openssl", "pkey", "-pubin", "-inform", "DER", "-in", raw, "-out", pub])
    ext = os.path.join(workdir, f"{label}.ext")
    with open(ext, "w") as f:
        f.write(f"basicConstraints=CA:FALSE\nkeyUsage=critical,{ku}\nextendedKeyUsage=emailProtection\n"
                f"subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\nsubjectAltName=email:{email}\n")
    der = os.path.join(workdir, f"{label}.crt.der")
    run(["openssl", "x509", "-new", "-force_pubkey", pub, "-subj", f"/CN={cn}/emailAddress={email}",
         "-CA", fx.ca, "-CAkey", os.path.join(fx.dir, "ca", "ca.key"), "-days", "30", "-sha256",
         "-set_serial", str(int.from_bytes(os.urandom(8), "big") >> 1), "-extfile", ext, "-outform", "DER",
         "-out", der])
    p11(fx, "--write-object", der, "--type", "cert", "--id", key_id, "--label", label)
    pem = os.path.join(workdir, f"{label}.crt.pem")
    run(["openssl", "x509", "-inform", "DER", "-in", der, "-out", pem])
    return pem


class AlwaysAuthTest(AgentTestCase):
    AGENT_ARGS = ()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        run(["softhsm2-util", "--init-token", "--free", "--label", PIV, "--so-pin", SO_PIN, "--pin", PIV_PIN],
            env=cls.fx.env)
        cls.sign_cert = make_key(cls.fx, cls.work, "piv-sign", "01", "rsa:2048", "--usage-sign", "PIV Sign",
                                 SIGN_EMAIL, "digitalSignature,nonRepudiation")
        cls.dec_cert = make_key(cls.fx, cls.work, "piv-dec", "02", "rsa:2048", "--usage-decrypt", "PIV Decrypt",
                                DEC_EMAIL, "keyEncipherment")
        cls.ec_cert = make_key(cls.fx, cls.work, "piv-ec", "03", "EC:prime256v1", "--usage-derive", "PIV EC",
                               EC_EMAIL, "keyAgreement")
        cls.pin_file = os.path.join(cls.tmp, "piv.pin")
        with open(cls.pin_file, "w") as f:
            f.write(PIV_PIN + "\n")
        # SoftHSM shows a new token only to processes started after it exists.
        cls.asking = cls.start_agent("asking", ())
        conf = os.path.join(cls.tmp, "gateway.conf")
        with open(conf, "w") as f:
            f.write(f"[token pkcs11:token={PIV}]\npin-file = {cls.pin_file}\n"
                    f"[key {SIGN_URI}]\nalways-authenticate = reuse\n")
        cls.gateway = cls.start_agent("gateway", ["--config", conf])
        conf = os.path.join(cls.tmp, "gateway-ask.conf")
        with open(conf, "w") as f:
            f.write(f"[token pkcs11:token={PIV}]\npin-file = {cls.pin_file}\n")
        cls.gateway_ask = cls.start_agent("gateway-ask", ["--config", conf])
        conf = os.path.join(cls.tmp, "keep.conf")
        with open(conf, "w") as f:
            f.write(f"[token pkcs11:token={PIV}]\nalways-authenticate = reuse\n")
        cls.keeping = cls.start_agent("keeping", ["--config", conf])

    # ---- helpers ----
    @staticmethod
    def answerer(answers):
        """A NEED_PIN handler answering from answers in turn (None: cancel), and the list of NEED_PINs it saw."""
        asked, answers = [], list(answers)

        def pin(f):
            asked.append(f)
            return answers.pop(0) if answers else None
        return asked, pin

    def sign(self, agent, answers, data=b"always authenticate\n", interactive=True):
        """Signs data with piv-sign, answering each NEED_PIN from answers (a list
        of PINs, None = cancel). Returns (NEED_PIN field lists, DER signature)."""
        asked, pin = self.answerer(answers)
        out = io.BytesIO()
        with self.connect(agent, interactive=interactive) as c:
            c.start_sign(key=SIGN_URI, format="der", pin=pin)
            c.stream(io.BytesIO(data), out, pin)
        return asked, out.getvalue()

    def sign_fails(self, agent, answers, interactive=True):
        with self.assertRaises(AgentError) as cm:
            self.sign(agent, answers, interactive=interactive)
        return cm.exception

    def check_signature(self, der, data=b"always authenticate\n"):
        self.verify(der, "der", expect_content=data)
        self.assertEqual(parse_signed_data(der)["certs"][0], self.cert_der(self.sign_cert))

    @staticmethod
    def cert_der(pem):
        return subprocess.run(["openssl", "x509", "-in", pem, "-outform", "DER"], check=True,
                              capture_output=True).stdout

    def logged_in(self, agent):
        with self.connect(agent) as c:
            (t,) = [dict(g) for n, g in c.status() if n == "TOKEN" and dict(g)["TOKEN_LABEL"] == PIV]
        return t["LOGGED_IN"]

    def encrypt_to(self, cert, data, *extra):
        src = self.write("plain.txt", data)
        out = self.path("enc.der")
        run(["openssl", "cms", "-encrypt", "-binary", "-in", src, "-outform", "DER", "-out", out, "-aes-256-cbc",
             "-recip", cert, *extra])
        with open(out, "rb") as f:
            return f.read()

    def decrypt(self, agent, der, answers):
        asked, pin = self.answerer(answers)
        out = io.BytesIO()
        with self.connect(agent, interactive=True) as c:
            c.decrypt(io.BytesIO(der), out, pin=pin)
        return asked, out.getvalue()

    # ---- ask (the default) ----
    def test_1_keys_are_listed_as_usable(self):
        with self.connect(self.asking) as c:
            keys = {dict(k)["LABEL"]: dict(k) for k in c.keys() if dict(k).get("TOKEN_LABEL") == PIV}
        self.assertEqual(sorted(keys), ["piv-dec", "piv-ec", "piv-sign"])

    def test_2_one_pin_for_login_and_first_signature(self):
        # Not logged in: NEED_PIN for the login (no CONTEXT_KEY); the same
        # PIN then serves the context-specific login: one question, not two.
        self.assertEqual(self.logged_in(self.asking), 0)
        asked, der = self.sign(self.asking, [PIV_PIN])
        self.assertEqual(len(asked), 1, asked)
        self.assertIsNone(field(asked[0], "CONTEXT_KEY"))
        self.check_signature(der)
        self.assertEqual(self.logged_in(self.asking), 1)

    def test_3_every_further_signature_asks_naming_the_key(self):
        for i in range(2):
            asked, der = self.sign(self.asking, [PIV_PIN], data=b"again %d\n" % i)
            self.assertEqual([field(f, "CONTEXT_KEY") for f in asked], ["piv-sign"])
            self.assertEqual(field(asked[0], "TOKEN_LABEL"), PIV)
            self.check_signature(der, b"again %d\n" % i)

    def test_4_wrong_pin_is_reported_once_and_not_retried(self):
        log0 = self.asking.log_size()
        e = self.sign_fails(self.asking, ["0000"])
        self.assertEqual(e.name, "PIN_INCORRECT", e.message)
        self.assertIn("CKU_CONTEXT_SPECIFIC", e.message)
        self.assertIn("piv-sign", e.message)
        self.assertIn("PIN count", e.message)  # what the token says about the tries left
        self.assertEqual(self.asking.log(log0).count("CKR_PIN_INCORRECT"), 1, self.asking.log(log0))
        self.assertNotIn("0000", self.asking.log(log0))
        # SoftHSM logs the user out when a context-specific PIN is wrong (a
        # card may not): the next request notices and asks for the login,
        # whose PIN then also serves the signature - one question either way.
        asked, der = self.sign(self.asking, [PIV_PIN])
        self.assertEqual(len(asked), 1, asked)
        self.check_signature(der)
        self.assertEqual(self.logged_in(self.asking), 1)

    def test_5_cancel_and_a_client_that_cannot_ask(self):
        e = self.sign_fails(self.asking, [None])
        self.assertEqual(e.name, "CANCELLED")
        self.assertIn("piv-sign", e.message)
        e = self.sign_fails(self.asking, [], interactive=False)
        self.assertEqual(e.name, "PIN_REQUIRED")
        self.assertIn("always-authenticate = reuse", e.message)
        # smimectl without a terminal: the same, exit 1 with the sentence.
        msg = self.assert_sign_fails("PIN_REQUIRED", "--key", SIGN_URI, agent=self.asking)
        self.assertIn("CKA_ALWAYS_AUTHENTICATE", msg)

    def test_6_decrypt_rsa_asks_mid_stream(self):
        data = b"secret for the PIV decryption key\n" * 50
        der = self.encrypt_to(self.dec_cert, data)
        asked, plain = self.decrypt(self.asking, der, [PIV_PIN])
        self.assertEqual(plain, data)
        self.assertEqual([field(f, "CONTEXT_KEY") for f in asked], ["piv-dec"])
        # OAEP (SHA-256: SoftHSM falls back to the raw operation, which needs
        # the context login just the same).
        der = self.encrypt_to(self.dec_cert, data, "-keyopt", "rsa_padding_mode:oaep", "-keyopt",
                              "rsa_oaep_md:sha256")
        asked, plain = self.decrypt(self.asking, der, [PIV_PIN])
        self.assertEqual(plain, data)
        # A wrong PIN: PIN_INCORRECT, nothing decrypted, no second key tried.
        with self.assertRaises(AgentError) as cm:
            self.decrypt(self.asking, der, ["0000"])
        self.assertEqual(cm.exception.name, "PIN_INCORRECT", cm.exception.message)
        # SoftHSM logged the user out: the next decrypt asks once (the login).
        asked, plain = self.decrypt(self.asking, der, [PIV_PIN])
        self.assertEqual((len(asked), plain), (1, data))

    def test_7_decrypt_ecdh(self):
        data = b"key agreement with an always-authenticate key\n"
        der = self.encrypt_to(self.ec_cert, data)
        asked, plain = self.decrypt(self.asking, der, [PIV_PIN])
        self.assertEqual(plain, data)
        # SoftHSM does not ask for the context login on C_DeriveKey; the
        # agent asks the client anyway (the key says every use needs it) and
        # tries the login, which such a token answers
        # CKR_OPERATION_NOT_INITIALIZED (= not needed here).
        self.assertEqual([field(f, "CONTEXT_KEY") for f in asked], ["piv-ec"])

    def test_6b_smimectl_asks_on_its_terminal_naming_the_key(self):
        data = self.write("tty-in", b"typed for the key\n")
        out = os.path.join(self.work, "tty-out.p7m")
        rc, screen, typed = self.smimectl_on_a_pty(
            self.asking, ["sign", "--key", SIGN_URI, "--format", "der", "--in", data, "--out", out],
            PIV_PIN.encode() + b"\n")
        self.assertEqual(rc, 0, screen)
        self.assertIn(f"PIN for key 'piv-sign' on token '{PIV}'", screen)
        self.assertIn("every use", screen)
        self.assertNotIn(PIV_PIN, screen, "the PIN was echoed")
        with open(out, "rb") as f:
            self.verify(f.read(), "der", expect_content=b"typed for the key\n")

    # ---- reuse ----
    def test_8_gateway_reuses_the_pin_file(self):
        for i in range(3):
            asked, der = self.sign(self.gateway, [], data=b"gateway %d\n" % i, interactive=False)
            self.assertEqual(asked, [])
            self.check_signature(der, b"gateway %d\n" % i)
        # The [key] section applies to piv-sign only: piv-dec still asks.
        with self.assertRaises(AgentError) as cm, self.connect(self.gateway) as c:
            c.decrypt(io.BytesIO(self.encrypt_to(self.dec_cert, b"x")), io.BytesIO())
        self.assertEqual(cm.exception.name, "PIN_REQUIRED")
        self.assertIn("piv-dec", cm.exception.message)
        # Same PIN file, no always-authenticate setting: the login is silent,
        # the signature key asks (and a client that cannot answer is told how).
        e = self.sign_fails(self.gateway_ask, [], interactive=False)
        self.assertEqual(e.name, "PIN_REQUIRED")
        self.assertIn("piv-sign", e.message)

    def test_9_reuse_keeps_the_login_pin_until_lock(self):
        asked, der = self.sign(self.keeping, [PIV_PIN])
        self.assertEqual(len(asked), 1)
        self.assertIsNone(field(asked[0], "CONTEXT_KEY"))
        for i in range(2):
            asked, der = self.sign(self.keeping, [], data=b"kept %d\n" % i, interactive=False)
            self.assertEqual(asked, [])
            self.check_signature(der, b"kept %d\n" % i)
        # Decryption keys of the token too (the [token] section covers them).
        data = b"kept pin decrypt\n"
        asked, plain = self.decrypt(self.keeping, self.encrypt_to(self.dec_cert, data), [])
        self.assertEqual((asked, plain), ([], data))
        # smimectl lock ends the login and wipes the kept PIN: asked again.
        r = self.ctl("lock", agent=self.keeping)
        self.assertEqual(r.returncode, 0, r.stderr)
        e = self.sign_fails(self.keeping, [], interactive=False)
        self.assertEqual(e.name, "PIN_REQUIRED")
        asked, der = self.sign(self.keeping, [PIV_PIN])
        self.assertEqual(len(asked), 1)
        self.check_signature(der)


if __name__ == "__main__":
    main()
