#!/usr/bin/env python3
"""A remote token through p11-kit's RPC, and the module fault paths.

`p11-kit server` exports the fixture token on a Unix socket and the agent
loads p11-kit-client.so (P11_KIT_SERVER_ADDRESS), as README "Remote tokens"
describes. Then: the server is killed in the middle of a run of signatures
(the clients get clean errors, the agent keeps serving, and signs again once
the server is back); and the server is stopped with SIGSTOP, a hang: the
request gets a TOKEN error when the call timeout (3 s here) passes, later
requests fail at once instead of waiting, STATUS and KEYS still answer and
show the token unresponsive, and after SIGCONT it signs again."""
import io
import os
import signal
import subprocess
import threading
import time

from harness import EMAIL, AgentTestCase, main
from smime_proto import AgentError, ProtocolError

CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
TOKEN_URI = "pkcs11:token=smime-test"


class RemoteTest(AgentTestCase):
    AGENT_ARGS = ()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.server_socket = os.path.join(cls.tmp, "p11-kit.sock")
        cls.server = None
        cls.start_server()
        conf = os.path.join(cls.tmp, "remote.conf")
        with open(conf, "w") as f:
            f.write(f"call-timeout = 3\nhotplug-poll = 1\npin-file = {cls.fx.pin_file}\n")
        cls.fx.env["P11_KIT_SERVER_ADDRESS"] = "unix:path=" + cls.server_socket
        cls.remote = cls.start_agent("remote", ["--module", CLIENT_MODULE, "--config", conf])
        cls.addClassCleanup(cls.stop_server)

    @classmethod
    def start_server(cls):
        if os.path.exists(cls.server_socket):
            os.unlink(cls.server_socket)
        # Its own process group: the server forks a p11-kit-remote per client,
        # and a crash takes both.
        cls.server = subprocess.Popen(["p11-kit", "server", "-f", "-n", cls.server_socket, "--provider",
                                       "/usr/lib/softhsm/libsofthsm2.so", TOKEN_URI],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cls.fx.env,
                                      start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(cls.server_socket):
            if time.monotonic() > deadline or cls.server.poll() is not None:
                raise RuntimeError("p11-kit server did not start")
            time.sleep(0.05)

    @classmethod
    def signal_server(cls, sig):
        os.killpg(cls.server.pid, sig)

    @classmethod
    def stop_server(cls):
        if cls.server and cls.server.poll() is None:
            cls.signal_server(signal.SIGCONT)
            cls.signal_server(signal.SIGKILL)
            cls.server.wait()

    def sign_once(self, key=EMAIL["rsa2048"], timeout=60):
        """'ok', or the error name; never hangs past timeout (the socket's)."""
        try:
            with self.connect(self.remote, timeout=timeout) as c:
                c.start_sign(key=key, format="der")
                out = io.BytesIO()
                c.stream(io.BytesIO(b"remote\n"), out)
            self.verify(out.getvalue(), "der", expect_content=b"remote\n")
            return "ok"
        except AgentError as e:
            return e.name + ": " + e.message

    def token_state(self):
        with self.connect(self.remote, timeout=10) as c:
            (t,) = [dict(g) for n, g in c.status() if n == "TOKEN"]
            return t.get("TOKEN_STATE"), t

    def wait_ok(self, within=60):
        deadline = time.monotonic() + within
        last = None
        while time.monotonic() < deadline:
            last = self.sign_once()
            if last == "ok":
                return
            time.sleep(0.3)
        self.fail(f"no signature within {within} s after the server came back: {last}")

    def test_1_signs_through_the_remote_token(self):
        self.assertEqual(self.sign_once(), "ok")
        state, t = self.token_state()
        self.assertEqual(state, "present")
        self.assertIn("p11-kit-client", t["MODULE_NAME"])

    def test_2_server_killed_during_a_run_then_back(self):
        results, stop = [], threading.Event()

        def run():
            while not stop.is_set():
                try:
                    results.append(self.sign_once(timeout=30))
                except (ProtocolError, OSError) as e:  # a broken conversation is a failure of the agent
                    results.append("BROKEN: " + repr(e))

        th = threading.Thread(target=run)
        th.start()
        try:
            time.sleep(1.5)
            self.signal_server(signal.SIGKILL)
            self.server.wait()
            time.sleep(3)
        finally:
            stop.set()
            th.join(60)
        self.assertFalse(th.is_alive(), "a signature hung")
        errors = [r for r in results if r != "ok"]
        self.assertIn("ok", results)
        self.assertTrue(errors, f"no request failed while the server was down: {results}")
        for e in errors:
            self.assertRegex(e, r"^(TOKEN_REMOVED|TOKEN): ", e)
        self.assertTrue(self.remote.alive())
        self.start_server()
        self.wait_ok()
        self.assertEqual(self.token_state()[0], "present")

    def test_3_server_hangs_then_continues(self):
        self.assertEqual(self.sign_once(), "ok")
        self.signal_server(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            first = self.sign_once()
            took = time.monotonic() - t0
            self.assertRegex(first, r"^TOKEN(_REMOVED)?: ")
            self.assertIn("did not answer", first)
            self.assertLess(took, 20, "the deadline did not bound the request")
            # Now it fails at once, and the agent still answers everything else.
            t0 = time.monotonic()
            second = self.sign_once()
            self.assertLess(time.monotonic() - t0, 2.5, f"the second request waited: {second}")
            self.assertRegex(second, r"^TOKEN: .*not answering")
            t0 = time.monotonic()
            state, _ = self.token_state()
            with self.connect(self.remote, timeout=10) as c:
                c.keys()
            self.assertLess(time.monotonic() - t0, 2.5)
            self.assertEqual(state, "unresponsive")
            r = self.ctl("status", agent=self.remote, timeout=30)
            self.assertIn("UNRESPONSIVE", r.stdout.decode())
        finally:
            self.signal_server(signal.SIGCONT)
        self.wait_ok()
        self.assertEqual(self.token_state()[0], "present")
        self.assertTrue(self.remote.alive())


if __name__ == "__main__":
    main()
