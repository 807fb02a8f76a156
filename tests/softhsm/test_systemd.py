"""systemd integration (issue 5): the shipped units and socket activation.

- The units (as CMake configured them, with ExecStart pointing at the agent
  under test) pass `systemd-analyze verify`, and `systemd-analyze security
  --offline=true` rates each service 2.0 or lower.
- Socket activation for real: systemd-socket-activate holds the socket and
  starts the agent on the first connection (what systemd does with
  smime-agent.socket); the agent finds the socket with sd_listen_fds, tells
  READY=1 and a STATUS= line on a NOTIFY_SOCKET this test listens on, sends
  WATCHDOG=1 when WATCHDOG_USEC is set, STOPPING=1 on SIGTERM, and exits on
  its own after idle-exit seconds without a connection.
- The running agent is not dumpable, has RLIMIT_CORE 0, and every file
  descriptor it opened itself is close-on-exec.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

from harness import EMAIL, REPO, Fixture, run, sanitizer_env, sanitizer_report, _binary, _is_sanitized

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
STRACE = shutil.which("strace")
ANALYZE = shutil.which("systemd-analyze")


def unit_text(path, agent_bin):
    with open(path) as f:
        text = f.read()
    return re.sub(r"^ExecStart=\S*/smime-agent", f"ExecStart={agent_bin}", text, flags=re.M)


class UnitsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not ANALYZE:
            raise unittest.SkipTest("systemd-analyze is not installed (Debian package systemd)")
        cls.agent_bin = _binary("SMIME_AGENT_BIN", "service/smime-agent")
        build = os.environ.get("SMIME_BUILD_DIR") or os.path.join(REPO, "build")
        cls.tmp = tempfile.mkdtemp(prefix="smime-units-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        cls.units = {}
        for scope in ("user", "system"):
            d = os.path.join(cls.tmp, scope)
            os.mkdir(d)
            for name, src in (("smime-agent.service", os.path.join(build, "systemd", scope, "smime-agent.service")),
                              ("smime-agent.socket", os.path.join(REPO, "systemd", scope, "smime-agent.socket"))):
                with open(os.path.join(d, name), "w") as f:
                    f.write(unit_text(src, cls.agent_bin))
            cls.units[scope] = d
        cls.rt = os.path.join(cls.tmp, "runtime")
        os.mkdir(cls.rt, 0o700)

    def analyze(self, scope, *args):
        env = dict(os.environ, XDG_RUNTIME_DIR=self.rt, SYSTEMD_LOG_LEVEL="notice")
        cmd = [ANALYZE] + (["--user"] if scope == "user" else []) + list(args)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=self.units[scope], timeout=120)

    def test_units_verify(self):
        for scope in ("user", "system"):
            r = self.analyze(scope, "verify", "--man=no", "./smime-agent.socket", "./smime-agent.service")
            self.assertEqual(r.returncode, 0, f"{scope}: {r.stdout}{r.stderr}")
            self.assertNotIn("smime-agent", r.stdout + r.stderr, f"{scope} units: {r.stdout}{r.stderr}")

    def test_security_exposure_at_most_2(self):
        for scope in ("user", "system"):
            r = self.analyze(scope, "security", "--offline=true", "./smime-agent.service")
            m = re.search(r"Overall exposure level for smime-agent.service: (\d+\.\d)", r.stdout)
            self.assertTrue(m, f"{scope}: no score in:\n{r.stdout}{r.stderr}")
            print(f"\n{scope} smime-agent.service exposure {m.group(1)}")
            self.assertLessEqual(float(m.group(1)), 2.0, f"{scope} unit:\n{r.stdout}")

    def test_revocation_dropin_verifies(self):
        # systemd/revocation.conf.example, the drop-in for crl-fetch / ocsp:
        # valid in both units, and it opens IP without lifting IPAddressDeny.
        with open(os.path.join(REPO, "systemd", "revocation.conf.example")) as f:
            dropin = f.read()
        for scope in ("user", "system"):
            d = os.path.join(self.tmp, scope + "-revocation")
            os.mkdir(d)
            with open(os.path.join(self.units[scope], "smime-agent.service")) as f:
                text = f.read()
            # A drop-in's assignments come after the unit's: the same as appending them.
            with open(os.path.join(d, "smime-agent.service"), "w") as f:
                f.write(text + "\n" + dropin)
            shutil.copy(os.path.join(self.units[scope], "smime-agent.socket"), d)
            env = dict(os.environ, XDG_RUNTIME_DIR=self.rt, SYSTEMD_LOG_LEVEL="notice")
            user = ["--user"] if scope == "user" else []
            r = subprocess.run([ANALYZE, *user, "verify", "--man=no", "./smime-agent.socket", "./smime-agent.service"],
                               capture_output=True, text=True, env=env, cwd=d, timeout=120)
            self.assertEqual(r.returncode, 0, f"{scope}: {r.stdout}{r.stderr}")
            self.assertNotIn("smime-agent", r.stdout + r.stderr, f"{scope} units: {r.stdout}{r.stderr}")
            r = subprocess.run([ANALYZE, *user, "security", "--offline=true", "./smime-agent.service"],
                               capture_output=True, text=True, env=env, cwd=d, timeout=120)
            m = re.search(r"Overall exposure level for smime-agent.service: (\d+\.\d)", r.stdout)
            self.assertTrue(m, f"{scope}: no score in:\n{r.stdout}{r.stderr}")
            print(f"\n{scope} smime-agent.service with the revocation drop-in: exposure {m.group(1)}")
            self.assertLessEqual(float(m.group(1)), 2.0, f"{scope} unit:\n{r.stdout}")
            # Deny-all with an allow list, not "Service does not define an IP address allow list".
            self.assertIn("IP address allow list with non-localhost entries", r.stdout)

    def test_hardening_directives_present(self):
        # The list, in both service units.
        for scope in ("user", "system"):
            with open(os.path.join(self.units[scope], "smime-agent.service")) as f:
                text = f.read()
            for d in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "PrivateNetwork=yes",
                      "RestrictAddressFamilies=AF_UNIX", "MemoryDenyWriteExecute=yes", "LockPersonality=yes",
                      "RestrictRealtime=yes", "SystemCallFilter=@system-service", "CapabilityBoundingSet=\n",
                      "Type=notify", "WatchdogSec=", "StateDirectory=smime-agent\n"):
                self.assertIn(d, text, f"{scope} unit lacks {d.strip()}")


class NotifyListener:
    """A NOTIFY_SOCKET like systemd's: collects the sd_notify datagrams."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages = []

    def wait_for(self, pred, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if pred(m):
                    return m
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                break
        for m in self.messages:
            if pred(m):
                return m
        return None

    def collect(self, seconds):
        """Everything that arrives during the next SECONDS."""
        self.wait_for(lambda m: False, timeout=seconds)

    def close(self):
        self.sock.close()


@unittest.skipUnless(SOCKET_ACTIVATE, "systemd-socket-activate is not installed (Debian package systemd)")
class SocketActivationTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.agent_bin = _binary("SMIME_AGENT_BIN", "service/smime-agent")
        cls.ctl_bin = _binary("SMIMECTL_BIN", "client/smimectl")
        cls.sanitize = _is_sanitized(cls.agent_bin)
        cls.tmp = tempfile.mkdtemp(prefix="smime-activate-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        cls.fx = Fixture(os.path.join(cls.tmp, "fx"))

    def setUp(self):
        self.dir = tempfile.mkdtemp(dir=self.tmp)
        self.sock_path = os.path.join(self.dir, "socket")
        self.notify = NotifyListener(os.path.join(self.dir, "notify"))
        self.addCleanup(self.notify.close)
        self.proc = None

    def start(self, config="", watchdog_usec=None):
        conf = os.path.join(self.dir, "agent.conf")
        with open(conf, "w") as f:
            f.write(config)
        env = sanitizer_env(self.fx.env) if self.sanitize else dict(self.fx.env)
        env.pop("NOTIFY_SOCKET", None)
        setenv = ["-E", f"NOTIFY_SOCKET={self.notify.path}", "-E", f"SOFTHSM2_CONF={env['SOFTHSM2_CONF']}",
                  "-E", f"XDG_CONFIG_HOME={self.fx.dir}"]
        for k in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"):
            if k in env:
                setenv += ["-E", f"{k}={env[k]}"]
        if watchdog_usec:
            setenv += ["-E", f"WATCHDOG_USEC={watchdog_usec}"]
        self.log_path = os.path.join(self.dir, "agent.log")
        self.log = open(self.log_path, "wb")
        self.addCleanup(self.log.close)
        self.proc = subprocess.Popen([SOCKET_ACTIVATE, "-l", self.sock_path, *setenv, self.agent_bin, "-v",
                                      "--config", conf, "--pin-file", self.fx.pin_file],
                                     stdout=self.log, stderr=self.log, env=env)
        self.addCleanup(self.stop)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock_path):
            self.assertIsNone(self.proc.poll(), self.agent_log())
            self.assertLess(time.monotonic(), deadline, "systemd-socket-activate did not listen")
            time.sleep(0.02)

    def agent_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def ctl(self, *args, input=None):
        env = sanitizer_env(self.fx.env) if self.sanitize else dict(self.fx.env)
        env["SMIME_AGENT_SOCKET"] = self.sock_path
        r = subprocess.run([self.ctl_bin, *args], input=input, capture_output=True, env=env, timeout=120)
        self.assertEqual(sanitizer_report(r.stderr.decode(errors="replace")), "")
        return r

    def exe(self):
        return os.readlink(f"/proc/{self.proc.pid}/exe")

    def test_started_on_first_connection_ready_status_watchdog_stopping(self):
        self.start(watchdog_usec=400000)
        # Nothing runs the agent before a client comes.
        time.sleep(0.3)
        self.assertEqual(self.notify.messages, [])
        self.assertNotEqual(os.path.realpath(self.exe()), os.path.realpath(self.agent_bin))
        r = self.ctl("status")
        self.assertEqual(r.returncode, 0, r.stderr.decode() + self.agent_log())
        self.assertEqual(os.path.realpath(self.exe()), os.path.realpath(self.agent_bin))
        self.assertIn("listening on the socket passed by systemd", self.agent_log())
        ready = self.notify.wait_for(lambda m: "READY=1" in m)
        self.assertIsNotNone(ready, f"no READY=1; got {self.notify.messages}")
        self.assertRegex(ready, r"STATUS=1 token\(s\), 0 logged in, 11 key\(s\); \d+ connection\(s\)")
        # The watchdog: WATCHDOG=1 at least every 200 ms (half of WATCHDOG_USEC).
        n = sum("WATCHDOG=1" in m for m in self.notify.messages)
        self.notify.collect(1.0)
        self.assertGreaterEqual(sum("WATCHDOG=1" in m for m in self.notify.messages) - n, 3,
                                f"too few WATCHDOG=1 in a second: {self.notify.messages}")
        # Sign: after the login STATUS says so.
        data = b"socket activated\n"
        r = self.ctl("sign", "--key", EMAIL["rsa2048"], "--format", "der", input=data)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIsNotNone(self.notify.wait_for(lambda m: "STATUS=1 token(s), 1 logged in" in m),
                             f"STATUS never showed the login: {self.notify.messages}")
        # Hardening of the running process: no core file, no fd leaks to exec.
        with open(f"/proc/{self.proc.pid}/limits") as f:
            self.assertRegex(f.read(), r"Max core file size\s+0\s+0\s")
        self.assert_fds_cloexec()
        # SIGTERM: STOPPING=1 and a clean exit.
        self.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.proc.wait(timeout=60), 0, self.agent_log())
        self.assertIsNotNone(self.notify.wait_for(lambda m: "STOPPING=1" in m, timeout=5),
                             f"no STOPPING=1: {self.notify.messages}")
        self.assertEqual(sanitizer_report(self.agent_log()), "")

    def assert_fds_cloexec(self):
        """Every fd but 0-2 is O_CLOEXEC: a module that execs helpers gets none of ours."""
        leaking = []
        fd_dir = f"/proc/{self.proc.pid}/fd"
        for fd in os.listdir(fd_dir):
            if int(fd) <= 2:
                continue
            try:
                with open(f"/proc/{self.proc.pid}/fdinfo/{fd}") as f:
                    flags = int(re.search(r"^flags:\s+(\d+)", f.read(), re.M).group(1), 8)
                target = os.readlink(f"{fd_dir}/{fd}")
            except FileNotFoundError:
                continue
            if not flags & 0o2000000:
                leaking.append(f"{fd} -> {target}")
        self.assertEqual(leaking, [], "file descriptors without O_CLOEXEC")

    def test_not_dumpable(self):
        """PR_SET_DUMPABLE 0: the kernel then gives the process's /proc files
        to root, so a process of another UID shows up as root-owned, and its
        own user can no longer read its memory or environment. Run the
        agent as nobody (as root) or as ourselves, and look."""
        run_dir = os.path.join(self.dir, "nd")
        os.mkdir(run_dir)
        os.chmod(run_dir, 0o777)
        os.chmod(self.dir, 0o755)
        os.chmod(self.tmp, 0o711)
        env = sanitizer_env(os.environ) if self.sanitize else dict(os.environ)
        env.update(SOFTHSM2_CONF=os.path.join(run_dir, "none.conf"), XDG_CONFIG_HOME=run_dir)
        cmd = [self.agent_bin, "--socket", os.path.join(run_dir, "s", "socket")]
        uid = os.getuid()
        if uid == 0:
            cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
            uid = 65534
        log = open(os.path.join(run_dir, "log"), "wb")
        self.addCleanup(log.close)
        p = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(os.path.join(run_dir, "s", "socket")):
                if p.poll() is not None:
                    with open(os.path.join(run_dir, "log")) as f:
                        self.fail(f"the agent exited before listening:\n{f.read()}")
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.02)
            with open(f"/proc/{p.pid}/status") as f:
                self.assertRegex(f.read(), rf"(?m)^Uid:\s+{uid}\s", "the agent runs as the expected user")
            self.assertEqual(os.stat(f"/proc/{p.pid}/environ").st_uid, 0,
                             "/proc/PID/environ of the agent belongs to root: it is not dumpable")
            with open(f"/proc/{p.pid}/limits") as f:
                self.assertRegex(f.read(), r"Max core file size\s+0\s+0\s")
        finally:
            p.send_signal(signal.SIGTERM)
            self.assertEqual(p.wait(timeout=60), 0)

    def test_idle_exit(self):
        self.start("idle-exit = 1\n")
        r = self.ctl("sign", "--key", EMAIL["p256"], "--format", "der", input=b"idle soon\n")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.proc.wait(timeout=30), 0, self.agent_log())
        self.assertIn("idle for", self.agent_log())
        self.assertIsNotNone(self.notify.wait_for(lambda m: "STOPPING=1" in m, timeout=5))
        self.assertEqual(sanitizer_report(self.agent_log()), "")


