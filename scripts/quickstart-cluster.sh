#!/usr/bin/env bash
# Quickstart act: the whole system. `bulkhead up` starts the KMS, two hosts (controllers) and the
# control plane as separate processes; a customer runs an instance, creates an encrypted volume and
# attaches it to the running instance (customer → control plane → KMS → controller → block card →
# hypervisor hot-plug → the guest sees a new disk and writes to it; the backing file holds only
# ciphertext); an operator is refused every customer-data operation; the audit trail of the flow
# is shown and verified. Real binaries, real mutual TLS 1.3, real guests when target/guest exists
# (`make guest`; BULKHEAD_BACKEND=detached skips them). Run from the repository root after
# `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

DIR=$(mktemp -d)
"$BIN/bulkhead" up --hosts 2 --record --backend "${BULKHEAD_BACKEND:-auto}" --dir "$DIR" >"$DIR/up.out" 2>"$DIR/up.err" &
UP=$!
trap 'kill "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 300); do [ -s "$DIR/cluster.json" ] && break; sleep 0.1; done
[ -s "$DIR/cluster.json" ] || { echo "cluster did not start:"; cat "$DIR/up.err" "$DIR"/logs/*.log 2>/dev/null | tail -20; exit 1; }
CTL=$(j 'd["control"]' <"$DIR/cluster.json")
KMS=$(j 'd["kms"]' <"$DIR/cluster.json")
TOKENS=$(j 'd["tokens"]' <"$DIR/cluster.json")
H1=$(j 'd["hosts"][0]["addr"]' <"$DIR/cluster.json")

say "Act: the cluster — bulkhead up --hosts 2 (KMS, token service, 2 hosts, control plane; every link mTLS 1.3)"
sed -n '1,9p' "$DIR/up.out"
for log in "$DIR"/logs/attest-host-*.log; do
  [ -e "$log" ] && echo "measured start: $(grep -E '^host-[0-9]+: ' "$log" | tail -1)"
done
echo "(inter-service traffic is recorded through relays into DIR/capture/ for the plaintext check)"

say "A customer signs up (access key + secret; the KMS gets its own wrapped copy to verify forwarded requests)"
"$BIN/bulkhead-control" create-customer --config "$DIR/control.toml" --tenant acme --out "$DIR/acme.json"
"$BIN/bulkhead-control" create-customer --config "$DIR/control.toml" --tenant globex --out "$DIR/globex.json" >/dev/null
acme() { "$BIN/bulkhead-control" call --endpoint "$CTL" --ca "$DIR/ca/ca.pem" --credentials "$DIR/acme.json" "$@"; }
# The customer's CLI, spelled like `aws ec2`: signs each request with acme's access key + secret.
ec2() { BULKHEAD_CLUSTER="$DIR" BULKHEAD_CREDENTIALS="$DIR/acme.json" "$BIN/bulkhead" ec2 "$@"; }
globex() { "$BIN/bulkhead-control" call --endpoint "$CTL" --ca "$DIR/ca/ca.pem" --credentials "$DIR/globex.json" "$@"; }

# The guest's user data: wait for the attached disk, write a secret to it through the card, read
# it back. The secret is assembled in the guest so it appears nowhere outside it in plaintext.
GUEST_SCRIPT='while [ ! -e /sys/block/vda ]; do :; done
read -r n </sys/block/vda/size; echo guest: new disk vda, $n sectors
s=ACME-SECRET-; s=${s}PAYROLL-2026-Q4-0001
printf %s $s | dd of=/dev/vda bs=32 seek=128 conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
R=$(dd if=/dev/vda bs=32 skip=128 count=1 2>/dev/null)
[ "$R" = "$s" ] && echo guest: wrote the secret to vda and read it back'

say "acme: RunInstances (scheduler places it on a host by whole cores; the control plane calls that host's controller with a token for just that host+operation)"
echo '$ bulkhead ec2 run-instances --image-id test-guest --vcpu-count 1 --user-data "<wait for a disk, write a secret>"'
OUT=$(ec2 run-instances --image-id test-guest --vcpu-count 1 --user-data "$GUEST_SCRIPT"); echo "$OUT"
I=$(echo "$OUT" | j 'd["Instances"][0]["InstanceId"]')
BACKEND=$("$BIN/bulkhead-control" hosts --config "$DIR/control.toml" | j 'd[0]["status"]["backend"] if d[0]["status"] else "unknown"')
console() { ec2 get-console-output --instance-id "$I" --output text; }
wait_console() { # NEEDLE: poll the customer's console API (software KVM boots take a minute)
  for _ in $(seq 600); do [[ "$(console)" == *"$1"* ]] && return 0; sleep 1; done
  echo "timed out waiting for '$1' on the console"; console | tail -20; exit 1
}
if [ "$BACKEND" = host ]; then
  echo "(a real guest is booting under bulkhead-hypervisor on its host; waiting for it)"
  wait_console BULKHEAD-GUEST-READY
  echo "guest console: BULKHEAD-GUEST-READY"
fi

say "acme: CreateVolume — encrypted by default; the KMS returns only the data key's ciphertext"
echo '$ bulkhead ec2 create-volume --size 1'
OUT=$(ec2 create-volume --size 1); echo "$OUT"
V=$(echo "$OUT" | j 'd["VolumeId"]'); K=$(echo "$OUT" | j 'd["KmsKeyId"]')
python3 - "$DIR/control/control.db" "$V" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1]); (blob,) = db.execute("SELECT ciphertext_blob FROM volumes WHERE volume_id=?", (sys.argv[2],)).fetchone()
print(f"control.db stores for {sys.argv[2]}: {len(blob)}-byte KMS ciphertext blob, magic {bytes(blob[:4])!r} — no key")
PY

say "acme: AttachVolume — control plane → KMS nonce → the host's TPM quotes its measurements (via its controller) → KMS (checks the quote, acme's forwarded signed request and grant; re-wraps to the attested host key with HPKE) → controller (sealed blob only)"
echo "\$ bulkhead ec2 attach-volume --volume-id $V --instance-id $I"
ec2 attach-volume --volume-id "$V" --instance-id "$I"
echo "host backend reported by the controllers (pulled by the control plane): $BACKEND"
if [ "$BACKEND" = host ]; then
  echo "(the controller handed the sealed blob, unopened, to a new block card; the card unsealed the key in"
  echo " its own memory; the hypervisor hot-plugged a virtio-pci disk into the running guest)"
  wait_console "guest: wrote the secret"
  echo "guest console:"; console | grep '^guest:' | sed 's/^/  /'
  python3 - "$DIR" <<'PY'
import glob, sys
secret = b"ACME-SECRET-" + b"PAYROLL-2026-Q4-0001"
for img in sorted(glob.glob(sys.argv[1] + "/host-*/volumes/*.img") + glob.glob(sys.argv[1] + "/storage-*/data/*.raw")):
    data = open(img, "rb").read()
    used = sum(1 for i in range(0, len(data), 512) if any(data[i:i+512]))
    print(f"volume file {img.split('/')[-3]}/{img.split('/')[-1]}: {len(data)} bytes, {used} sectors written,"
          f" plaintext secret present: {secret in data}")
    assert secret not in data, "plaintext on disk"
PY
else
  echo "(detached backend: no guest kernel found — run 'make guest'; the controller verified the token, audited,"
  echo " and holds the sealed blob, but no block card or guest runs in this act)"
fi

say "Tenant isolation: globex can neither see nor touch acme's instance or volume"
globex DescribeInstances '{}'
globex DetachVolume "{\"VolumeId\":\"$V\"}" || true
globex GetConsoleOutput "{\"InstanceId\":\"$I\"}" || true

say "The same cluster through the unmodified aws CLI (EC2 Query API, AWS Signature Version 4)"
if command -v aws >/dev/null 2>&1; then
  awsas() { # TENANT ARGS...: the aws CLI with that tenant's access key and secret
    local creds="$DIR/$1.json"; shift
    AWS_CA_BUNDLE="$DIR/ca/ca.pem" AWS_DEFAULT_REGION=us-east-1 AWS_CONFIG_FILE=/dev/null \
      AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_ACCESS_KEY_ID=$(j 'd["access_key_id"]' <"$creds") \
      AWS_SECRET_ACCESS_KEY=$(j 'd["secret"]' <"$creds") aws ec2 --endpoint-url "https://$CTL" "$@"
  }
  echo '$ aws ec2 describe-instances --endpoint-url https://CONTROL-PLANE --query "Reservations[].Instances[].[InstanceId,State.Name,PrivateIpAddress]"'
  awsas acme describe-instances --query 'Reservations[].Instances[].[InstanceId,State.Name,PrivateIpAddress]' --output text
  echo "\$ aws ec2 describe-volumes --filters Name=attachment.instance-id,Values=$I"
  awsas acme describe-volumes --filters "Name=attachment.instance-id,Values=$I" \
    --query 'Volumes[].[VolumeId,State,Encrypted,Attachments[0].InstanceId]' --output text
  echo "\$ aws ec2 describe-instances --instance-ids $I   (with globex's keys)"
  awsas globex describe-instances --instance-ids "$I" 2>&1 | grep -v '^\s*$' | sed 's/^/  /' || true
else
  echo "(the aws CLI is not installed here: 'make deps' installs it)"
fi

say "The operator: refused every customer-data operation (token service, controller, KMS, customer API)"
# The operator asks the token service (its own process, the only holder of the signing key) with
# the operator's client certificate; the caller is whoever that certificate names.
mint() { curl -sS --cacert "$DIR/ca/ca.pem" --cert "$DIR/ca/operator.pem" --key "$DIR/ca/operator.key" \
  -H 'content-type: application/json' -d "$1" "https://$TOKENS/v1/Mint"; }
echo '$ curl --cert operator.pem https://TOKEN-SERVICE/v1/Mint {"operations":["GetConsole"],…}   (customer plane)'
mint '{"hosts":["host-1"],"operations":["GetConsole"],"ttl_secs":300}' | j 'd["error"]["code"]'
T=$(mint '{"hosts":["host-1"],"operations":["DescribeHost"],"ttl_secs":300}' | j 'd["token"]')
op() { curl -sS --cacert "$DIR/ca/ca.pem" --cert "$DIR/ca/operator.pem" --key "$DIR/ca/operator.key" -H "Authorization: Bearer $T" "$@"; echo; }
for call in "GET /v1/instances/$I/console" "GET /v1/instances/$I" "POST /v1/instances/$I/stop" \
            "DELETE /v1/instances/$I/volumes/$V" "POST /v1/instances/$I/terminate"; do
  set -- $call; printf '%-7s %-48s → ' "$1" "$2"; op -X "$1" "https://$H1$2" | j 'd["error"]["code"]'
done
printf '%-56s → ' "KMS DecryptForHost with the operator's certificate"
op -X POST -H 'content-type: application/json' -d '{}' "https://$KMS/v1/DecryptForHost" | j 'd["error"]["code"]'
printf '%-56s → ' "customer API DescribeVolumes without a customer signature"
curl -sS --cacert "$DIR/ca/ca.pem" -X POST -d '{}' "https://$CTL/v1/DescribeVolumes" | j 'd["error"]["code"]'

if [ "$BACKEND" = host ] && grep -q '^\[\[storage_nodes\]\]' "$DIR/control.toml"; then
  say "The volume follows acme: detached on one host, attached to an instance on the other, the data is there"
  echo "(a network volume: the storage node holds only the card's ciphertext and serves it over NBD+TLS to the one"
  echo " host the control plane granted it to; a grant to another host cuts the old host's connection)"
  echo "\$ bulkhead ec2 detach-volume --volume-id $V"
  ec2 detach-volume --volume-id "$V"
  READ_SCRIPT='while [ ! -e /sys/block/vda ]; do sleep 1; done
echo 3 >/proc/sys/vm/drop_caches
R=$(dd if=/dev/vda bs=32 skip=128 count=1 2>/dev/null)
echo "guest: read on the moved volume: $R"'
  OUT=$(ec2 run-instances --image-id test-guest --vcpu-count 1 --user-data "$READ_SCRIPT")
  I2=$(echo "$OUT" | j 'd["Instances"][0]["InstanceId"]')
  echo "\$ bulkhead ec2 run-instances … → $I2"
  console2() { ec2 get-console-output --instance-id "$I2" --output text; }
  for _ in $(seq 600); do [[ "$(console2)" == *BULKHEAD-GUEST-READY* ]] && break; sleep 1; done
  echo "\$ bulkhead ec2 attach-volume --volume-id $V --instance-id $I2"
  ec2 attach-volume --volume-id "$V" --instance-id "$I2"
  for _ in $(seq 300); do [[ "$(console2)" == *"guest: read on the moved volume"* ]] && break; sleep 1; done
  python3 - "$DIR/control/control.db" "$I" "$I2" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
for i in sys.argv[2:]:
    (h,) = db.execute("SELECT host_id FROM instances WHERE instance_id=?", (i,)).fetchone()
    print(f"{i} runs on {h}")
PY
  echo "guest console of $I2:"; console2 | grep '^guest:' | sed 's/^/  /'
  grep -h '"fence\|Grant\|refused' "$DIR"/storage-1/audit.log 2>/dev/null | tail -3 | cut -c1-200 | sed 's/^/  storage audit: /' || true
  I=$I2
fi

say "acme revokes the KMS grant: the next attach fails (the KMS refuses to decrypt)"
acme DetachVolume "{\"VolumeId\":\"$V\"}" >/dev/null
acme RevokeGrant "{\"KeyId\":\"$K\",\"VolumeId\":\"$V\"}"
acme AttachVolume "{\"VolumeId\":\"$V\",\"InstanceId\":\"$I\"}" || true

say "Audit trail of the flow (every hop; hash-chained; pulled from hosts by the control plane)"
sleep 1.2
show() { # FILTER-REGEX FILES...: request records of the audit logs, one line each
  python3 - "$@" <<'PY'
import json, re, sys
pat = re.compile(sys.argv[1])
last, n = None, 0
def flush():
    if last:
        print(last + ("   (×%d in a row)" % n if n > 1 else ""))
for path in sys.argv[2:]:
    for line in open(path):
        e = json.loads(line)["entry"]
        if e["kind"] == "request" and pat.search(e["op"]):
            res = " ".join(e["resources"][:4])
            row = "  %-14s %-17s %-5s %-26s %s" % (e["caller"], e["op"], e["decision"], e["code"], res)
            if row == last:
                n += 1
            else:
                flush(); last, n = row, 1
flush()
PY
}
echo "-- KMS (kms/audit.log):"
show 'GenerateDataKey|Challenge|DecryptForHost|RevokeGrant' "$DIR/kms/audit.log"
echo "-- token service (tokens/audit.log; every mint is audited — here the flow's and the operator's):"
show 'Mint:(CreateInstance|StartInstance|AttestHost|AttachVolume|DetachVolume)' "$DIR/tokens/audit.log"
show 'Mint' "$DIR/tokens/audit.log" | grep '^  operator' || true
echo "-- controllers (host-*/audit.log; customer-data operations):"
show 'AttestHost|AttachVolume|DetachVolume|GetConsole|StopInstance|TerminateInstance|CreateInstance' "$DIR"/host-*/audit.log
echo "-- the operators' API on the control plane (mTLS, operator certificate; state and audit records it pulled from each host):"
OPAPI=$(j 'd["operator"]' <"$DIR/cluster.json")
opget() { curl -sS --cacert "$DIR/ca/ca.pem" --cert "$DIR/ca/operator.pem" --key "$DIR/ca/operator.key" "https://$OPAPI$1"; }
echo '$ curl --cert operator.pem https://CONTROL-PLANE-OPERATOR-API/v1/operator/hosts'
opget /v1/operator/hosts | python3 -c '
import json, sys
for h in json.load(sys.stdin):
    print("  %s: backend=%s instances=%s audit records pulled=%s" % (h["host_id"], (h["status"] or {}).get("backend"), (h["status"] or {}).get("instances"), h["audit_records_pulled"]))'
