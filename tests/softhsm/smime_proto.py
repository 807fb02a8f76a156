#!/usr/bin/env python3
"""smime_proto — a minimal smime-agent client in plain Python (stdlib only).

It is a worked example for plugin authors, and the test suite uses it too.
Wire format (proto/proto.h, proto/PROTOCOL.md):

  frame   = u32 BE body length, then the body: u8 message type + payload
  payload = raw bytes for DATA; else fields: u16 BE tag, u32 BE length, value
  values  = uint: 8 bytes BE; string: UTF-8 without NUL; group: nested fields

A session: connect, HELLO {VERSION=1, SOFTWARE, INTERACTIVE} -> HELLO_OK,
then one request at a time. KEYS -> KEY* DONE. STATUS -> STATUS_OK.
SIGN {KEY, FORMAT, DETACHED, DIGEST, ...} -> [NEED_PIN -> PIN | CANCEL]
-> READY, then lock-step streaming: send DATA (1..262144 bytes), read
DATA* until MORE; after the last input send END and read DATA* until DONE.
DECRYPT {KEY, FORMAT} -> READY, then the same streaming; it may send
NEED_PIN in place of a MORE (it learns its token from the content), and
ends with DONE {CIPHER, AUTHENTICATED, ...} only when the whole content
decrypted correctly: ERROR INTEGRITY means discard the output.
The agent may answer ERROR {CODE, MESSAGE} at any point.

CLI: smime_proto.py --socket S sign --key alice@example.org --format der < in > out
     smime_proto.py --socket S decrypt < message.eml > content
"""
import argparse
import os
import socket
import struct
import sys

VERSION = 1
MAX_FRAME = 1024 * 1024  # body bytes (type + payload)
MAX_CHUNK = 256 * 1024  # payload bytes of one DATA frame

# Message types. Client -> agent, then agent -> client (DATA goes both ways).
HELLO, STATUS, KEYS, SIGN, DECRYPT, DATA, END, PIN, CANCEL = 0x01, 0x02, 0x03, 0x10, 0x11, 0x20, 0x21, 0x30, 0x31
MORE, HELLO_OK, STATUS_OK, KEY, DONE, NEED_PIN, READY, ERROR = 0x22, 0x81, 0x82, 0x83, 0x8F, 0x90, 0x91, 0xFF
# Address book, verify, encrypt.
CERTS, IMPORT, TRUST, VERIFY, ENCRYPT, CERT = 0x04, 0x05, 0x06, 0x07, 0x08, 0x84
LOGIN, LOCK = 0x40, 0x41
TYPE_NAMES = {v: k for k, v in dict(
    LOGIN=LOGIN, LOCK=LOCK,
    HELLO=HELLO, STATUS=STATUS, KEYS=KEYS, SIGN=SIGN, DECRYPT=DECRYPT, DATA=DATA, END=END, PIN=PIN, CANCEL=CANCEL, MORE=MORE,
    CERTS=CERTS, IMPORT=IMPORT, TRUST=TRUST, VERIFY=VERIFY, ENCRYPT=ENCRYPT, CERT=CERT,
    HELLO_OK=HELLO_OK, STATUS_OK=STATUS_OK, KEY=KEY, DONE=DONE, NEED_PIN=NEED_PIN, READY=READY,
    ERROR=ERROR).items()}

