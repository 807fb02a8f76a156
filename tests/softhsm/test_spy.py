""""Keys never leave the token", proven on the agent's own PKCS#11 traffic.

The agent here loads OpenSC's pkcs11-spy in front of SoftHSM (harness.py's
SMIME_TEST_SPY mode, switched on for this module), signs with every key
type and mechanism it supports — RSA PKCS#1 v1.5 and PSS, ECDSA P-256/384/
521, Ed25519 — in every format, after both a PIN-file login and an
interactive one, and the spy's log of every call must show:
- no C_GetAttributeValue of CKA_VALUE, CKA_PRIVATE_EXPONENT, CKA_PRIME_1/2,
  CKA_EXPONENT_1/2 or CKA_COEFFICIENT on a private key,
- no C_WrapKey, C_CopyObject, C_SetAttributeValue (nor any call that
  creates, changes or destroys objects or PINs).
The checker itself is tested on a log with violations, so a log it does
not understand cannot pass as clean. The fixture's keys (the only keys the
project creates) are checked to be sensitive and never extractable.
tests.cmake also runs most of the integration suite in this mode
(softhsm_spy_suite).
"""
import io
import os
import re
import textwrap

os.environ["SMIME_TEST_SPY"] = "1"

from harness import (EMAIL, PIN, SOFTHSM_MODULE, SPY_MODULE, AgentTestCase, main, run,  # noqa: E402
                     spy_log_violations)


