#!/usr/bin/env bash
# tests/softhsm/fixture.sh DIR [--demo]
#
# Builds a throwaway SoftHSM world in DIR for smime-agent tests: its own
# softhsm2.conf and token store, keys generated ON the token, a software test
# CA in DIR/ca/ that certifies the token public keys, and the certificates
# written back onto the token.  See README.md beside this file for the list of
# identities and the files it leaves in DIR.
#
# It never touches the system SoftHSM configuration: every command runs with
# SOFTHSM2_CONF=DIR/softhsm2.conf.  Chatter goes to DIR/fixture.log; on
# failure the failing step and the tail of that log are printed.
#
# Needs: pkcs11-tool (opensc), /usr/lib/softhsm/libsofthsm2.so (libsofthsm2),
# openssl (3.0+), perl (Essential on Debian).
set -euo pipefail

MODULE=/usr/lib/softhsm/libsofthsm2.so
USER_PIN=1234
SO_PIN=12345678
MARKER=.smime-fixture
PROG=${0##*/}

usage() {
    echo "usage: $PROG DIR [--demo]" >&2
    exit 2
}

DIR=
DEMO=0
for arg in "$@"; do
    case $arg in
        --demo) DEMO=1 ;;
        -h|--help) usage ;;
        -*) echo "$PROG: unknown option: $arg" >&2; usage ;;
        *) [[ -z $DIR ]] || usage; DIR=$arg ;;
    esac
done
[[ -n $DIR ]] || usage

if ((DEMO)); then
    TOKEN=smime-demo
    CA_CN="smime-agent Demo CA"
    # label|id|key type|CN|email|profile|validity
    IDENTITIES=(
        "demo|01|rsa:2048|Demo User|demo@example.org|rsa|current"
    )
else
    TOKEN=smime-test
    CA_CN="smime-agent Test CA"
    IDENTITIES=(
        "rsa2048|01|rsa:2048|Alice RSA2048|alice@example.org|rsa|current"
        "rsa3072|02|rsa:3072|Bob RSA3072|bob@example.org|rsa|current"
        "p256|03|EC:prime256v1|Carol P256|carol@example.org|ec|current"
        "p384|04|EC:secp384r1|Dave P384|dave@example.org|ec|current"
        "ed25519|05|EC:edwards25519|Erin Ed25519|erin@example.org|ed|current"
        "nocert|06|rsa:2048|||rsa|none"
        "expired|07|rsa:2048|Frank Expired|frank@example.org|rsa|expired"
        "noemail|08|EC:prime256v1|No Email P256||ec|current"
        "encrypt-only|09|rsa:2048|Grace EncryptOnly|grace@example.org|encrypt|current"
        "p521|0a|EC:secp521r1|Heidi P521|heidi@example.org|ec|current"
        "sign-only|0b|rsa:2048|Ivan SignOnly|ivan@example.org|sign|current"
    )
fi

# --- preconditions ---------------------------------------------------------
command -v pkcs11-tool >/dev/null || { echo "$PROG: pkcs11-tool not found (apt-get install opensc)" >&2; exit 1; }
command -v openssl >/dev/null || { echo "$PROG: openssl not found (apt-get install openssl)" >&2; exit 1; }
command -v perl >/dev/null || { echo "$PROG: perl not found (apt-get install perl-base)" >&2; exit 1; }
[[ -r $MODULE ]] || { echo "$PROG: $MODULE not found (apt-get install softhsm2)" >&2; exit 1; }
[[ $DIR != *$'\n'* ]] || { echo "$PROG: DIR must not contain a newline" >&2; exit 2; }

# --- DIR: create, or wipe a previous fixture, or refuse ---------------------
if [[ -e $DIR || -L $DIR ]]; then
    [[ -d $DIR ]] || { echo "$PROG: $DIR exists and is not a directory" >&2; exit 1; }
    if [[ -n $(ls -A -- "$DIR") ]]; then
        if [[ -f $DIR/$MARKER ]]; then
            find "$DIR" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +
        else
            echo "$PROG: refusing to use $DIR: it is not empty and holds no $MARKER from an earlier fixture" >&2
            exit 1
        fi
    fi
