"""pki — certificates, keys, CRLs and signed messages made in the test run for
the verify/encrypt/address book tests, with the real openssl command.

Pki(dir) makes a root CA and a sub CA (`openssl ca`, so that any validity
dates and revocations are possible). person() issues an end-entity
certificate with a software key; self_signed() makes one outside the PKI.
signed_with_caps() builds a CMS SignedData by hand (DER in Python, the
signature by `openssl dgst`), because `openssl cms -sign` cannot advertise
chosen SMIMECapabilities (AES-GCM, RSAES-OAEP).
"""
import datetime
import hashlib
import os
import subprocess

from harness import ber_parse, run

OID = {
    "data": "1.2.840.113549.1.7.1", "signedData": "1.2.840.113549.1.7.2", "contentType": "1.2.840.113549.1.9.3",
    "messageDigest": "1.2.840.113549.1.9.4", "signingTime": "1.2.840.113549.1.9.5",
    "smimeCapabilities": "1.2.840.113549.1.9.15", "sha256": "2.16.840.1.101.3.4.2.1",
    "rsaEncryption": "1.2.840.113549.1.1.1", "ecdsaWithSHA256": "1.2.840.10045.4.3.2",
    "aes256-gcm": "2.16.840.1.101.3.4.1.46", "aes128-gcm": "2.16.840.1.101.3.4.1.6",
    "aes256-cbc": "2.16.840.1.101.3.4.1.42", "aes192-cbc": "2.16.840.1.101.3.4.1.22",
    "aes128-cbc": "2.16.840.1.101.3.4.1.2", "rsaes-oaep": "1.2.840.113549.1.1.7",
}

CA_CNF = """[ca]
default_ca = this
[this]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/new
serial = {dir}/serial
crlnumber = {dir}/crlnumber
certificate = {dir}/ca.pem
private_key = {dir}/ca.key
default_md = sha256
default_crl_days = 30
policy = anything
copy_extensions = none
unique_subject = no
[anything]
commonName = supplied
emailAddress = optional
"""


def der_len(n):
    if n < 128:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def tlv(tag, content):
    return bytes([tag]) + der_len(len(content)) + content


def seq(*items):
    return tlv(0x30, b"".join(items))


def der_set(*items):
    return tlv(0x31, b"".join(sorted(items)))


