#!/usr/bin/env bash
# bench/bigsign.sh [BUILD_DIR]
#
# Signs one big message (default 1 GiB) through smime-agent and smimectl and
# measures time, throughput and peak memory of both processes, to show that
# memory stays constant whatever the message size.
#
# It builds nothing: BUILD_DIR (default ./build) must already hold
# service/smime-agent and client/smimectl.  Everything else happens in a
# temporary directory that is removed on exit, also after a failure:
#
#   - a throwaway SoftHSM token from tests/softhsm/fixture.sh,
#   - an smime-agent on its own socket, reading the PIN from the fixture's
#     pin file (--pin-file) and loading only the SoftHSM module,
#   - the input: SIZE_MB MiB from /dev/urandom written to a file (never
#     held in memory), signed with --in FILE,
#   - the outputs (the opaque S/MIME one is about 1.37 times the input and
#     is deleted right after its size is taken).
#
# For each mode it reports wall time, MiB/s, the ratio to the throughput of
# `openssl dgst -sha256` over the same file (measured in the same run), the
# agent's peak RSS (VmHWM from /proc/PID/status, read right after the run)
# and smimectl's peak RSS (ru_maxrss, from /usr/bin/time or python3; it
# includes the measuring process as copied by fork, which the report shows
# as the "floor": ~1 MiB with /usr/bin/time, >10 MiB with python3).
#
# VmHWM is the peak over the process lifetime.  Before each mode the script
# resets it with `echo 5 > /proc/PID/clear_refs` (Linux 4.0 and later), so
# each row shows the peak of that run only.  The agent clears its dumpable
# flag, so only root may write clear_refs; otherwise the report says
# "(lifetime)" and the column is the peak since the agent started.
#
# Environment:
#   SIZE_MB=N   message size in MiB (default 1024)
#   KEY=SEL     signing key, e-mail or PKCS#11 URI (default alice@example.org,
#               RSA 2048 on the fixture token)
#   VERIFY=0    skip `openssl cms -verify` of the detached signature
#   TMPDIR      where the temporary directory goes (needs about
#               2.4 x SIZE_MB MiB free)
set -euo pipefail