fi
mkdir -p -- "$DIR"
DIR=$(cd -- "$DIR" && pwd -P)
# Marker first, so that a run that fails half way can simply be run again.
printf 'smime-agent SoftHSM test fixture (%s mode), created %s by %s\n' \
    "$( ((DEMO)) && echo demo || echo full)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROG" >"$DIR/$MARKER"

LOG=$DIR/fixture.log
: >"$LOG"
STEP="start"
START_NS=$(date +%s%N)

on_exit() {
    local rc=$?
    if ((rc != 0)); then
        {
            echo "$PROG: FAILED (exit $rc) at step: $STEP"
            echo "---- last lines of $LOG ----"
            tail -n 30 "$LOG"
            echo "----"
        } >&2
    fi
}
trap on_exit EXIT

step() {
    STEP=$*
    printf '\n== %s\n' "$STEP" >>"$LOG"
}
# run CMD...: run quietly, everything into the log.
run() {
    printf '$ %s\n' "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
}
fail() {
    echo "error: $*" >>"$LOG"
    exit 1
}

export SOFTHSM2_CONF=$DIR/softhsm2.conf
p11() { pkcs11-tool --module "$MODULE" "$@"; }
p11tok() { p11 --token-label "$TOKEN" "$@"; }
p11user() { p11 --token-label "$TOKEN" --login --pin "$USER_PIN" "$@"; }

CA=$DIR/ca
mkdir -p "$DIR/tokens" "$DIR/certs" "$CA/pubkeys" "$CA/ext" "$CA/work"

# UTCTime (YYMMDDHHMMSSZ) for a `date -d` expression; all dates used here are
# before 2050, so UTCTime is what X.509 requires.
utctime() { date -u -d "$1" +%y%m%d%H%M%SZ; }
NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
NB_CURRENT=$(utctime "$NOW - 1 day")
NA_CURRENT=$(utctime "$NOW - 1 day + 2 years")
NB_EXPIRED=200101000000Z
NA_EXPIRED=210101000000Z
NB_CA=191201000000Z             # covers the expired certificate's validity too
NA_CA=$(utctime "$NOW + 10 years")

# Serial numbers: 8 bytes, random per run (so certificates from two runs never
# share issuer+serial) with the identity's index in the low byte (so they are
# unique within a run).  Leading nibble 5 keeps them positive.
SERIAL_BASE=5$(openssl rand -hex 7 | cut -c1-13)
serial_for() { printf '0x%s%02x' "$SERIAL_BASE" "$1"; }

