#!/usr/bin/python3
"""pinentry_standin — a scripted pinentry for the tests (Python 3 stdlib).

It speaks the server side of the Assuan protocol on stdin/stdout as the
GnuPG pinentry programs do (greeting, OPTION, SETDESC/SETPROMPT/SETTITLE/
SETTIMEOUT, GETPIN answered with D and OK, BYE), and does what a control
file says, read at every start, so that one agent can meet several
behaviours:

  PINENTRY_STANDIN_CONTROL  a JSON file {"mode": ..., "pin": ..., "delay": s}
  PINENTRY_STANDIN_LOG      a file it appends to (one line per event, each
                            starting with its pid): START with the open file
                            descriptors, its blocked-signal mask and some
                            environment variables, every command received
                            (SETDESC and others decoded, a newline in them
                            written as \n), END. Never the PIN.

Modes (what GETPIN does):
  pin       D with the PIN (%, CR and LF escaped, as pinentry does), OK
  escaped   the PIN with every byte %-escaped, split over two D lines
  empty     OK without D (the user pressed OK on an empty field)
  cancel    ERR 83886179 Operation cancelled
  timeout   ERR 83886142 Timeout (pinentry's own SETTIMEOUT expired)
  error     ERR 83918950 No such device (any other error)
  hang      never answers (the agent must kill it)
  silent    never even sends its greeting
  crash     kills itself with SIGKILL on GETPIN
  exit      exits with status 3 right after SETDESC
  garbage   answers GETPIN with a line that is not Assuan
  stubborn  the right PIN, then ignores SIGTERM and never answers BYE
"slow" behaviour: "delay" seconds before answering GETPIN, in any mode.
"""
import json
import os
import signal
import sys
import time

ENV_SHOWN = ("DISPLAY", "WAYLAND_DISPLAY", "GPG_TTY", "TERM", "LANG", "LC_ALL", "CREDENTIALS_DIRECTORY",
             "NOTIFY_SOCKET", "LD_PRELOAD", "PATH", "SMIME_STANDIN_MARK")


def unescape(s):
    out, i = bytearray(), 0
    b = s.encode("utf-8", "surrogateescape")
    while i < len(b):
        if b[i] == 0x25 and i + 2 < len(b):
            out.append(int(b[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(b[i])
            i += 1
    return out.decode("utf-8", "replace")


def escape(pin, every=False):
    """The PIN's UTF-8 bytes with %, CR and LF (or every byte) as %XX."""
    out = bytearray()
    for c in pin.encode():
        if every or c in (0x25, 0x0D, 0x0A):
            out += b"%%%02X" % c
        else:
            out.append(c)
    return bytes(out)


def main():
    control = {}
    path = os.environ.get("PINENTRY_STANDIN_CONTROL")
    if path:
        with open(path) as f:
            control = json.load(f)
    mode, pin, delay = control.get("mode", "pin"), control.get("pin", ""), float(control.get("delay", 0))
    pid = os.getpid()
    # Descriptors first, before this script opens any of its own.
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fds.append(f"{name}:{os.readlink('/proc/self/fd/' + name)}")
        except OSError:
            pass  # the directory listing's own descriptor, closed by now
    with open("/proc/self/status") as f:
        sigblk = next((l.split()[1] for l in f if l.startswith("SigBlk:")), "?")
    logf = open(os.environ["PINENTRY_STANDIN_LOG"], "a", buffering=1) if os.environ.get("PINENTRY_STANDIN_LOG") else None

    def log(msg):
        if logf:
            logf.write(f"{pid} {msg}\n")

    env = " ".join(f"{k}={os.environ[k]}" for k in ENV_SHOWN if k in os.environ)
    log(f"START t={time.time():.3f} mode={mode} fds={','.join(sorted(fds))} sigblk={sigblk} env={env}")
    out, inp = sys.stdout.buffer, sys.stdin.buffer

    def send(line):
        out.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
        out.flush()

    if mode == "silent":
        time.sleep(3600)
    send("OK Pleased to meet you, process %d" % pid)
    while True:
        raw = inp.readline()
        if not raw:
            log(f"EOF t={time.time():.3f}")
            return
        line = raw.decode("utf-8", "surrogateescape").rstrip("\n")
        cmd, _, arg = line.partition(" ")
        # SET* texts decoded, their newlines shown as a backslash and n.
        log(f"{cmd} {unescape(arg)}".replace("\n", "\\n") if cmd.startswith("SET") else line)
        if cmd == "BYE" and mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            log("IGNORING-TERM")
            time.sleep(3600)
        if cmd == "BYE":
            send("OK closing connection")
            log(f"END t={time.time():.3f}")
            return
        if cmd == "SETDESC" and mode == "exit":
            os._exit(3)
        if cmd != "GETPIN":
            if cmd == "OPTION" and arg.startswith("unknown"):
                send("ERR 83886254 Unknown option <Pinentry>")
            else:
                send("OK")
            continue
        if delay:
            time.sleep(delay)
        if mode in ("pin", "stubborn"):
            send(b"D " + escape(pin))
            send("OK")
        elif mode == "escaped":
            e = escape(pin, every=True)
            half = (len(e) // 6) * 3
            send("S PASSWORD_FROM_CACHE_NOT")  # a status line the agent must skip
            send(b"D " + e[:half])
            send(b"D " + e[half:])
            send("OK")
        elif mode == "empty":
            send("OK")
        elif mode == "cancel":
            send("ERR 83886179 Operation cancelled <Pinentry>")
        elif mode == "timeout":
            send("ERR 83886142 Timeout <Pinentry>")
        elif mode == "error":
            send("ERR 83918950 No such device <Pinentry>")
        elif mode == "hang":
            time.sleep(3600)
        elif mode == "crash":
            os.kill(pid, signal.SIGKILL)
        elif mode == "garbage":
            send("Hello, I am not a pinentry")
        log(f"ANSWERED t={time.time():.3f}")


if __name__ == "__main__":
    main()