class SpyTest(AgentTestCase):
    @classmethod
    def setUpClass(cls):
        if not os.path.exists(SPY_MODULE):
            raise cls.skipException(f"{SPY_MODULE} is missing (Debian package opensc)")
        super().setUpClass()

    def sign_everything(self, agent=None):
        n = 0
        for label in ("rsa2048", "rsa3072", "p256", "p384", "p521"):
            for fmt in ("der", "pem", "smime"):
                data = f"spy {label} {fmt}\n".encode()
                out = self.raw_sign(data, agent=agent, key=EMAIL[label], format=fmt)
                self.assertTrue(out)
                n += 1
        for label in ("rsa2048", "rsa3072"):
            der = self.raw_sign(b"pss\n", agent=agent, key=EMAIL[label], format="der", pss=True)
            self.verify(der, "der", expect_content=b"pss\n")
            n += 1
        # Ed25519: the token signs; OpenSSL 3.0 cannot verify it in CMS.
        self.assertTrue(self.raw_sign(b"eddsa\n", agent=agent, key=EMAIL["ed25519"], format="der"))
        return n + 1

    def test_agent_never_reads_or_exports_private_keys(self):
        # Agents of their own: this test stops them to read the whole log.
        headless = self.start_agent("headless")
        signed = self.sign_everything(headless)
        # An interactive login (NEED_PIN answered with the PIN).
        other = self.start_agent("interactive", ())
        out = io.BytesIO()
        with self.connect(other, interactive=True) as c:
            c.sign(io.BytesIO(b"interactive\n"), out, key=EMAIL["p256"], format="der",
                   pin=lambda fields: PIN)
        self.assertTrue(out.getvalue())
        for a in (headless, other):
            a.check_exit()      # the harness checks the spy log here too
            violations, stats = spy_log_violations(a.spy_log)
            self.assertEqual(violations, [])
            # The log was understood: objects found by class, attribute reads of
            # private keys seen, one C_Sign per signature, one C_Login.
            self.assertGreater(stats["objects"], 10, stats)
            self.assertGreater(stats["private_key_reads"], 10, stats)
            self.assertEqual(stats["logins"], 1, stats)
        self.assertGreaterEqual(spy_log_violations(headless.spy_log)[1]["sign_calls"], signed)

    def test_decryption_reads_only_the_derived_secret(self):
        # RSA (v1.5 and OAEP-SHA-256, which goes through CKM_RSA_X_509 on
        # SoftHSM) and ECDH: the only CKA_VALUE read is of the session object
        # C_DeriveKey made, and each such object is destroyed right away.
        agent = self.start_agent("decrypt")
        plain = self.write("plain", b"Content-Type: text/plain\r\n\r\nspy decrypt\r\n")
        cases = [("rsa2048", []), ("rsa3072", ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"]),
                 ("p256", []), ("p384", []), ("p521", [])]
        for label, opts in cases:
            out = self.path("enc.der")
            run(["openssl", "cms", "-encrypt", "-binary", "-aes-256-gcm", "-outform", "DER", "-in", plain,
                 "-out", out, "-recip", self.fx.cert(label), *opts])
            with open(out, "rb") as f, self.connect(agent) as c:
                res = io.BytesIO()
                c.decrypt(f, res)
            self.assertTrue(res.getvalue().endswith(b"spy decrypt\r\n"))
        agent.check_exit()
        violations, stats = spy_log_violations(agent.spy_log)
        self.assertEqual(violations, [])
        self.assertEqual(stats["derived"], 3, stats)
        self.assertEqual(stats["derived_destroyed"], 3, stats)
        with open(agent.spy_log, errors="replace") as f:
            text = f.read()
        self.assertIn("CKM_RSA_X_509", text)
        self.assertIn("CKM_RSA_PKCS", text)

    def test_checker_finds_violations(self):
        # The spy's format, as OpenSC 0.23 writes it.
        log = textwrap.dedent("""\
            1: C_FindObjectsInit
            [in] hSession = 0x1
            [in] pTemplate[1]:
                CKA_CLASS             CKO_PRIVATE_KEY
            Returned:  0 CKR_OK

            2: C_FindObjects
            [in] hSession = 0x1
            [in] ulMaxObjectCount = 0x1
            [out] ulObjectCount = 0x1
            Object 0x2 matches
            Returned:  0 CKR_OK

            3: C_GetAttributeValue
            [in] hSession = 0x1
            [in] hObject = 0x2
            [in] pTemplate[2]:
                CKA_ID                0000000000000000 / 0
                CKA_PRIVATE_EXPONENT  0000000000000000 / 0
            Returned:  0 CKR_OK

            4: C_GetAttributeValue
            [in] hSession = 0x1
            [in] hObject = 0x7
            [in] pTemplate[1]:
                CKA_PRIME_1           0000000000000000 / 0
            Returned:  0 CKR_OK

            5: C_WrapKey
            Returned:  0 CKR_OK

            6: C_SetAttributeValue
            Returned:  0 CKR_OK

            7: C_DeriveKey
            [in] hSession = 0x1
            [in] hBaseKey = 0x2
            [in] pTemplate[2]:
                CKA_CLASS             CKO_SECRET_KEY
                CKA_TOKEN             False
            [out] hKey = 0x9
            Returned:  0 CKR_OK

            8: C_GetAttributeValue
            [in] hSession = 0x1
            [in] hObject = 0x9
            [in] pTemplate[1]:
                CKA_VALUE             0000000000000000 / 32
            Returned:  0 CKR_OK

            9: C_DestroyObject
            [in] hSession = 0x1
            [in] hObject = 0x2
            Returned:  0 CKR_OK
            """)
        path = self.write("fake-spy.log", log.encode())
        violations, stats = spy_log_violations(path)
        self.assertEqual(violations, [
            "C_GetAttributeValue CKA_PRIVATE_EXPONENT of a private key",
            "C_GetAttributeValue CKA_PRIME_1 of a object of unknown class",
            "call C_WrapKey", "call C_SetAttributeValue",
            "call C_DestroyObject on an object it did not derive",
            "1 derived secret object(s) never destroyed"])

    def test_checker_follows_a_derive_interleaved_with_another_thread(self):
        # pkcs11-spy does not serialise calls: the hot-plug poll's call can
        # land between C_DeriveKey's [in] and [out] lines.
        log = textwrap.dedent("""\
            1: C_FindObjectsInit
            [in] hSession = 0x1
            [in] pTemplate[1]:
                CKA_CLASS             CKO_PRIVATE_KEY
            Returned:  0 CKR_OK

            2: C_FindObjects
            [in] hSession = 0x1
            Object 0x2 matches
            Returned:  0 CKR_OK

            3: C_DeriveKey
            [in] hSession = 0x1
            [in] hBaseKey = 0x2
            [in] pTemplate[2]:
                CKA_CLASS             CKO_SECRET_KEY
                CKA_TOKEN             False

            4: C_GetTokenInfo
            [in] slotID = 0x1
            [out] hKey = 0x9
            Returned:  0 CKR_OK
            Returned:  0 CKR_OK

            5: C_GetAttributeValue
            [in] hSession = 0x1
            [in] hObject = 0x9
            [in] pTemplate[1]:
                CKA_VALUE             0000000000000000 / 32
            Returned:  0 CKR_OK

            6: C_DestroyObject
            [in] hSession = 0x1
            [in] hObject = 0x9
            Returned:  0 CKR_OK

            7: C_UnwrapKey
            Returned:  0 CKR_OK
            """)
        violations, stats = spy_log_violations(self.write("interleaved-spy.log", log.encode()))
        self.assertEqual(violations, ["call C_UnwrapKey"])
        self.assertEqual((stats["derived"], stats["derived_destroyed"]), (1, 1))

    def test_spy_sees_the_real_module(self):
        # The spy is really between the agent and SoftHSM: the log names its calls.
        self.raw_sign(b"x\n", key=EMAIL["rsa2048"], format="der")
        with open(self.agent.spy_log, errors="replace") as f:
            text = f.read()
        self.assertIn("C_Initialize", text)
        self.assertRegex(text, r"\d+: C_Sign\b")
        self.assertIn("--module", self.agent.cmd)

    def test_fixture_keys_are_sensitive_and_never_extractable(self):
        out = run(["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "smime-test", "--login",
                   "--pin", PIN, "--list-objects", "--type", "privkey"], env=self.fx.env, text=True).stdout
        keys = re.split(r"\n(?=Private Key Object)", out.strip())
        self.assertEqual(len(keys), 11, out)
        for k in keys:
            access = re.search(r"Access:\s*(.*)", k)
            self.assertTrue(access, k)
            self.assertIn("sensitive", access.group(1), k)
            self.assertIn("never extractable", access.group(1), k)


if __name__ == "__main__":
    main()
