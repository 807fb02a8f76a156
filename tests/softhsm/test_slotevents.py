#!/usr/bin/env python3
"""Hot-plug by slot events (C_WaitForSlotEvent) instead of polling.

The module under test is tests/softhsm/slotevents.c: the real SoftHSM with
every call forwarded unchanged, plus a C_WaitForSlotEvent that reports a
token directory created, removed or moved in SoftHSM's token store (inotify).
No real module can be used here: SoftHSM and p11-kit's RPC client do not
implement slot events, and OpenSC (which does, over pcscd) reports events
only for cards it recognises, which no card emulator in Debian 12 provides
(slotevents.c has the details).

The agents under test run with hotplug-poll = 0 (no timed poll at all) and
nothing asks them anything while a token goes and comes back: only an event
can make them notice. An agent on plain SoftHSM with the same settings, which
does not notice, shows that the events are what did it. Then the fallbacks:
a module whose wait fails at once again and again is polled instead (and
says so once), and the agent exits promptly at SIGTERM whether the module's
wait ends at C_Finalize (as PKCS#11 says) or never returns."""
import io
import os
import re
import shutil
import subprocess
import time

from harness import EMAIL, TOKEN, AgentTestCase, main, parse_signed_data
from smime_proto import field


def slotevents_module():
    path = os.environ.get("SMIME_TEST_SLOTEVENTS_MODULE") or os.path.join(
        os.environ.get("SMIME_BUILD_DIR", "build"), "tests", "smime-test-slotevents.so")
    if not os.path.exists(path):
        raise RuntimeError(f"{path} not found: build the tests (cmake --build) first")
    return os.path.abspath(path)