# set_validity IN.der OUT.der NOTBEFORE NOTAFTER SIGNKEY
# OpenSSL 3.0 `x509 -new` can only start a certificate "now", and re-signing
# an existing certificate with `x509 -CA -preserve_dates` insists that it be
# self-signed (impossible: the private key is on the token).  So the
# certificate is made with `x509 -new -force_pubkey`, then its Validity
# (two UTCTimes, fixed length) is rewritten in the DER and the TBSCertificate
# is signed again with the CA key (sha256WithRSAEncryption, as x509 used).
set_validity() {
    local in=$1 out=$2 nb=$3 na=$4 key=$5
    perl -e '
        use strict; use warnings;
        my ($in, $out, $nb, $na, $key, $tbsfile) = @ARGV;
        for ($nb, $na) { /^[0-9]{12}Z$/ or die "bad UTCTime $_\n" }
        open(my $f, "<:raw", $in) or die "$in: $!\n";
        my $der = do { local $/; <$f> }; close $f;
        sub hdr {                       # (tag, header length, content length)
            my ($b, $o) = @_;
            my $t = ord substr($b, $o, 1); my $l = ord substr($b, $o + 1, 1); my $h = 2;
            if ($l & 0x80) { my $n = $l & 0x7f; $l = 0;
                $l = ($l << 8) | ord substr($b, $o + 2 + $_, 1) for 0 .. $n - 1; $h += $n }
            return ($t, $h, $l);
        }
        sub enc { my ($t, $c) = @_; my $l = length $c; my $ls;
            if ($l < 0x80) { $ls = chr $l } else { my $x = ""; while ($l) { $x = chr($l & 0xff) . $x; $l >>= 8 }
                $ls = chr(0x80 | length $x) . $x }
            return chr($t) . $ls . $c }
        my ($t0, $h0, $l0) = hdr($der, 0);
        die "not a certificate\n" unless $t0 == 0x30 && $h0 + $l0 == length $der;
        my ($t1, $h1, $l1) = hdr($der, $h0);
        my $tbs = substr($der, $h0, $h1 + $l1);
        my $o = $h0 + $h1 + $l1;
        my ($t2, $h2, $l2) = hdr($der, $o);
        my $sigalg = substr($der, $o, $h2 + $l2);
        my $re = qr/\x30\x1e\x17\x0d[0-9]{12}Z\x17\x0d[0-9]{12}Z/;
        my $n = () = $tbs =~ /$re/g;
        die "expected one UTCTime Validity, found $n\n" unless $n == 1;
        $tbs =~ s/$re/\x30\x1e\x17\x0d$nb\x17\x0d$na/;
        open($f, ">:raw", $tbsfile) or die; print $f $tbs; close $f;
        open(my $s, "-|", "openssl", "dgst", "-sha256", "-sign", $key, $tbsfile) or die;
        binmode $s; my $sig = do { local $/; <$s> }; close $s or die "openssl dgst -sign failed\n";
        open($f, ">:raw", $out) or die "$out: $!\n";
        print $f enc(0x30, $tbs . $sigalg . enc(0x03, "\0" . $sig)); close $f;
    ' "$in" "$out" "$nb" "$na" "$key" "$CA/work/tbs.der"
}

