#!/usr/bin/env bash
# bench/bigdecrypt.sh [BUILD_DIR]
#
# Decrypts one big message (default 1 GiB) through smime-agent and smimectl
# and measures time, throughput and the peak memory of both processes, to
# show that memory stays constant whatever the message size.
#
# BUILD_DIR (default ./build) must hold service/smime-agent and
# client/smimectl. Everything else happens in a temporary directory removed
# on exit: a throwaway SoftHSM token (tests/softhsm/fixture.sh), an agent on
# its own socket with the fixture's PIN file, SIZE_MB MiB from /dev/urandom,
# and the encrypted messages made by `openssl cms -encrypt -stream` to a
# token certificate:
#   - der GCM:    AuthEnvelopedData, AES-256-GCM, to the P-384 key (ECDH)
#   - smime CBC:  EnvelopedData, AES-256-CBC, base64 S/MIME, to the RSA key
# The baseline, measured in the same run on the same size, is
# `openssl enc -d -aes-256-cbc` of a file that `openssl enc` encrypted: the
# bare cipher with no CMS, no token and no socket.
#
# Peak RSS: the agent's VmHWM (reset before each run with clear_refs when
# allowed, else its lifetime peak) and smimectl's ru_maxrss (/usr/bin/time).
#
# Environment: SIZE_MB (default 1024); TMPDIR (needs about 4 x SIZE_MB MiB).
set -euo pipefail

PROG=${0##*/}
SRC=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
BUILD=${1:-./build}
SIZE_MB=${SIZE_MB:-1024}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

[[ $# -le 1 ]] || { echo "usage: $PROG [BUILD_DIR]" >&2; exit 2; }
[[ $SIZE_MB =~ ^[1-9][0-9]*$ ]] || die "SIZE_MB must be a positive whole number of MiB"
AGENT_BIN=$(cd -- "$BUILD/service" 2>/dev/null && pwd -P)/smime-agent
CTL=$(cd -- "$BUILD/client" 2>/dev/null && pwd -P)/smimectl
[[ -x $AGENT_BIN && -x $CTL ]] || die "no smime-agent/smimectl in $BUILD; build first: cmake -S . -B $BUILD -DCMAKE_BUILD_TYPE=Release && cmake --build $BUILD"
[[ -x /usr/bin/time ]] || die "need /usr/bin/time (apt-get install time)"

T=$(mktemp -d "${TMPDIR:-/tmp}/bigdecrypt.XXXXXX")
AGENT_PID=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $AGENT_PID ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
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

now_ns() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
mibps() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", n / 1048576 / s }'; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
agent_kib() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$AGENT_PID/status"; }
reset_hwm() { { echo 5 >"/proc/$AGENT_PID/clear_refs"; } 2>/dev/null; }

echo "$PROG: building the SoftHSM fixture in $T/fx" >&2
"$SRC/tests/softhsm/fixture.sh" "$T/fx" >&2
# shellcheck source=/dev/null
. "$T/fx/env"
SOCK=$T/run/socket
: >"$T/agent.conf"
"$AGENT_BIN" --config "$T/agent.conf" --socket "$SOCK" --module "$SMIME_TEST_MODULE" \
    --pin-file "$T/fx/pin" 2>"$T/agent.log" &
AGENT_PID=$!
for _ in $(seq 100); do
    kill -0 "$AGENT_PID" 2>/dev/null || die "smime-agent exited at start"
    [[ -S $SOCK ]] && "$CTL" --socket "$SOCK" status >/dev/null 2>&1 && break
    sleep 0.1
done
[[ -S $SOCK ]] || die "smime-agent did not start listening on $SOCK"

# Warm-up: log in and load the code paths.
echo warm-up | openssl cms -encrypt -binary -aes-256-cbc -outform DER "$T/fx/certs/rsa2048.pem" >"$T/warm.der"
"$CTL" --socket "$SOCK" decrypt --in "$T/warm.der" >/dev/null

IN=$T/input
BYTES=$((SIZE_MB * 1048576))
echo "$PROG: writing $SIZE_MB MiB from /dev/urandom" >&2
dd if=/dev/urandom of="$IN" bs=1M count="$SIZE_MB" status=none
sha=$(openssl dgst -sha256 -r "$IN" | cut -d' ' -f1)

echo "$PROG: baseline: openssl enc -aes-256-cbc" >&2
KEYHEX=$(openssl rand -hex 32)
IVHEX=$(openssl rand -hex 16)
openssl enc -aes-256-cbc -K "$KEYHEX" -iv "$IVHEX" -in "$IN" -out "$T/enc.bin"
s=$(now_ns)
openssl enc -d -aes-256-cbc -K "$KEYHEX" -iv "$IVHEX" -in "$T/enc.bin" -out /dev/null
e=$(now_ns)
ENC_S=$(secs "$s" "$e")
ENC_MBS=$(mibps "$BYTES" "$ENC_S")
rm -f -- "$T/enc.bin"

ROWS=()
HWM_NOTE=
run_mode() {
    local name=$1 msg=$2 s e wall rate ratio hwm ctl_kib got
    reset_hwm || HWM_NOTE=" (lifetime)"
    echo "$PROG: decrypting $name" >&2
    s=$(now_ns)
    /usr/bin/time -f '%M' -o "$T/rusage" "$CTL" --socket "$SOCK" decrypt --in "$msg" --out "$T/out"
    e=$(now_ns)
    hwm=$(agent_kib VmHWM)
    ctl_kib=$(tr -d ' \n' <"$T/rusage")
    got=$(openssl dgst -sha256 -r "$T/out" | cut -d' ' -f1)
    [[ $got == "$sha" ]] || die "$name: the decrypted content differs from the input"
    rm -f -- "$T/out"
    wall=$(secs "$s" "$e")
    rate=$(mibps "$BYTES" "$wall")
    ratio=$(awk -v a="$rate" -v b="$ENC_MBS" 'BEGIN { printf "%.2f", a / b }')
    ROWS+=("$(printf '%-12s %8s %8s %8s %9s %10s %10s' "$name" "$SIZE_MB" "$wall" "$rate" "$ratio" \
        "$(kib_to_mib "$hwm")" "$(kib_to_mib "$ctl_kib")")")
}

echo "$PROG: encrypting with openssl cms -stream" >&2
openssl cms -encrypt -stream -binary -aes-256-gcm -outform DER -in "$IN" -out "$T/gcm.der" "$T/fx/certs/p384.pem"
run_mode "der GCM" "$T/gcm.der"
rm -f -- "$T/gcm.der"
openssl cms -encrypt -stream -binary -aes-256-cbc -in "$IN" -out "$T/cbc.eml" "$T/fx/certs/rsa2048.pem"
run_mode "smime CBC" "$T/cbc.eml"

cat <<EOF
date:      $(date -u '+%Y-%m-%d %H:%M:%S UTC')
machine:   $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, Linux $(uname -r)
openssl:   $(openssl version)
input:     $SIZE_MB MiB from /dev/urandom; output checked against its SHA-256
baseline:  openssl enc -d -aes-256-cbc: $ENC_S s, $ENC_MBS MiB/s

mode              MiB  seconds    MiB/s     x enc      agent   smimectl
                                                  VmHWM MiB maxrss MiB
EOF
printf '%s\n' "${ROWS[@]}"
[[ -z $HWM_NOTE ]] || echo "agent VmHWM$HWM_NOTE: clear_refs not writable, peak since start"