PROG=${0##*/}
SRC=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
BUILD=${1:-./build}
SIZE_MB=${SIZE_MB:-1024}
KEY=${KEY:-alice@example.org}
VERIFY=${VERIFY:-1}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

[[ $# -le 1 ]] || { echo "usage: $PROG [BUILD_DIR]" >&2; exit 2; }
[[ $SIZE_MB =~ ^[1-9][0-9]*$ ]] || die "SIZE_MB must be a positive whole number of MiB"
AGENT_BIN=$BUILD/service/smime-agent
CTL=$BUILD/client/smimectl
[[ -x $AGENT_BIN ]] || die "$AGENT_BIN not found; build first: cmake -S . -B $BUILD -DCMAKE_BUILD_TYPE=Release && cmake --build $BUILD"
[[ -x $CTL ]] || die "$CTL not found; build first"
AGENT_BIN=$(cd -- "$(dirname -- "$AGENT_BIN")" && pwd -P)/smime-agent
CTL=$(cd -- "$(dirname -- "$CTL")" && pwd -P)/smimectl
command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
if [[ -x /usr/bin/time ]]; then
    RUSAGE=gnu-time
elif command -v python3 >/dev/null; then
    RUSAGE=python3
else
    die "need /usr/bin/time (apt-get install time) or python3 to measure peak RSS"
fi

# ---- temporary directory and cleanup ----------------------------------------
T=$(mktemp -d "${TMPDIR:-/tmp}/bigsign.XXXXXX")
AGENT_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $AGENT_PID ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$AGENT_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    if ((rc != 0)) && [[ -s $T/agent.log ]]; then
        echo "$PROG: failed (exit $rc); last lines of the agent's log:" >&2
        tail -n 20 "$T/agent.log" >&2
    fi
    rm -rf -- "$T"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- helpers -----------------------------------------------------------------
now_ns() { date +%s%N; }
# secs START_NS END_NS
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
# mibps BYTES SECS
mibps() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", n / 1048576 / s }'; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# timed FILE CMD...: runs CMD; writes its peak RSS in KiB (ru_maxrss) to FILE.
timed() {
    local out=$1
    shift
    if [[ $RUSAGE == gnu-time ]]; then
        /usr/bin/time -f '%M' -o "$out" "$@"
    else
        python3 -c '
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write("%d\n" % ru.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)
' "$out" "$@"
    fi
}

# ru_maxrss also counts the measuring process as it was copied by fork()
# before exec: about 1 MiB for /usr/bin/time, over 10 MiB for python3.  The
# same measurement of /bin/true shows that floor.
timed "$T/rusage" /bin/true
RUSAGE_FLOOR_KIB=$(tr -d ' \n' <"$T/rusage")

# agent_kib FIELD: VmHWM or VmRSS of the agent, in KiB.
agent_kib() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$AGENT_PID/status"; }

# Resets the agent's VmHWM to its current RSS; false when not possible.
reset_hwm() { { echo 5 >"/proc/$AGENT_PID/clear_refs"; } 2>/dev/null; }

# ---- fixture and agent ---------------------------------------------------------
echo "$PROG: building the SoftHSM fixture in $T/fx" >&2
"$SRC/tests/softhsm/fixture.sh" "$T/fx" >&2
# shellcheck source=/dev/null
. "$T/fx/env"

SOCK=$T/run/socket
: >"$T/agent.conf"      # an empty configuration: ignore the user's own
"$AGENT_BIN" --config "$T/agent.conf" --socket "$SOCK" --module "$SMIME_TEST_MODULE" \
    --pin-file "$T/fx/pin" --default-key "$KEY" 2>"$T/agent.log" &
AGENT_PID=$!
for _ in $(seq 100); do
    kill -0 "$AGENT_PID" 2>/dev/null || die "smime-agent exited at start"
    [[ -S $SOCK ]] && "$CTL" --socket "$SOCK" status >/dev/null 2>&1 && break
    sleep 0.1
done
[[ -S $SOCK ]] || die "smime-agent did not start listening on $SOCK"

# Log in to the token (PIN file) and load the code paths before measuring.
echo warm-up | "$CTL" --socket "$SOCK" sign --format der --detached >/dev/null
AGENT_RSS_START=$(agent_kib VmRSS)
AGENT_HWM_START=$(agent_kib VmHWM)

# ---- input and baseline -----------------------------------------------------------
IN=$T/input
BYTES=$((SIZE_MB * 1048576))
echo "$PROG: writing $SIZE_MB MiB from /dev/urandom to $IN" >&2
dd if=/dev/urandom of="$IN" bs=1M count="$SIZE_MB" status=none

t0=$(now_ns)
openssl dgst -sha256 -r "$IN" >"$T/input.sha256"
t1=$(now_ns)
DGST_S=$(secs "$t0" "$t1")
DGST_MBS=$(mibps "$BYTES" "$DGST_S")

# ---- measured runs ------------------------------------------------------------------
ROWS=()
HWM_NOTE=
# run_mode NAME OUTFILE SMIMECTL-SIGN-OPTIONS...
run_mode() {
    local name=$1 outfile=$2 s e wall rate ratio hwm ctl_kib outbytes
    shift 2
    if ! reset_hwm; then
        HWM_NOTE=" (lifetime)"
    fi
    echo "$PROG: signing: smimectl sign $* --in FILE > OUT" >&2
    s=$(now_ns)
    timed "$T/rusage" "$CTL" --socket "$SOCK" sign "$@" --in "$IN" >"$outfile"
    e=$(now_ns)
    hwm=$(agent_kib VmHWM)
    ctl_kib=$(tr -d ' \n' <"$T/rusage")
    wall=$(secs "$s" "$e")
    rate=$(mibps "$BYTES" "$wall")
    ratio=$(awk -v a="$rate" -v b="$DGST_MBS" 'BEGIN { printf "%.2f", a / b }')
    outbytes=$(stat -c %s "$outfile")
    ROWS+=("$(printf '%-16s %8s %8s %8s %9s %10s %10s %14s' "$name" "$SIZE_MB" "$wall" "$rate" "$ratio" \
        "$(kib_to_mib "$hwm")" "$(kib_to_mib "$ctl_kib")" "$outbytes")")
}

run_mode "der --detached" "$T/detached.p7s" --format der --detached
run_mode "smime (opaque)" "$T/opaque.eml" --format smime
grep -qi '^Content-Type: application/pkcs7-mime' "$T/opaque.eml" ||
    die "the opaque output has no application/pkcs7-mime header"
OPAQUE_RATIO=$(awk -v o="$(stat -c %s "$T/opaque.eml")" -v i="$BYTES" 'BEGIN { printf "%.3f", o / i }')
rm -f -- "$T/opaque.eml"

VERIFIED="not checked (VERIFY=0)"
if [[ $VERIFY != 0 ]]; then
    echo "$PROG: verifying the detached signature with openssl cms -verify" >&2
    t0=$(now_ns)
    if openssl cms -verify -binary -inform DER -in "$T/detached.p7s" -content "$IN" \
        -CAfile "$T/fx/ca.pem" -out /dev/null 2>"$T/verify.log"; then
        t1=$(now_ns)
        VERIFIED="$(tr -d '\n' <"$T/verify.log") (openssl cms -verify -binary -content FILE -CAfile ca.pem, $(secs "$t0" "$t1") s)"
    else
        cat "$T/verify.log" >&2
        die "openssl cms -verify rejected the detached signature"
    fi
fi

# ---- report -------------------------------------------------------------------------------
cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
echo
echo "date:      $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "machine:   $(nproc) CPUs, ${cpu:-unknown CPU}, $mem RAM, Linux $(uname -r)"
echo "openssl:   $(openssl version)"
echo "key:       $KEY on SoftHSM ($SMIME_TEST_MODULE)"
echo "input:     $SIZE_MB MiB ($BYTES bytes) from /dev/urandom, in a file (page cache)"
echo "baseline:  openssl dgst -sha256: $DGST_S s, $DGST_MBS MiB/s"
echo "peak RSS:  smimectl: ru_maxrss via $RUSAGE (floor: $(kib_to_mib "$RUSAGE_FLOOR_KIB") MiB for /bin/true)"
echo
printf '%-16s %8s %8s %8s %9s %10s %10s %14s\n' "mode" "MiB" "seconds" "MiB/s" "x dgst" \
    "agent" "smimectl" "output bytes"
printf '%-16s %8s %8s %8s %9s %10s %10s %14s\n' "" "" "" "" "" "VmHWM MiB" "maxrss MiB" ""
printf '%s\n' "${ROWS[@]}"
echo
echo "agent after start and one warm-up signature: VmRSS $(kib_to_mib "$AGENT_RSS_START") MiB, VmHWM $(kib_to_mib "$AGENT_HWM_START") MiB"
echo "agent VmHWM column: peak RSS during that run${HWM_NOTE:- (reset before each run via /proc/PID/clear_refs)}"
echo "agent at the end: VmRSS $(kib_to_mib "$(agent_kib VmRSS)") MiB"
echo "opaque S/MIME output / input: $OPAQUE_RATIO"
echo "detached signature: $VERIFIED"