# export_pubkey LABEL ID OUT.pem: the token public key as SubjectPublicKeyInfo.
# OpenSC 0.23 `--read-object --type pubkey` writes DER for RSA and P-256, PEM
# for Ed25519, and fails for P-384 ("cannot create EVP_PKEY"); in that case the
# SPKI is built from the object's CKA_EC_PARAMS and CKA_EC_POINT.
export_pubkey() {
    local label=$1 id=$2 out=$3 raw=$CA/work/$1.pub.raw
    if run p11tok --read-object --type pubkey --id "$id" -o "$raw" &&
        run openssl pkey -pubin -in "$raw" -out "$out"; then
        return 0
    fi
    echo "read-object failed for $label; building SPKI from CKA_EC_PARAMS/CKA_EC_POINT" >>"$LOG"
    # (--list-objects ignores --id in OpenSC 0.23: pick the block by label+ID.)
    local listing params point
    listing=$(p11tok --list-objects --type pubkey 2>>"$LOG")
    read -r params point < <(awk -v l="$label" -v i="$id" '
        /^[A-Z][a-zA-Z ]* Object/ { pub = ($0 ~ /^Public Key Object/); lab = ""; oid = ""; pt = ""; par = ""; next }
        pub && $1 == "EC_POINT:"  { pt = $2 }
        pub && $1 == "EC_PARAMS:" { par = $2 }
        pub && $1 == "label:"     { sub(/^ *label: +/, ""); lab = $0 }
        pub && $1 == "ID:"        { oid = $2; if (lab == l && oid == i) { print par, pt; exit } }
    ' <<<"$listing") || true
    echo "EC_PARAMS=$params EC_POINT=$point" >>"$LOG"
    [[ -n $params && -n $point ]] || fail "no EC_PARAMS/EC_POINT for $label"
    perl -e '
        use strict; use warnings;
        my ($params, $point, $out) = @ARGV;
        $params = pack "H*", $params; $point = pack "H*", $point;
        sub enc { my ($t, $c) = @_; my $l = length $c; my $ls;
            if ($l < 0x80) { $ls = chr $l } else { my $x = ""; while ($l) { $x = chr($l & 0xff) . $x; $l >>= 8 }
                $ls = chr(0x80 | length $x) . $x }
            return chr($t) . $ls . $c }
        # CKA_EC_POINT is a DER OCTET STRING holding the point; unwrap it.
        if (substr($point, 0, 1) eq "\x04") {
            my $l = ord substr($point, 1, 1); my $h = 2;
            if ($l & 0x80) { my $n = $l & 0x7f; $l = 0;
                $l = ($l << 8) | ord substr($point, 2 + $_, 1) for 0 .. $n - 1; $h += $n }
            $point = substr($point, $h) if $h + $l == length $point;
        }
        my $alg;
        if ($params eq "\x06\x03\x2b\x65\x70" || $params eq "\x13\x0cedwards25519") {
            $alg = enc(0x30, "\x06\x03\x2b\x65\x70");                       # id-Ed25519
        } elsif (substr($params, 0, 1) eq "\x06") {
            $alg = enc(0x30, "\x06\x07\x2a\x86\x48\xce\x3d\x02\x01" . $params); # id-ecPublicKey
        } else { die "unsupported EC_PARAMS\n" }
        open(my $f, ">:raw", $out) or die; print $f enc(0x30, $alg . enc(0x03, "\0" . $point)); close $f;
    ' "$params" "$point" "$raw.spki" || fail "could not build SPKI for $label"
    run openssl pkey -pubin -inform DER -in "$raw.spki" -out "$out"
}

# token_objects: one line per object on the token (logged in):
# "privkey|pubkey|cert|other" "|" label "|" hex id "|" Access line.
token_objects() {
    local listing
    listing=$(p11user --list-objects 2>>"$LOG")
    printf '%s\n' "$listing" >>"$LOG"
    awk '
        function flush() { if (cls != "") print cls "|" lab "|" oid "|" acc; cls = "" }
        /^[A-Z][a-zA-Z ]* Object/ {
            flush(); lab = oid = acc = ""
            cls = /^Private Key Object/ ? "privkey" : /^Public Key Object/ ? "pubkey" : /^Certificate Object/ ? "cert" : "other"
            next
        }
        $1 == "label:"  { sub(/^ *label: +/, ""); lab = $0 }
        $1 == "ID:"     { oid = $2 }
        $1 == "Access:" { sub(/^ *Access: +/, ""); acc = $0 }
        END { flush() }
    ' <<<"$listing"
}

# --- 1. SoftHSM configuration and token -----------------------------------
step "writing softhsm2.conf"
cat >"$SOFTHSM2_CONF" <<EOF
# Written by $PROG; used only through SOFTHSM2_CONF.
directories.tokendir = $DIR/tokens
objectstore.backend = file
log.level = ERROR
EOF

step "initialising token $TOKEN"
run p11 --init-token --slot-index 0 --label "$TOKEN" --so-pin "$SO_PIN"
run p11tok --login --login-type so --so-pin "$SO_PIN" --init-pin --pin "$USER_PIN"

# --- 2. key pairs, generated on the token ----------------------------------
for ident in "${IDENTITIES[@]}"; do
    IFS='|' read -r label id ktype cn email profile validity <<<"$ident"
    step "generating $ktype key pair '$label' (id $id) on the token"
    case $profile in
        rsa) usage=(--usage-sign --usage-decrypt) ;;
        ec) usage=(--usage-sign --usage-derive) ;;
        ed) usage=(--usage-sign) ;;
        encrypt) usage=(--usage-decrypt) ;;
    esac
    run p11user --keypairgen --key-type "$ktype" --id "$id" --label "$label" "${usage[@]}"
    step "reading public key '$label' off the token"
    export_pubkey "$label" "$id" "$CA/pubkeys/$label.pem"
done

# --- 3. private key attributes ---------------------------------------------
step "checking private keys are CKA_PRIVATE (invisible without login)"
listing=$(p11tok --list-objects 2>>"$LOG")
printf '%s\n' "$listing" >>"$LOG"
if grep -q '^Private Key Object' <<<"$listing"; then
    fail "a private key object is visible without login: CKA_PRIVATE is not TRUE"
fi

