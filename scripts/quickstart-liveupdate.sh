#!/usr/bin/env bash
# Quickstart act: instances outlive host software. `bulkhead up --hosts 1` runs a host; a
# customer's guest prints a counter with its boot id and uptime every second. While it counts:
# a 2-of-3 signed release carrying a new `bulkhead-hypervisor` is deployed with
# `bulkhead deploy --cluster` (the host live-updates the guest's hypervisor: a new process, the
# same guest memory, a pause of about a millisecond), then the host's controller is killed -9
# (`bulkhead up`'s supervisor starts it again; the new controller adopts the running hypervisor
# and card). The console shows the guest counting on with the same boot id throughout; the
# host's audit chain records every step and verifies. Needs a real guest (target/guest) and an
# attested host (swtpm) for the deploy; says loudly what it skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

say "Act: instances outlive host software — a live update of the hypervisor and a controller kill -9 under a counting guest"
if [ ! -e "${CARGO_TARGET_DIR:-target}/guest/vmlinux" ]; then
  echo "SKIPPED: no guest kernel (run 'make guest'): this act needs a real guest"
  exit 0
fi
DIR=$(mktemp -d)
"$BIN/bulkhead" up --hosts 1 --backend host --dir "$DIR" >"$DIR/up.out" 2>"$DIR/up.err" &
UP=$!
trap 'kill "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 300); do [ -s "$DIR/cluster.json" ] && break; sleep 0.1; done
[ -s "$DIR/cluster.json" ] || { echo "cluster did not start:"; tail -20 "$DIR/up.err"; exit 1; }
ATTESTED=$(j 'd["attested"]' <"$DIR/cluster.json")
"$BIN/bulkhead-control" create-customer --config "$DIR/control.toml" --tenant acme --out "$DIR/acme.json" >/dev/null
ec2() { BULKHEAD_CLUSTER="$DIR" BULKHEAD_CREDENTIALS="$DIR/acme.json" "$BIN/bulkhead" ec2 "$@"; }

# Builtins only, apart from `cat` once and `sleep`: every exec costs seconds on this KVM.
COUNTER='B=$(cat /proc/sys/kernel/random/boot_id); i=0
while :; do i=$((i+1)); read -r U X </proc/uptime; echo "TICK=$i boot=$B uptime=$U"; sleep 1; done'
echo '$ bulkhead ec2 run-instances --image-id test-guest --vcpu-count 1 --user-data "<print a counter every second>"'
I=$(ec2 run-instances --image-id test-guest --vcpu-count 1 --user-data "$COUNTER" | j 'd["Instances"][0]["InstanceId"]')
echo "instance $I"
console() { ec2 get-console-output --instance-id "$I" --output text; }
last_tick() { { console || true; } | grep '^TICK=' | tail -1 || true; }
wait_ticks() { # N: wait until the counter passed N
  for _ in $(seq 600); do
    local t; t=$(last_tick); t=${t#TICK=}; t=${t%% *}
    [ -n "$t" ] && [ "$t" -ge "$1" ] && return 0; sleep 1
  done
  echo "the guest stopped counting (waiting for $1):"; console | tail -10; exit 1
}
# The host's keeper (the controller's launcher, which outlives it) and its hypervisor children.
keeper() { pgrep -f "bulkhead-controller-launcher.*$DIR" | head -1; }
hypervisors() { for p in $(pgrep -P "$(keeper)"); do
  case "$(readlink /proc/"$p"/exe)" in *bulkhead-hypervisor*) printf '%s ' "$p" ;; esac; done; }
controller() { pgrep -f "bulkhead-controller --config $DIR" | head -1; }
echo "(the guest is booting under bulkhead-hypervisor; software KVM: about a minute)"
wait_ticks 3
echo "guest: $(last_tick)"
echo "its hypervisor process: $(hypervisors)"

say "Deploy: a 2-of-3 signed release carrying bulkhead-hypervisor — the host live-updates the running guest's hypervisor"
if [ "$ATTESTED" != True ]; then
  echo "SKIPPED: the host is not attested (swtpm or root missing): bulkhead deploy checks each host's quote after the update"
else
  REL=$DIR/release-v2; mkdir -p "$REL"
  objcopy --strip-debug "$BIN/bulkhead-hypervisor" "$REL/bulkhead-hypervisor"
  "$BIN/bulkhead" release create --version 2 --env dev --dir "$REL" --binary bulkhead-hypervisor --out "$DIR/v2.json" >/dev/null
  for k in 0 2; do "$BIN/bulkhead" release sign --release "$DIR/v2.json" --key "$DIR/release/keys/release-$k.secret"; done
  BEFORE=$(last_tick); N=${BEFORE#TICK=}; N=${N%% *}
  echo '$ bulkhead deploy --cluster DIR --release v2.json --artefacts release-v2/'
  OUT=$("$BIN/bulkhead" deploy --cluster "$DIR" --release "$DIR/v2.json" --artefacts "$REL")
  echo "release $(echo "$OUT" | j 'd["version"]') applied, waves: $(echo "$OUT" | j 'd["waves"]')"
  wait_ticks $((N + 3))
  echo "its hypervisor process now: $(hypervisors)(the release's binary: $(readlink /proc/"$(hypervisors | cut -d' ' -f1)"/exe))"
  grep -ah '"DeployRelease:live-update"' "$DIR"/host-1/audit.log | tail -1 \
    | python3 -c 'import json,sys; e=json.loads(sys.stdin.read())["entry"]; print("audit:", e["op"], e["code"], e["resources"])'
fi

say "The host's controller is killed -9: bulkhead up's supervisor starts it again, and it adopts the running guest"
CPID=$(controller)
BEFORE=$(last_tick); N=${BEFORE#TICK=}; N=${N%% *}
echo "\$ kill -9 $CPID   (the controller of host-1)"
kill -9 "$CPID"
for _ in $(seq 100); do
  NEW=$(controller || true)
  [ -n "$NEW" ] && [ "$NEW" != "$CPID" ] && grep -aq '"AdoptInstance"' "$DIR"/host-1/audit.log && break; sleep 0.2
done
echo "new controller process: ${NEW:-none}; its audit: $(grep -ac '"AdoptInstance"' "$DIR"/host-1/audit.log) AdoptInstance record(s)"
wait_ticks $((N + 3))
echo "its hypervisor process, unchanged: $(hypervisors)"

say "The guest never noticed: one boot id, the counter with no gap or repeat, uptime never back"
console | grep '^TICK=' | python3 -c '
import sys
rows = [dict(kv.split("=", 1) for kv in l.split()) for l in sys.stdin if l.startswith("TICK=")]
n = [int(r["TICK"]) for r in rows]; boots = {r["boot"] for r in rows}; up = [float(r["uptime"]) for r in rows]
gaps = [(a, b) for a, b in zip(n, n[1:]) if b != a + 1]
print(f"{len(n)} ticks, {n[0]}..{n[-1]}, boot ids seen: {len(boots)}, gaps or repeats: {gaps or None}, uptime {up[0]:.1f} s → {up[-1]:.1f} s")
assert len(boots) == 1 and not gaps and all(b >= a for a, b in zip(up, up[1:])), "the guest rebooted or lost a tick"
'
echo '$ bulkhead audit verify host-1/audit.log --cert ca/host-1.pem   (every checkpoint signed by the host'"'"'s key)'
"$BIN/bulkhead" audit verify "$DIR/host-1/audit.log" --cert "$DIR/ca/host-1.pem"
