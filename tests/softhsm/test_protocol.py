#!/usr/bin/env python3
"""Protocol abuse against the real agent. Each case checks the agent's
answer (ERROR code, then the connection closed where the spec says so) and
then that the same agent still signs. Also: another user is refused, an
idle connection blocks nobody, and 32 concurrent clients all get valid,
unmixed results."""
import io
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import threading

from harness import EMAIL, SYSTEM_PYTHON, AgentTestCase, main, parse_signed_data
import smime_proto
from smime_proto import DATA, END, ERROR, HELLO, KEYS, SIGN, AgentError, decode_fields, field

CLOSES = {"PROTOCOL", "TOO_LARGE", "VERSION"}


class ProtocolTest(AgentTestCase):
    def raw_conn(self, hello=True):
        return self.connect(hello=hello, timeout=30)

    def answer_then_eof(self, c):
        """Reads to the end of the connection: the ERROR names seen, then how it ended."""
        errors = []
        try:
            while True:
                frame = c.recv()
                if frame is None:
                    return errors, "eof"
                mtype, payload = frame
                if mtype == ERROR:
                    errors.append(smime_proto.ERROR_NAMES.get(field(decode_fields(payload), "CODE"), "?"))
                else:
                    errors.append(smime_proto.TYPE_NAMES.get(mtype, hex(mtype)))
        except ConnectionResetError:
            # Unread bytes of ours were still queued at the agent when it closed.
            return errors, "eof"
        except socket.timeout:
            return errors, "timeout"

    def send_quietly(self, c, data):
        try:
            c.send_raw(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent may close before reading everything

    def assert_error_then_closed(self, c, name):
        errors, end = self.answer_then_eof(c)
        self.assertEqual(errors, [name])
        self.assertEqual(end, "eof", "the agent must close the connection after " + name)

    # ---- framing ----
    def test_oversized_frame_header(self):
        for hello in (False, True):
            with self.subTest(after_hello=hello), self.raw_conn(hello) as c:
                self.send_quietly(c, struct.pack(">I", 0x7FFFFFFF))
                self.assert_error_then_closed(c, "TOO_LARGE")
        self.assert_agent_serves()

    def test_frame_just_over_the_limit(self):
        with self.raw_conn() as c:
            self.send_quietly(c, struct.pack(">I", smime_proto.MAX_FRAME + 1) + bytes([KEYS]))
            self.assert_error_then_closed(c, "TOO_LARGE")
        self.assert_agent_serves()

    def test_zero_length_frame(self):
        for hello in (False, True):
            with self.subTest(after_hello=hello), self.raw_conn(hello) as c:
                self.send_quietly(c, struct.pack(">I", 0))
                # PROTOCOL.md section 5: TOO_LARGE (clients may also see PROTOCOL), then close.
                errors, end = self.answer_then_eof(c)
                self.assertIn(errors, (["TOO_LARGE"], ["PROTOCOL"]))
                self.assertEqual(end, "eof")
        self.assert_agent_serves()

    def test_truncated_frame_then_close(self):
        for hello in (False, True):
            with self.subTest(after_hello=hello):
                c = self.raw_conn(hello)
                c.send_raw(struct.pack(">I", 100) + bytes([SIGN]) + b"\x00\x0a\x00")
                c.sock.shutdown(socket.SHUT_WR)
                errors, end = self.answer_then_eof(c)
                c.close()
                self.assertEqual(end, "eof")
                self.assertFalse(set(errors) - CLOSES, errors)
        self.assert_agent_serves()

    def test_malformed_fields(self):
        # A field whose length runs past the payload; a uint that is not 8 bytes.
        for body in (bytes([SIGN]) + struct.pack(">HI", 10, 1000) + b"abc",
                     bytes([SIGN]) + struct.pack(">HI", 12, 3) + b"\x00\x00\x01"):
            with self.subTest(body=body), self.raw_conn() as c:
                c.send_raw(struct.pack(">I", len(body)) + body)
                self.assert_error_then_closed(c, "PROTOCOL")
        self.assert_agent_serves()

    def test_field_limits(self):
        def fld(tag, value):
            return struct.pack(">HI", tag, len(value)) + value

        nested = b""
        for _ in range(5):  # five groups inside each other: one too deep
            nested = fld(60, nested)
        cases = (("string over 64 KiB", fld(10, b"a" * (65536 + 1)), "TOO_LARGE"),
                 ("groups nested 5 deep", nested, "TOO_LARGE"),
                 ("NUL in a string", fld(10, b"alice\0@example.org"), "PROTOCOL"))
        for name, payload, code in cases:
            with self.subTest(name), self.raw_conn() as c:
                self.send_quietly(c, struct.pack(">I", 1 + len(payload)) + bytes([SIGN]) + payload)
                self.assert_error_then_closed(c, code)
        # At the limits it is fine: a 64 KiB string (an unknown key) gets NO_KEY.
        with self.raw_conn() as c:
            with self.assertRaises(AgentError) as cm:
                c.start_sign(key="k" * 65536)
            self.assertEqual(cm.exception.name, "NO_KEY")
        self.assert_agent_serves()

    def test_one_megabyte_of_garbage(self):
        garbage = random.Random(20261123).randbytes(1 << 20)
        for hello in (False, True):
            with self.subTest(after_hello=hello), self.raw_conn(hello) as c:
                self.send_quietly(c, garbage)
                errors, end = self.answer_then_eof(c)
                self.assertEqual(end, "eof")
                self.assertTrue(errors and set(errors) <= CLOSES, errors)
        self.assert_agent_serves()

    # ---- handshake and sequencing ----
    def test_request_before_hello(self):
        with self.raw_conn(hello=False) as c:
            c.send(KEYS)
            self.assert_error_then_closed(c, "PROTOCOL")
        self.assert_agent_serves()

    def test_hello_with_version_2(self):
        with self.raw_conn(hello=False) as c:
            with self.assertRaises(AgentError) as cm:
                c.hello(version=2)
            self.assertEqual(cm.exception.name, "VERSION")
            self.assertIn("1", cm.exception.message)
            self.assertEqual(self.answer_then_eof(c), ([], "eof"))
        self.assert_agent_serves()

    def test_second_hello(self):
        with self.raw_conn() as c:
            c.send(HELLO, [("VERSION", 1)])
            self.assert_error_then_closed(c, "PROTOCOL")
        self.assert_agent_serves()

    def test_data_outside_a_request(self):
        for mtype, data in ((DATA, b"abc"), (END, b""), (smime_proto.PIN, smime_proto.encode_fields([("PIN", "1234")])),
                            (smime_proto.CANCEL, b"")):
            with self.subTest(type=smime_proto.TYPE_NAMES[mtype]), self.raw_conn() as c:
                c.send(mtype, data=data)
                self.assert_error_then_closed(c, "PROTOCOL")
        self.assert_agent_serves()

    def test_other_request_inside_the_content_stream(self):
        with self.raw_conn() as c:
            c.start_sign(key=EMAIL["rsa2048"], format="der")
            c.send(DATA, data=b"some content\n")
            c._pump(io.BytesIO(), smime_proto.MORE)
            c.send(KEYS)
            errors, end = self.answer_then_eof(c)
            self.assertEqual(errors[-1:], ["PROTOCOL"])
            self.assertFalse(set(errors) - {"DATA", "PROTOCOL"}, errors)
            self.assertEqual(end, "eof")
        self.assert_agent_serves()

    def test_client_disconnects_mid_stream(self):
        for after in ("ready", "data", "more"):
            with self.subTest(disconnect_after=after):
                c = self.raw_conn()
                c.start_sign(key=EMAIL["p256"], format="smime")
                if after != "ready":
                    c.send(DATA, data=b"x" * 100000)
                if after == "more":
                    c._pump(io.BytesIO(), smime_proto.MORE)
                    c.send(DATA, data=b"y" * 1000)
                c.close()
                self.assert_agent_serves()
        self.assertIn("closed during the content stream", self.agent.log())

    def test_data_chunk_over_the_limit_inside_a_sign(self):
        with self.raw_conn() as c:
            c.start_sign(key=EMAIL["rsa2048"], format="der")
            self.send_quietly(c, struct.pack(">I", 1 + smime_proto.MAX_CHUNK + 1) + bytes([DATA]) +
                              b"z" * (smime_proto.MAX_CHUNK + 1))
            self.assert_error_then_closed(c, "TOO_LARGE")
        self.assert_agent_serves()

    def test_data_chunk_at_the_limit_is_fine(self):
        data = bytes(range(256)) * (smime_proto.MAX_CHUNK // 256)
        self.assertEqual(len(data), smime_proto.MAX_CHUNK)
        der = self.raw_sign(data, key=EMAIL["rsa2048"], format="der")
        self.verify(der, "der", expect_content=data)

    def test_empty_data_frame_inside_a_sign(self):
        with self.raw_conn() as c:
            c.start_sign(key=EMAIL["rsa2048"], format="der")
            c.send(DATA, data=b"")
            errors, end = self.answer_then_eof(c)
            self.assertEqual(end, "eof")
            self.assertTrue(errors and set(errors) <= CLOSES, errors)
        self.assert_agent_serves()

    # ---- who may connect ----
    def test_other_uid_is_refused(self):
        if os.getuid() != 0:
            self.skipTest("needs root to run a client as another user")
        # Open the way to the socket for user nobody, for this test only.
        probe_dir = os.path.join(self.tmp, "nobody")
        os.mkdir(probe_dir)
        shutil.copy(smime_proto.__file__, probe_dir)
        with open(os.path.join(probe_dir, "probe.py"), "w") as f:
            f.write("import json, sys\nimport smime_proto as sp\n"
                    "c = sp.Connection(sys.argv[1], hello=False)\n"
                    "t, p = c.recv()\n"
                    "print(json.dumps([sp.TYPE_NAMES[t], sp.decode_fields(p), c.recv()]))\n")
        os.chmod(probe_dir, 0o755)
        for name in os.listdir(probe_dir):
            os.chmod(os.path.join(probe_dir, name), 0o644)
        modes = [(p, os.stat(p).st_mode & 0o777) for p in (self.tmp, self.agent.rundir, self.agent.socket)]
        try:
            os.chmod(self.tmp, 0o711)
            os.chmod(self.agent.rundir, 0o755)
            os.chmod(self.agent.socket, 0o666)
            as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", SYSTEM_PYTHON]
            r = subprocess.run(as_nobody + [os.path.join(probe_dir, "probe.py"), self.agent.socket],
                               capture_output=True, text=True, timeout=60, cwd=probe_dir)
            self.assertEqual(r.returncode, 0, r.stderr)
            mtype, fields, after = json.loads(r.stdout)
            self.assertEqual(mtype, "ERROR")
            self.assertEqual(smime_proto.ERROR_NAMES[dict(fields)["CODE"]], "PERMISSION")
            self.assertIsNone(after, "the connection must be closed after PERMISSION")
            # The example client, as that user, with a full HELLO.
            r = subprocess.run(as_nobody + [os.path.join(probe_dir, "smime_proto.py"), "--socket",
                                            self.agent.socket, "sign", "--key", EMAIL["rsa2048"]],
                               input=b"steal a signature\n", capture_output=True, timeout=60, cwd=probe_dir)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertIn(b"[PERMISSION]", r.stderr)
            self.assertEqual(r.stdout, b"")
            self.assertIn("uid 65534 is not the agent's uid", self.agent.log())
        finally:
            for p, mode in modes:
                os.chmod(p, mode)
        self.assert_agent_serves()

    def test_idle_connections_block_nobody(self):
        idle_before_hello = self.raw_conn(hello=False)
        idle_after_hello = self.raw_conn()
        idle_in_sign = self.raw_conn()
        idle_in_sign.start_sign(key=EMAIL["rsa3072"], format="der")
        try:
            self.assert_agent_serves()
            self.verify(self.sign(b"while others idle\n", "--key", EMAIL["p384"], "--format", "der"), "der",
                        expect_content=b"while others idle\n")
        finally:
            for c in (idle_before_hello, idle_after_hello, idle_in_sign):
                c.close()

    def test_connection_limit_answers_busy(self):
        conf = os.path.join(self.tmp, "busy.conf")
        with open(conf, "w") as f:
            f.write("max-connections = 2\n")
        agent = self.start_agent("agent-busy", ["--pin-file", self.fx.pin_file, "--config", conf])

        def connect_when_free():
            # A connection that just closed (start_agent's readiness probe)
            # frees its slot only when its thread ends: retry BUSY briefly.
            for attempt in range(50):
                try:
                    return self.connect(agent)
                except AgentError as e:
                    self.assertEqual(e.name, "BUSY")
                    threading.Event().wait(0.1)
            self.fail("the agent stayed BUSY with fewer connections than its limit")

        try:
            held = [connect_when_free(), connect_when_free()]
            c = self.connect(agent, hello=False)
            self.assert_error_then_closed(c, "BUSY")
            c.close()
            held.pop().close()
            # A slot is free again (the agent notices the close asynchronously).
            for attempt in range(50):
                try:
                    self.raw_sign(b"a free slot\n", agent=agent, key=EMAIL["rsa2048"], format="der")
                    break
                except AgentError as e:
                    self.assertEqual(e.name, "BUSY")
                    threading.Event().wait(0.1)
            else:
                self.fail("the agent stayed BUSY after a connection closed")
            for c in held:
                c.close()
        finally:
            agent.check_exit()

    # ---- concurrency ----
    def concurrent_signs(self, n, agent=None, use_ctl=True):
        """n clients sign at once, mixed keys and formats; returns (results, failures)."""
        keys = ["rsa2048", "rsa3072", "p256", "p384"]
        formats = ["der", "pem", "smime"]
        barrier = threading.Barrier(n)
        results, failures = {}, []

        def worker(i):
            label, fmt = keys[i % 4], formats[(i // 4) % 3]
            data = (b"client %d of %d, key %s, format %s\n" % (i, n, label.encode(), fmt.encode())) * (1 + i * 300)
            try:
                barrier.wait(timeout=60)
                if use_ctl and i % 2:
                    out = self.sign(data, "--key", EMAIL[label], "--format", fmt, agent=agent)
                else:
                    out = self.raw_sign(data, agent=agent, key=EMAIL[label], format=fmt)
                results[i] = (label, fmt, data, out)
            except BaseException as e:  # noqa: B902 - reported by the caller
                failures.append(f"client {i} ({label}): {e!r}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        return results, failures

    def test_32_concurrent_clients(self):
        self.assert_agent_serves()  # token logged in: this is about concurrent signing
        results, failures = self.concurrent_signs(32)
        self.assertEqual(failures, [])
        self.assertEqual(len(results), 32)
        for i, (label, fmt, data, out) in sorted(results.items()):
            with self.subTest(client=i, key=label, format=fmt):
                if fmt == "smime":
                    canonical = b"Content-Type: text/plain\r\n\r\n" + data.replace(b"\n", b"\r\n")
                    self.verify(out, "smime", expect_content=canonical)
                else:
                    self.verify(out, fmt, expect_content=data)
                der = out if fmt == "der" else None
                if der:
                    self.assertEqual(parse_signed_data(der)["certs"], [self.fx.cert_der(label)])
        self.assert_agent_serves()

    def test_concurrent_first_requests_while_the_agent_logs_in(self):
        # A fresh agent with --pin-file logs in on the first requests; the
        # others must wait for that login, not fail. Several rounds, since
        # it is a race.
        for rnd in range(5):
            agent = self.start_agent(f"agent-cold-{rnd}", ["--pin-file", self.fx.pin_file])
            try:
                results, failures = self.concurrent_signs(32, agent=agent, use_ctl=False)
                self.assertEqual(failures, [], f"round {rnd}")
                self.assertEqual(len(results), 32)
            finally:
                agent.check_exit()

if __name__ == "__main__":
    main()