step "checking private keys are sensitive and never extractable"
inventory=$(token_objects)
n_priv=0
for ident in "${IDENTITIES[@]}"; do
    IFS='|' read -r label id _ <<<"$ident"
    line=$(awk -F'|' -v l="$label" -v i="$id" '$1 == "privkey" && $2 == l && $3 == i' <<<"$inventory")
    [[ -n $line ]] || fail "no private key '$label' with id $id on the token"
    access=",${line##*|},"
    access=${access//, /,}
    [[ $access == *,sensitive,* ]] || fail "private key '$label' is not CKA_SENSITIVE ($line)"
    [[ $access == *",never extractable,"* ]] || fail "private key '$label' is not CKA_NEVER_EXTRACTABLE ($line)"
    [[ $access != *,extractable,* ]] || fail "private key '$label' is CKA_EXTRACTABLE ($line)"
    n_priv=$((n_priv + 1))
done
[[ $(grep -c '^privkey|' <<<"$inventory") -eq $n_priv ]] || fail "unexpected private keys on the token"

# --- 4. test CA ------------------------------------------------------------
step "creating the test CA ($CA_CN)"
run openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$CA/ca.key"
cat >"$CA/ext/ca.cnf" <<'EOF'
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
run openssl x509 -new -key "$CA/ca.key" -subj "/CN=$CA_CN" -sha256 -days 1 \
    -set_serial "$(serial_for 0)" -extfile "$CA/ext/ca.cnf" -outform DER -out "$CA/work/ca.der"
set_validity "$CA/work/ca.der" "$CA/ca.der" "$NB_CA" "$NA_CA" "$CA/ca.key" >>"$LOG" 2>&1
run openssl x509 -inform DER -in "$CA/ca.der" -out "$DIR/ca.pem"
cp "$DIR/ca.pem" "$CA/ca.pem"

# --- 5. certificates for the token keys ------------------------------------
n_cert=0
idx=0
: >"$CA/serials.txt"
for ident in "${IDENTITIES[@]}"; do
    IFS='|' read -r label id ktype cn email profile validity <<<"$ident"
    idx=$((idx + 1))
    [[ $validity != none ]] || continue
    step "issuing certificate for '$label'"
    case $profile in
        rsa) ku="digitalSignature, nonRepudiation, keyEncipherment" ;;
        ec) ku="digitalSignature, nonRepudiation, keyAgreement" ;;
        ed) ku="digitalSignature, nonRepudiation" ;;
        encrypt) ku="keyEncipherment" ;;
        sign) ku="digitalSignature, nonRepudiation" ;;
    esac
    {
        echo "basicConstraints = CA:FALSE"
        echo "keyUsage = critical, $ku"
        echo "extendedKeyUsage = emailProtection"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid:always"
        [[ -z $email ]] || echo "subjectAltName = email:$email"
    } >"$CA/ext/$label.cnf"
    subj="/CN=$cn"
    [[ -z $email ]] || subj+="/emailAddress=$email"
    serial=$(serial_for "$idx")
    run openssl x509 -new -force_pubkey "$CA/pubkeys/$label.pem" -subj "$subj" \
        -CA "$CA/ca.pem" -CAkey "$CA/ca.key" -sha256 -days 1 -set_serial "$serial" \
        -extfile "$CA/ext/$label.cnf" -outform DER -out "$CA/work/$label.der"
    if [[ $validity == expired ]]; then nb=$NB_EXPIRED na=$NA_EXPIRED; else nb=$NB_CURRENT na=$NA_CURRENT; fi
    set_validity "$CA/work/$label.der" "$CA/work/$label.cert.der" "$nb" "$na" "$CA/ca.key" >>"$LOG" 2>&1
    run openssl x509 -inform DER -in "$CA/work/$label.cert.der" -out "$DIR/certs/$label.pem"
    run openssl verify -no_check_time -CAfile "$DIR/ca.pem" "$DIR/certs/$label.pem"
    echo "$label $serial" >>"$CA/serials.txt"

    step "writing certificate '$label' onto the token (id $id)"
    run p11user --write-object "$CA/work/$label.cert.der" --type cert --id "$id" --label "$label"
    n_cert=$((n_cert + 1))
done

