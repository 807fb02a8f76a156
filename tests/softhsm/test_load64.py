#!/usr/bin/env python3
"""64 clients at once on two tokens: zero lost or mixed-up requests.

Two SoftHSM tokens carry a key with the SAME label and CKA_ID (rsa2048, id
01) but different key pairs and certificates: the fixture's smime-test and
smime-two (made here). 64 client threads, each with its own connection to
one agent (a socket each, kept for the whole run), start together; client i
uses the token i % 2, naming the key by PKCS#11 URI only
(pkcs11:token=...;object=rsa2048). Each round a client signs content that is
its own (client number, round, random bytes) and decrypts a message that
openssl encrypted beforehand to its token's certificate, with its own
plaintext. Afterwards every answer is checked: each signature verifies
(openssl cms -verify -nointern) with exactly the expected token's
certificate and over exactly that client's content, and carries that
certificate; each decryption gives exactly that client's plaintext (the
other token's key cannot decrypt it); the counts add up; no error.

In the middle, smime-two is logged out (LOCK): in test_1 between the first
and the second round (every client waits for it, so it is deterministic),
after which all 32 clients of smime-two need a new login at once (from the
token's PIN file) and must all succeed. test_2 logs out while requests are
in flight: a request that found the token logged in and then meets
CKR_USER_NOT_LOGGED_IN logs in again from the PIN file and retries once,
so none may fail. Under the sanitizers the run has fewer rounds,
still 64 clients."""
import io
import os
import subprocess
import threading
import time

from harness import PIN, TOKEN, AgentTestCase, main, parse_signed_data, run
import smime_proto
from smime_proto import field
from test_hotplug import init_token, make_identity

TWO = "smime-two"
TWO_PIN = "4321"
CLIENTS = 64


