#!/usr/bin/env bash
# Net card tunnel vs. kernel IPsec ESP (AES-256-GCM) and wireguard-go, on the same two network
# namespaces joined by one veth pair (the "host network"). Prints a markdown section on stdout.
# Needs root, iperf3, ping, wireguard-go + wg, and a release build of bulkhead-netcard.
# BENCH_SECONDS (default 5) per iperf3 run; BENCH_ROUNDS (default 3) alternating rounds, medians.
set -uo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-3}  # alternating rounds (sealed card, plain card, wireguard-go); medians
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/bulkhead-netcard
A=ncbench-a; B=ncbench-b
section() { echo "## Net card tunnel: Bulkhead vs kernel ESP and wireguard-go"; echo; }
if [ "$(id -u)" -ne 0 ]; then section; echo "Not measured: needs root (network namespaces)."; echo; exit 0; fi
for t in iperf3 ping wireguard-go wg ip; do
  command -v "$t" >/dev/null || { section; echo "Not measured: $t is not installed (scripts/install-deps.sh)."; echo; exit 0; }
done
if [ ! -x "$BIN" ]; then cargo build -q --release -p bulkhead-netcard --bins >&2 || true; fi
[ -x "$BIN" ] || { section; echo "Not measured: bulkhead-netcard did not build."; echo; exit 0; }
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  ip netns del $A 2>/dev/null; ip netns del $B 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
load=$(cut -d' ' -f1 /proc/loadavg)

ip netns del $A 2>/dev/null; ip netns del $B 2>/dev/null
ip netns add $A; ip netns add $B
ip link add ncbv-a type veth peer name ncbv-b
ip link set ncbv-a netns $A; ip link set ncbv-b netns $B
i=1
for ns in $A $B; do
  v=ncbv-${ns#ncbench-}
  ip -n $ns addr add 192.168.214.$i/24 dev $v; ip -n $ns link set $v up; ip -n $ns link set lo up
  i=$((i + 1))
done

# iperf3 TCP throughput (Gbit/s) and ping RTT (ms, average of 50) from A to address $1 in B.
measure() {
  local dst=$1 gbps rtt
  ip netns exec $B timeout $((SECS + 20)) iperf3 -s -1 -B "$dst" >/dev/null 2>&1 &
  local srv=$!
  sleep 0.5
  gbps=$(ip netns exec $A timeout $((SECS + 15)) iperf3 -c "$dst" -t "$SECS" --connect-timeout 3000 -J 2>/dev/null \
    | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' 2>/dev/null || echo 0)
  wait $srv 2>/dev/null
  rtt=$(ip netns exec $A ping -c 50 -i 0.02 -W 1 -w 10 -q "$dst" 2>/dev/null | awk -F/ '/rtt|round-trip/{print $5}')
  echo "${gbps:-0} ${rtt:-nan}"
}

# Frame generator without TCP: one `iperf3 -u -b 0` UDP flood of $2-byte datagrams from A to the
# address $1 in B for SECS. Prints what B received: Mbit/s of UDP payload and kpps (thousands of
# datagrams per second), and the loss. The sender is as fast as one core allows; what the path
# cannot carry is lost, so "received" is the path's forwarding rate under overload.
measure_udp() {
  local dst=$1 len=$2
  ip netns exec $B timeout $((SECS + 20)) iperf3 -s -1 -B "$dst" >/dev/null 2>&1 &
  local srv=$!
  sleep 0.5
  ip netns exec $A timeout $((SECS + 15)) iperf3 -c "$dst" -u -b 0 -l "$len" -t "$SECS" --connect-timeout 3000 -J 2>/dev/null \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["end"]["sum_received"]; print("%.0f %.1f %.0f" % (r["bits_per_second"]/1e6, (r["packets"]-r["lost_packets"])/r["seconds"]/1e3, r["lost_percent"]))' 2>/dev/null \
    || echo "0 0 n/a"
  wait $srv 2>/dev/null
}

# --- Bulkhead net card (sealed, then plain) ---
head -c 32 /dev/urandom > "$work/key"
card_up() { # $1 = extra flag (--plain or empty)
  local i=1 ns
  for ns in $A $B; do
    ip -n $ns link del nctap 2>/dev/null
    ip -n $ns tuntap add dev nctap mode tap
    ip netns exec $ns sysctl -qw net.ipv6.conf.nctap.disable_ipv6=1
    ip -n $ns link set nctap address 02:00:00:00:00:1$i mtu 1400 up
    ip -n $ns addr add 10.0.1.1$i/24 dev nctap
    local peer=$((3 - i))
    ip netns exec $ns "$BIN" tap --tap nctap --listen 192.168.214.$i:4789 --peer 192.168.214.$peer:4789 \
      --key-file "$work/key" --vpc 7 --card-id $i --peer-card-id $peer \
      --mac 02:00:00:00:00:1$i --ip 10.0.1.1$i/24 --allow all:10.0.1.0/24 \
      --uid 65534 --gid 65534 $1 >/dev/null 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  sleep 0.7
}
card_down() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait "${pids[@]}" 2>/dev/null; pids=()
  ip -n $A link del nctap 2>/dev/null; ip -n $B link del nctap 2>/dev/null
}
declare -A R  # R[path_metric] = the rounds' values, space-separated
med() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:] if x not in ("nan","n/a")]; print(("%.3g" % statistics.median(v)) if v else "n/a")' "$@"; }
# One round of every measurement on the path to $2, values appended under label $1.
measure_all() {
  local g r m k l
  read -r g r < <(measure "$2"); R[$1_gbps]+=" $g"; R[$1_rtt]+=" $r"
  read -r m k l < <(measure_udp "$2" 1300); R[$1_um]+=" $m"; R[$1_uk]+=" $k"; R[$1_ul]+=" $l"
  read -r m k l < <(measure_udp "$2" 64); R[$1_sk]+=" $k"; R[$1_sl]+=" $l"
}
for ((round = 0; round < ROUNDS; round++)); do
  card_up ""; measure_all card 10.0.1.12; card_down
  card_up --plain; measure_all plain 10.0.1.12; card_down