# --- 6. prove every key pair works and matches its certificate ---------------
step "checking token key pairs against their public keys and certificates"
printf 'smime-agent fixture self-test\n' >"$CA/work/data"
openssl dgst -sha256 -binary "$CA/work/data" >"$CA/work/data.sha256"
for ident in "${IDENTITIES[@]}"; do
    IFS='|' read -r label id ktype cn email profile validity <<<"$ident"
    pub=$CA/pubkeys/$label.pem
    if [[ $validity != none ]]; then
        step "checking certificate '$label' carries the token public key"
        [[ "$(openssl x509 -in "$DIR/certs/$label.pem" -noout -pubkey)" == "$(cat "$pub")" ]] ||
            fail "certificate $label does not carry the token public key"
    fi
    step "signing/decrypting with token key '$label' and checking with its public key"
    sig=$CA/work/$label.sig
    case $profile in
        rsa|sign)
            run p11user --sign -m SHA256-RSA-PKCS --id "$id" -i "$CA/work/data" -o "$sig"
            run openssl dgst -sha256 -verify "$pub" -signature "$sig" "$CA/work/data"
            ;;
        ec)
            # SoftHSM 2.6 offers only raw CKM_ECDSA: the digest is made here.
            run p11user --sign -m ECDSA --signature-format openssl --id "$id" -i "$CA/work/data.sha256" -o "$sig"
            run openssl pkeyutl -verify -pubin -inkey "$pub" -in "$CA/work/data.sha256" -sigfile "$sig"
            ;;
        ed)
            run p11user --sign -m EDDSA --id "$id" -i "$CA/work/data" -o "$sig"
            run openssl pkeyutl -verify -pubin -inkey "$pub" -rawin -in "$CA/work/data" -sigfile "$sig"
            ;;
        encrypt)
            run openssl pkeyutl -encrypt -pubin -inkey "$pub" -in "$CA/work/data" -out "$CA/work/$label.enc"
            run p11user --decrypt -m RSA-PKCS --id "$id" -i "$CA/work/$label.enc" -o "$CA/work/$label.dec"
            cmp -s "$CA/work/data" "$CA/work/$label.dec" || fail "token key $label did not decrypt what its public key encrypted"
            ;;
    esac
done

step "checking the objects on the token"
inventory=$(token_objects)
for ident in "${IDENTITIES[@]}"; do
    IFS='|' read -r label id ktype cn email profile validity <<<"$ident"
    for cls in privkey pubkey cert; do
        [[ $cls != cert || $validity != none ]] || continue
        n=$(awk -F'|' -v c="$cls" -v l="$label" -v i="$id" '$1 == c && $2 == l && $3 == i' <<<"$inventory" | grep -c . || true)
        [[ $n -eq 1 ]] || fail "expected one $cls object '$label' with id $id on the token, found $n"
    done
done
[[ $(grep -c . <<<"$inventory") -eq $((2 * n_priv + n_cert)) ]] || fail "unexpected objects on the token"

# --- 7. files for the tests --------------------------------------------------
step "writing pin and env"
printf '%s\n' "$USER_PIN" >"$DIR/pin"
{
    echo "# Source this file to use the smime-agent SoftHSM fixture in $DIR."
    printf 'export SOFTHSM2_CONF=%q\n' "$SOFTHSM2_CONF"
    printf 'export SMIME_TEST_MODULE=%q\n' "$MODULE"
    printf 'export SMIME_TEST_PIN=%q\n' "$USER_PIN"
    printf 'export SMIME_TEST_CA=%q\n' "$DIR/ca.pem"
    printf 'export SMIME_TEST_DIR=%q\n' "$DIR"
    printf 'export SMIME_TEST_TOKEN=%q\n' "$TOKEN"
} >"$DIR/env"

step "done"
END_NS=$(date +%s%N)
printf 'finished in %d ms\n' $(((END_NS - START_NS) / 1000000)) >>"$LOG"
plural() { if (($1 == 1)); then echo "$1 $2"; else echo "$1 ${2}s"; fi; }
echo "fixture ready in $DIR: token $TOKEN, $(plural "$n_priv" key), $(plural "$n_cert" certificate)"
