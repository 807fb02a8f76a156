"""Per-key authorization and the audit log (issue 5).

The agent runs as root with "allow" lines granting keys to test users, and
smimectl runs as those users (setpriv): a grant by user, by supplementary
group and for a whole token each lets exactly what it names through; every
other request is answered PERMISSION before any login, and every use or
refusal leaves one audit line on the agent's stderr with the peer, key,
subject, SHA-256 of the content, result and duration — and never the PIN
or the content. Needs root (to create the users); skipped otherwise.
"""
import grp
import hashlib
import os
import stat
import time

from harness import EMAIL, PIN, AgentTestCase, audit_records, ensure_test_user, main, run

# Users: T1 by name, T2 through a supplementary group, T3 for the whole token,
# T4 named by no grant. Group G is also the socket's group in the second agent.
T1, T2, T3, T4, G = "smime-test-u1", "smime-test-u2", "smime-test-u3", "smime-test-u4", "smime-test-grp"


class AuthzTest(AgentTestCase):
    AGENT_ARGS = ("--pin-file", "{pin}", "--config", "{tmp}/authz.conf")

    @classmethod
    def setUpClass(cls):
        if os.getuid() != 0:
            raise cls.skipException("needs root: creates test users and runs clients as them (setpriv)")
        cls.uids = {u: ensure_test_user(u, [G] if u == T2 else []) for u in (T1, T2, T3, T4)}
        super().setUpClass()

    @classmethod
    def start_agent(cls, name, args=AGENT_ARGS, socket_path=None):
        if name == "agent":
            # The config is written here because setUpClass makes the fixture first.
            with open(os.path.join(cls.tmp, "authz.conf"), "w") as f:
                f.write(f"# test grants\n"
                        f"socket-mode = 0666\n"
                        f"allow = {EMAIL['rsa2048']} sign user:{T1}\n"
                        f"allow = pkcs11:token=smime-test;object=p256 decrypt user:{T1}\n"
                        f"allow = {EMAIL['rsa3072']} sign group:{G}\n"
                        f"allow = pkcs11:token=smime-test sign user:{cls.uids[T3]}\n")  # by UID
            # The agent makes the socket's directory itself; the way to it is open.
            os.chmod(cls.tmp, 0o711)
            socket_path = os.path.join(cls.tmp, "shared", "socket")
        return super().start_agent(name, args, socket_path)

    def audits(self, agent=None, start=0):
        return audit_records((agent or self.agent).log(start))

    def last_audit(self, start):
        # A success is audited before DONE; a failure right after its ERROR,
        # so the record may land a moment after smimectl exits.
        deadline = time.monotonic() + 10
        while not self.audits(start=start) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)
        recs = self.audits(start=start)
        self.assertEqual(len(recs), 1, f"expected one audit record, got {recs}")
        return recs[0]

    # ---- the socket ----
    def test_socket_directory_and_mode_follow_the_configuration(self):
        st = os.stat(self.agent.socket)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o666)
        self.assertEqual(stat.S_IMODE(os.stat(self.agent.rundir).st_mode), 0o711,
                         "socket-mode 0666 needs a directory others may search, and no more")

    # ---- grants ----
    def test_user_grant_signs_and_is_audited(self):
        data = b"From: a@example.org\nSubject: granted\n\nsigned by a granted user\n"
        start = self.agent.log_size()
        der = self.sign(data, "--key", EMAIL["rsa2048"], "--format", "der", user=T1)
        self.verify(der, "der", expect_content=data)
        rec = self.last_audit(start)
        self.assertEqual(rec["operation"], "sign")
        self.assertEqual(rec["result"], "ok")
        self.assertEqual(rec["peer_uid"], str(self.uids[T1]))
        self.assertEqual(rec["peer_gid"], str(grp.getgrnam(T1).gr_gid))
        self.assertEqual(rec["peer_exe"], os.path.realpath(self.ctl_bin))
        self.assertEqual(rec["content_sha256"], hashlib.sha256(data).hexdigest())
        self.assertIn("object=rsa2048", rec["key_uri"])
        self.assertIn("Alice RSA2048", rec["cert_subject"])
        self.assertGreater(float(rec["duration_sec"]), 0.0)
        self.assertRegex(rec["peer_pid"], r"^\d+$")

    def test_group_grant_through_supplementary_group(self):
        data = b"group grant\n"
        der = self.sign(data, "--key", EMAIL["rsa3072"], "--format", "der", user=T2)
        self.verify(der, "der", expect_content=data)

    def test_token_grant_covers_every_key_of_the_token(self):
        for label in ("p256", "p384", "rsa2048"):
            data = f"token grant {label}\n".encode()
            der = self.sign(data, "--key", EMAIL[label], "--format", "der", user=T3)
            self.verify(der, "der", expect_content=data)

    def encrypt_to(self, label, data):
        plain = self.write("plain", data)
        out = self.path("enc.der")
        run(["openssl", "cms", "-encrypt", "-binary", "-aes-256-gcm", "-outform", "DER", "-in", plain, "-out", out,
             self.fx.cert(label)])
        with open(out, "rb") as f:
            return f.read()

    def test_decrypt_grant_and_refusal(self):
        data = b"Content-Type: text/plain\r\n\r\nfor a granted decrypter\r\n"
        # Granted: decrypt with p256.
        start = self.agent.log_size()
        r = self.ctl("decrypt", input=self.encrypt_to("p256", data), user=T1)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, data)
        rec = self.last_audit(start)
        self.assertEqual((rec["operation"], rec["result"]), ("decrypt", "ok"))
        self.assertEqual(rec["peer_uid"], str(self.uids[T1]))
        self.assertIn("object=p256", rec["key_uri"])
        self.assertEqual(rec["content_sha256"], hashlib.sha256(data).hexdigest(), "the hash of the plaintext")
        # Not granted: T1 may sign with rsa2048 but not decrypt with it.
        start = self.agent.log_size()
        r = self.ctl("decrypt", input=self.encrypt_to("rsa2048", data), user=T1)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("[PERMISSION]", r.stderr)
        self.assertIn("may not decrypt with", r.stderr)
        self.assertEqual(r.stdout, b"")
        rec = self.last_audit(start)
        self.assertEqual((rec["operation"], rec["result"], rec["error"]), ("decrypt", "denied", "PERMISSION"))
        self.assertIn("object=rsa2048", rec["key_uri"])

    def test_other_key_is_refused_with_permission(self):
        start = self.agent.log_size()
        msg = self.assert_sign_fails("PERMISSION", "--key", EMAIL["rsa3072"], user=T1)
        self.assertIn(f"uid {self.uids[T1]} may not sign with", msg)
        self.assertIn("Bob RSA3072", msg)
        self.assertIn(f"allow = {EMAIL['rsa3072']} sign user:{T1}", msg, "the message says how to grant it")
        rec = self.last_audit(start)
        self.assertEqual((rec["operation"], rec["result"], rec["error"]), ("sign", "denied", "PERMISSION"))
        self.assertEqual(rec["peer_uid"], str(self.uids[T1]))
        self.assertIn("object=rsa3072", rec["key_uri"])
        self.assertNotIn("content_sha256", rec, "a refused request never read content")

    def test_decrypt_grant_does_not_allow_signing(self):
        msg = self.assert_sign_fails("PERMISSION", "--key", EMAIL["p256"], user=T1)
        self.assertIn("may not sign", msg)

    def test_group_member_cannot_use_the_user_grant_of_another(self):
        self.assert_sign_fails("PERMISSION", "--key", EMAIL["rsa2048"], user=T2)

    def test_default_key_is_not_a_back_door(self):
        # No --key: the agent picks; the pick must still be granted.
        r = self.ctl("sign", "--format", "der", input=b"x\n", user=T1)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertRegex(r.stderr, r"\[(PERMISSION|AMBIGUOUS_KEY)\]")
        self.assertEqual(r.stdout, b"")

    def test_keys_lists_only_granted_keys(self):
        r = self.ctl("keys", user=T1)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.decode()
        self.assertIn(EMAIL["rsa2048"] + "\n", out)
        self.assertIn(EMAIL["p256"] + "\n", out, "a decrypt grant makes the key visible")
        for label in ("rsa3072", "p384", "ed25519", "p521"):
            self.assertNotIn(EMAIL[label], out)
        # The owner sees everything.
        out = self.ctl("keys").stdout.decode()
        for email in EMAIL.values():
            self.assertIn(email, out)

    def test_no_key_lists_only_granted_keys(self):
        # A selector matching nothing: the answer lists the keys there are,
        # but to a peer only those it may use.
        msg = self.assert_sign_fails("NO_KEY", "--key", "nobody@example.org", user=T1)
        self.assertIn(EMAIL["rsa2048"], msg)
        for label in ("rsa3072", "p384", "ed25519", "p521", "expired"):
            self.assertNotIn(EMAIL[label], msg)
        msg = self.assert_sign_fails("NO_KEY", "--key", "nobody@example.org")
        for label in ("rsa2048", "rsa3072", "p384"):
            self.assertIn(EMAIL[label], msg, "the owner hears of every key")

    def test_user_without_grant_cannot_connect(self):
        start = self.agent.log_size()
        r = self.ctl("status", user=T4)
        # smimectl: exit 3, no agent that will talk to us, with the agent's reason.
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn("refused the connection: this agent's configuration grants your user no key", r.stderr)
        recs = [self.last_audit(start)]
        self.assertEqual([(x["operation"], x["result"], x["peer_uid"]) for x in recs],
                         [("connect", "denied", str(self.uids[T4]))])
        self.assertEqual(recs[0]["peer_exe"], os.path.realpath(self.ctl_bin))

    def test_owner_keeps_every_key(self):
        data = b"owner\n"
        start = self.agent.log_size()
        der = self.sign(data, "--key", EMAIL["p384"], "--format", "der")
        self.verify(der, "der", expect_content=data)
        rec = self.last_audit(start)
        self.assertEqual((rec["result"], rec["peer_uid"]), ("ok", "0"))

    def test_failures_after_authorization_are_audited_as_failed(self):
        start = self.agent.log_size()
        self.assert_sign_fails("CERT_EXPIRED", "--key", EMAIL["expired"], user=T3)
        rec = self.last_audit(start)
        self.assertEqual((rec["result"], rec["error"]), ("failed", "CERT_EXPIRED"))

    def test_audit_never_holds_pin_or_content(self):
        secret = b"content that must never reach a log %d\n" % os.getpid()
        start = self.agent.log_size()
        self.sign(secret, "--key", EMAIL["rsa2048"], "--format", "der", user=T1)
        self.assertEqual(self.audits(start=start)[0]["result"], "ok", "a success is audited before DONE")
        log = self.agent.log()
        self.assertNotIn(secret.strip().decode(), log)
        self.assertNotRegex(log, r"\b" + PIN + r"\b", "the PIN appears in the agent's log")


