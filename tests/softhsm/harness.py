"""harness — shared machinery of the SoftHSM integration tests.

Each test module builds its own SoftHSM fixture (fixture.sh) in a fresh
temporary directory, starts the real smime-agent on a socket in a 0700
directory, and stops it when the class ends: always, even when set-up
failed half way. A test that fails prints what the agent logged during it.
Under the sanitizers (SMIME_TEST_SANITIZE=1, set by tests.cmake) the agent
runs with ASAN_OPTIONS=detect_leaks=1:abort_on_error=1, and an ASan, UBSan
or LeakSanitizer report in its log (checked after SIGTERM) fails the class;
the only suppressions are tests/lsan.supp's, which name leaks inside
third-party modules (SoftHSM's C_SignInit for Ed25519). smimectl's stderr is
checked for reports too.

Binaries come from SMIME_AGENT_BIN and SMIMECTL_BIN (tests.cmake sets them).
Nothing here uses a fixed path, so modules run in parallel (ctest -j).

Two audit modes wrap every agent a test starts (tests.cmake runs part of
the suite in each):
- SMIME_VALGRIND=1: the agent runs under valgrind memcheck; any memcheck
  error or definite leak (tests/valgrind.supp names the few inside
  third-party modules; indirect leaks hang off a definite one and are shown
  with it) fails the class when the agent stops.
- SMIME_TEST_SPY=1: the agent loads OpenSC's pkcs11-spy in front of SoftHSM
  (--module), and when it stops the spy's log must show no read of a
  private key's secret attributes, no C_WrapKey, and no C_CopyObject or
  C_SetAttributeValue (spy_log_violations()).
"""
import base64
import datetime
import io
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import smime_proto  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
FIXTURE_SH = os.path.join(HERE, "fixture.sh")
LSAN_SUPP = os.path.join(REPO, "tests", "lsan.supp")
# An interpreter another user can run (pyenv shims under /root cannot be).
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

TOKEN = "smime-test"
PIN = "1234"
# label -> e-mail address of the fixture's identities (tests/softhsm/README.md)
EMAIL = {"rsa2048": "alice@example.org", "rsa3072": "bob@example.org", "p256": "carol@example.org",
         "p384": "dave@example.org", "ed25519": "erin@example.org", "expired": "frank@example.org",
         "encrypt-only": "grace@example.org", "p521": "heidi@example.org",
         "sign-only": "ivan@example.org"}

OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_SMIME_CAPS = "1.2.840.113549.1.9.15"
OID_SIGNING_CERT_V2 = "1.2.840.113549.1.9.16.2.47"
OID_ED25519 = "1.3.101.112"
OID_RSASSA_PSS = "1.2.840.113549.1.1.10"
OID_SHA = {"sha256": "2.16.840.1.101.3.4.2.1", "sha384": "2.16.840.1.101.3.4.2.2", "sha512": "2.16.840.1.101.3.4.2.3"}

SPY_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
VALGRIND_SUPP = os.path.join(REPO, "tests", "valgrind.supp")
# Attributes that hold (part of) a private key's secret.
SECRET_ATTRIBUTES = ("CKA_VALUE", "CKA_PRIVATE_EXPONENT", "CKA_PRIME_1", "CKA_PRIME_2", "CKA_EXPONENT_1",
                     "CKA_EXPONENT_2", "CKA_COEFFICIENT")
# Calls that could copy a key out, change its protection, or change the token.
# C_DestroyObject is allowed only on what C_DeriveKey just made (below).
FORBIDDEN_CALLS = ("C_WrapKey", "C_UnwrapKey", "C_CopyObject", "C_SetAttributeValue", "C_CreateObject",
                   "C_GenerateKey", "C_GenerateKeyPair", "C_InitPIN", "C_SetPIN", "C_InitToken")

SANITIZER_PATTERNS = ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer", "ERROR: UndefinedBehaviorSanitizer")