class Load64Test(AgentTestCase):
    AGENT_ARGS = ()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        init_token(cls.fx, TWO, TWO_PIN)
        make_identity(cls.fx, TWO, TWO_PIN, "rsa2048", "01", "Two RSA", "two@example.net", cls.work)
        cls.cert_pem = {TOKEN: cls.fx.cert("rsa2048"), TWO: os.path.join(cls.work, "two-rsa2048.pem")}
        run(["openssl", "x509", "-inform", "DER", "-in", os.path.join(cls.work, f"{TWO}-rsa2048.key.crt.der"),
             "-out", cls.cert_pem[TWO]])
        conf = os.path.join(cls.tmp, "load.conf")
        with open(conf, "w") as f:
            for label, pin in ((TOKEN, PIN), (TWO, TWO_PIN)):
                path = os.path.join(cls.tmp, label + ".pin")
                with open(path, "w") as p:
                    p.write(pin + "\n")
                f.write(f"[token pkcs11:token={label}]\npin-file = {path}\n")
        # Started after smime-two exists (SoftHSM shows new tokens only then).
        cls.load = cls.start_agent("load", ["--config", conf])

    def der(self, pem):
        return run(["openssl", "x509", "-in", pem, "-outform", "DER"]).stdout

    def test_1_64_clients_two_tokens_same_labels_lock_between_rounds(self):
        self.run_clients(inflight_lock=False)

    def test_2_64_clients_lock_while_requests_are_in_flight(self):
        self.run_clients(inflight_lock=True)

    def run_clients(self, inflight_lock):
        rounds = 2 if self.sanitize else 3
        tokens = [TOKEN, TWO]
        uri = {t: f"pkcs11:token={t};object=rsa2048" for t in tokens}

        # Per client and round: its own content, and a message for its token.
        content, encrypted = {}, {}
        for i in range(CLIENTS):
            for r in range(rounds):
                content[i, r] = (f"client {i} round {r} ".encode() + os.urandom(24).hex().encode() + b"\n") * (1 + i % 5)
        # openssl encrypts (one process per message, in parallel batches).
        procs = {}
        for (i, r), data in content.items():
            procs[i, r] = subprocess.Popen(
                ["openssl", "cms", "-encrypt", "-binary", "-aes-256-cbc", "-outform", "DER",
                 self.cert_pem[tokens[i % 2]]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
            procs[i, r].stdin.write(data)
            procs[i, r].stdin.close()
            if len(procs) % 16 == 0:
                for p in procs.values():
                    p.wait()
        for key, p in procs.items():
            out = p.stdout.read()
            self.assertEqual(p.wait(), 0, p.stderr.read())
            p.stdout.close()
            p.stderr.close()
            encrypted[key] = out

        signed, decrypted, errors = {}, {}, []
        lock = threading.Lock()
        answered = [0]
        half_round = threading.Event()
        locked = threading.Event()
        start = threading.Barrier(CLIENTS + 1)
        between = threading.Barrier(CLIENTS + 1)

        def client(i):
            tok = tokens[i % 2]
            try:
                with smime_proto.Connection(self.load.socket, timeout=120) as c:
                    start.wait(timeout=60)
                    for r in range(rounds):
                        if r == 1:
                            # The second round begins after the LOCK.
                            if not inflight_lock:
                                between.wait(timeout=300)
                            if not locked.wait(timeout=120):
                                raise RuntimeError("the LOCK never came")
                        c.start_sign(key=uri[tok], format="der")
                        out = io.BytesIO()
                        done = c.stream(io.BytesIO(content[i, r]), out)
                        with lock:
                            signed[i, r] = (out.getvalue(), field(done, "BYTES_IN"))
                            answered[0] += 1
                            if r == 0 and answered[0] >= CLIENTS // 2:
                                half_round.set()
                        out = io.BytesIO()
                        done = c.decrypt(io.BytesIO(encrypted[i, r]), out, key=uri[tok])
                        with lock:
                            decrypted[i, r] = (out.getvalue(), field(done, "URI"))
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                with lock:
                    errors.append(f"client {i} ({tok}): {type(e).__name__}: {e}")
                half_round.set()
                locked.set()
                between.abort()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        start.wait(timeout=60)
        if inflight_lock:
            # Log smime-two out while the first round is under way.
            self.assertTrue(half_round.wait(timeout=120), "half of the first round never answered")
        else:
            # ... or once every client has finished it.
            try:
                between.wait(timeout=300)
            except threading.BrokenBarrierError:
                self.fail(f"a client failed in the first round: {errors}")
        with smime_proto.Connection(self.load.socket) as c:
            done = c.lock(key=f"pkcs11:token={TWO}")
        with lock:
            answered_at_lock = answered[0]
        locked.set()
        self.assertEqual(field(done, "LOGGED_OUT"), 1, done)
        (two_after_lock,) = [dict(g) for n, g in done if n == "TOKEN" and dict(g)["TOKEN_LABEL"] == TWO]
        if not inflight_lock:
            # (In flight, a request that meets the logout logs in again at
            # once from the PIN file: the token may be logged in already.)
            self.assertEqual(two_after_lock["LOGGED_IN"], 0)
        for t in threads:
            t.join(timeout=300)
        took = time.monotonic() - t0
        self.assertFalse([t for t in threads if t.is_alive()], "clients still running after 300 s")
        self.assertEqual(errors, [])
        # Nothing lost.
        self.assertEqual(len(signed), CLIENTS * rounds)
        self.assertEqual(len(decrypted), CLIENTS * rounds)
        self.assertLess(answered_at_lock, CLIENTS * rounds, "the LOCK did not come during the run")

        # Nothing mixed up: every signature, with exactly the expected
        # certificate and over exactly that client's content.
        certs_der = {t: self.der(self.cert_pem[t]) for t in tokens}
        for (i, r), (sig, bytes_in) in sorted(signed.items()):
            tok = tokens[i % 2]
            self.assertEqual(bytes_in, len(content[i, r]))
            self.assertEqual(parse_signed_data(sig)["certs"][0], certs_der[tok], f"client {i} round {r}")
            p = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-nointern", "-certfile",
                                self.cert_pem[tok], "-CAfile", self.fx.ca, "-purpose", "any"],
                               input=sig, capture_output=True)
            self.assertEqual(p.returncode, 0, f"client {i} round {r}: {p.stderr.decode(errors='replace')}")
            self.assertEqual(p.stdout, content[i, r], f"client {i} round {r}: signed content is not its own")
        for (i, r), (plain, used) in sorted(decrypted.items()):
            tok = tokens[i % 2]
            self.assertEqual(plain, content[i, r], f"client {i} round {r}: decrypted content is not its own")
            self.assertIn(f"token={tok}", used)
        # The agent logged smime-two in again for the rounds after the LOCK.
        with smime_proto.Connection(self.load.socket) as c:
            two = [dict(g) for n, g in c.status() if n == "TOKEN" and dict(g)["TOKEN_LABEL"] == TWO]
        self.assertEqual(two[0]["LOGGED_IN"], 1)
        print(f"\n{CLIENTS} clients x {rounds} rounds x (sign + decrypt) on 2 tokens in {took:.1f} s; "
              f"LOCK after {answered_at_lock} answers", flush=True)
        self.assertTrue(self.load.alive())


if __name__ == "__main__":
    main()