echo '$ curl --cert operator.pem https://CONTROL-PLANE-OPERATOR-API/v1/operator/hosts/host-1/audit?after=0&limit=3'
opget '/v1/operator/hosts/host-1/audit?after=0&limit=3' | python3 -c '
import json, sys
d = json.load(sys.stdin)
for r in d["records"]:
    e = r["entry"]; print("  seq %s: %s %s %s %s" % (r["seq"], e["caller"], e["op"], e["decision"], e["code"]))
print("  next_after:", d["next_after"])'
for log in kms/audit.log tokens/audit.log host-1/audit.log host-2/audit.log control/audit.log; do
  printf '  verify %-18s ' "$log"; "$BIN/bulkhead" audit verify "$DIR/$log"
done
CERT1="$DIR/ca/host-1.pem"; [ -f "$CERT1" ] || CERT1="$DIR/host-1/host-1.pem"
printf '  verify %-18s ' "host-1 --cert"; "$BIN/bulkhead" audit verify --cert "$CERT1" "$DIR/host-1/audit.log"

say "An operator with file access deletes 40 records from host-1's audit log: verify and the control plane catch it"
python3 - "$DIR/host-1/audit.log" <<'PY'
import sys
p = sys.argv[1]
lines = open(p).read().splitlines(True)
open(p, "w").writelines(lines[:10] + lines[50:])
PY
printf '  verify %-18s ' "host-1 --cert"; "$BIN/bulkhead" audit verify --cert "$CERT1" "$DIR/host-1/audit.log" 2>&1 || true
for _ in $(seq 40); do opget /v1/operator/alerts | grep -q host_audit && break; sleep 0.5; done
echo '$ curl --cert operator.pem https://CONTROL-PLANE-OPERATOR-API/v1/operator/alerts'
opget /v1/operator/alerts | python3 -c '
import json, sys
for a in json.load(sys.stdin)["alerts"]:
    print("  ALERT %-26s %-7s %s" % (a["rule"], a["host"], a["evidence"][:90]))'
opget /v1/operator/metrics | grep -E 'host_audit_(chain_broken|truncated)|flagged\{host="host-1"' | sed 's/^/  /'
echo "captured inter-service traffic: $(cat "$DIR"/capture/*.bin | wc -c) bytes on $(ls "$DIR"/capture | wc -l) links (TLS 1.3); the test"
echo "attach_flow_across_processes_leaves_no_plaintext_key_on_any_wire_database_or_log greps them, every db and log for the key"