# Field tags (one namespace) and the type of each: u = uint, s = string, g = group.
TAGS = dict(
    VERSION=(1, "u"), SOFTWARE=(2, "s"), INTERACTIVE=(3, "u"), KEY=(10, "s"), FORMAT=(11, "s"), DETACHED=(12, "u"),
    DIGEST=(13, "s"), NO_CERTS=(14, "u"), CHAIN=(15, "u"), PSS=(16, "u"), CODE=(20, "u"), MESSAGE=(21, "s"),
    PIN=(30, "s"), URI=(40, "s"), LABEL=(41, "s"), SUBJECT=(42, "s"), ISSUER=(43, "s"), SERIAL=(44, "s"),
    EMAIL=(45, "s"), KEY_TYPE=(46, "s"), KEY_BITS=(47, "u"), USAGE=(48, "s"), NOT_BEFORE=(49, "u"),
    NOT_AFTER=(50, "u"), USABLE=(51, "u"), STATUS_TEXT=(52, "s"), CURVE=(53, "s"), DEFAULT=(54, "u"),
    TOKEN=(60, "g"), MANUFACTURER=(61, "s"), MODEL=(62, "s"), TOKEN_SERIAL=(63, "s"), MODULE_NAME=(64, "s"),
    LOGIN_REQUIRED=(65, "u"), LOGGED_IN=(66, "u"), PIN_STATE=(67, "s"), PROTECTED_AUTH=(68, "u"),
    TOKEN_LABEL=(69, "s"), MODULE=(70, "g"), LIBRARY=(71, "s"), KEY_COUNT=(72, "u"), PATH=(73, "s"),
    BYTES_IN=(80, "u"), BYTES_OUT=(81, "u"), CIPHER=(90, "s"), AUTHENTICATED=(91, "u"), RECIPIENT=(92, "s"),
    KEY_TRANSPORT=(93, "s"),
    FINGERPRINT=(100, "s"), TRUST=(101, "s"), CERT_DATA=(102, "b"), SOURCE=(103, "s"), ADDED=(104, "u"),
    CAPS=(105, "s"), PROBLEM=(106, "s"), VERDICT=(107, "s"), SIGNER=(108, "g"), SIGNING_TIME=(109, "u"),
    SIG_ALG=(110, "s"), CHAIN_SUBJECT=(111, "s"), HINT=(112, "s"), FROM=(113, "s"),
    RECIPIENT_CERT=(115, "b"), NO_SELF=(116, "u"), RECIPIENT_INFO=(118, "g"), FAILED=(120, "g"), SIGNATURE=(121, "b"), COUNT=(122, "u"), SUMMARY=(123, "s"),
    NO_CONTENT=(124, "u"), TRUST_PATH=(125, "s"), CRL_COUNT=(200, "u"),
    LOGIN_EXPIRES=(160, "u"), SIGN_EXPIRES=(161, "u"), DECRYPT_EXPIRES=(162, "u"),
    LOGIN_POLICY=(163, "s"), TOKEN_STATE=(164, "s"), LOGGED_OUT=(165, "u"),
    CONTEXT_KEY=(240, "s"), PIN_PAD_NOTICE=(241, "u"),
    HOTPLUG=(220, "s"), SESSION_ENV=(230, "s"))
TAG_BY_NUMBER = {num: (name, kind) for name, (num, kind) in TAGS.items()}

ERROR_NAMES = {
    1: "PROTOCOL", 2: "TOO_LARGE", 3: "VERSION", 4: "UNSUPPORTED", 5: "BUSY", 6: "INTERNAL", 7: "CANCELLED",
    8: "PERMISSION", 10: "NO_KEY", 11: "AMBIGUOUS_KEY", 12: "NO_CERT", 13: "CERT_EXPIRED", 14: "KEY_USAGE",
    15: "MECHANISM", 16: "NO_PRIVATE_KEY", 20: "PIN_REQUIRED", 21: "PIN_INCORRECT", 22: "PIN_LOCKED",
    23: "TOKEN", 24: "TOKEN_REMOVED", 30: "BAD_INPUT", 31: "NOT_RECIPIENT", 32: "INTEGRITY", 33: "DECRYPT_FAILED",
    40: "RECIPIENT", 41: "NOT_FOUND", 42: "STORE"}


class AgentError(Exception):
    """The agent answered ERROR. code is the number, name e.g. "NO_KEY"."""

    def __init__(self, code, message, fields=()):
        self.code, self.message, self.fields = code, message, list(fields)
        self.name = ERROR_NAMES.get(code, "UNKNOWN")
        super().__init__(f"{self.name}: {message}")


class ProtocolError(Exception):
    """The agent sent something this client did not expect, or went away."""


def encode_fields(fields):
    """fields: iterable of (name, value); value int, str, bytes or a list of fields (group)."""
    out = bytearray()
    for name, value in fields:
        tag, kind = TAGS[name]
        if kind == "u":
            raw = struct.pack(">Q", value)
        elif kind == "g":
            raw = encode_fields(value)
        else:
            raw = value.encode() if isinstance(value, str) else bytes(value)
        out += struct.pack(">HI", tag, len(raw)) + raw
    return bytes(out)


def decode_fields(payload):
    """[(name, value)]: uints as int, strings as str, groups as nested lists."""
    fields, pos = [], 0
    while pos < len(payload):
        if pos + 6 > len(payload):
            raise ProtocolError("truncated field header")
        tag, length = struct.unpack_from(">HI", payload, pos)
        value = payload[pos + 6:pos + 6 + length]
        if len(value) != length:
            raise ProtocolError(f"field {tag} runs past the payload")
        pos += 6 + length
        name, kind = TAG_BY_NUMBER.get(tag, (f"TAG_{tag}", "b"))
        if kind == "u":
            value = struct.unpack(">Q", value)[0]
        elif kind == "s":
            value = value.decode("utf-8", "replace")
        elif kind == "g":
            value = decode_fields(value)
        fields.append((name, value))
    return fields


def field(fields, name, default=None):
    """The first value of a field, as the agent reads them."""
    return next((v for n, v in fields if n == name), default)