def _binary(var, rel):
    path = os.environ.get(var) or os.path.join(REPO, "build", rel)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{var} is not set and {path} does not exist: run through ctest")
    return path


def _is_sanitized(path):
    if os.environ.get("SMIME_TEST_SANITIZE") in ("0", "1"):
        return os.environ["SMIME_TEST_SANITIZE"] == "1"
    with open(path, "rb") as f:
        return b"__asan_init" in f.read()


def sanitizer_report(text):
    """The sanitizer report lines in a log, or "" when there is none."""
    return "\n".join(l for l in text.splitlines() if any(p in l for p in SANITIZER_PATTERNS))


def valgrind_mode():
    return os.environ.get("SMIME_VALGRIND") == "1"


def spy_mode():
    return os.environ.get("SMIME_TEST_SPY") == "1"


def spy_log_violations(path):
    """Reads a pkcs11-spy log. Returns (violations, stats): violations lists
    every secret-attribute read of a private key (or of an object whose class
    the log does not show) and every forbidden call; stats counts what was
    understood, so that a test can tell an empty or unparsed log from a
    clean one."""
    objs, violations = {}, []
    stats = {"calls": 0, "private_key_reads": 0, "sign_calls": 0, "objects": 0, "logins": 0, "derived": 0,
             "derived_destroyed": 0}
    # ECDH (decrypt): C_DeriveKey puts the shared secret Z in a session
    # object, not sensitive, which the agent reads (CKA_VALUE) and destroys
    # at once. That object is the only one whose value may be read and the
    # only one that may be destroyed; a derivation from anything but a
    # private key, or with a template asking for a token object, is a
    # violation.
    derived, derive_base, derive_token = set(), "", False
    call, search_cls, cur_cls, in_template = "", "", "", False
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = re.match(r"\d+: (C_\w+)", line)
            if m:
                call, in_template, cur_cls = m.group(1), False, ""
                stats["calls"] += 1
                if call == "C_FindObjectsInit":
                    search_cls = ""
                if call in ("C_Sign", "C_SignFinal"):
                    stats["sign_calls"] += 1
                if call == "C_Login":
                    stats["logins"] += 1
                if call in FORBIDDEN_CALLS:
                    violations.append(f"call {call}")
                if call == "C_DeriveKey":
                    derive_base, derive_token = "", False
                continue
            # pkcs11-spy prints a call's [out] lines when it returns, after
            # whatever other threads called meanwhile (the hot-plug poll's
            # C_GetTokenInfo, say), so the new key's handle may come under
            # another call's header. Only C_DeriveKey among the calls allowed
            # returns an hKey (C_GenerateKey, C_UnwrapKey are forbidden).
            m = re.match(r"\[out\] hKey = 0x([0-9a-f]+)", line)
            if m:
                if not (call == "C_DeriveKey" and derive_token):
                    derived.add(int(m.group(1), 16))
                    objs[int(m.group(1), 16)] = "derived"
                    stats["derived"] += 1
                continue
            if call == "C_DeriveKey":
                m = re.match(r"\[in\] hBaseKey = 0x([0-9a-f]+)", line)
                if m:
                    derive_base = objs.get(int(m.group(1), 16), "?")
                    if derive_base != "CKO_PRIVATE_KEY":
                        violations.append("C_DeriveKey from an object that is not a private key")
                a = line.split()
                if len(a) >= 2 and a[0] == "CKA_TOKEN" and a[1] == "True":
                    derive_token = True
                    violations.append("C_DeriveKey into a token object")
                continue
            if call == "C_DestroyObject":
                m = re.match(r"\[in\] hObject = 0x([0-9a-f]+)", line)
                if m:
                    h = int(m.group(1), 16)
                    if h in derived:
                        derived.discard(h)
                        objs.pop(h, None)
                        stats["derived_destroyed"] += 1
                    else:
                        violations.append("call C_DestroyObject on an object it did not derive")
                continue
            if line.startswith("[in] pTemplate"):
                in_template = True
                continue
            if line.startswith("[out]") or line.startswith("Returned"):
                in_template = False
                continue
            if call == "C_FindObjectsInit" and in_template:
                a = line.split()
                if len(a) >= 2 and a[0] == "CKA_CLASS":
                    search_cls = a[1]
                continue
            if call == "C_FindObjects":
                m = re.match(r"Object 0x([0-9a-f]+) matches", line)
                if m:
                    objs[int(m.group(1), 16)] = search_cls or "?"
                    stats["objects"] += 1
                continue
            if call == "C_GetAttributeValue":
                m = re.match(r"\[in\] hObject = 0x([0-9a-f]+)", line)
                if m:
                    cur_cls = objs.get(int(m.group(1), 16), "?")
                    continue
                a = line.split()
                if not in_template or not a or not a[0].startswith("CKA_"):
                    continue
                if cur_cls == "CKO_PRIVATE_KEY":
                    stats["private_key_reads"] += 1
                if cur_cls in ("CKO_PRIVATE_KEY", "?") and a[0] in SECRET_ATTRIBUTES:
                    violations.append(f"C_GetAttributeValue {a[0]} of a {'private key' if cur_cls != '?' else 'object of unknown class'}")
    if derived:
        violations.append(f"{len(derived)} derived secret object(s) never destroyed")
    return violations, stats


