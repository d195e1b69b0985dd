#!/usr/bin/env bash
# Runs COMMAND with a throw-away single-node Ceph cluster (real daemons, plain processes, no
# systemd): one ceph-mon, one ceph-mgr and one ceph-osd on a sparse-file BlueStore, all in a
# fresh temp dir on 127.0.0.1, cephx on. It creates one pool (size 1, `rbd` application enabled)
# and a client key limited to it, waits until an RBD image can be created, then exports
#   BULKHEAD_CEPH_CONF     the cluster's ceph.conf (monitor address, per-process admin sockets,
#                          logs in the temp dir)
#   BULKHEAD_CEPH_POOL     the pool's name (bulkhead)
#   BULKHEAD_CEPH_ID       the client id, without the `client.` prefix (bulkhead): what
#                          `rbd --id`, librados' `rados_create(id)` and QEMU's `rbd:…:id=` take
#   BULKHEAD_CEPH_KEYRING  that client's keyring (caps: `profile rbd` on the pool only)
# runs the command, and always stops the daemons and removes the directory, exiting with the
# command's status. Quiet unless start fails (then the daemons' logs go to stderr); one line
# says how long the start took.
# Usage: scripts/with-ceph.sh cargo test --release -p bulkhead-storage --test ceph
#        scripts/with-ceph.sh sh -c 'qemu-img create -f raw \
#          "rbd:$BULKHEAD_CEPH_POOL/t1:id=$BULKHEAD_CEPH_ID:keyring=$BULKHEAD_CEPH_KEYRING:conf=$BULKHEAD_CEPH_CONF" 64M'
# `make test` runs it with BULKHEAD_REQUIRE_ALL=1 (passed through), so the Ceph tests fail
# instead of skipping when BULKHEAD_CEPH_CONF does not reach a cluster.
# Needs Debian's ceph-mon, ceph-mgr, ceph-osd, ceph-common (and qemu-block-extra for QEMU's rbd
# driver): scripts/install-deps.sh. Set BULKHEAD_CEPH_KEEP=1 to keep the directory for a look.
set -euo pipefail
for b in monmaptool ceph-authtool ceph-mon ceph-mgr ceph-osd ceph rbd uuidgen; do
  command -v "$b" >/dev/null || { echo "with-ceph: no $b (install ceph-mon ceph-mgr ceph-osd ceph-common)" >&2; exit 1; }