def oid(dotted):
    parts = [int(x) for x in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


class Pki:
    def __init__(self, path):
        self.dir = path
        os.makedirs(path, exist_ok=True)
        self.root = self._ca("root", "Verify Test Root CA", None)
        self.sub = self._ca("sub", "Verify Test Sub CA", self.root)

    def _ca(self, name, cn, parent):
        d = os.path.join(self.dir, name)
        os.makedirs(os.path.join(d, "new"))
        open(os.path.join(d, "index.txt"), "w").close()
        with open(os.path.join(d, "serial"), "w") as f:
            f.write(os.urandom(8).hex() + "\n")
        with open(os.path.join(d, "crlnumber"), "w") as f:
            f.write("01\n")
        with open(os.path.join(d, "ca.cnf"), "w") as f:
            f.write(CA_CNF.format(dir=d))
        key, pem = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
        ext = os.path.join(d, "ca.ext")
        with open(ext, "w") as f:
            f.write("basicConstraints = critical, CA:true\nkeyUsage = critical, keyCertSign, cRLSign\n"
                    "subjectKeyIdentifier = hash\n")
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key])
        if parent is None:
            run(["openssl", "req", "-x509", "-new", "-key", key, "-subj", f"/CN={cn}", "-days", "3650", "-sha256",
                 "-extensions", "v3", "-config", self._req_cnf(d, ext), "-out", pem])
        else:
            csr = os.path.join(d, "ca.csr")
            run(["openssl", "req", "-new", "-key", key, "-subj", f"/CN={cn}", "-out", csr])
            self._issue(parent, csr, pem, ext, "-1 day", "+5 years")
        return d

    def _req_cnf(self, d, ext):
        p = os.path.join(d, "req.cnf")
        with open(p, "w") as f:
            with open(ext) as e:
                f.write("[req]\ndistinguished_name = dn\n[dn]\n[v3]\n" + e.read())
        return p

    @staticmethod
    def _date(rel):
        t = datetime.datetime.now(datetime.timezone.utc)
        if rel.startswith("abs:"):
            return rel[4:]
        sign = -1 if rel.startswith("-") else 1
        n, unit = rel.lstrip("+-").split()
        delta = datetime.timedelta(days=int(n) * (365 if unit.startswith("year") else 1))
        return (t + sign * delta).strftime("%Y%m%d%H%M%SZ")

    def _issue(self, ca, csr, out, ext, start, end):
        run(["openssl", "ca", "-batch", "-notext", "-config", os.path.join(ca, "ca.cnf"), "-in", csr, "-out", out,
             "-extfile", ext, "-startdate", self._date(start), "-enddate", self._date(end)])

    def person(self, name, email, key="rsa", usage="both", start="-1 day", end="+1 year", ca=None, ku=None, extra=""):
        """Issues name.pem / name.key (PKCS#8). key: rsa | p256 | p384 | ed25519. extra: more extension lines
        (e.g. crlDistributionPoints, authorityInfoAccess)."""
        d = os.path.join(self.dir, "people")
        os.makedirs(d, exist_ok=True)
        keyf, pem, csr, ext = (os.path.join(d, name + s) for s in (".key", ".pem", ".csr", ".ext"))
        self._genkey(key, keyf)
        run(["openssl", "req", "-new", "-key", keyf, "-subj", f"/CN={name}", "-out", csr])
        if ku is None:
            enc = "keyAgreement" if key.startswith("p") else "keyEncipherment"
            ku = {"both": f"digitalSignature, {enc}", "sign": "digitalSignature", "encrypt": enc}[usage]
        with open(ext, "w") as f:
            f.write(f"basicConstraints = CA:false\nkeyUsage = critical, {ku}\nextendedKeyUsage = emailProtection\n"
                    f"subjectAltName = email:{email}\nsubjectKeyIdentifier = hash\n"
                    f"authorityKeyIdentifier = keyid\n{extra}")
        self._issue(ca or self.root, csr, pem, ext, start, end)
        return pem, keyf

    def ocsp_responder(self, name, ca=None):
        """A delegated OCSP responder certificate (extendedKeyUsage OCSPSigning) issued by ca; EC P-256."""
        d = os.path.join(self.dir, "people")
        os.makedirs(d, exist_ok=True)
        keyf, pem, csr, ext = (os.path.join(d, name + s) for s in (".key", ".pem", ".csr", ".ext"))
        self._genkey("p256", keyf)
        run(["openssl", "req", "-new", "-key", keyf, "-subj", f"/CN={name}", "-out", csr])
        with open(ext, "w") as f:
            f.write("basicConstraints = CA:false\nkeyUsage = critical, digitalSignature\n"
                    "extendedKeyUsage = OCSPSigning\nnoCheck = ignored\n")
        self._issue(ca or self.root, csr, pem, ext, "-1 day", "+1 year")
        return pem, keyf

    def self_signed(self, name, email, key="rsa"):
        d = os.path.join(self.dir, "people")
        os.makedirs(d, exist_ok=True)
        keyf, pem = os.path.join(d, name + ".key"), os.path.join(d, name + ".pem")
        self._genkey(key, keyf)
        run(["openssl", "req", "-x509", "-new", "-key", keyf, "-subj", f"/CN={name}", "-days", "365",
             "-addext", f"subjectAltName=email:{email}", "-addext", "keyUsage=digitalSignature,keyEncipherment",
             "-addext", "extendedKeyUsage=emailProtection", "-out", pem])
        return pem, keyf

    @staticmethod
    def _genkey(key, out):
        if key == "rsa":
            run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", out])
        elif key in ("p256", "p384"):
            curve = {"p256": "P-256", "p384": "P-384"}[key]
            run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{curve}", "-out", out])
        else:
            run(["openssl", "genpkey", "-algorithm", key.upper(), "-out", out])

    def revoke(self, pem, ca=None):
        ca = ca or self.root
        run(["openssl", "ca", "-config", os.path.join(ca, "ca.cnf"), "-revoke", pem])

    def crl(self, out, ca=None, next_update=None, der=False):
        """The CA's CRL (PEM, or DER when der); next_update: a datetime for its nextUpdate."""
        ca = ca or self.root
        extra = ["-crl_nextupdate", next_update.strftime("%Y%m%d%H%M%SZ")] if next_update else []
        pem = out + ".pem" if der else out
        run(["openssl", "ca", "-config", os.path.join(ca, "ca.cnf"), "-gencrl", "-out", pem, *extra])
        if der:
            run(["openssl", "crl", "-in", pem, "-outform", "DER", "-out", out])
        return out


