#!/usr/bin/env python3
"""A 200 MB message streams through smimectl and the agent in bounded
memory: the peak RSS of both stays under 64 MB, and the results verify.
The content is never held in this process either: a sparse file for one
run, /dev/zero through a pipe for the other."""
import hashlib
import os
import re
import subprocess
import time

from harness import EMAIL, AgentTestCase, main, run, sanitizer_report

SIZE = 200 * 1024 * 1024
RSS_LIMIT_KB = 64 * 1024
# Under ASan the agent's RSS is mostly ASan's (shadow memory, per-thread
# caches, the quarantine of freed chunks): 61-64 MB measured on 2026-11-23
# against 18 MB in the normal build, where the 64 MB bound is the requirement. 96 MB still
# tells bounded streaming from buffering the 200 MB message.
SANITIZED_RSS_LIMIT_KB = 96 * 1024


class LargeTest(AgentTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sparse = os.path.join(cls.tmp, "zeros-200M")
        with open(cls.sparse, "wb") as f:
            f.truncate(SIZE)  # a hole: no disk, no memory

    def ctl_measured(self, args, stdin, stdout=subprocess.DEVNULL):
        """Runs smimectl; returns (exit status, stderr, peaks in kB). The peaks:
        ru_maxrss from wait4(), an upper bound (Linux carries the parent's RSS
        high-water mark into it across fork and exec, so it includes this
        Python process), and smimectl's own VmHWM sampled while it runs."""
        env = self.ctl_env()
        with open(self.path("smimectl.err"), "w+b") as errf:
            p = subprocess.Popen([self.ctl_bin, *args], stdin=stdin, stdout=stdout, stderr=errf, env=env,
                                 start_new_session=True)
            deadline, hwm = time.monotonic() + 900, 0
            while True:
                try:
                    with open(f"/proc/{p.pid}/status") as f:
                        m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
                    hwm = max(hwm, int(m.group(1))) if m else hwm
                except (FileNotFoundError, ProcessLookupError):
                    pass
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    p.kill()
                    pid, status, usage = os.wait4(p.pid, 0)
                    break
                time.sleep(0.02)
            p.returncode = os.waitstatus_to_exitcode(status)
            errf.seek(0)
            err = errf.read().decode(errors="replace")
            self.assertEqual(sanitizer_report(err), "", err)
            return p.returncode, err, {"ru_maxrss": usage.ru_maxrss, "VmHWM": hwm}

    def check_rss(self, what, kb):
        kb = kb if isinstance(kb, dict) else {"VmHWM": kb}
        print(f"\n{what}: peak RSS " + ", ".join(f"{k} {v / 1024:.1f} MB" for k, v in kb.items()), flush=True)
        for k, v in kb.items():
            limit = SANITIZED_RSS_LIMIT_KB if self.sanitize else RSS_LIMIT_KB
            self.assertLess(v, limit, f"{what} {k} {v} kB: memory is not bounded")
        self.assertGreater(kb["VmHWM"], 0, f"no VmHWM sample of {what}")

    def test_200mb_detached_der(self):
        out = os.path.join(self.tmp, "big.p7s")
        rc, err, rss = self.ctl_measured(["sign", "--key", EMAIL["rsa2048"], "--format", "der", "--detached",
                                          "--in", self.sparse, "--out", out], subprocess.DEVNULL)
        self.assertEqual(rc, 0, err)
        self.assertLess(os.path.getsize(out), 16384, "a detached signature must not contain the content")
        self.check_rss("smimectl", rss)
        self.check_rss("smime-agent", self.agent.vmhwm_kb())
        r = run(["openssl", "cms", "-verify", "-inform", "DER", "-in", out, "-content", self.sparse, "-binary",
                 "-CAfile", self.fx.ca, "-out", "/dev/null"], check=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        # One byte more or less is a different message.
        shorter = os.path.join(self.tmp, "zeros-shorter")
        with open(shorter, "wb") as f:
            f.truncate(SIZE - 1)
        r = run(["openssl", "cms", "-verify", "-inform", "DER", "-in", out, "-content", shorter, "-binary",
                 "-CAfile", self.fx.ca, "-out", "/dev/null"], check=False)
        self.assertNotEqual(r.returncode, 0)
        os.unlink(out)

    def test_200mb_smime_opaque_from_a_pipe(self):
        out = os.path.join(self.tmp, "big.p7m")
        head = subprocess.Popen(["head", "-c", str(SIZE), "/dev/zero"], stdout=subprocess.PIPE)
        try:
            rc, err, rss = self.ctl_measured(["sign", "--key", EMAIL["p256"], "--format", "smime", "--out", out],
                                             head.stdout)
        finally:
            head.stdout.close()
            head.wait()
        self.assertEqual(rc, 0, err)
        self.check_rss("smimectl", rss)
        self.check_rss("smime-agent", self.agent.vmhwm_kb())
        # base64 of the 200 MB content plus the certificate: about 4/3 of it.
        self.assertGreater(os.path.getsize(out), SIZE * 4 // 3)
        # openssl verifies it and hands back exactly the signed content.
        prefix = b"Content-Type: text/plain\r\n\r\n"
        errpath = self.path("verify.err")
        with open(errpath, "w+b") as errf, subprocess.Popen(
                ["openssl", "cms", "-verify", "-in", out, "-CAfile", self.fx.ca], stdout=subprocess.PIPE,
                stderr=errf) as p:
            first = p.stdout.read(len(prefix))
            total, nonzero = 0, 0
            while True:
                block = p.stdout.read(1 << 20)
                if not block:
                    break
                total += len(block)
                nonzero += len(block) - block.count(0)
            rc = p.wait(timeout=600)
            errf.seek(0)
            stderr = errf.read()
        self.assertEqual(rc, 0, stderr)
        self.assertIn(b"Verification successful", stderr)
        self.assertEqual(first, prefix)
        self.assertEqual(total, SIZE)
        self.assertEqual(nonzero, 0)
        os.unlink(out)

    def test_200mb_decrypt(self):
        # openssl -stream writes the ciphertext as it goes (indefinite-length
        # BER, many OCTET STRING segments); the agent must read it the same way.
        enc = os.path.join(self.tmp, "big.p7m")
        run(["openssl", "cms", "-encrypt", "-stream", "-binary", "-aes-256-gcm", "-outform", "DER",
             "-in", self.sparse, "-out", enc, self.fx.cert("p384")], timeout=600)
        self.assertGreater(os.path.getsize(enc), SIZE)
        out = os.path.join(self.tmp, "big.out")
        with open(out, "wb") as o:
            rc, err, rss = self.ctl_measured(["decrypt", "-v", "--in", enc], subprocess.DEVNULL, stdout=o)
        self.assertEqual(rc, 0, err)
        self.assertIn("content authenticated", err)
        self.check_rss("smimectl", rss)
        self.check_rss("smime-agent", self.agent.vmhwm_kb())
        self.assertEqual(os.path.getsize(out), SIZE)
        zeros, h = bytes(1 << 20), hashlib.sha256()
        with open(out, "rb") as f:
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                h.update(block)
        ref = hashlib.sha256()
        for _ in range(SIZE >> 20):
            ref.update(zeros)
        self.assertEqual(h.hexdigest(), ref.hexdigest(), "decrypted content differs")
        os.unlink(out)
        os.unlink(enc)


if __name__ == "__main__":
    main()