done
[ $# -gt 0 ] || { echo "usage: with-ceph.sh COMMAND [ARG...]" >&2; exit 2; }

T0=$(date +%s.%N)
DIR=$(mktemp -d /tmp/bulkhead-ceph.XXXXXX)
chmod 0755 "$DIR"
POOL=bulkhead
CLIENT=bulkhead
PIDS=()

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    # ceph-osd can take a few seconds to stop BlueStore; give each daemon 10 s, then SIGKILL.
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "${BULKHEAD_CEPH_KEEP:-0}" = 1 ]; then echo "with-ceph: kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "with-ceph: $*" >&2
  local f
  for f in "$DIR"/*.out "$DIR"/log/*.log; do
    [ -s "$f" ] || continue
    echo "----- ${f#"$DIR"/} (last 60 lines) -----" >&2
    tail -n 60 "$f" >&2
  done
  exit 1
}

# A free loopback TCP port for the monitor (msgr2 only); the OSD and mgr bind their own in
# ms_bind_port_min..max, skipping ports in use.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
FSID=$(uuidgen)
CONF="$DIR/ceph.conf"
mkdir -p "$DIR/run" "$DIR/log" "$DIR/mon" "$DIR/mgr/ceph-x" "$DIR/osd"
cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon_host = [v2:127.0.0.1:$PORT]
public_network = 127.0.0.0/8
ms_bind_msgr1 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = $DIR/run
admin_socket = $DIR/run/\$cluster-\$name.asok
log_file = $DIR/log/\$cluster-\$name.log
log_to_stderr = false
err_to_stderr = false
mon_cluster_log_file = $DIR/log/cluster.log
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
# The monitor refuses to start when its data filesystem has under 5% free, whatever that is in
# bytes; a throw-away test cluster needs a few MiB, so only a truly full disk should stop it.
mon_data_avail_crit = 0
mon_data_avail_warn = 1
[client.admin]
keyring = $DIR/ceph.client.admin.keyring
[client]
# Each client process (rbd CLI, qemu-img, qemu-storage-daemon, a test's librbd) gets its own
# admin socket and log: two clients sharing one socket path collide.
admin_socket = $DIR/run/\$cluster-\$name.\$pid.asok
log_file = $DIR/log/\$cluster-\$name.\$pid.log
[mon]
mon_data = $DIR/mon/\$cluster-\$id
[mgr]
mgr_data = $DIR/mgr/\$cluster-\$id
[osd]
osd_data = $DIR/osd/\$cluster-\$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 8589934592
bluestore_cache_autotune = false
bluestore_cache_size = 134217728
EOF

ADMIN="$DIR/ceph.client.admin.keyring"
CEPH=(ceph -c "$CONF" -n client.admin -k "$ADMIN" --connect-timeout 20)
{
  ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *'
  ceph-authtool --create-keyring "$ADMIN" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
  ceph-authtool "$DIR/mon.keyring" --import-keyring "$ADMIN"
  monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$PORT]" "$DIR/monmap"
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
} >"$DIR/setup.out" 2>&1 || fail "monitor set-up failed"

ceph-mon -c "$CONF" -f -i a >"$DIR/mon.out" 2>&1 & PIDS+=($!)

# mgr key (the monitor answers once it has formed its one-member quorum)
"${CEPH[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
  -o "$DIR/mgr/ceph-x/keyring" >>"$DIR/setup.out" 2>&1 || fail "monitor did not answer"
ceph-mgr -c "$CONF" -f -i x >"$DIR/mgr.out" 2>&1 & PIDS+=($!)

# One OSD: registered with `osd new`, its BlueStore made on a sparse file by --mkfs.
OSD_UUID=$(uuidgen)
OSD_KEY=$(ceph-authtool --gen-print-key)
OSD_ID=$(echo "{\"cephx_secret\": \"$OSD_KEY\"}" | "${CEPH[@]}" osd new "$OSD_UUID" -i - 2>>"$DIR/setup.out") \
  || fail "osd new failed"
[[ "$OSD_ID" =~ ^[0-9]+$ ]] || fail "osd new answered '$OSD_ID'"
mkdir -p "$DIR/osd/ceph-$OSD_ID"
{
  ceph-authtool --create-keyring "$DIR/osd/ceph-$OSD_ID/keyring" --name "osd.$OSD_ID" --add-key "$OSD_KEY"
  ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID"
} >>"$DIR/setup.out" 2>&1 || fail "osd --mkfs failed"
ceph-osd -c "$CONF" -f -i "$OSD_ID" >"$DIR/osd.out" 2>&1 & PIDS+=($!)

# The pool and a client key limited to it.
{
  "${CEPH[@]}" osd pool create "$POOL" 8 8 replicated
  "${CEPH[@]}" osd pool set "$POOL" size 1 --yes-i-really-mean-it
  "${CEPH[@]}" osd pool application enable "$POOL" rbd
  "${CEPH[@]}" auth get-or-create "client.$CLIENT" mon 'profile rbd' \
    osd "profile rbd pool=$POOL" mgr "profile rbd pool=$POOL" -o "$DIR/ceph.client.$CLIENT.keyring"
} >>"$DIR/setup.out" 2>&1 || fail "pool or client key set-up failed"
chmod 0644 "$DIR/ceph.client.$CLIENT.keyring" "$CONF"

# Ready when the client can create (and remove) an RBD image: the OSD is up and the pool's
# placement groups are active.
RBD=(rbd -c "$CONF" --id "$CLIENT" --keyring "$DIR/ceph.client.$CLIENT.keyring" -p "$POOL")
ready=0
for i in $(seq 60); do
  if timeout 20 "${RBD[@]}" create --size 1M "probe$i" >>"$DIR/probe.out" 2>&1; then
    timeout 20 "${RBD[@]}" rm --no-progress "probe$i" >>"$DIR/probe.out" 2>&1 || true
    ready=1
    break
  fi
  for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || fail "a Ceph daemon (pid $pid) exited during start"; done
  sleep 1
done
[ "$ready" = 1 ] || fail "no RBD image could be created within the start budget"

export BULKHEAD_CEPH_CONF="$CONF"
export BULKHEAD_CEPH_POOL="$POOL"
export BULKHEAD_CEPH_ID="$CLIENT"
export BULKHEAD_CEPH_KEYRING="$DIR/ceph.client.$CLIENT.keyring"
echo "with-ceph: Ceph $(ceph-mon --version | awk '{print $3}') (mon, mgr, osd.$OSD_ID) on 127.0.0.1:$PORT, pool $POOL, client.$CLIENT, ready in $(python3 -c "import time; print(f'{time.time()-$T0:.1f}')") s" >&2
set +e
"$@"
status=$?
set -e
exit "$status"