def cert_der(pem):
    return run(["openssl", "x509", "-in", pem, "-outform", "DER"]).stdout


def fingerprint(pem):
    return hashlib.sha256(cert_der(pem)).hexdigest()


def signed_with_caps(pem, key, content, caps, workdir, ec=False):
    """A CMS SignedData (DER, content included) signed by key, whose signed
    attributes advertise caps (names as in OID)."""
    cert = cert_der(pem)
    tbs = ber_parse(cert).children[0]
    fields = tbs.children[1:] if tbs.children[0].tag == 0xA0 else tbs.children
    serial, issuer = fields[0].raw(), fields[2].raw()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%y%m%d%H%M%SZ").encode()
    caps_der = seq(*(seq(oid(OID[c])) for c in caps))
    attrs = [
        seq(oid(OID["contentType"]), der_set(oid(OID["data"]))),
        seq(oid(OID["signingTime"]), der_set(tlv(0x17, now))),
        seq(oid(OID["messageDigest"]), der_set(tlv(0x04, hashlib.sha256(content).digest()))),
        seq(oid(OID["smimeCapabilities"]), der_set(caps_der)),
    ]
    signed_attrs = der_set(*attrs)
    tbs_path = os.path.join(workdir, "attrs.der")
    with open(tbs_path, "wb") as f:
        f.write(signed_attrs)
    sig = run(["openssl", "dgst", "-sha256", "-sign", key, tbs_path]).stdout
    sha256 = seq(oid(OID["sha256"]))
    sig_alg = seq(oid(OID["ecdsaWithSHA256"])) if ec else seq(oid(OID["rsaEncryption"]), b"\x05\x00")
    signer_info = seq(tlv(0x02, b"\x01"), seq(issuer, serial), sha256, b"\xa0" + signed_attrs[1:], sig_alg,
                      tlv(0x04, sig))
    sd = seq(tlv(0x02, b"\x01"), der_set(sha256), seq(oid(OID["data"]), tlv(0xA0, tlv(0x04, content))),
             tlv(0xA0, cert), der_set(signer_info))
    return seq(oid(OID["signedData"]), tlv(0xA0, sd))


def decrypt(msg_path, pem, key, inform="SMIME"):
    """openssl cms -decrypt with a software key: (returncode, plaintext, stderr)."""
    r = subprocess.run(["openssl", "cms", "-decrypt", "-in", msg_path, "-inform", inform, "-inkey", key,
                        "-recip", pem], capture_output=True, timeout=120)
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


# ---- a test case with a PKI, an address book and an agent configured for them ----

import re  # noqa: E402
import unittest  # noqa: E402

from harness import REPO, AgentTestCase  # noqa: E402

# ../shared/vectors beside the checkout (as in CI); SMIME_TEST_VECTORS
# points elsewhere (a git worktree that is not beside shared/).
VECTORS = os.environ.get("SMIME_TEST_VECTORS") or os.path.join(os.path.dirname(REPO), "shared", "vectors")
NSS = os.path.join(VECTORS, "thunderbird-nss")
VERIFY_EXIT = {"good": 0, "bad": 5, "untrusted": 6}