def sanitizer_env(env):
    env = dict(env)
    # fast_unwind_on_malloc=0: LeakSanitizer needs the slow unwinder to see
    # stacks through libcrypto and the PKCS#11 module (no frame pointers).
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=1:fast_unwind_on_malloc=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    if os.path.exists(LSAN_SUPP):
        env["LSAN_OPTIONS"] = f"suppressions={LSAN_SUPP}:print_suppressions=0"
    return env


class Fixture:
    """A SoftHSM token made by fixture.sh in DIR (about 3 s)."""

    def __init__(self, path):
        self.dir = path
        r = subprocess.run([FIXTURE_SH, path], capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"fixture.sh failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        self.ca = os.path.join(path, "ca.pem")
        self.pin_file = os.path.join(path, "pin")
        # XDG_CONFIG_HOME: the agent must not read the user's own configuration;
        # XDG_STATE_HOME: nor write the address book into the user's home.
        self.env = dict(os.environ, SOFTHSM2_CONF=os.path.join(path, "softhsm2.conf"), XDG_CONFIG_HOME=path,
                        XDG_STATE_HOME=os.path.join(path, "state"))
        self.env.pop("STATE_DIRECTORY", None)  # a CI runner under systemd must not redirect the book

    def cert(self, label):
        return os.path.join(self.dir, "certs", label + ".pem")

    def cert_der(self, label):
        return run(["openssl", "x509", "-in", self.cert(label), "-outform", "DER"]).stdout

    def token_serial(self):
        out = run(["pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "-L"], env=self.env,
                  text=True).stdout
        m = re.search(r"token label\s*:\s*" + TOKEN + r"\s*\n(?:.*\n)*?\s*serial num\s*:\s*(\S+)", out)
        if not m:
            raise RuntimeError("no serial for token " + TOKEN + " in:\n" + out)
        return m.group(1)


class Agent:
    """A running smime-agent with its log in a file."""

    def __init__(self, fixture, workdir, name="agent", args=(), sanitize=False, bin_path=None, socket_path=None):
        self.name = name
        self.rundir = os.path.join(workdir, name + "-run")
        if socket_path:
            # The agent creates the directory itself (modes from its configuration).
            self.rundir = os.path.dirname(socket_path)
        else:
            os.mkdir(self.rundir, 0o700)
        self.socket = socket_path or os.path.join(self.rundir, "socket")
        self.log_path = os.path.join(workdir, name + ".log")
        env = sanitizer_env(fixture.env) if sanitize else dict(fixture.env)
        env.pop("SMIME_AGENT_SOCKET", None)
        self.cmd = [bin_path, "--socket", self.socket, "-v", *args]
        self.spy_log = self.valgrind_log = None
        if spy_mode() and "--module" not in args:
            self.spy_log = os.path.join(workdir, name + ".spy.log")
            env.update(PKCS11SPY=SOFTHSM_MODULE, PKCS11SPY_OUTPUT=self.spy_log)
            self.cmd[1:1] = ["--module", SPY_MODULE]
        if valgrind_mode():
            if sanitize:
                raise RuntimeError("SMIME_VALGRIND=1 needs the build without sanitizers")
            self.valgrind_log = os.path.join(workdir, name + ".valgrind.log")
            self.cmd = ["valgrind", "--tool=memcheck", "--error-exitcode=99", "--leak-check=full",
                        "--show-leak-kinds=definite,indirect", "--errors-for-leak-kinds=definite",
                        "--num-callers=40", f"--suppressions={VALGRIND_SUPP}", f"--log-file={self.valgrind_log}",
                        *self.cmd]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.pid = self.proc.pid
        self.returncode = None
        deadline = time.monotonic() + (180 if valgrind_mode() else 60)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode} before listening:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.socket)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{name} did not listen on {self.socket} in time:\n{self.log()}")
                time.sleep(0.05)

    def log(self, start=0):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self):
        return os.path.getsize(self.log_path)

    def alive(self):
        return self.proc.poll() is None

    def vmhwm_kb(self):
        with open(f"/proc/{self.pid}/status") as f:
            return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1))

    def stop(self):
        """SIGTERM, then wait (LeakSanitizer runs at exit). Returns the exit status."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=300 if valgrind_mode() else 60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    self.returncode = "killed: did not exit within 60 s of SIGTERM"
            if self.returncode is None:
                self.returncode = self.proc.returncode
        return self.returncode

    def check_exit(self):
        """Stops the agent; raises if it died, did not exit cleanly or logged a sanitizer report."""
        if getattr(self, "checked", False):
            return  # reported once, by whoever stopped it first
        self.checked = True
        died_before = self.proc.poll() is not None and self.returncode is None
        rc = self.stop()
        log = self.log()
        report = sanitizer_report(log)
        if self.valgrind_log and os.path.exists(self.valgrind_log):
            with open(self.valgrind_log, errors="replace") as f:
                vg = f.read()
            if rc == 99 or not re.search(r"ERROR SUMMARY: 0 errors", vg):
                report += "\nvalgrind memcheck:\n" + vg[-20000:]
        if self.spy_log:
            violations, stats = spy_log_violations(self.spy_log)
            if violations:
                report += "\npkcs11-spy: the agent touched private key material:\n" + "\n".join(violations[:50])
            if stats["calls"] == 0:
                report += f"\npkcs11-spy: the spy log {self.spy_log} shows no PKCS#11 call at all"
        if report or rc != 0 or died_before:
            raise AssertionError(
                f"{self.name} ({' '.join(self.cmd)}) {'had died before the end' if died_before else 'stopped'} "
                f"with exit status {rc}" + (f"; report:\n{report}" if report else "") +
                f"\n---- {self.log_path} ----\n{log[-30000:]}")


def audit_records(log):
    """The agent's audit lines ("smime-agent: audit: k=v ...") as dicts."""
    import shlex
    out = []
    for line in log.splitlines():
        if line.startswith("smime-agent: audit: "):
            out.append(dict(kv.split("=", 1) for kv in shlex.split(line[len("smime-agent: audit: "):])))
    return out