done
for x in card plain; do
  for m in gbps rtt um uk ul sk sl; do printf -v "${x}_$m" '%s' "$(med ${R[${x}_$m]})"; done
done
card_u_mbps=$card_um card_u_kpps=$card_uk card_u_loss=$card_ul card_s_kpps=$card_sk card_s_loss=$card_sl
plain_u_mbps=$plain_um plain_u_kpps=$plain_uk plain_u_loss=$plain_ul plain_s_kpps=$plain_sk plain_s_loss=$plain_sl

# --- Kernel IPsec ESP, AES-256-GCM (rfc4106, 128-bit ICV), transport mode between the hosts ---
espkey=0x$(head -c 36 /dev/urandom | od -An -tx1 | tr -d ' \n')
H1=192.168.214.1; H2=192.168.214.2
esp_note=""
if ip -n $A xfrm state add src $H1 dst $H2 proto esp spi 0x101 mode transport aead 'rfc4106(gcm(aes))' "$espkey" 128 2>"$work/esp.err"; then
  ip -n $A xfrm state add src $H2 dst $H1 proto esp spi 0x102 mode transport aead 'rfc4106(gcm(aes))' "$espkey" 128
  for spi in "$H1 $H2 0x101" "$H2 $H1 0x102"; do
    set -- $spi
    ip -n $B xfrm state add src $1 dst $2 proto esp spi $3 mode transport aead 'rfc4106(gcm(aes))' "$espkey" 128
  done
  ip -n $A xfrm policy add src $H1 dst $H2 dir out tmpl src $H1 dst $H2 proto esp mode transport
  ip -n $A xfrm policy add src $H2 dst $H1 dir in tmpl src $H2 dst $H1 proto esp mode transport
  ip -n $B xfrm policy add src $H2 dst $H1 dir out tmpl src $H2 dst $H1 proto esp mode transport
  ip -n $B xfrm policy add src $H1 dst $H2 dir in tmpl src $H1 dst $H2 proto esp mode transport
  read -r esp_gbps esp_rtt < <(measure $H2)
  esp_packets=$(ip -n $B -s xfrm state | awk '/lifetime current/ && !n++ {getline; print $3}')
else
  esp_gbps=0; esp_rtt=n/a; esp_packets=0
  cfg=$( (zcat /proc/config.gz 2>/dev/null || true) | grep -E '^(# )?CONFIG_(INET_ESP|CRYPTO_GCM)[ =]' | tr '\n' ' ')
  esp_note="Kernel ESP could not be measured on this machine: \`ip xfrm state add … aead rfc4106(gcm(aes))\` answers \"$(head -n1 "$work/esp.err")\" (kernel config: ${cfg:-unknown}). "
fi
for ns in $A $B; do ip -n $ns xfrm policy flush; ip -n $ns xfrm state flush; done

# --- wireguard-go (userspace WireGuard: ChaCha20-Poly1305) ---
(umask 077; wg genkey > "$work/wa"; wg genkey > "$work/wb")
# One interface name per namespace: wireguard-go's control socket lives in the shared
# /var/run/wireguard/NAME.sock.
for side in a b; do
  ip netns exec ncbench-$side env WG_PROCESS_FOREGROUND=1 wireguard-go wg$side >/dev/null 2>&1 &
  pids+=($!)
done
sleep 1
ip netns exec $A wg set wga private-key "$work/wa" listen-port 51820 \
  peer "$(wg pubkey < "$work/wb")" allowed-ips 10.0.2.2/32 endpoint 192.168.214.2:51820
ip netns exec $B wg set wgb private-key "$work/wb" listen-port 51820 \
  peer "$(wg pubkey < "$work/wa")" allowed-ips 10.0.2.1/32 endpoint 192.168.214.1:51820
