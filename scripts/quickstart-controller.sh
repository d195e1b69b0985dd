#!/usr/bin/env bash
# Quickstart act: the controller. An operator gets a token, describes the host, is refused a
# customer-plane call (by the token service and by the controller), and the audit log verifies.
# Real binaries, real mutual TLS 1.3. Run from the repository root after `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

DIR=$(mktemp -d)
"$BIN/bulkhead-controller" --dev --state-dir "$DIR" --listen 127.0.0.1:0 \
  >"$DIR/ready.json" 2>"$DIR/controller.log" &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do [ -s "$DIR/ready.json" ] && break; sleep 0.1; done
PORT=$(sed -n 's/.*"listen":"127.0.0.1:\([0-9]*\)".*/\1/p' "$DIR/ready.json")
[ -n "$PORT" ] || { echo "controller did not start:"; cat "$DIR/controller.log"; exit 1; }
call() { # NAME TOKEN METHOD PATH
  curl -sS --cacert "$DIR/ca.pem" --cert "$DIR/$1.pem" --key "$DIR/$1.key" \
    -H "Authorization: Bearer $2" -X "$3" "https://127.0.0.1:$PORT$4"; echo; }

say "Act: the controller — the host's only door (mTLS 1.3 + certificate-bound tokens + audit)"
BACKEND=$(sed -n 's/.*"backend":"\([a-z]*\)".*/\1/p' "$DIR/ready.json")
case "$BACKEND" in
  host) NOTE="host: real bulkhead-hypervisor and bulkhead-blockcard processes, guest from target/guest" ;;
  *) NOTE="detached: no guest kernel found (make guest), nothing runs" ;;
esac
echo "dev controller for host-1 on 127.0.0.1:$PORT, state in $DIR (instance backend: $NOTE)"
echo "\$ bulkhead token mint --dev-dir DIR --caller operator --host host-1 --ops DescribeHost --ttl 5m"
T=$("$BIN/bulkhead" token mint --dev-dir "$DIR" --caller operator --host host-1 --ops DescribeHost --ttl 5m)
echo "${T:0:48}… (${#T} chars)"
echo "\$ GET /v1/host as operator"
call operator "$T" GET /v1/host
echo "\$ bulkhead token mint … --caller operator --ops GetConsole   (customer plane)"
"$BIN/bulkhead" token mint --dev-dir "$DIR" --caller operator --host host-1 --ops GetConsole 2>&1 \
  && { echo "UNEXPECTED: minted"; exit 1; } || true
echo "\$ GET /v1/instances/i-1/console with the operator's DescribeHost token"
call operator "$T" GET /v1/instances/i-1/console
echo "\$ POST /v1/exec (no such route exists)"
call operator "$T" POST /v1/exec
echo "\$ GET /v1/host without a client certificate"
curl -sS --cacert "$DIR/ca.pem" "https://127.0.0.1:$PORT/v1/host" 2>&1 | head -1 || true
sleep 0.2
echo "\$ bulkhead audit verify DIR/audit.log"
"$BIN/bulkhead" audit verify "$DIR/audit.log"
echo "last records (decision, code, caller, op):"
tail -n 6 "$DIR/audit.log" | sed -n 's/.*"caller":"\([^"]*\)".*"op":"\([^"]*\)".*"decision":"\([^"]*\)","code":"\([^"]*\)".*/  \3 \4 \1 \2/p'
