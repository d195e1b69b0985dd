#!/usr/bin/env bash
# Quickstart act: the VPC (claim 4). `bulkhead up` starts two hosts joined by a data network;
# a customer creates a VPC, a subnet and a security group with the `aws ec2`-spelled CLI and
# runs two instances that land on different hosts. Each guest gets its address by DHCP from its
# own net card; one sends a marker over TCP to the other, across the hosts. tcpdump on the hosts'
# links shows what an operator on the network sees: AES-256-GCM datagrams, no marker. Needs the
# test guest (`make guest`) and root (network namespaces). Run from the repository root after
# `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

if [ ! -f "${CARGO_TARGET_DIR:-target}/guest/vmlinux" ] || [ "$(id -u)" != 0 ]; then
  echo "*** SKIPPED the VPC act: it needs the test guest (make guest) and root (network namespaces)"
  exit 0
fi
DIR=$(mktemp -d)
"$BIN/bulkhead" up --hosts 2 --host-cores 2 --backend host --dir "$DIR" >"$DIR/up.out" 2>"$DIR/up.err" &
UP=$!
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  kill "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; rm -rf "$DIR"
}
trap cleanup EXIT
for _ in $(seq 600); do [ -s "$DIR/cluster.json" ] && break; sleep 0.1; done
[ -s "$DIR/cluster.json" ] || { echo "cluster did not start:"; tail -20 "$DIR/up.err"; exit 1; }
FABRIC=$(j 'd["fabric"]["ns"]' <"$DIR/cluster.json")

say "Act: the VPC — two hosts joined by a data network ($FABRIC); every guest frame between them sealed by the net cards"
"$BIN/bulkhead-control" create-customer --config "$DIR/control.toml" --tenant acme --out "$DIR/acme.json" >/dev/null
ec2() { BULKHEAD_CLUSTER="$DIR" BULKHEAD_CREDENTIALS="$DIR/acme.json" "$BIN/bulkhead" ec2 "$@"; }
run() { echo "\$ bulkhead ec2 $*" | cut -c1-150 >&2; ec2 "$@"; }

VPC=$(run create-vpc --cidr-block 10.0.0.0/16 | tee /dev/stderr | j 'd["Vpc"]["VpcId"]')
SUBNET=$(run create-subnet --vpc-id "$VPC" --cidr-block 10.0.1.0/24 | tee /dev/stderr | j 'd["Subnet"]["SubnetId"]')
SG=$(run create-security-group --group-name app --vpc-id "$VPC" | tee /dev/stderr | j 'd["GroupId"]')
run authorize-security-group-ingress --group-id "$SG" --protocol tcp --port 7000 --cidr 10.0.0.0/16 >/dev/null
run authorize-security-group-ingress --group-id "$SG" --protocol icmp --cidr 10.0.0.0/16 >/dev/null

i=0
for link in $(j '" ".join(d["fabric"]["links"])' <"$DIR/cluster.json"); do
  ip netns exec "$FABRIC" tcpdump -i "$link" -s 0 -U -w "$DIR/link-$i.pcap" udp 2>/dev/null &
  PIDS+=($!); i=$((i+1))
done

say "Two instances in the subnet; the scheduler spreads them over the hosts"
OUT=$(run run-instances --image-id test-guest --vcpu-count 1 --subnet-id "$SUBNET" --security-group-ids "$SG" \
  --user-data 'while :; do nc -l -p 7000; done')
I1=$(echo "$OUT" | j 'd["Instances"][0]["InstanceId"]'); IP1=$(echo "$OUT" | j 'd["Instances"][0]["PrivateIpAddress"]')
OUT=$(run run-instances --image-id test-guest --vcpu-count 1 --subnet-id "$SUBNET" --security-group-ids "$SG" \
  --user-data "ping -c 2 -W 3 $IP1; until echo HELLO-FROM-THE-OTHER-HOST | nc -w 10 $IP1 7000; do sleep 1; done; echo sent")
I2=$(echo "$OUT" | j 'd["Instances"][0]["InstanceId"]'); IP2=$(echo "$OUT" | j 'd["Instances"][0]["PrivateIpAddress"]')
ec2 describe-instances | j '"\n".join("  %s  %s  %s" % (i["InstanceId"], i["PrivateIpAddress"], i.get("VpcId")) for i in d["Instances"])'
console() { ec2 get-console-output --instance-id "$1" --output text; }
wait_console() { # INSTANCE NEEDLE
  for _ in $(seq 900); do [[ "$(console "$1")" == *"$2"* ]] && return 0; sleep 1; done
  echo "timed out waiting for '$2' on $1"; console "$1" | tail -20; exit 1
}
echo "(real guests are booting under bulkhead-hypervisor; this machine's KVM is slow: a minute or two)"
wait_console "$I2" sent
wait_console "$I1" HELLO-FROM-THE-OTHER-HOST
echo "-- $I2 ($IP2), console:"; console "$I2" | grep -E 'NET-UP|bytes from|sent' | sed 's/^/  /'
echo "-- $I1 ($IP1), console:"; console "$I1" | grep -E 'NET-UP|HELLO' | sed 's/^/  /'

say "What the host network saw (tcpdump on both hosts' links)"
for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait "${PIDS[@]}" 2>/dev/null || true; PIDS=()
python3 - "$DIR"/link-*.pcap <<'PY'
import struct, sys
for path in sys.argv[1:]:
    raw = open(path, "rb").read()
    n, off, seen = 0, 24, set()
    while off + 16 <= len(raw):
        incl = struct.unpack("<I", raw[off+8:off+12])[0]; pkt = raw[off+16:off+16+incl]; off += 16 + incl
        if len(pkt) > 14 + 20 + 8 + 40 and pkt[23] == 17:
            d = pkt[14 + (pkt[14] & 15) * 4 + 8:]
            if d[0] == 1 and d[1] == 1:
                n += 1; seen.add(struct.unpack(">IIIQ", d[4:24])[:3])
    print(f"  {path.split('/')[-1]}: {n} sealed datagrams (VPC, epoch, sender card) = {sorted(seen)};"
          f" plaintext marker present: {b'HELLO-FROM-THE-OTHER-HOST' in raw}")
    assert b"HELLO-FROM-THE-OTHER-HOST" not in raw
PY
echo "(crates/control/tests/vpc_guests.rs opens every such datagram with an independent Python AES-GCM decryptor,"
echo " scripts/vpc-decrypt.py, given the VPC key the KMS sealed to the host — and attacks the rest of claim 4)"
