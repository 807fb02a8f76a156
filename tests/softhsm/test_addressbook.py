#!/usr/bin/env python3
"""The address book: certificates are imported from PEM, DER, a PKCS#7
bundle and a signed message; trust decisions are recorded by fingerprint or
file; everything survives an agent restart; the file is replaced
atomically and a damaged one is refused, never overwritten."""
import io
import os
import signal

from harness import run
from pki import PkiTestCase, cert_der, fingerprint, main, signed_with_caps
import smime_proto


class AddressBookTest(PkiTestCase):
    PEOPLE = (
        ("amy", "amy@example.net", {}),
        ("ben", "ben@example.net", {"key": "p256"}),
        ("cal", "cal@example.net", {}),
        ("dan", "dan@example.net", {}),
    )

    def certs(self, email=None):
        with self.connect() as c:
            return {smime_proto.field(e, "FINGERPRINT"): e for e in c.certs(email)}

    def test_book_goes_to_systemds_state_directory(self):
        # Under the shipped units the sandbox leaves only StateDirectory=
        # writable; systemd names it in $STATE_DIRECTORY (a list).
        state = os.path.join(self.tmp, "state-directory")
        os.mkdir(state)
        self.fx.env["STATE_DIRECTORY"] = state + ":/nonexistent"
        try:
            agent = self.start_agent("statedir", ("--pin-file", "{pin}"))  # no config: the default book
        finally:
            del self.fx.env["STATE_DIRECTORY"]
        r = self.ctl("import", self.people["amy"][0], agent=agent)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(os.path.isfile(os.path.join(state, "addressbook")), os.listdir(state))

    def test_import_pem_der_bundle_and_signed_message(self):
        # Certificates no other test touches (the book is shared by the class).
        amy = self.pki.person("ann", "ann@example.net")[0]
        ben = self.pki.person("bea", "bea@example.net", key="p256")[0]
        cal, dan = self.people["cal"][0], self.people["dan"][0]
        r = self.ctl("import", amy)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("1 new certificate(s)", r.stderr)
        self.assertIn(fingerprint(amy), r.stdout.decode())
        r = self.ctl("import", input=cert_der(ben))
        self.assertEqual(r.returncode, 0, r.stderr)
        bundle = self.path("bundle.p7b")
        run(["openssl", "crl2pkcs7", "-nocrl", "-certfile", cal, "-certfile", os.path.join(self.pki.root, "ca.pem"),
             "-outform", "DER", "-out", bundle])
        r = self.ctl("import", "--in", bundle)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("2 new certificate(s)", r.stderr)
        msg = signed_with_caps(dan, self.people["dan"][1], b"hi\n", ["aes256-gcm", "aes256-cbc"], self.work)
        r = self.ctl("import", input=msg)
        self.assertEqual(r.returncode, 0, r.stderr)
        book = self.certs()
        for pem in (amy, ben, cal, dan):
            self.assertIn(fingerprint(pem), book)
        d = book[fingerprint(dan)]
        self.assertEqual([v for n, v in d if n == "CAPS"], ["aes-256-gcm", "aes-256-cbc"])
        self.assertEqual(smime_proto.field(d, "USABLE"), 1)
        self.assertEqual(smime_proto.field(d, "TRUST_PATH"), "anchor")
        self.assertEqual(smime_proto.field(book[fingerprint(ben)], "KEY_TYPE"), "EC")
        self.assertIsNone(smime_proto.field(book[fingerprint(ben)], "CAPS"), "no capabilities known")
        # Importing again adds nothing.
        r = self.ctl("import", amy)
        self.assertIn("0 new certificate(s)", r.stderr)
        # Only one address.
        self.assertEqual(list(self.certs("ANN@example.net")), [fingerprint(amy)])
        r = self.ctl("certs", "ann@example.net")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout.decode(), r"status\s+ok: valid until")

    def test_nothing_to_import(self):
        r = self.ctl("import", input=b"hello, no certificate here\n")
        self.assertEqual(r.returncode, 1)
        self.assertIn("[BAD_INPUT]", r.stderr)

    def test_trust_by_fingerprint_and_unknown_fingerprint(self):
        pem, _ = self.pki.self_signed("sue", "sue@example.net")
        fp = fingerprint(pem)
        r = self.ctl("trust", fp)
        self.assertEqual(r.returncode, 1)
        self.assertIn("[NOT_FOUND]", r.stderr)
        self.assertEqual(self.ctl("import", pem).returncode, 0)
        self.assertEqual(smime_proto.field(self.certs()[fp], "TRUST_PATH"), "untrusted")
        self.assertIn("UNTRUSTED", [v for n, v in self.certs()[fp] if n == "PROBLEM"])
        # Colon-separated, upper case, as other tools print them.
        colons = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
        r = self.ctl("trust", colons)
        self.assertEqual(r.returncode, 0, r.stderr)
        e = self.certs()[fp]
        self.assertEqual(smime_proto.field(e, "TRUST"), "trusted")
        self.assertEqual(smime_proto.field(e, "TRUST_PATH"), "trusted-by-you")
        self.assertEqual(smime_proto.field(e, "USABLE"), 1)
        r = self.ctl("trust", "not-a-fingerprint")
        self.assertEqual(r.returncode, 1)
        self.assertIn("[BAD_INPUT]", r.stderr)

    def test_book_survives_restart_and_is_replaced_atomically(self):
        pem, _ = self.pki.self_signed("tom", "tom@example.net")
        self.assertEqual(self.ctl("trust", pem).returncode, 0)
        self.assertEqual(self.ctl("distrust", self.people["amy"][0]).returncode, 0)
        book_dir = os.path.dirname(self.book)
        self.assertEqual(os.listdir(book_dir), ["addressbook"], "a temporary file was left behind")
        with open(self.book) as f:
            text = f.read()
        self.assertIn("trust=trusted", text)
        self.assertIn("trust=distrusted", text)
        # A second agent on the same book (the first is still running) reads it.
        other = self.start_agent("agent2")
        with self.connect(other) as c:
            book = {smime_proto.field(e, "FINGERPRINT"): e for e in c.certs()}
        self.assertEqual(smime_proto.field(book[fingerprint(pem)], "TRUST"), "trusted")
        self.assertEqual(smime_proto.field(book[fingerprint(self.people["amy"][0])], "TRUST"), "distrusted")
        other.check_exit()

    def test_damaged_book_is_refused_and_not_overwritten(self):
        damaged = os.path.join(self.tmp, "damaged-book")
        with open(damaged, "w") as f:
            f.write("# smime-agent address book, format 1\nentry trust=none source=imported added=1 caps=-\n"
                    "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        with open(damaged) as f:
            before = f.read()
        conf = os.path.join(self.tmp, "damaged.conf")
        with open(os.path.join(self.tmp, "agent.conf")) as f, open(conf, "w") as g:
            g.write(f.read().replace(f"address-book = {self.book}", f"address-book = {damaged}"))
        agent = self.start_agent("damaged", ("--pin-file", "{pin}", "--config", conf))
        with self.connect(agent) as c:
            with self.assertRaises(smime_proto.AgentError) as cm:
                c.certs()
            self.assertEqual(cm.exception.name, "STORE")
            self.assertIn("damaged at entry 1", cm.exception.message)
        r = self.ctl("import", self.people["amy"][0], agent=agent)
        self.assertEqual(r.returncode, 1)
        self.assertIn("[STORE]", r.stderr)
        with open(damaged) as f:
            self.assertEqual(f.read(), before, "the damaged book was rewritten")
        # Signing still works: the book is not the agent's only job.
        self.assert_agent_serves(agent)
        agent.check_exit()

    def test_unwritable_book_fails_cleanly(self):
        # Nobody, not even root, can create files in /proc.
        path = "/proc/smime-agent-test/addressbook"
        conf = os.path.join(self.tmp, "ro.conf")
        with open(os.path.join(self.tmp, "agent.conf")) as f, open(conf, "w") as g:
            g.write(f.read().replace(f"address-book = {self.book}", f"address-book = {path}"))
        agent = self.start_agent("readonly", ("--pin-file", "{pin}", "--config", conf))
        r = self.ctl("import", self.people["amy"][0], agent=agent)
        self.assertEqual(r.returncode, 1)
        self.assertIn("[STORE]", r.stderr)
        self.assertIn("cannot write the address book", r.stderr)
        with self.connect(agent) as c:
            self.assertEqual(c.certs(), [], "a certificate that was not saved is in the book")
        agent.check_exit()


if __name__ == "__main__":
    main()