class PkiTestCase(AgentTestCase):
    """cls.pki and its people, and an agent whose ca-file holds the fixture CA,
    the PKI root and NSS's test CA, with the root's CRL and its own book."""

    AGENT_ARGS = ("--pin-file", "{pin}", "--config", "{tmp}/agent.conf")
    PEOPLE = ()     # (name, email, kwargs) issued before the agent starts
    REVOKED = ()    # names revoked in the root CRL

    @classmethod
    def start_agent(cls, name, args=AGENT_ARGS):
        if not os.path.isdir(NSS):
            raise RuntimeError(f"the S/MIME test vectors are not at {NSS}: check out shared/ beside the "
                               "repository, or set SMIME_TEST_VECTORS to its vectors directory")
        if not hasattr(cls, "pki"):
            cls.pki = Pki(os.path.join(cls.tmp, "pki"))
            cls.people = {}
            for pname, email, kw in cls.PEOPLE:
                cls.people[pname] = cls.pki.person(pname, email, **kw)
            for pname in cls.REVOKED:
                cls.pki.revoke(cls.people[pname][0])
            cls.crl = cls.pki.crl(os.path.join(cls.tmp, "root.crl"))
            cls.book = os.path.join(cls.tmp, "book", "addressbook")
            with open(os.path.join(cls.tmp, "agent.conf"), "w") as f:
                f.write(f"ca-file = {cls.fx.ca}\nca-file = {cls.pki.root}/ca.pem\n"
                        f"ca-file = {NSS}/TestCA.pem\ncrl-file = {cls.crl}\naddress-book = {cls.book}\n"
                        f"default-key = alice@example.org\nsystem-ca = no\n")
        return super().start_agent(name, args)

    # ---- smimectl verify / encrypt ----
    def smime_verify(self, data=None, *args, path=None):
        """smimectl verify; returns (verdict fields dict-of-lists, CompletedProcess)."""
        if path is None and data is not None:
            path = self.write("in.msg", data)
        r = self.ctl("verify", *(["--in", path] if path else []), *args)
        res = {}
        for line in r.stdout.decode(errors="replace").splitlines():
            m = re.match(r"\s*([a-z]+): (.*)", line)
            if m:
                res.setdefault(m.group(1), []).append(m.group(2))
        return res, r

    def assert_verdict(self, verdict, data=None, *args, path=None, problems=()):
        res, r = self.smime_verify(data, *args, path=path)
        self.assertEqual(res.get("verdict"), [verdict], f"stdout:\n{r.stdout.decode()}\nstderr:\n{r.stderr}")
        self.assertEqual(r.returncode, VERIFY_EXIT[verdict], r.stderr)
        for p in problems:
            self.assertIn(p, res.get("problem", []), r.stdout.decode())
        if verdict == "good":
            self.assertNotIn("problem", res, r.stdout.decode())
        return res

    def encrypt_ok(self, data, *args):
        """smimectl encrypt ARGS --out FILE; returns (path, stderr)."""
        out = self.path("enc.out")
        r = self.ctl("encrypt", "--out", out, *args, input=data)
        self.assertEqual(r.returncode, 0, f"smimectl encrypt {' '.join(args)} failed: {r.stderr}")
        return out, r.stderr

    def encrypt_fails(self, data, *args):
        out = self.path("enc.out")
        r = self.ctl("encrypt", "--out", out, *args, input=data)
        self.assertEqual(r.returncode, 1, f"expected exit 1: {r.stderr}")
        self.assertIn("[RECIPIENT]", r.stderr)
        self.assertFalse(os.path.exists(out), "output written although a recipient failed")
        self.assertEqual([f for f in os.listdir(self.work) if f.startswith(os.path.basename(out))], [],
                         "temporary output left behind")
        return r.stderr

    def openssl_sign(self, pem, key, content, *extra, fmt="SMIME", certfile=None):
        msg = self.write("content.txt", content)
        out = self.path("signed")
        cmd = ["openssl", "cms", "-sign", "-signer", pem, "-inkey", key, "-in", msg, "-out", out,
               "-outform", fmt, *extra]
        if certfile:
            cmd += ["-certfile", certfile]
        run(cmd)
        with open(out, "rb") as f:
            return f.read()


def main():
    unittest.main(verbosity=2)