ip -n $A addr add 10.0.2.1/24 dev wga; ip -n $A link set wga mtu 1420 up
ip -n $B addr add 10.0.2.2/24 dev wgb; ip -n $B link set wgb mtu 1420 up
for ((round = 0; round < ROUNDS; round++)); do measure_all wg 10.0.2.2; done
for m in gbps rtt um uk ul sk sl; do printf -v "wg_$m" '%s' "$(med ${R[wg_$m]})"; done
wg_u_mbps=$wg_um wg_u_kpps=$wg_uk wg_u_loss=$wg_ul wg_s_kpps=$wg_sk wg_s_loss=$wg_sl

ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (a/b) if b > 0 else 'n/a')" "$1" "$2"; }
section
echo "Written by \`scripts/bench-netcard.sh\` on $(date -u +%Y-%m-%dT%H:%MZ); 1-min load average at start: $load"
echo "($(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); kernel $(uname -r))."
echo "Two network namespaces joined by one veth pair; in each, the peer under test. TCP throughput:"
echo "one \`iperf3 -c … -t $SECS\` stream from A to B; RTT: \`ping -c 50 -i 0.02\` average. Every figure is"
echo "the median of $ROUNDS rounds (sealed card, plain card alternating, then wireguard-go). The card runs"
echo "in TAP mode (the namespaces' kernels stand in for the guests; TAP MTU 1400), sandboxed, one"
echo "thread per direction; \`--plain\` is the same card with the AES-256-GCM seal/open left out."
echo
echo "| Path | TCP Gbit/s | RTT ms | card / this (throughput) |"
echo "|---|---|---|---|"
echo "| Bulkhead net card, AES-256-GCM | $card_gbps | $card_rtt | 1.00 |"
echo "| Bulkhead net card, plain (no crypto) | $plain_gbps | $plain_rtt | $(ratio "$card_gbps" "$plain_gbps") |"
echo "| Kernel IPsec ESP, AES-256-GCM, transport (\`ip xfrm\`) | $esp_gbps | $esp_rtt | $(ratio "$card_gbps" "$esp_gbps") |"
echo "| wireguard-go (ChaCha20-Poly1305) | $wg_gbps | $wg_rtt | $(ratio "$card_gbps" "$wg_gbps") |"
echo
echo "Ratios: card/wireguard-go = $(ratio "$card_gbps" "$wg_gbps") (target ≥ 1.0), card/ESP = $(ratio "$card_gbps" "$esp_gbps") (target ≥ 0.5),"
echo "encrypted/plain = $(ratio "$card_gbps" "$plain_gbps") (target ≥ 0.9). ESP packets on B's inbound SA: ${esp_packets:-?}."
echo "TCP Gbit/s per round: sealed${R[card_gbps]}; plain${R[plain_gbps]}; wireguard-go${R[wg_gbps]}."
echo
echo "Frame generator (no TCP in the loop): one \`iperf3 -u -b 0\` UDP flood from A to B for $SECS s through"
echo "the same paths, as fast as the sender's core allows; received rate at B (what the path carried"
echo "under overload) and the share lost.$([ -n "$esp_note" ] && echo " Kernel ESP: not measurable here (below)." || echo " Kernel ESP: not run with the generator.")"
echo
echo "| Path | 1300-byte datagrams: Mbit/s received | kpps | lost % | 64-byte datagrams: kpps received | lost % |"
echo "|---|---|---|---|---|---|"
echo "| Bulkhead net card, AES-256-GCM | $card_u_mbps | $card_u_kpps | $card_u_loss | $card_s_kpps | $card_s_loss |"
echo "| Bulkhead net card, plain | $plain_u_mbps | $plain_u_kpps | $plain_u_loss | $plain_s_kpps | $plain_s_loss |"
echo "| wireguard-go | $wg_u_mbps | $wg_u_kpps | $wg_u_loss | $wg_s_kpps | $wg_s_loss |"
echo
echo "Frame-generator ratios: card/wireguard-go = $(ratio "$card_u_mbps" "$wg_u_mbps") (1300 B), $(ratio "$card_s_kpps" "$wg_s_kpps") (64 B);"
echo "encrypted/plain = $(ratio "$card_u_mbps" "$plain_u_mbps") (1300 B), $(ratio "$card_s_kpps" "$plain_s_kpps") (64 B). The generator is"
echo "the kernel's UDP stack and a TAP write per datagram, not a raw frame injector: it shares the"
echo "2 cores with the card, so these are lower bounds of the card's own rate."
[ -n "$esp_note" ] && { echo; echo "$esp_note"; }
if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 1.0 else 1)" "$load"; then
  echo
  echo "Noisy: other work was running (load $load on $(nproc) cores), so single runs vary by tens of"
  echo "percent (an encrypted/plain ratio above 1 is noise). Rerun on an idle machine for figures to quote."
fi
echo
