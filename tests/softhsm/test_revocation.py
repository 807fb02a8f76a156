#!/usr/bin/env python3
"""Revocation from the network, against real servers started here: CRLs
fetched from a certificate's HTTP distribution point (a stdlib HTTP server
that counts its requests), OCSP answered by `openssl ocsp` (a delegated
responder of the test CA, and a forger signing with a key of its own), a
responder that is down, an agent without any network (unshare -n), and
CRLs imported by hand for offline machines.

Each behaviour runs through smimectl encrypt / verify / import and the real
agent: a recipient revoked per a fetched CRL is refused and the CRL named;
good per OCSP is accepted; revoked per OCSP is refused; a responder that is
down gives REVOCATION_UNKNOWN, which blocks unless revocation-unknown =
allow; a fetched CRL is reused (no second request, also after a restart)
until its nextUpdate, then fetched again; a revoked signer shows REVOKED in
verify; a forged OCSP answer is refused."""
import datetime
import glob
import http.server
import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time

from harness import Agent, run
from pki import NSS, Pki, PkiTestCase, main

TEXT = b"Revocation test message.\n"
MAIL = (b"From: Rita <rita@example.net>\nTo: Bob <bob@example.org>\nSubject: hello\n"
        b"MIME-Version: 1.0\nContent-Type: text/plain\n\n" + TEXT)