def syscall_set(spec, cache={}):
    """The system calls of a group (@system-service) or a single name."""
    if not spec.startswith("@"):
        return {spec}
    if spec not in cache:
        out = subprocess.run([ANALYZE, "syscall-filter", spec], capture_output=True, text=True, check=True).stdout
        names = set()
        for line in out.splitlines()[1:]:
            w = line.strip()
            if w and not w.startswith("#"):
                names |= syscall_set(w) if w != spec else set()
        cache[spec] = names
    return cache[spec]


def unit_filter(path):
    """The system calls a unit's SystemCallFilter= lines let through."""
    allowed, denied = None, set()
    with open(path) as f:
        for line in f:
            if not line.startswith("SystemCallFilter="):
                continue
            v = line.split("=", 1)[1].strip()
            deny = v.startswith("~")
            names = set().union(*(syscall_set(w) for w in v.lstrip("~").split()))
            if deny:
                denied |= names
            else:
                allowed = names if allowed is None else allowed | names
    return allowed - denied


@unittest.skipUnless(STRACE and ANALYZE, "needs strace and systemd-analyze")
class SyscallFilterTest(unittest.TestCase):
    """Every system call the agent makes while it starts (loading every
    p11-kit module, OpenSC's too), logs in, signs with each key type and
    stops is let through by the units' SystemCallFilter: a call outside it
    would fail with EPERM under systemd (SystemCallErrorNumber=EPERM)."""

    def test_agent_stays_inside_the_unit_filter(self):
        agent_bin = _binary("SMIME_AGENT_BIN", "service/smime-agent")
        if _is_sanitized(agent_bin):
            self.skipTest("the sanitizer runtime makes calls of its own; checked in the plain build")
        ctl_bin = _binary("SMIMECTL_BIN", "client/smimectl")
        tmp = tempfile.mkdtemp(prefix="smime-syscalls-")
        self.addCleanup(shutil.rmtree, tmp, True)
        fx = Fixture(os.path.join(tmp, "fx"))
        sock = os.path.join(tmp, "run", "socket")
        trace = os.path.join(tmp, "strace")
        log = open(os.path.join(tmp, "log"), "wb")
        self.addCleanup(log.close)
        p = subprocess.Popen([STRACE, "-f", "-qq", "-o", trace, agent_bin, "--socket", sock, "--pin-file",
                              fx.pin_file], stdout=log, stderr=log, env=fx.env)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(sock):
                self.assertIsNone(p.poll())
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.05)
            env = dict(fx.env, SMIME_AGENT_SOCKET=sock)
            for args in (["status"], ["keys"]):
                self.assertEqual(subprocess.run([ctl_bin, *args], env=env, capture_output=True).returncode, 0)
            for label in ("rsa2048", "p256", "ed25519"):
                r = subprocess.run([ctl_bin, "sign", "--key", EMAIL[label]], input=b"x\n", env=env,
                                   capture_output=True)
                self.assertEqual(r.returncode, 0, r.stderr)
        finally:
            # strace's child is the agent: stop it, strace follows.
            with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                kids = f.read().split()
            for k in kids:
                os.kill(int(k), signal.SIGTERM)
            p.wait(timeout=60)
        used = set()
        with open(trace) as f:
            for line in f:
                m = re.match(r"\d+\s+([a-z_0-9]+)\(", line)
                if m:
                    used.add(m.group(1))
        self.assertIn("accept4", used, "the trace was understood")
        used.discard("execve")  # strace starting the agent; the manager does that under systemd
        for scope in ("user", "system"):
            src = os.path.join(REPO, "systemd", scope, "smime-agent.service.in")
            outside = sorted(used - unit_filter(src))
            self.assertEqual(outside, [], f"{scope} unit's SystemCallFilter would refuse these")


if __name__ == "__main__":
    unittest.main(verbosity=2)