class SlotEventsTest(AgentTestCase):
    @classmethod
    def setUpClass(cls):
        cls.module = slotevents_module()
        super().setUpClass()
        # Plain SoftHSM, no poll either: the control.
        cls.plain = cls.start_agent("plain", ["--pin-file", cls.fx.pin_file, "--config",
                                              cls.conf("nopoll.conf", "hotplug-poll = 0\n")])

    @classmethod
    def conf(cls, name, text):
        path = os.path.join(cls.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    @classmethod
    def start_events_agent(cls, name, mode="", poll=0):
        conf = cls.conf(name + ".conf", f"hotplug-poll = {poll}\n")
        saved = dict(cls.fx.env)
        if mode:
            cls.fx.env["SMIME_TEST_SLOTEVENTS"] = mode
        try:
            return cls.start_agent(name, ["--pin-file", cls.fx.pin_file, "--module", cls.module, "--config", conf])
        finally:
            cls.fx.env.clear()
            cls.fx.env.update(saved)

    # ---- helpers ----
    def modules(self, agent):
        with self.connect(agent) as c:
            return [dict(g) for n, g in c.status() if n == "MODULE"]

    def hotplug_mode(self, agent, name=""):
        (m,) = [m for m in self.modules(agent) if name in m["MODULE_NAME"]]
        return m.get("HOTPLUG")

    def wait_for(self, what, cond, within):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(0.1)
        self.fail(f"{what}: not within {within} s")

    def sign_cert(self, agent, key=EMAIL["rsa2048"], data=b"event\n"):
        with self.connect(agent) as c:
            c.start_sign(key=key, format="der")
            out = io.BytesIO()
            c.stream(io.BytesIO(data), out)
        self.verify(out.getvalue(), "der", expect_content=data)
        return parse_signed_data(out.getvalue())["certs"][0]

    def token_dir(self):
        tokens = os.path.join(self.fx.dir, "tokens")
        (name,) = os.listdir(tokens)
        return tokens, name

    # ---- tests, in the order of their names ----
    def test_1_softhsm_is_polled_the_event_module_is_watched(self):
        # Plain SoftHSM: C_WaitForSlotEvent is not supported, so it is polled
        # (here not even that: hotplug-poll = 0), and the log says why, once.
        self.wait_for("SoftHSM's probe answered", lambda: "CKR_FUNCTION_NOT_SUPPORTED" in self.plain.log(), 10)
        self.assertEqual(self.hotplug_mode(self.plain, "softhsm"), "poll")
        self.assertEqual(len(re.findall(r"hot-plug: module '[^']*softhsm[^']*' is not polled \(hotplug-poll = 0\) and reports no "
                                        r"slot events \(C_WaitForSlotEvent: CKR_FUNCTION_NOT_SUPPORTED\)",
                                        self.plain.log())), 1, self.plain.log())
        type(self).events = self.start_events_agent("events")
        self.wait_for("the module watched by events", lambda: self.hotplug_mode(self.events) == "events", 10)
        self.wait_for("the change logged", lambda: "reports slot events" in self.events.log(), 5)
        self.assertEqual(len(re.findall(r"hot-plug: module '.*' reports slot events", self.events.log())), 1)
        out = self.ctl("status", agent=self.events).stdout.decode()
        self.assertRegex(out, r"module: .*hot-plug: slot events")
        out = self.ctl("status", agent=self.plain).stdout.decode()
        self.assertRegex(out, r"module: .*hot-plug: polled")
        # The base agent polls SoftHSM every 2 s (the default), and says so.
        self.assertRegex(self.agent.log(), r"hot-plug: module '[^']*softhsm[^']*' is polled every 2 s \(C_WaitForSlotEvent: "
                                           r"CKR_FUNCTION_NOT_SUPPORTED\)")

    def test_2_token_removed_and_back_noticed_by_events_alone(self):
        agent = self.events
        self.assertEqual(self.sign_cert(agent), self.fx.cert_der("rsa2048"))
        tokens, name = self.token_dir()
        away = os.path.join(self.tmp, "token-away")
        removed = re.compile(r"token 'smime-test' .*: removed")
        present = re.compile(r"token 'smime-test' .*: present")
        start, start_base = agent.log_size(), self.plain.log_size()
        t0 = time.monotonic()
        shutil.move(os.path.join(tokens, name), away)
        try:
            # No request, no status: the log line comes from the hot-plug
            # thread, woken by the module's event.
            self.wait_for("removal logged", lambda: removed.search(agent.log(start)), 5)
            took = time.monotonic() - t0
            self.assertLess(took, 3, f"removal noticed after {took:.1f} s")
            # The same without events: nothing noticed.
            self.assertIsNone(removed.search(self.plain.log(start_base)), "plain SoftHSM agent noticed without poll")
            start = agent.log_size()
        finally:
            shutil.move(away, os.path.join(tokens, name))
        t0 = time.monotonic()
        self.wait_for("return logged", lambda: present.search(agent.log(start)), 10)
        took = time.monotonic() - t0
        self.assertLess(took, 5, f"return noticed after {took:.1f} s")
        self.assertEqual(self.sign_cert(agent, data=b"back\n"), self.fx.cert_der("rsa2048"))
        self.assertEqual(self.hotplug_mode(agent), "events", "still watched after the module was re-initialised")
        self.assertNotIn("falls back", agent.log())

    def test_3_a_module_whose_wait_keeps_failing_is_polled(self):
        agent = self.start_events_agent("failing", mode="fail", poll=1)
        self.wait_for("fallback to polling", lambda: re.search(
            r"hot-plug: module '.*' is polled every 1 s \(C_WaitForSlotEvent failed 5 times in a row "
            r"\(CKR_DEVICE_ERROR\)\)", agent.log()), 20)
        self.assertEqual(self.hotplug_mode(agent), "poll")
        # ... and polling works: a removal is noticed (poll every 1 s).
        tokens, name = self.token_dir()
        away = os.path.join(self.tmp, "token-away-3")
        start = agent.log_size()
        shutil.move(os.path.join(tokens, name), away)
        try:
            self.wait_for("removal noticed by the poll",
                          lambda: re.search(r"token 'smime-test' .*: removed", agent.log(start)), 10)
        finally:
            shutil.move(away, os.path.join(tokens, name))
        self.wait_for("return noticed by the poll",
                      lambda: re.search(r"token 'smime-test' .*: present", agent.log(start)), 30)
        self.assertEqual(self.sign_cert(agent), self.fx.cert_der("rsa2048"))
        # Said once, not at every failure or poll.
        self.assertEqual(len(re.findall(r"C_WaitForSlotEvent failed", agent.log())), 1, agent.log())
        agent.check_exit()

    def test_4_exit_while_a_thread_waits_in_the_module(self):
        # A module that ends the wait at C_Finalize, and one that never does.
        hang = self.start_events_agent("hang", mode="hang")
        for agent in (self.events, hang):
            self.wait_for(f"{agent.name} watched by events", lambda: self.hotplug_mode(agent) == "events", 10)
            self.assertEqual(self.sign_cert(agent), self.fx.cert_der("rsa2048"))
            t0 = time.monotonic()
            agent.check_exit()  # SIGTERM; clean exit status and no sanitizer report, or it raises
            took = time.monotonic() - t0
            self.assertLess(took, 10 if self.sanitize else 6, f"{agent.name} took {took:.1f} s to exit")


if __name__ == "__main__":
    main()