def free_port():
    """A port nothing listens on (bound and released: connections to it are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CrlServer:
    """HTTP server on 127.0.0.1 serving files[path] (bytes); hits[path] counts GETs."""

    def __init__(self):
        self.files, self.hits = {}, {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/pkix-crl")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def start_ocsp(port, ca_dir, signer, key, log):
    """`openssl ocsp` answering for the CA in ca_dir on port, signing with signer/key; waits until it listens."""
    p = subprocess.Popen(["openssl", "ocsp", "-index", os.path.join(ca_dir, "index.txt"), "-port", str(port),
                          "-CA", os.path.join(ca_dir, "ca.pem"), "-rsigner", signer, "-rkey", key, "-nmin", "60"],
                         stdout=subprocess.PIPE, stderr=open(log, "wb"), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    line = b""
    while time.monotonic() < deadline and b"\n" not in line:
        r, _, _ = select.select([p.stdout], [], [], 1)
        if r:
            chunk = os.read(p.stdout.fileno(), 200)
            if not chunk:
                break
            line += chunk
    if not re.search(rb"ACCEPT .*:%d" % port, line):
        p.kill()
        raise RuntimeError(f"openssl ocsp did not listen on {port}: {line!r}")
    return p


class RevocationTest(PkiTestCase):
    AGENT_ARGS = ("--pin-file", "{pin}", "--config", "{tmp}/crl.conf")

    @classmethod
    def start_agent(cls, name, args=AGENT_ARGS, socket_path=None, bin_path=None):
        if not hasattr(cls, "pki"):
            cls._make_pki()
        if bin_path is None:
            return super(PkiTestCase, cls).start_agent(name, args, socket_path)
        args = [a.format(pin=cls.fx.pin_file, dir=cls.fx.dir, tmp=cls.tmp) for a in args]
        agent = Agent(cls.fx, cls.tmp, name, args, cls.sanitize, bin_path, socket_path)
        cls.agents.append(agent)
        cls.addClassCleanup(agent.check_exit)
        return agent

    @classmethod
    def _make_pki(cls):
        for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
            cls.fx.env.pop(var, None)
        cls.http = CrlServer()
        cls.addClassCleanup(cls.http.stop)
        cls.ocsp_port, cls.forger_port, cls.down_port = free_port(), free_port(), free_port()
        cls.pki = Pki(os.path.join(cls.tmp, "pki"))
        root = cls.pki.root
        cdp = f"crlDistributionPoints = URI:{cls.http.url('/root.crl')}\n"
        aia = f"authorityInfoAccess = OCSP;URI:http://127.0.0.1:{cls.ocsp_port}/\n"
        down = (f"crlDistributionPoints = URI:http://127.0.0.1:{cls.down_port}/root.crl\n"
                f"authorityInfoAccess = OCSP;URI:http://127.0.0.1:{cls.down_port}/\n")
        cls.people = {
            "rita": cls.pki.person("rita", "rita@example.net", extra=cdp),          # revoked, CRL
            "gus": cls.pki.person("gus", "gus@example.net", extra=cdp),            # good, CRL
            "olly": cls.pki.person("olly", "olly@example.net", extra=aia),         # good, OCSP
            "rory": cls.pki.person("rory", "rory@example.net", extra=aia),         # revoked, OCSP
            "dan": cls.pki.person("dan", "dan@example.net", extra=down),           # nobody answers
            "ed": cls.pki.person("ed", "ed@example.net",
                                 extra=f"crlDistributionPoints = URI:{cls.http.url('/ed.crl')}\n"),
            "nocdp": cls.pki.person("nocdp", "nocdp@example.net"),                 # nothing to ask
        }
        cls.pki.revoke(cls.people["rita"][0])
        cls.pki.revoke(cls.people["rory"][0])
        cls.root_crl = cls.pki.crl(os.path.join(cls.tmp, "root.crl"), der=True)
        with open(cls.root_crl, "rb") as f:
            cls.http.files["/root.crl"] = f.read()
        # The OCSP responders: the CA's delegated responder, and a forger
        # whose self-signed certificate carries the CA's name.
        resp = cls.pki.ocsp_responder("Test OCSP Responder")
        forged_key = os.path.join(cls.tmp, "forged.key")
        forged = os.path.join(cls.tmp, "forged.pem")
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", forged_key, "-out", forged, "-subj", "/CN=Verify Test Root CA", "-days", "30",
             "-addext", "extendedKeyUsage=OCSPSigning"])
        for port, (cert, key), log in ((cls.ocsp_port, resp, "ocsp.log"), (cls.forger_port, (forged, forged_key),
                                                                              "forger.log")):
            p = start_ocsp(port, root, cert, key, os.path.join(cls.tmp, log))
            cls.addClassCleanup(p.wait)
            cls.addClassCleanup(p.kill)
        base = (f"ca-file = {cls.fx.ca}\nca-file = {root}/ca.pem\nca-file = {NSS}/TestCA.pem\n"
                f"default-key = alice@example.org\nsystem-ca = no\nrevocation-timeout = 5\n")
        confs = {
            "crl": "crl-fetch = yes\n",
            "ocsp": "ocsp = aia\n",
            "allow": "crl-fetch = yes\nocsp = aia\nrevocation-unknown = allow\n",
            "responder": f"ocsp-responder = http://127.0.0.1:{cls.ocsp_port}/\n",
            "forged": f"ocsp-responder = http://127.0.0.1:{cls.forger_port}/\n",
            "offline": "",
            "nonet": "crl-fetch = yes\nocsp = aia\n",
        }
        for name, extra in confs.items():
            with open(os.path.join(cls.tmp, name + ".conf"), "w") as f:
                f.write(base + f"address-book = {cls.tmp}/{name}-book/addressbook\n" + extra)

    def agent_for(self, name):
        """The agent with configuration NAME.conf (started once, then reused)."""
        cls = type(self)
        if name == "crl":
            return cls.agent
        key = "agent_" + name
        if not hasattr(cls, key):
            setattr(cls, key, cls.start_agent(name, ("--pin-file", "{pin}", "--config", "{tmp}/" + name + ".conf")))
        return getattr(cls, key)

    # ---- helpers ----
    def encrypt(self, agent, who):
        out = self.path("enc.out")
        r = self.ctl("encrypt", "--no-self", "-r", self.people[who][0], "--out", out, input=TEXT, agent=agent)
        return r, out

    def assert_encrypts(self, agent, who):
        r, out = self.encrypt(agent, who)
        self.assertEqual(r.returncode, 0, f"encrypting to {who} failed: {r.stderr}")
        self.assertTrue(os.path.getsize(out) > 0)
        return r

    def assert_refused(self, agent, who, problem):
        """Encrypting to who fails with exactly this problem; returns the reason given."""
        r, out = self.encrypt(agent, who)
        self.assertEqual(r.returncode, 1, f"encrypting to {who} should fail with {problem}: {r.stderr}")
        self.assertFalse(os.path.exists(out), "output written although the recipient was refused")
        m = re.search(re.escape(who) + r"@example\.net: ([A-Z_ ]+) — (.*)", r.stderr)
        self.assertTrue(m, r.stderr)
        self.assertEqual(m.group(1).split(), [problem], r.stderr)
        return m.group(2)

    def sign_as(self, who):
        pem, key = self.people[who]
        return self.openssl_sign(pem, key, MAIL, "-nodetach")

    # ---- CRLs fetched from the distribution point ----
    def test_recipient_revoked_per_fetched_crl_is_refused_and_the_crl_named(self):
        why = self.assert_refused(self.agent, "rita", "REVOKED")
        self.assertIn("/CN=rita is revoked since ", why)
        # The CRL OpenSSL used: the root's, from whichever of our URLs (the
        # root's CRL is also served as /ed.crl to another test).
        self.assertRegex(why, r"listed in the CRL from " + re.escape(self.http.url("/")) + r"(root|ed)\.crl")
        self.assertGreaterEqual(self.http.hits.get("/root.crl", 0), 1)
        # Stored durably beside the address book, as PEM with its URL.
        heads = []
        for path in glob.glob(os.path.join(self.tmp, "crl-book", "revocation", "crl-url-*.pem")):
            with open(path) as f:
                heads.append(f.readline().strip())
        self.assertIn("# smime-agent: CRL from " + self.http.url("/root.crl"), heads)

    def test_fetched_crl_is_reused_until_its_next_update_also_after_a_restart(self):
        self.assert_encrypts(self.agent, "gus")
        hits = self.http.hits.get("/root.crl", 0)
        self.assertGreaterEqual(hits, 1)
        self.assert_encrypts(self.agent, "gus")
        self.assert_refused(self.agent, "rita", "REVOKED")
        self.assertEqual(self.http.hits.get("/root.crl", 0), hits, "the cached CRL was fetched again")
        # A new agent on the same address book reads the cache from disk.
        again = type(self).start_agent("crl-again", self.AGENT_ARGS)
        try:
            self.assert_encrypts(again, "gus")
            self.assertEqual(self.http.hits.get("/root.crl", 0), hits, "the stored CRL was not reused")
        finally:
            again.check_exit()

    def test_crl_past_its_next_update_is_fetched_again(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        # Ten seconds: time for two requests on a loaded machine (ASan).
        soon = self.pki.crl(self.path("soon.crl"), next_update=now + datetime.timedelta(seconds=10), der=True)
        with open(soon, "rb") as f:
            self.http.files["/ed.crl"] = f.read()
        self.assert_encrypts(self.agent, "ed")
        self.assertEqual(self.http.hits.get("/ed.crl"), 1)
        self.assert_encrypts(self.agent, "ed")
        self.assertEqual(self.http.hits.get("/ed.crl"), 1, "a fresh cached CRL was fetched again")
        fresh = self.pki.crl(self.path("fresh.crl"), der=True)
        with open(fresh, "rb") as f:
            self.http.files["/ed.crl"] = f.read()
        time.sleep(max(0.0, (now + datetime.timedelta(seconds=11) -
                             datetime.datetime.now(datetime.timezone.utc)).total_seconds()))
        self.assert_encrypts(self.agent, "ed")
        self.assertEqual(self.http.hits.get("/ed.crl"), 2, "the CRL past its nextUpdate was not fetched again")
        self.assert_encrypts(self.agent, "ed")
        self.assertEqual(self.http.hits.get("/ed.crl"), 2)

    def test_out_of_date_crl_from_the_server_gives_revocation_unknown(self):
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
        old = self.pki.crl(self.path("old.crl"), next_update=past, der=True)
        with open(old, "rb") as f:
            self.http.files["/stale.crl"] = f.read()
        pem, _ = self.pki.person("stella", "stella@example.net",
                                 extra=f"crlDistributionPoints = URI:{self.http.url('/stale.crl')}\n")
        self.people["stella"] = (pem, None)
        # A fresh root CRL in the cache from another URL would answer for
        # stella too: use an agent whose cache has none.
        self._write_conf("stale", "crl-fetch = yes\n")
        agent = type(self).start_agent("stale", ("--pin-file", "{pin}", "--config", "{tmp}/stale.conf"))
        try:
            why = self.assert_refused(agent, "stella", "REVOCATION_UNKNOWN")
            self.assertIn("the CRL from " + self.http.url("/stale.crl") + " is out of date", why)
        finally:
            agent.check_exit()

    def _write_conf(self, name, extra):
        root = self.pki.root
        with open(os.path.join(self.tmp, name + ".conf"), "w") as f:
            f.write(f"ca-file = {self.fx.ca}\nca-file = {root}/ca.pem\nca-file = {NSS}/TestCA.pem\n"
                    f"default-key = alice@example.org\nsystem-ca = no\nrevocation-timeout = 5\n"
                    f"address-book = {self.tmp}/{name}-book/addressbook\n{extra}")

    def test_crl_not_signed_by_the_issuer_is_refused_and_not_stored(self):
        forged = self.crl_signed_by("cdp-forger", os.path.join(self.tmp, "forged.pem"),
                                    os.path.join(self.tmp, "forged.key"))
        self.http.files["/forged.crl"] = run(["openssl", "crl", "-in", forged, "-outform", "DER"]).stdout
        pem, _ = self.pki.person("fay", "fay@example.net",
                                 extra=f"crlDistributionPoints = URI:{self.http.url('/forged.crl')}\n")
        self.people["fay"] = (pem, None)
        # A fresh agent: a good root CRL in the cache would answer for fay.
        self._write_conf("forgedcrl", "crl-fetch = yes\n")
        agent = type(self).start_agent("forgedcrl", ("--pin-file", "{pin}", "--config", "{tmp}/forgedcrl.conf"))
        try:
            why = self.assert_refused(agent, "fay", "REVOCATION_UNKNOWN")
            self.assertIn(f"the CRL from {self.http.url('/forged.crl')} is not signed by the certificate's issuer "
                          "/CN=Verify Test Root CA: refused", why)
            self.assertEqual(self.cache_files("forgedcrl"), {}, "the forged CRL was stored")
        finally:
            agent.check_exit()

    def test_crl_from_a_server_that_is_down_gives_revocation_unknown_and_blocks(self):
        agent = self.agent_for("crl")
        why = self.assert_refused(agent, "dan", "REVOCATION_UNKNOWN")
        self.assertIn(f"revocation status unknown for /CN=dan: the CRL from http://127.0.0.1:{self.down_port}/root.crl "
                      "could not be fetched: ", why)
        self.assertIn("revocation-unknown = block", why)

    def test_revoked_signer_in_verify(self):
        res = self.assert_verdict("untrusted", self.sign_as("rita"), problems=["REVOKED"])
        self.assertRegex(res["status"][0], r"/CN=rita is revoked since .*\(listed in the CRL from " +
                         re.escape(self.http.url("/")))
        res = self.assert_verdict("good", self.sign_as("gus"))

    # ---- OCSP ----
    def test_good_per_ocsp_is_accepted_and_the_answer_cached(self):
        agent = self.agent_for("ocsp")
        start = agent.log_size()
        self.assert_encrypts(agent, "olly")
        self.assert_encrypts(agent, "olly")
        asked = agent.log(start).count(f"asking the OCSP responder http://127.0.0.1:{self.ocsp_port}/")
        self.assertEqual(asked, 1, agent.log(start))
        self.assertTrue(glob.glob(os.path.join(self.tmp, "ocsp-book", "revocation", "ocsp-*.der")),
                        "the good OCSP answer was not stored")

    def test_revoked_per_ocsp_is_refused_naming_the_responder(self):
        why = self.assert_refused(self.agent_for("ocsp"), "rory", "REVOKED")
        self.assertIn(f"/CN=rory is revoked since ", why)
        self.assertIn(f"the OCSP responder http://127.0.0.1:{self.ocsp_port}/ says so", why)
        # Signers too.
        res = self.assert_verdict("untrusted", self.sign_as("rory"), problems=["REVOKED"])

    def test_configured_responder_answers_for_every_certificate(self):
        agent = self.agent_for("responder")
        self.assert_encrypts(agent, "gus")          # no AIA in gus's certificate
        why = self.assert_refused(agent, "rita", "REVOKED")
        self.assertIn("OCSP responder", why)

    def test_responder_down_is_unknown_and_the_policy_decides(self):
        why = self.assert_refused(self.agent_for("ocsp"), "dan", "REVOCATION_UNKNOWN")
        self.assertIn(f"the OCSP responder http://127.0.0.1:{self.down_port}/ could not be reached: ", why)
        self.assertRegex(why, r"(?i)connect|refused")
        # revocation-unknown = allow: used anyway, and still refused when revoked.
        agent = self.agent_for("allow")
        self.assert_encrypts(agent, "dan")
        self.assert_refused(agent, "rita", "REVOKED")
        self.assertIn("accepted (revocation-unknown = allow)", agent.log())

    def test_forged_ocsp_answer_is_refused(self):
        agent = self.agent_for("forged")
        why = self.assert_refused(agent, "olly", "REVOCATION_UNKNOWN")
        self.assertIn(f"the answer of the OCSP responder http://127.0.0.1:{self.forger_port}/ was refused: "
                      "its signature does not verify", why)
        # Nothing of it was cached.
        self.assertEqual(glob.glob(os.path.join(self.tmp, "forged-book", "revocation", "ocsp-*.der")), [])

    def test_certificate_without_cdp_or_aia_is_not_asked_about(self):
        for name in ("crl", "ocsp"):
            with self.subTest(agent=name):
                self.assert_encrypts(self.agent_for(name), "nocdp")

    # ---- no network: the systemd unit's PrivateNetwork=yes ----
    def test_no_network_says_what_to_do(self):
        unshare = shutil.which("unshare")
        if not unshare or subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
            self.skipTest("unshare -n is not permitted here (needs root or user namespaces)")
        wrapper = os.path.join(self.tmp, "agent-nonet.sh")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {unshare} -n {self.agent_bin} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        agent = type(self).start_agent("nonet", ("--pin-file", "{pin}", "--config", "{tmp}/nonet.conf"),
                                       bin_path=wrapper)
        try:
            why = self.assert_refused(agent, "gus", "REVOCATION_UNKNOWN")
            self.assertIn("could not be fetched", why)
            self.assertIn("PrivateNetwork=yes", why)
            self.assertIn("smimectl import", why)
            why = self.assert_refused(agent, "olly", "REVOCATION_UNKNOWN")
            self.assertIn("could not be reached", why)
            self.assertIn("PrivateNetwork=yes", why)
        finally:
            agent.check_exit()

    # ---- CRLs imported by hand (offline machines) ----
    def test_crl_imported_by_hand(self):
        agent = self.agent_for("offline")
        self.assert_encrypts(agent, "rita")        # nothing says otherwise yet
        r = self.ctl("import", self.root_crl, agent=agent)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("1 CRL(s) stored", r.stderr)
        why = self.assert_refused(agent, "rita", "REVOKED")
        self.assertIn("listed in a CRL imported with `smimectl import`", why)
        self.assert_encrypts(agent, "gus")
        self.assertTrue(glob.glob(os.path.join(self.tmp, "offline-book", "revocation", "crl-import-*.pem")))
        # The same CRL again: nothing new.
        r = self.ctl("import", self.root_crl, agent=agent)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("CRL(s) stored", r.stderr)

    def test_crl_of_an_unknown_issuer_or_with_a_bad_signature_is_refused(self):
        agent = self.agent_for("offline")
        before = self.cache_files("offline")
        stranger_key, stranger = self.path("stranger.key"), self.path("stranger.pem")
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", stranger_key, "-out", stranger, "-subj", "/CN=Stranger CA", "-days", "30"])
        r = self.ctl("import", self.crl_signed_by("stranger", stranger, stranger_key), agent=agent)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("[NOT_FOUND]", r.stderr)
        self.assertIn("the CRL's issuer /CN=Stranger CA is not known: import the issuer's certificate first",
                      r.stderr)
        # A CRL in the root's name, signed by the forger's key.
        forged = self.crl_signed_by("forger", os.path.join(self.tmp, "forged.pem"),
                                    os.path.join(self.tmp, "forged.key"))
        r = self.ctl("import", forged, agent=agent)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("[BAD_INPUT]", r.stderr)
        self.assertIn("the CRL claims to be from /CN=Verify Test Root CA but its signature does not verify",
                      r.stderr)
        self.assertEqual(self.cache_files("offline"), before, "a refused CRL was stored")

    def cache_files(self, name):
        """{file name: content} of the revocation cache of agent NAME."""
        out = {}
        for path in glob.glob(os.path.join(self.tmp, name + "-book", "revocation", "*")):
            with open(path, "rb") as f:
                out[os.path.basename(path)] = f.read()
        return out

    def crl_signed_by(self, name, cert, key):
        """An empty CRL issued in cert's name and signed with key (`openssl ca -gencrl`)."""
        d = os.path.join(self.tmp, name + "-ca")
        os.makedirs(os.path.join(d, "new"))
        open(os.path.join(d, "index.txt"), "w").close()
        with open(os.path.join(d, "crlnumber"), "w") as f:
            f.write("01\n")
        with open(os.path.join(self.pki.root, "ca.cnf")) as f:
            cnf = f.read().replace(self.pki.root, d)
        with open(os.path.join(d, "ca.cnf"), "w") as f:
            f.write(cnf)
        shutil.copy(cert, os.path.join(d, "ca.pem"))
        shutil.copy(key, os.path.join(d, "ca.key"))
        out = self.path(name + ".crl")
        run(["openssl", "ca", "-config", os.path.join(d, "ca.cnf"), "-gencrl", "-out", out])
        return out

    def test_out_of_date_imported_crl_makes_the_status_unknown(self):
        self._write_conf("offline2", "")
        agent = type(self).start_agent("offline2", ("--pin-file", "{pin}", "--config", "{tmp}/offline2.conf"))
        try:
            past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=10)
            old = self.pki.crl(self.path("old.crl"), next_update=past)
            r = self.ctl("import", old, agent=agent)
            self.assertEqual(r.returncode, 0, r.stderr)
            why = self.assert_refused(agent, "gus", "REVOCATION_UNKNOWN")
            self.assertIn("the newest CRL for it (a CRL imported with `smimectl import`) was due to be replaced on",
                          why)
            # It still proves revocations.
            self.assertIn("REVOKED", self.encrypt(agent, "rita")[0].stderr)
        finally:
            agent.check_exit()


if __name__ == "__main__":
    main()