def ensure_test_user(name, groups=()):
    """A system user NAME (created when missing; needs root) in the given
    supplementary groups (created too). Returns its UID. Users are left in
    place: they own nothing and other runs reuse them."""
    import grp
    import pwd
    # Test modules run in parallel: another one may be adding the same user
    # (useradd then fails on the lock); try again until the user is there.
    for attempt in range(50):
        try:
            for g in groups:
                try:
                    grp.getgrnam(g)
                except KeyError:
                    run(["groupadd", "--system", g], check=False)
                    grp.getgrnam(g)
            try:
                pwd.getpwnam(name)
            except KeyError:
                run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                     "/usr/sbin/nologin", "--user-group", name], check=False)
            for g in groups:
                if name not in grp.getgrnam(g).gr_mem:
                    run(["usermod", "--append", "--groups", g, name])
            return pwd.getpwnam(name).pw_uid
        except (KeyError, AssertionError):
            if attempt == 49:
                raise
            time.sleep(0.2)


def as_user(name, cmd):
    """cmd run as user NAME with its own groups (setpriv, from util-linux)."""
    return ["setpriv", f"--reuid={name}", f"--regid={name}", "--init-groups", *cmd]


def run(cmd, check=True, timeout=300, **kw):
    kw.setdefault("capture_output", True)
    r = subprocess.run(cmd, timeout=timeout, **kw)
    if check and r.returncode != 0:
        err = r.stderr.decode(errors="replace") if isinstance(r.stderr, bytes) else r.stderr
        raise AssertionError(f"{' '.join(map(str, cmd))} failed with {r.returncode}:\n{err}")
    return r