class AuthzBeforeLoginTest(AgentTestCase):
    """A second agent without a PIN file: a refused request must be refused
    before the login (it gets PERMISSION, not PIN_REQUIRED), and socket-group
    and socket-mode 0660 keep users outside the group from connecting."""
    AGENT_ARGS = ("--config", "{tmp}/authz.conf")

    @classmethod
    def setUpClass(cls):
        if os.getuid() != 0:
            raise cls.skipException("needs root: creates test users and runs clients as them (setpriv)")
        cls.uids = {u: ensure_test_user(u, [G] if u == T2 else []) for u in (T1, T2)}
        super().setUpClass()

    @classmethod
    def start_agent(cls, name, args=AGENT_ARGS, socket_path=None):
        with open(os.path.join(cls.tmp, "authz.conf"), "w") as f:
            f.write(f"socket-mode = 0660\nsocket-group = {G}\n"
                    f"allow = {EMAIL['rsa3072']} sign group:{G}\n"
                    f"allow = {EMAIL['rsa2048']} sign user:{T1}\n")
        os.chmod(cls.tmp, 0o711)
        return super().start_agent(name, args, os.path.join(cls.tmp, "grp", "socket"))

    def test_refused_before_login(self):
        # Not logged in: a refused key answers PERMISSION, never PIN_REQUIRED.
        self.assert_sign_fails("PERMISSION", "--key", EMAIL["rsa2048"], user=T2)
        # The granted key gets as far as the login (no PIN file, no terminal).
        self.assert_sign_fails("PIN_REQUIRED", "--key", EMAIL["rsa3072"], user=T2)

    def test_socket_group_and_mode(self):
        st = os.stat(self.agent.socket)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
        self.assertEqual(st.st_gid, grp.getgrnam(G).gr_gid)
        dst = os.stat(self.agent.rundir)
        self.assertEqual((stat.S_IMODE(dst.st_mode), dst.st_gid), (0o710, grp.getgrnam(G).gr_gid))
        # T1 has a grant but is not in the socket's group: the socket keeps it out.
        r = self.ctl("status", user=T1)
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertRegex(r.stderr, r"[Pp]ermission denied")
        # T2 is in the group.
        r = self.ctl("status", user=T2)
        self.assertEqual(r.returncode, 0, r.stderr)


if __name__ == "__main__":
    main()