class Connection:
    """One connection to the agent. hello=False leaves the handshake to the caller."""

    def __init__(self, path, software="smime_proto.py", interactive=False, hello=True, timeout=60,
                 pin_pad_notice=False, session_env=()):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        if hello:
            self.hello(interactive=interactive, software=software, pin_pad_notice=pin_pad_notice,
                       session_env=session_env)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- framing ----
    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, mtype, fields=(), data=None):
        body = bytes([mtype]) + (data if data is not None else encode_fields(fields))
        self.send_raw(struct.pack(">I", len(body)) + body)

    def _read_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def recv(self):
        """(type, payload bytes), or None at EOF. ERROR is returned, not raised."""
        head = self._read_exact(4)
        if head is None:
            return None
        (length,) = struct.unpack(">I", head)
        if length == 0 or length > MAX_FRAME:
            raise ProtocolError(f"the agent sent a frame of {length} bytes")
        body = self._read_exact(length)
        if body is None:
            raise ProtocolError("the agent closed the connection inside a frame")
        return body[0], body[1:]

    def expect(self, *types):
        """The next frame, which must be one of types: fields (or bytes for DATA).
        Raises AgentError for ERROR and ProtocolError for anything else."""
        frame = self.recv()
        if frame is None:
            raise ProtocolError("the agent closed the connection")
        mtype, payload = frame
        if mtype == ERROR and ERROR not in types:
            f = decode_fields(payload)
            raise AgentError(field(f, "CODE", 0), field(f, "MESSAGE", ""), f)
        if mtype not in types:
            raise ProtocolError(f"expected {'/'.join(TYPE_NAMES.get(t, hex(t)) for t in types)}, "
                                f"got {TYPE_NAMES.get(mtype, hex(mtype))}")
        return mtype, (payload if mtype == DATA else decode_fields(payload))

    # ---- requests ----
    def hello(self, version=VERSION, interactive=False, software="smime_proto.py", pin_pad_notice=False,
              session_env=()):
        """session_env: "NAME=value" strings (DISPLAY, GPG_TTY...) for the agent's pinentry."""
        fields = [("VERSION", version), ("SOFTWARE", software), ("INTERACTIVE", int(interactive))]
        if pin_pad_notice:
            fields.append(("PIN_PAD_NOTICE", 1))
        fields += [("SESSION_ENV", kv) for kv in session_env]
        try:
            self.send(HELLO, fields)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent may have refused us already: its ERROR is still readable
        return self.expect(HELLO_OK)[1]

    def keys(self):
        self.send(KEYS)
        keys = []
        while True:
            mtype, f = self.expect(KEY, DONE)
            if mtype == DONE:
                return keys
            keys.append(f)

    def status(self):
        self.send(STATUS)
        return self.expect(STATUS_OK)[1]

    def _token_request(self, mtype, key, pin):
        self.send(mtype, [("KEY", key)] if key is not None else [])
        while True:
            mtype, f = self.expect(DONE, NEED_PIN)
            if mtype == DONE:
                return f
            answer = pin(f) if pin else None
            if answer is None:
                self.send(CANCEL)
            else:
                self.send(PIN, [("PIN", answer)])

    def login(self, key=None, pin=None):
        """LOGIN: log in ahead of time (key: a token's or key's URI, or an e-mail address;
        None: every token that needs it). NEED_PIN answered with pin(fields). DONE fields."""
        return self._token_request(LOGIN, key, pin)

    def lock(self, key=None):
        """LOCK: log out of every (or the selected) token. DONE fields (LOGGED_OUT, TOKEN groups)."""
        return self._token_request(LOCK, key, None)

    def start_sign(self, key=None, format=None, detached=False, digest=None, no_certs=False, chain=False,
                   pss=False, pin=None):
        """Sends SIGN and answers NEED_PIN with pin(fields) -> PIN string, or None to cancel.
        Returns the READY fields."""
        opts = [("KEY", key)] if key is not None else []
        opts += [("FORMAT", format)] if format is not None else []
        opts += [("DIGEST", digest)] if digest is not None else []
        opts += [("DETACHED", int(detached)), ("NO_CERTS", int(no_certs)), ("CHAIN", int(chain)), ("PSS", int(pss))]
        self.send(SIGN, opts)
        while True:
            mtype, f = self.expect(READY, NEED_PIN)
            if mtype == READY:
                return f
            answer = pin(f) if pin else None
            if answer is None:
                self.send(CANCEL)
            else:
                self.send(PIN, [("PIN", answer)])

    def _pump(self, out, until, pin=None):
        while True:
            mtype, data = self.expect(DATA, until, NEED_PIN)
            if mtype == NEED_PIN:
                answer = pin(data) if pin else None
                if answer is None:
                    self.send(CANCEL)
                else:
                    self.send(PIN, [("PIN", answer)])
                continue
            if mtype != DATA:
                return data
            out.write(data)

    def stream(self, infile, outfile, pin=None):
        """Lock-step content streaming after READY. Returns the DONE fields."""
        while True:
            chunk = infile.read(MAX_CHUNK)
            if not chunk:
                break
            self.send(DATA, data=chunk)
            self._pump(outfile, MORE, pin)
        self.send(END)
        return self._pump(outfile, DONE, pin)

    def decrypt(self, infile, outfile, key=None, format=None, pin=None):
        """Decrypts infile into outfile. Returns the DONE fields; on AgentError
        (INTEGRITY in particular) what was written to outfile must be discarded."""
        opts = [("KEY", key)] if key is not None else []
        opts += [("FORMAT", format)] if format is not None else []
        self.send(DECRYPT, opts)
        self.expect(READY)
        return self.stream(infile, outfile, pin)

    def verify(self, infile, outfile, **fields):
        """VERIFY with the given fields (FROM=..., SIGNATURE=bytes, NO_CONTENT=1). Returns the DONE fields."""
        self.send(VERIFY, list(fields.items()))
        self.expect(READY)
        return self.stream(infile, outfile)

    def encrypt(self, infile, outfile, recipients=(), certs=(), **fields):
        """ENCRYPT. Returns (READY fields, DONE fields)."""
        self.send(ENCRYPT, [("RECIPIENT", r) for r in recipients] + [("RECIPIENT_CERT", c) for c in certs] +
                  list(fields.items()))
        ready = self.expect(READY)[1]
        return ready, self.stream(infile, outfile)

    def certs(self, email=None):
        self.send(CERTS, [("EMAIL", email)] if email else [])
        out = []
        while True:
            mtype, f = self.expect(CERT, DONE)
            if mtype == DONE:
                return out
            out.append(f)

    def sign(self, infile, outfile, **opts):
        """Signs everything read from infile (binary) into outfile. Returns the DONE fields."""
        self.start_sign(**opts)
        return self.stream(infile, outfile)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Minimal smime-agent client (raw protocol).")
    ap.add_argument("--socket", default=os.environ.get("SMIME_AGENT_SOCKET"), help="agent socket")
    ap.add_argument("--interactive", action="store_true", help="answer NEED_PIN (PIN from --pin-file)")
    ap.add_argument("--pin-file", help="PIN to give when the agent asks (implies --interactive)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("keys")
    sub.add_parser("status")
    sp = sub.add_parser("sign")
    sp.add_argument("--key")
    sp.add_argument("--format")
    sp.add_argument("--digest")
    for flag in ("detached", "no-certs", "chain", "pss"):
        sp.add_argument("--" + flag, action="store_true")
    dp = sub.add_parser("decrypt")
    dp.add_argument("--key")
    dp.add_argument("--format")
    a = ap.parse_args(argv)
    if not a.socket:
        ap.error("no socket: pass --socket or set SMIME_AGENT_SOCKET")

    pin = None
    if a.pin_file:
        with open(a.pin_file) as f:
            secret = f.read().rstrip("\r\n")
        pin = lambda token: secret  # noqa: E731
    try:
        with Connection(a.socket, interactive=a.interactive or pin is not None) as c:
            if a.cmd == "keys":
                for k in c.keys():
                    print(field(k, "EMAIL") or field(k, "LABEL"), field(k, "URI"), field(k, "STATUS_TEXT"))
            elif a.cmd == "status":
                for name, value in c.status():
                    print(name, value)
            elif a.cmd == "decrypt":
                done = c.decrypt(sys.stdin.buffer, sys.stdout.buffer, key=a.key, format=a.format, pin=pin)
                sys.stdout.buffer.flush()
                print(f"decrypted {field(done, 'BYTES_OUT')} bytes ({field(done, 'CIPHER')}, "
                      f"{'authenticated' if field(done, 'AUTHENTICATED') else 'not integrity-protected'})",
                      file=sys.stderr)
            else:
                done = c.sign(sys.stdin.buffer, sys.stdout.buffer, key=a.key, format=a.format, digest=a.digest,
                              detached=a.detached, no_certs=a.no_certs, chain=a.chain, pss=a.pss, pin=pin)
                sys.stdout.buffer.flush()
                print(f"signed {field(done, 'BYTES_IN')} bytes", file=sys.stderr)
    except AgentError as e:
        print(f"smime_proto.py: {e.message} [{e.name}]", file=sys.stderr)
        return 1
    except (OSError, ProtocolError) as e:
        print(f"smime_proto.py: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