# ---- BER/DER walking (enough for CMS SignedData, indefinite lengths too) ----

class Node:
    __slots__ = ("tag", "cons", "start", "cstart", "cend", "end", "children", "buf")

    def content(self):
        return self.buf[self.cstart:self.cend]

    def raw(self):
        return self.buf[self.start:self.end]

    def octets(self):
        """An OCTET STRING's value, joining the pieces of a constructed one."""
        if not self.cons:
            return self.content()
        return b"".join(c.octets() for c in self.children)


def ber_parse(buf, pos=0):
    n = Node()
    n.buf, n.start, n.tag = buf, pos, buf[pos]
    n.cons = bool(n.tag & 0x20)
    p = pos + 1
    if n.tag & 0x1F == 0x1F:
        while buf[p] & 0x80:
            p += 1
        p += 1
    first = buf[p]
    p += 1
    indefinite = first == 0x80
    if first & 0x80 and not indefinite:
        k = first & 0x7F
        length = int.from_bytes(buf[p:p + k], "big")
        p += k
    else:
        length = first
    n.cstart, n.children = p, []
    if indefinite:
        if not n.cons:
            raise ValueError(f"indefinite length on a primitive at {pos}")
        while buf[p:p + 2] != b"\0\0":
            c = ber_parse(buf, p)
            n.children.append(c)
            p = c.end
        n.cend, n.end = p, p + 2
    else:
        n.cend = n.end = p + length
        if n.end > len(buf):
            raise ValueError(f"element at {pos} runs past the end")
        if n.cons:
            while p < n.cend:
                c = ber_parse(buf, p)
                n.children.append(c)
                p = c.end
    return n


