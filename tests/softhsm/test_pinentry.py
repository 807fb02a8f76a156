#!/usr/bin/env python3
"""PIN dialogs through a pinentry program (issue 4): an agent whose
configuration names pinentry_standin.py — a scripted pinentry that speaks
Assuan and logs what it received — asks it for the PIN when a client that
cannot answer NEED_PIN signs with a key on a token that needs a login.

The agents here use sign-cache-idle = ask, so every signature asks for the
PIN again and each test starts from the same state. The stand-in reads its
behaviour from a control file at every start (PINENTRY_STANDIN_CONTROL in
the agent's environment): right PIN, wrong PIN, cancel, empty, error,
hang, crash, exit, %-escaped, slow. The last test runs the real
pinentry-curses on a pseudo-terminal the client names in SESSION_ENV."""
import io
import json
import os
import re
import select
import subprocess
import threading
import time

from harness import EMAIL, PIN, TOKEN, AgentTestCase, ensure_test_user, main
from smime_proto import AgentError

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = os.path.join(HERE, "pinentry_standin.py")
WRONG_PIN = "4711-not-the-pin"
TIMEOUT = 3  # pinentry-timeout of the agents here; the agent adds 2 s of grace
SOFTWARE = "pinentry-test-client"


class PinentryTest(AgentTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()  # cls.agent: a PIN-file agent, used as a bystander
        cls.serial = cls.fx.token_serial()
        cls.control = os.path.join(cls.tmp, "standin.json")
        cls.standin_log = os.path.join(cls.tmp, "standin.log")
        # The agent's own environment, which its pinentry inherits (minus
        # what it must not see: CREDENTIALS_DIRECTORY).
        cls.fx.env.update(PINENTRY_STANDIN_CONTROL=cls.control, PINENTRY_STANDIN_LOG=cls.standin_log,
                          SMIME_STANDIN_MARK="agent-env", DISPLAY=":7", CREDENTIALS_DIRECTORY=cls.tmp)
        cls.fx.env.pop("GPG_TTY", None)
        cls.pe = cls.start_agent("agent-pinentry", ["--config", cls.config("fallback.conf", "")])

    @classmethod
    def config(cls, name, extra, program=STANDIN):
        path = os.path.join(cls.tmp, name)
        with open(path, "w") as f:
            f.write(f"pinentry = {program}\npinentry-timeout = {TIMEOUT}\nsign-cache-idle = ask\n{extra}")
        return path

    # ---- the stand-in ----
    def standin(self, mode, pin=PIN, delay=0):
        with open(self.control, "w") as f:
            json.dump({"mode": mode, "pin": pin, "delay": delay}, f)
        if os.path.exists(self.standin_log):
            os.unlink(self.standin_log)

    def standin_lines(self):
        try:
            with open(self.standin_log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def commands(self, name):
        return [l.split(" ", 1)[1] for l in self.standin_lines() if l.split(" ")[1:2] == [name]]

    def standin_pids(self):
        return [int(l.split()[0]) for l in self.standin_lines() if l.split()[1:2] == ["START"]]

    def assert_no_child_left(self, agent):
        """Every pinentry the agent started has been reaped: no child of the
        agent (zombie or not) remains."""
        deadline = time.monotonic() + 5
        while True:
            kids = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        st = f.read()
                except OSError:
                    continue
                fields = st[st.rindex(")") + 2:].split()
                if int(fields[1]) == agent.pid:
                    kids.append(f"{pid} state {fields[0]} {st[:st.rindex(')') + 1]}")
            if not kids or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(kids, [], "the agent left child processes behind")
        for pid in self.standin_pids():
            self.assertFalse(os.path.exists(f"/proc/{pid}"), f"the pinentry (pid {pid}) still exists")

    # ---- clients ----
    def sign_noninteractive(self, agent=None, **kw):
        """Signs as a client that cannot answer NEED_PIN. Returns the DER."""
        out = io.BytesIO()
        with self.connect(agent or self.pe, interactive=False, software=SOFTWARE, **kw) as c:
            c.sign(io.BytesIO(b"pinentry signed\n"), out, key=EMAIL["rsa2048"], format="der")
        return out.getvalue()

    def sign_error(self, agent=None, **kw):
        with self.connect(agent or self.pe, interactive=False, software=SOFTWARE, **kw) as c:
            with self.assertRaises(AgentError) as cm:
                c.start_sign(key=EMAIL["rsa2048"], format="der")
            # The connection goes on serving after the error.
            c.status()
        return cm.exception

    # ---- tests ----
    def test_01_right_pin_signs_and_the_dialog_says_who_asks(self):
        self.standin("pin")
        der = self.sign_noninteractive()
        self.verify(der, "der", expect_content=b"pinentry signed\n")
        self.assertEqual(len(self.commands("GETPIN")), 1)
        (desc,) = self.commands("SETDESC")
        for part in (f'"{TOKEN}"', "SoftHSM project", f"serial {self.serial}", f"pid {os.getpid()}",
                     f'client "{SOFTWARE}"'):
            self.assertIn(part, desc, f"SETDESC does not name {part}")
        self.assertIn("needs its user PIN", desc)
        self.assertIn("\\n\\nRequested by", desc, "the description's lines arrive as lines")
        self.assertIn(TOKEN, self.commands("SETTITLE")[0])
        self.assertEqual(self.commands("SETTIMEOUT"), [f"SETTIMEOUT {TIMEOUT}"])
        self.assertEqual(self.commands("BYE"), ["BYE"])
        (start,) = self.commands("START")
        # Only stdin and stdout (one socket) and stderr; no signal blocked;
        # the agent's environment minus CREDENTIALS_DIRECTORY.
        fds = re.search(r"fds=(\S+)", start).group(1).split(",")
        self.assertEqual([f.split(":")[0] for f in fds], ["0", "1", "2"], start)
        self.assertTrue(fds[0].startswith("0:socket:") and fds[1] == fds[0].replace("0:", "1:", 1), start)
        self.assertIn("sigblk=0000000000000000", start)
        self.assertIn("SMIME_STANDIN_MARK=agent-env", start)
        self.assertIn("DISPLAY=:7", start)
        self.assertNotIn("CREDENTIALS_DIRECTORY", start)
        self.assertIn(f"asking for the PIN of token '{TOKEN}' with {STANDIN}", self.pe.log())
        self.assert_no_child_left(self.pe)

    def test_02_smimectl_without_a_terminal_gets_the_dialog_on_its_display(self):
        """smimectl (libsmime-agent) sends DISPLAY and friends in HELLO's
        SESSION_ENV; they override the agent's own for this client."""
        self.standin("pin")
        env = self.ctl_env(self.pe)
        env.update(DISPLAY=":42", LANG="C.UTF-8")
        r = subprocess.run([self.ctl_bin, "sign", "--key", EMAIL["p256"], "--format", "der"], input=b"via smimectl\n",
                           capture_output=True, env=env, timeout=60, start_new_session=True)
        self.assertEqual(r.returncode, 0, r.stderr.decode())
        self.verify(r.stdout, "der", expect_content=b"via smimectl\n")
        (start,) = self.commands("START")
        self.assertIn("DISPLAY=:42", start)
        self.assertNotIn("DISPLAY=:7", start)
        self.assertIn("OPTION lc-ctype=C.UTF-8", self.commands("OPTION"))
        self.assertIn('client "smimectl', self.commands("SETDESC")[0])

    def test_03_wrong_pin_is_not_retried(self):
        self.standin("pin", pin=WRONG_PIN)
        e = self.sign_error()
        self.assertEqual(e.name, "PIN_INCORRECT")
        self.assertIn("CKR_PIN_INCORRECT", e.message)
        self.assertRegex(e.message, r"the token (reports|does not say)", "the error says what the token reports "
                         "about the PIN's tries")
        self.assertEqual(len(self.commands("GETPIN")), 1, "the agent asked the pinentry again")
        self.assertNotIn(WRONG_PIN, self.pe.log(), "the PIN went to the log")
        self.assert_no_child_left(self.pe)
        # The next request asks again and signs with the right PIN.
        self.standin("pin")
        self.verify(self.sign_noninteractive(), "der", expect_content=b"pinentry signed\n")

    def test_04_cancel_and_empty_are_cancelled(self):
        for mode, words in (("cancel", "cancelled"), ("empty", "empty PIN")):
            with self.subTest(mode):
                self.standin(mode)
                e = self.sign_error()
                self.assertEqual(e.name, "CANCELLED", e.message)
                self.assertIn(words, e.message)
                self.assertIn(f"token '{TOKEN}'", e.message)
                self.assertIn("nothing was tried on the token", e.message)
                self.assertEqual(len(self.commands("GETPIN")), 1)
                self.assert_no_child_left(self.pe)

    def test_05_failing_pinentries_are_clear_errors(self):
        for mode, words in (("error", "ERR 83918950 No such device"), ("crash", "killed by signal 9 (SIGKILL)"),
                            ("exit", "exited with status 3"), ("garbage", "not Assuan"),
                            ("timeout", f"no PIN was entered in the dialog within {TIMEOUT} s")):
            with self.subTest(mode):
                self.standin(mode)
                t0 = time.monotonic()
                e = self.sign_error()
                self.assertLess(time.monotonic() - t0, TIMEOUT, "a failure that the pinentry reports is not waited out")
                self.assertEqual(e.name, "PIN_REQUIRED", e.message)
                self.assertIn(words, e.message)
                if mode != "timeout":
                    self.assertIn(STANDIN, e.message, "the error names the program")
                self.assert_no_child_left(self.pe)

    def test_06_hung_pinentry_is_killed_and_the_agent_serves_others(self):
        self.standin("hang")
        result = {}

        def hung_client():
            t0 = time.monotonic()
            try:
                result["error"] = self.sign_error()
            finally:
                result["took"] = time.monotonic() - t0

        th = threading.Thread(target=hung_client)
        th.start()
        deadline = time.monotonic() + 10
        while not self.commands("GETPIN") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertTrue(self.commands("GETPIN"), "the dialog never started")
        # Meanwhile: other clients are served, by this agent and the bystander.
        t0 = time.monotonic()
        with self.connect(self.pe) as c:
            self.assertTrue(c.status())
            self.assertTrue(c.keys())
        self.assert_agent_serves(self.agent)
        self.assertLess(time.monotonic() - t0, TIMEOUT, "other clients waited for the hung dialog")
        self.assertTrue(th.is_alive(), "the hung request ended too early")
        th.join(30)
        e = result["error"]
        self.assertEqual(e.name, "PIN_REQUIRED", e.message)
        self.assertIn(f"did not answer within {TIMEOUT + 2} s", e.message)
        self.assertIn("stopped", e.message)
        self.assertGreater(result["took"], TIMEOUT + 1.5)
        self.assertLess(result["took"], TIMEOUT + 5)
        self.assert_no_child_left(self.pe)

    def test_07_client_gone_closes_the_dialog(self):
        self.standin("hang")
        c = self.connect(self.pe, interactive=False, software=SOFTWARE)
        c.send(0x10, [("KEY", EMAIL["rsa2048"]), ("FORMAT", "der")])  # SIGN
        deadline = time.monotonic() + 10
        while not self.commands("GETPIN") and time.monotonic() < deadline:
            time.sleep(0.05)
        (pid,) = self.standin_pids()
        c.close()
        t0 = time.monotonic()
        while os.path.exists(f"/proc/{pid}") and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        self.assertLess(time.monotonic() - t0, 1.5, "the pinentry outlived its client")
        self.assert_no_child_left(self.pe)
        deadline = time.monotonic() + 5
        while "client went away" not in self.pe.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIn("the client went away while the PIN dialog was open", self.pe.log())

    def test_08_one_dialog_at_a_time(self):
        self.standin("pin", delay=1)
        results = []

        def one():
            try:
                results.append(self.sign_noninteractive())
            except Exception as e:  # noqa: BLE001 — reported below
                results.append(e)

        ths = [threading.Thread(target=one) for _ in range(2)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
        self.assertEqual(len(results), 2)
        for r in results:
            self.assertIsInstance(r, bytes, f"a concurrent signature failed: {r}")
        times = []
        for l in self.standin_lines():
            m = re.match(r"\d+ (START|ANSWERED) t=([\d.]+)", l)
            if m:
                times.append((m.group(1), float(m.group(2))))
        self.assertEqual([k for k, _ in times], ["START", "ANSWERED", "START", "ANSWERED"],
                         "two dialogs were open at the same time")

    def test_09_escaped_pin(self):
        self.standin("escaped")
        self.verify(self.sign_noninteractive(), "der", expect_content=b"pinentry signed\n")

    def test_10_interactive_clients_get_need_pin_unless_mode_is_always(self):
        self.standin("pin")
        asked = []
        with self.connect(self.pe, interactive=True) as c:
            c.start_sign(key=EMAIL["rsa2048"], format="der", pin=lambda f: asked.append(f) or PIN)
            c.stream(io.BytesIO(b"x\n"), io.BytesIO())
        self.assertEqual(len(asked), 1, "pinentry-mode = fallback: an interactive client gets NEED_PIN")
        self.assertEqual(self.commands("GETPIN"), [], "the pinentry ran for an interactive client")

        always = self.start_agent("agent-always", ["--config", self.config("always.conf", "pinentry-mode = always\n")])
        asked.clear()
        with self.connect(always, interactive=True) as c:
            c.start_sign(key=EMAIL["rsa2048"], format="der", pin=lambda f: asked.append(f) or PIN)
            out = io.BytesIO()
            c.stream(io.BytesIO(b"always\n"), out)
        self.assertEqual(asked, [], "pinentry-mode = always: NEED_PIN was sent")
        self.assertEqual(len(self.commands("GETPIN")), 1)
        self.verify(out.getvalue(), "der", expect_content=b"always\n")
        always.check_exit()

    def test_11_configuration_errors_stop_the_agent(self):
        for extra, program, words in (
                ("", "/nonexistent/pinentry", "/nonexistent/pinentry: No such file or directory"),
                ("", "no-such-pinentry-here", "'no-such-pinentry-here' is not in $PATH"),
                ("", os.path.join(HERE, "README.md"), "is not an executable file"),
                ("pinentry-mode = sometimes\n", STANDIN, "pinentry-mode must be 'fallback'"),
                ("pinentry-timeout = 0\n", STANDIN, "pinentry-timeout must be a number of seconds from 1 to 3600")):
            with self.subTest(words):
                cfg = self.config("bad.conf", extra, program)
                r = subprocess.run([self.agent_bin, "--config", cfg, "--socket", os.path.join(self.tmp, "bad.sock")],
                                   capture_output=True, text=True, env=self.fx.env, timeout=60)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn(words, r.stderr)

    def test_12_session_env_from_hello(self):
        """Allowed names from HELLO reach the pinentry; others do not."""
        self.standin("pin")
        self.sign_noninteractive(session_env=["DISPLAY=:99", "GPG_TTY=/dev/pts/99", "TERM=vt100",
                                              "LD_PRELOAD=/tmp/evil.so", "PATH=/tmp/evil"])
        start = self.commands("START")[0]
        self.assertIn("DISPLAY=:99", start)
        self.assertIn("GPG_TTY=/dev/pts/99", start)
        (start,) = self.commands("START")
        self.assertIn(" PATH=", start, "the stand-in shows PATH")
        self.assertNotIn("evil", "\n".join(self.standin_lines()))
        self.assertEqual(self.commands("OPTION")[:2], ["OPTION ttyname=/dev/pts/99", "OPTION ttytype=vt100"])

    def test_13_real_pinentry_curses(self):
        """Debian's pinentry-curses, started by the agent, on a pseudo-terminal
        the client names in SESSION_ENV (GPG_TTY), as mutt would with gpg."""
        prog = "/usr/bin/pinentry-curses"
        if not os.access(prog, os.X_OK):
            self.skipTest(f"{prog} is not installed (apt-get install pinentry-curses)")
        agent = self.start_agent("agent-curses", ["--config", self.config("curses.conf", "", prog)])
        master, slave = os.openpty()
        tty = os.ttyname(slave)
        result = {}

        def client():
            try:
                result["der"] = self.sign_noninteractive(agent, session_env=[f"GPG_TTY={tty}", "TERM=xterm",
                                                                             "LC_ALL=C.UTF-8"])
            except Exception as e:  # noqa: BLE001 — reported below
                result["error"] = e

        th = threading.Thread(target=client)
        th.start()
        screen, typed, deadline = b"", False, time.monotonic() + 30
        while th.is_alive() and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                screen += os.read(master, 65536)
            if not typed and b"PIN:" in screen:
                time.sleep(0.3)
                os.write(master, PIN.encode() + b"\r")
                typed = True
        th.join(10)
        os.close(master)
        os.close(slave)
        text = screen.decode("utf-8", "replace")
        self.assertTrue(typed, f"no PIN prompt on the terminal: {text[-2000:]!r}")
        self.assertNotIn("error", result, result.get("error"))
        self.verify(result["der"], "der", expect_content=b"pinentry signed\n")
        self.assertIn(TOKEN, text)
        self.assertIn(f"pid {os.getpid()}", text)
        self.assertNotIn(PIN, re.sub(r"\d{5,}|pid \d+", "", text), "pinentry-curses echoed the PIN")
        self.assert_no_child_left(agent)
        agent.check_exit()

    def test_14_special_characters_in_the_pin(self):
        """A PIN with %, space, + and a non-ASCII character goes through the
        dialog unchanged (pkcs11-tool sets it, then puts 1234 back)."""
        special = "p%1 +\u00e9"
        tool = ["pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", TOKEN, "--login",
                "--change-pin"]
        r = subprocess.run(tool + ["--pin", PIN, "--new-pin", special], capture_output=True, text=True,
                           env=self.fx.env, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        try:
            # A fresh agent, so that SoftHSM reads the token's new PIN.
            agent = self.start_agent("agent-special", ["--config", self.config("special.conf", "")])
            self.standin("pin", pin=special)
            self.verify(self.sign_noninteractive(agent), "der", expect_content=b"pinentry signed\n")
            self.standin("escaped", pin=special)
            self.verify(self.sign_noninteractive(agent), "der", expect_content=b"pinentry signed\n")
            self.assertNotIn(special, agent.log())
            agent.check_exit()
        finally:
            r = subprocess.run(tool + ["--pin", special, "--new-pin", PIN], capture_output=True, text=True,
                               env=self.fx.env, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)

    def test_15_another_users_dialog_is_named_and_its_session_env_ignored(self):
        """A user an allow line grants a key gets the dialog on the agent's
        user's session (the agent's DISPLAY, not the one it sends), and the
        dialog says which user asks."""
        if os.getuid() != 0:
            self.skipTest("needs root: creates a test user and runs smimectl as it (setpriv)")
        other = "smime-test-u1"
        uid = ensure_test_user(other)
        os.chmod(self.tmp, 0o711)
        agent = self.start_agent("agent-shared", ["--config", self.config(
            "shared.conf", f"socket-mode = 0666\nallow = {EMAIL['rsa2048']} sign user:{other}\n")],
            socket_path=os.path.join(self.tmp, "shared", "socket"))
        self.standin("pin")
        env = self.ctl_env(agent)
        env.update(DISPLAY=":66", GPG_TTY="/dev/pts/66")
        cmd = ["setpriv", f"--reuid={other}", f"--regid={other}", "--init-groups", self.ctl_bin, "sign", "--key",
               EMAIL["rsa2048"], "--format", "der"]
        r = subprocess.run(cmd, input=b"for another user\n", capture_output=True, env=env, timeout=60,
                           start_new_session=True)
        self.assertEqual(r.returncode, 0, r.stderr.decode())
        self.verify(r.stdout, "der", expect_content=b"for another user\n")
        (start,) = self.commands("START")
        self.assertIn("DISPLAY=:7", start, "the agent's own DISPLAY")
        self.assertNotIn(":66", "\n".join(self.standin_lines()), "another user chose where the dialog appears")
        self.assertFalse([o for o in self.commands("OPTION") if "ttyname" in o], "its GPG_TTY was used")
        self.assertIn(f"user {other} (uid {uid}) — not you", self.commands("SETDESC")[0])
        agent.check_exit()


if __name__ == "__main__":
    main()