def oid_str(node):
    b = node.content()
    out, v = [str(b[0] // 40), str(b[0] % 40)], 0
    for x in b[1:]:
        v = (v << 7) | (x & 0x7F)
        if not x & 0x80:
            out.append(str(v))
            v = 0
    return ".".join(out)


def parse_signed_data(der):
    """The parts of a CMS SignedData (DER or BER) the tests look at."""
    ci = ber_parse(der)
    if oid_str(ci.children[0]) != OID_SIGNED_DATA:
        raise ValueError("not a SignedData ContentInfo")
    sd = ci.children[1].children[0]
    items = sd.children
    res = {"digest_algs": [oid_str(a.children[0]) for a in items[1].children]}
    eci = items[2]
    res["econtent_type"] = oid_str(eci.children[0])
    res["econtent"] = eci.children[1].children[0].octets() if len(eci.children) > 1 else None
    res["certs"], res["signers"] = [], []
    for it in items[3:]:
        if it.tag == 0xA0:
            res["certs"] = [c.raw() for c in it.children]
        elif it.tag == 0x31:
            for si in it.children:
                s = {"version": int.from_bytes(si.children[0].content(), "big"),
                     "digest_alg": oid_str(si.children[2].children[0]), "attrs": {}, "signed_attrs": None}
                rest = si.children[3:]
                if rest[0].tag == 0xA0:
                    # Signed attributes are signed as a SET OF: re-tag [0] IMPLICIT as 0x31.
                    s["signed_attrs"] = b"\x31" + rest[0].raw()[1:]
                    for a in rest[0].children:
                        s["attrs"][oid_str(a.children[0])] = [v for v in a.children[1].children]
                    rest = rest[1:]
                s["sig_alg"] = oid_str(rest[0].children[0])
                s["sig_alg_params"] = rest[0].children[1].raw() if len(rest[0].children) > 1 else None
                s["signature"] = rest[1].content()
                res["signers"].append(s)
    return res


def utc_time(node):
    s = node.content().decode()
    fmt = "%y%m%d%H%M%SZ" if node.tag == 0x17 else "%Y%m%d%H%M%SZ"
    return datetime.datetime.strptime(s, fmt).replace(tzinfo=datetime.timezone.utc)


# ---- the output formats ----

def pem_to_der(pem):
    body = re.search(rb"-----BEGIN [A-Z0-9 ]+-----\r?\n(.*?)-----END", pem, re.S)
    return base64.b64decode(body.group(1))


def split_message(msg):
    """(header block, body) of an RFC 5322 message with CRLF line ends."""
    i = msg.index(b"\r\n\r\n")
    return msg[:i + 2], msg[i + 4:]


def opaque_der(msg):
    """The SignedData DER of an application/pkcs7-mime message."""
    return base64.b64decode(split_message(msg)[1])


def boundary(msg):
    return re.search(rb'boundary="([^"]+)"', split_message(msg)[0]).group(1)


def multipart_parts(msg):
    """(signed part: the exact bytes between the first boundary line's CRLF and
    the CRLF before the next boundary, DER of the signature part)."""
    b = boundary(msg)
    first = msg.index(b"\r\n--" + b + b"\r\n") + len(b) + 6
    second = msg.index(b"\r\n--" + b + b"\r\n", first)
    sig_part = msg[second + len(b) + 6:msg.index(b"\r\n--" + b + b"--", second)]
    return msg[first:second], base64.b64decode(split_message(sig_part)[1])


def flip_byte(data, marker):
    """data with one byte of marker (which must occur once) changed."""
    i = data.find(marker)
    if i < 0 or data.find(marker, i + 1) >= 0:
        raise AssertionError(f"marker {marker!r} does not occur exactly once")
    i += len(marker) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def der_to_smime_opaque(headers, der):
    b64 = base64.encodebytes(der).replace(b"\n", b"\r\n")
    return headers + b"\r\n" + b64


class AgentTestCase(unittest.TestCase):
    """A test class with its own fixture and agent (cls.fx, cls.agent, cls.tmp)."""

    AGENT_ARGS = ("--pin-file", "{pin}")
    maxDiff = 4000

    @classmethod
    def setUpClass(cls):
        cls.agent_bin = _binary("SMIME_AGENT_BIN", "service/smime-agent")
        cls.ctl_bin = _binary("SMIMECTL_BIN", "client/smimectl")
        cls.sanitize = _is_sanitized(cls.agent_bin)
        cls.tmp = tempfile.mkdtemp(prefix=f"smime-{cls.__name__}-")
        cls.addClassCleanup(cls._remove_tmp)
        cls.work = os.path.join(cls.tmp, "work")
        os.mkdir(cls.work)
        cls.fx = Fixture(os.path.join(cls.tmp, "fx"))
        cls.agents = []
        cls.agent = cls.start_agent("agent", cls.AGENT_ARGS)
        cls._counter = 0

    @classmethod
    def _remove_tmp(cls):
        if os.environ.get("SMIME_TEST_KEEP"):
            print(f"keeping {cls.tmp}", file=sys.stderr)
            return
        # A fixture made by root is removed whatever modes a test left.
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def start_agent(cls, name, args=AGENT_ARGS, socket_path=None):
        args = [a.format(pin=cls.fx.pin_file, dir=cls.fx.dir, tmp=cls.tmp) for a in args]
        agent = Agent(cls.fx, cls.tmp, name, args, cls.sanitize, cls.agent_bin, socket_path)
        cls.agents.append(agent)
        cls.addClassCleanup(agent.check_exit)
        return agent

    # ---- per-test: print the agents' logs of a failed test ----
    def _result_counts(self):
        res = getattr(getattr(self, "_outcome", None), "result", None)
        return (len(res.errors) + len(res.failures)) if res else 0

    def setUp(self):
        self._fails = self._result_counts()
        self._log_starts = {a.name: a.log_size() for a in self.agents}

    def tearDown(self):
        outcome = getattr(self, "_outcome", None)
        failed = self._result_counts() > self._fails or (outcome is not None and not outcome.success)
        if failed:
            for a in self.agents:
                print(f"\n---- {a.name} log during {self.id()} ----\n{a.log(self._log_starts.get(a.name, 0))}",
                      file=sys.stderr)

    # ---- files ----
    def path(self, name):
        type(self)._counter += 1
        return os.path.join(self.work, f"{type(self)._counter:03d}-{name}")

    def write(self, name, data):
        p = self.path(name)
        with open(p, "wb") as f:
            f.write(data)
        return p

    # ---- smimectl ----
    def ctl_env(self, agent=None):
        env = sanitizer_env(self.fx.env) if self.sanitize else dict(self.fx.env)
        env["SMIME_AGENT_SOCKET"] = (agent or self.agent).socket
        return env

    def ctl(self, *args, input=None, agent=None, stdin=None, timeout=300, user=None):
        """Runs smimectl without a controlling terminal (so it cannot ask for a PIN);
        as user USER (setpriv) when given."""
        env = self.ctl_env(agent)
        cmd = [self.ctl_bin, *args]
        with subprocess.Popen(as_user(user, cmd) if user else cmd, stdin=subprocess.PIPE if input is not None else stdin,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              start_new_session=True) as p:
            try:
                out, err = p.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                self.fail(f"smimectl {' '.join(args)} did not finish within {timeout} s: {err!r}")
        r = subprocess.CompletedProcess(p.args, p.returncode, out, err.decode("utf-8", "replace"))
        r.pid = p.pid
        report = sanitizer_report(r.stderr)
        if report:
            self.fail(f"smimectl {' '.join(args)}: sanitizer report:\n{r.stderr}")
        return r

    def sign(self, data, *args, agent=None, user=None):
        """smimectl sign ARGS < data; returns the output, asserting success."""
        r = self.ctl("sign", *args, input=data, agent=agent, user=user)
        self.assertEqual(r.returncode, 0, f"smimectl sign {' '.join(args)} failed: {r.stderr}")
        self.assertTrue(r.stdout, "smimectl sign wrote nothing")
        return r.stdout

    def assert_sign_fails(self, name, *args, data=b"x\n", agent=None, user=None):
        """smimectl sign must exit 1 naming the ERROR code; returns the message."""
        r = self.ctl("sign", *args, input=data, agent=agent, user=user)
        self.assertEqual(r.returncode, 1, f"expected exit 1, got {r.returncode}: {r.stderr}")
        m = re.match(r"smimectl: signing failed: (.*) \[([A-Z_]+)\]\n\Z", r.stderr, re.S)
        self.assertTrue(m, f"unexpected stderr: {r.stderr!r}")
        self.assertEqual(m.group(2), name, r.stderr)
        self.assertEqual(r.stdout, b"", "output written despite the error")
        return m.group(1)

    # ---- openssl ----
    def verify(self, sig, fmt, content=None, ok=True, extra=(), expect_content=None):
        """openssl cms -verify of sig (bytes) in format der|pem|smime; content: the
        detached content (bytes) for DER/PEM. Asserts success or failure."""
        sig_path = self.write("sig." + fmt, sig)
        out_path = sig_path + ".out"
        cmd = ["openssl", "cms", "-verify", "-CAfile", self.fx.ca, "-in", sig_path, "-out", out_path,
               "-inform", {"der": "DER", "pem": "PEM", "smime": "SMIME"}[fmt], *extra]
        if content is not None:
            cmd += ["-content", self.write("content", content), "-binary"]
        r = run(cmd, check=False)
        err = r.stderr.decode(errors="replace")
        if ok:
            self.assertEqual(r.returncode, 0, f"openssl cms -verify failed: {err}")
            self.assertIn("Verification successful", err)
            if expect_content is not None:
                with open(out_path, "rb") as f:
                    self.assertEqual(f.read(), expect_content, "verified content differs")
        else:
            self.assertNotEqual(r.returncode, 0, "openssl cms -verify accepted a tampered or unverifiable signature")
            self.assertNotIn("Verification successful", err)
        return err

    def cms_print(self, der):
        return run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in", self.write("print.der", der)],
                   text=True).stdout

    # ---- raw protocol ----
    # ---- smimectl on a terminal ----
    def smimectl_on_a_pty(self, agent, args, keystrokes):
        """Runs smimectl with a pseudo-terminal as its controlling terminal, and
        types keystrokes once it has turned echo off for the PIN."""
        env = self.ctl_env(agent)
        pid, fd = pty.fork()
        if pid == 0:  # child: its controlling terminal is the pty
            try:
                os.execve(self.ctl_bin, [self.ctl_bin, *args], env)
            finally:
                os._exit(127)
        screen, typed, deadline = b"", False, time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                if not typed and b"PIN for " in screen and not termios.tcgetattr(fd)[3] & termios.ECHO:
                    os.write(fd, keystrokes)
                    typed = True
                ready, _, _ = select.select([fd], [], [], 0.05)
                if ready:
                    try:
                        chunk = os.read(fd, 4096)
                    except OSError:  # EIO: the child closed the terminal
                        chunk = b""
                    if not chunk:
                        break
                    screen += chunk
            else:
                os.kill(pid, signal.SIGKILL)
        finally:
            _, status = os.waitpid(pid, 0)
            os.close(fd)
        screen = screen.decode("utf-8", "replace")
        self.assertEqual(sanitizer_report(screen), "", screen)
        return os.waitstatus_to_exitcode(status), screen, typed

    def connect(self, agent=None, **kw):
        return smime_proto.Connection((agent or self.agent).socket, **kw)

    def raw_sign(self, data, agent=None, **opts):
        out = io.BytesIO()
        with self.connect(agent) as c:
            done = c.sign(io.BytesIO(data), out, **opts)
        self.assertEqual(smime_proto.field(done, "BYTES_IN"), len(data))
        return out.getvalue()

    def assert_agent_serves(self, agent=None):
        """The agent still signs: alice, DER, verified with openssl."""
        agent = agent or self.agent
        self.assertTrue(agent.alive(), f"{agent.name} died:\n{agent.log()[-5000:]}")
        data = b"still serving %d\n" % time.monotonic_ns()
        der = self.raw_sign(data, agent=agent, key=EMAIL["rsa2048"], format="der")
        self.verify(der, "der", expect_content=data)


def main():
    unittest.main(verbosity=2)
