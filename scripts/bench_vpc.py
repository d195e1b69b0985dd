#!/usr/bin/env python3
"""VPC benchmark with real guests: two `bulkhead-hypervisor run` guests, each with two
`bulkhead-netcard vhost` cards, on loopback. Prints a markdown section on stdout.

Guest A's eth0 and guest B's eth0 are joined by a sealed card pair (VPC 7, cards 1 and 2,
10.0.1.0/24, AES-256-GCM); their eth1 by a `--plain` pair (VPC 8, cards 3 and 4, 10.0.2.0/24, the
benchmark-only mode without the seal/open). Both paths are measured in the same boot, alternating
(sealed, plain, sealed, plain, ...), so the encrypted/plain ratio compares like with like.

(1) TCP throughput A -> B: guest A runs `dd if=/dev/zero bs=64k count=C | nc B 5001`, guest B a
    `nc -l` loop into /dev/null. The rate is taken from the receiving card's `rx_bytes` counter
    (Ethernet frame bytes handed to guest B), polled over its control socket every 50 ms: bytes
    moved between the first and the last sample that moved, over that time. This leaves out the
    guests' fork/exec of dd and nc (seconds each under this machine's software KVM). The guest's
    own wall time around the pipeline (exec included) is printed on the console and reported too.
(2) Round-trip time: `ping -c N -i 0.05` from A to B, every reply's time parsed from the console;
    median and p99 over all runs of a path.
(3) Boot: process start -> BULKHEAD-GUEST-READY and -> BULKHEAD-NET-UP (eth0's DHCP lease from its
    card), for one guest with one card booting alone (BENCH_VPC_BOOTS runs), and for the two guests
    of (1)/(2), which boot at the same time on the same cores.

Environment: BENCH_VPC_RUNS (alternating rounds, default 3), BENCH_VPC_COUNT (64 KiB blocks per
transfer, default 16 = 1 MiB: ~25 s per transfer on the software KVM), BENCH_VPC_PINGS (default 50), BENCH_VPC_BOOTS (default 3).
"""
import json, os, re, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
GUEST = os.environ.get("BULKHEAD_GUEST_DIR", os.path.join(TARGET, "guest"))
HV = os.path.join(TARGET, "release", "bulkhead-hypervisor")
CARD = os.path.join(TARGET, "release", "bulkhead-netcard")
ARGS = open(os.path.join(ROOT, "guest", "cmdline")).read().strip()
RUNS = int(os.environ.get("BENCH_VPC_RUNS", "3"))
COUNT = int(os.environ.get("BENCH_VPC_COUNT", "16"))
PINGS = int(os.environ.get("BENCH_VPC_PINGS", "50"))
BOOTS = int(os.environ.get("BENCH_VPC_BOOTS", "3"))
TIMEOUT = float(os.environ.get("BENCH_VPC_TIMEOUT", "900"))
TITLE = "## VPC: guest to guest through two net cards, sealed vs plain"
SEALED, PLAIN = "10.0.1.12", "10.0.2.12"


def log(*a):
    print("bench-vpc:", *a, file=sys.stderr, flush=True)


def run_arg(script):
    ok = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./,:=+-")
    return "bulkhead.run=" + "".join(chr(b) if b in ok else "\\0%03o" % b for b in script.encode())


class Card:
    def __init__(self, work, name, vpc, card_id, mac, ip, port, route, plain):
        self.sock = os.path.join(work, f"{name}.sock")
        self.ctl = os.path.join(work, f"{name}.ctl")
        key = os.path.join(work, f"vpc{vpc}.key")
        if not os.path.exists(key):
            with open(key, "wb") as f:
                f.write(os.urandom(32))
        subnet = ip.rsplit(".", 1)[0] + ".0/24"
        cmd = [CARD, "vhost", "--vhost-socket", self.sock, "--control", self.ctl,
               "--listen", f"127.0.0.1:{port}", "--route", route,
               "--vpc", str(vpc), "--card-id", str(card_id), "--epoch", "1",
               "--key-file", key, "--seq-state", os.path.join(work, f"{name}.seq"),
               "--mac", mac, "--ip", ip + "/24", "--mtu", "1400", "--allow", f"all:{subnet}",
               "--uid", "65534", "--gid", "65534"] + (["--plain"] if plain else [])
        self.err = open(os.path.join(work, f"{name}.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err)
        end = time.time() + 20
        while True:
            try:
                self.counters()
                break
            except OSError:
                if time.time() > end or self.proc.poll() is not None:
                    raise RuntimeError(f"net card {name} did not start (see its log)")
                time.sleep(0.05)

    def counters(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(self.ctl)
            s.sendall(b'{"op":"counters"}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                c = s.recv(65536)
                if not c:
                    break
                buf += c
        return json.loads(buf)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Guest:
    """A `bulkhead-hypervisor run` whose console lines are time-stamped as they arrive."""

    def __init__(self, nets, script):
        cmdline = ARGS + (" " + run_arg(script) if script else "")
        cmd = [HV, "run", "--kernel", os.path.join(GUEST, "vmlinux"),
               "--initrd", os.path.join(GUEST, "initramfs.cpio"), "--cmdline", cmdline]
        for n in nets:
            cmd += ["--net", n]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = []  # (monotonic seconds since start, text)
        self.err = b""
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            t = time.monotonic() - self.t0
            with self.cv:
                self.lines.append((t, raw.decode(errors="replace").rstrip("\r\n")))
                self.cv.notify_all()
        with self.cv:
            self.lines.append((time.monotonic() - self.t0, None))
            self.cv.notify_all()

    def _read_err(self):
        self.err = self.proc.stderr.read()

    def wait_for(self, pattern, timeout):
        """Seconds since start at which a console line matched `pattern` (regex), or None."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        i = 0
        with self.cv:
            while True:
                while i < len(self.lines):
                    t, s = self.lines[i]
                    i += 1
                    if s is None:
                        return None
                    if rx.search(s):
                        return t
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cv.wait(left)

    def text(self):
        with self.cv:
            return "\n".join(s for _, s in self.lines if s is not None)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Poller(threading.Thread):
    """Samples a card's rx_bytes every 50 ms: [(monotonic, bytes)]."""

    def __init__(self, card):
        super().__init__(daemon=True)
        self.card, self.samples, self.stop_ev = card, [], threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            try:
                self.samples.append((time.monotonic(), self.card.counters()["rx_bytes"]))
            except (OSError, ValueError, KeyError):
                pass
            self.stop_ev.wait(0.05)


def cpu_s(pid):
    """User + system CPU seconds of a process (and its threads) so far."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def rate(samples, t_from, t_to):
    """Mbit/s of rx_bytes growth within [t_from, t_to]: first to last sample that moved."""
    w = [(t, b) for t, b in samples if t_from <= t <= t_to]
    moved = [k for k in range(1, len(w)) if w[k][1] > w[k - 1][1]]
    if len(moved) < 2:
        return None
    a, z = moved[0] - 1, moved[-1]
    dt = w[z][0] - w[a][0]
    return (w[z][1] - w[a][1]) * 8 / dt / 1e6 if dt > 0 else None


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt(x, nd=1):
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def boot_alone(work, i):
    card = Card(work, f"boot{i}", 9, 1, "02:00:0a:00:03:0b", "10.0.3.11", 40500 + i,
                "10.0.3.12=2@127.0.0.1:40599", False)
    try:
        g = Guest([card.sock], None)
        try:
            ready = g.wait_for(r"BULKHEAD-GUEST-READY", TIMEOUT)
            up = g.wait_for(r"BULKHEAD-NET-(UP|DOWN)", TIMEOUT) if ready is not None else None
            ok = up is not None and "BULKHEAD-NET-UP=10.0.3.11/24" in g.text()
            return ready, (up if ok else None)
        finally:
            g.stop()
    finally:
        card.stop()


def main():
    missing = [p for p in (HV, CARD, os.path.join(GUEST, "vmlinux"), os.path.join(GUEST, "initramfs.cpio"))
               if not os.path.exists(p)]
    if os.geteuid() != 0:
        missing.append("root (the cards drop to uid 65534)")
    if not os.path.exists("/dev/kvm"):
        missing.append("/dev/kvm")
    if missing:
        print(TITLE + "\n\nNot measured: missing " + ", ".join(missing) +
              " (`make guest`, `cargo build --release -p bulkhead-hypervisor -p bulkhead-netcard --bins`).\n")
        return
    load = open("/proc/loadavg").read().split()[0]
    start = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    work = tempfile.mkdtemp(prefix="bench-vpc-")
    base = 41000 + os.getpid() % 10000
    cards, guests = [], []
    notes = []
    try:
        # Sealed pair (VPC 7) and plain pair (VPC 8): A's cards, then B's.
        a1 = Card(work, "a-sealed", 7, 1, "02:00:0a:00:01:0b", "10.0.1.11", base, f"{SEALED}=2@127.0.0.1:{base + 1}", False)
        cards.append(a1)
        b1 = Card(work, "b-sealed", 7, 2, "02:00:0a:00:01:0c", SEALED, base + 1, f"10.0.1.11=1@127.0.0.1:{base}", False)
        cards.append(b1)
        a2 = Card(work, "a-plain", 8, 3, "02:00:0a:00:02:0b", "10.0.2.11", base + 2, f"{PLAIN}=4@127.0.0.1:{base + 3}", True)
        cards.append(a2)
        b2 = Card(work, "b-plain", 8, 4, "02:00:0a:00:02:0c", PLAIN, base + 3, f"10.0.2.11=3@127.0.0.1:{base + 2}", True)
        cards.append(b2)
        eth1 = "ip addr add {ip}/24 dev eth1;ip link set eth1 up\n"
        recv = eth1.format(ip=PLAIN) + "echo vb-listen\nwhile :;do nc -l -p 5001 >/dev/null;done\n"
        send = (eth1.format(ip="10.0.2.11") +
                f"for p in {SEALED} {PLAIN};do i=0;until ping -c1 -W1 $p >/dev/null;do i=$((i+1));[ $i -gt 300 ]&&exit 3;done;done\n"
                "echo va-peers\n"
                f"r=0;while [ $r -lt {RUNS} ];do r=$((r+1));for p in {SEALED} {PLAIN};do\n"
                f"echo vp-s:$p;ping -c {PINGS} -i 0.05 -W 2 $p\n"
                "echo vt-s:$p;read t0 x </proc/uptime\n"
                f"i=0;until dd if=/dev/zero bs=64k count={COUNT} 2>/dev/null|nc $p 5001;do i=$((i+1));[ $i -gt 30 ]&&exit 4;sleep 1;done\n"
                "read t1 x </proc/uptime;echo vt-e:$p:$t0:$t1\ndone;done\n")
        gb = Guest([b1.sock, b2.sock], recv)
        ga = Guest([a1.sock, a2.sock], send)
        guests = [ga, gb]
        pollers = {SEALED: Poller(b1), PLAIN: Poller(b2)}
        for p in pollers.values():
            p.start()
        total = 2 * RUNS
        done = 0
        end = time.monotonic() + TIMEOUT
        hv_cpu = {}
        while done < total and time.monotonic() < end:
            for g in (ga, gb):  # last reading before each hypervisor exits
                c = cpu_s(g.proc.pid)
                if c == c:
                    hv_cpu[g.proc.pid] = c
            if ga.proc.poll() is not None:
                time.sleep(0.5)  # let the reader take the last lines
            n = sum(1 for _, s in list(ga.lines) if s and s.startswith("vt-e:"))
            if n > done:
                done = n
                log(f"transfer {done}/{total} done")
            elif ga.proc.poll() is not None:
                break
            time.sleep(0.2)
        for p in pollers.values():
            p.stop_ev.set()
            p.join()
        cpu_cards = sum(cpu_s(c.proc.pid) for c in cards)
        cpu_sealed = cpu_s(a1.proc.pid) + cpu_s(b1.proc.pid)
        cpu_plain = cpu_s(a2.proc.pid) + cpu_s(b2.proc.pid)
        for g in (ga, gb):
            c = cpu_s(g.proc.pid)
            if c == c:
                hv_cpu[g.proc.pid] = c
        cpu_guests = sum(hv_cpu.values()) if len(hv_cpu) == 2 else float("nan")
        ta, tb = ga.text(), gb.text()
        if done < total:
            raise RuntimeError(f"the guests did not finish ({done}/{total} transfers); console A:\n{ta[-3000:]}\n"
                               f"console B:\n{tb[-1500:]}\nstderr A: {ga.err[-1500:]!r}")
        boots2 = []
        for g, ip in ((ga, "10.0.1.11"), (gb, SEALED)):
            r = g.wait_for("BULKHEAD-GUEST-READY", 0)
            u = g.wait_for(f"BULKHEAD-NET-UP={ip}/24", 0)
            boots2.append((r, u))
        # Console timestamps (host clock) of each transfer's start/end, and RTTs per path.
        res = {SEALED: {"rate": [], "wall": [], "rtt": [], "rtt_med": []}, PLAIN: {"rate": [], "wall": [], "rtt": [], "rtt_med": []}}
        cur = None
        run_rtts = []
        t_start = {}
        for t, s in ga.lines:
            if s is None:
                continue
            ts = ga.t0 + t
            if s.startswith("vp-s:"):
                cur = s[5:]
                run_rtts = []
                res[cur]["rtt_med"].append(run_rtts)
            elif cur and (m := re.search(r"bytes from ([\d.]+): seq=\d+ ttl=\d+ time=([\d.]+) ms", s)):
                res[m.group(1)]["rtt"].append(float(m.group(2)))
                run_rtts.append(float(m.group(2)))
            elif s.startswith("vt-s:"):
                t_start[s[5:]] = ts
            elif m := re.match(r"vt-e:([\d.]+):([\d.]+):([\d.]+)", s):
                p = m.group(1)
                res[p]["wall"].append(COUNT * 65536 * 8 / (float(m.group(3)) - float(m.group(2))) / 1e6)
                r = rate(pollers[p].samples, t_start.get(p, 0), ts)
                if r is not None:
                    res[p]["rate"].append(r)
        for p in res:
            res[p]["rtt_med"] = [med(x) for x in res[p]["rtt_med"] if x]
            lost = RUNS * PINGS - len(res[p]["rtt"])
            if lost:
                notes.append(f"{lost} of {RUNS * PINGS} pings to {p} got no reply.")
        for c in cards:
            k = c.counters()
            bad = {n: k.get(n) for n in ("forged", "replayed", "rx_no_buffer", "tx_bad_chain", "io_errors") if k.get(n)}
            if bad:
                notes.append(f"card {os.path.basename(c.sock)[:-5]}: {bad}.")
        for g in guests:
            g.stop()
        guests = []
        # Boot figures for one guest with one card, booting alone.
        alone = [boot_alone(work, i) for i in range(BOOTS)]
    finally:
        for g in guests:
            g.stop()
        for c in cards:
            c.stop()
        shutil.rmtree(work, ignore_errors=True)

    S, P = res[SEALED], res[PLAIN]
    ms, mp = med(S["rate"]), med(P["rate"])
    rs, rp = med(S["rtt"]), med(P["rtt"])
    ratio = lambda a, b: fmt(a / b, 2) if a == a and b == b and b > 0 else "n/a"
    print(TITLE)
    print()
    print(f"Written by `scripts/bench-vpc.sh` on {start}; 1-min load average at start: {load} "
          f"({os.cpu_count()} cores: {open('/proc/cpuinfo').read().split('model name')[1].split(':', 1)[1].splitlines()[0].strip()}; "
          f"/dev/kvm: {'kvm_pvm, software KVM: guest kernel code is emulated' if os.path.exists('/sys/module/kvm_pvm') else 'hardware KVM'}).")
    print("Two `bulkhead-hypervisor run` guests (the test guest, 1 vCPU, 128 MiB), each with two "
          "`bulkhead-netcard vhost` cards (sandboxed, uid 65534) on loopback UDP: eth0 through a sealed pair "
          "(AES-256-GCM, epoch key from `--key-file`), eth1 through a `--plain` pair (same card, no seal/open). "
          f"{RUNS} alternating rounds (sealed, plain) in the same boot; per round and path `ping -c {PINGS} -i 0.05` "
          f"then one `dd if=/dev/zero bs=64k count={COUNT} | nc` ({COUNT * 64 // 1024} MiB) from A to B. "
          "Throughput: frame bytes the receiving card handed to guest B (its `rx_bytes` counter, sampled every "
          "50 ms) over the time they took; \"guest wall\" is guest A's own clock around the whole `dd | nc` "
          "pipeline, which also holds two fork/execs (seconds each on this KVM).")
    print()
    print("| Path | TCP Mbit/s (card counter, median) | runs | guest wall Mbit/s (median) | RTT median ms | RTT p99 ms | per-run RTT medians |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("sealed (AES-256-GCM)", S), ("plain (`--plain`)", P)):
        print(f"| {name} | {fmt(med(r['rate']), 3)} | {', '.join(fmt(x, 3) for x in r['rate'])} | {fmt(med(r['wall']), 3)} | "
              f"{fmt(med(r['rtt']), 3)} | {fmt(pct(r['rtt'], 99), 3)} | {', '.join(fmt(x, 3) for x in r['rtt_med'])} |")
    print()
    print(f"CPU over the whole pair run (boots included): the four cards {fmt(cpu_cards)} s (sealed pair "
          f"{fmt(cpu_sealed, 2)} s, plain pair {fmt(cpu_plain, 2)} s, for the same traffic), the two "
          f"hypervisors (guest vCPUs and device threads) {fmt(cpu_guests)} s. The guests' emulated kernels, "
          "not the cards, set these rates; on hardware KVM they would be orders of magnitude higher.")
    print()
    spread = max(((max(r["rate"]) - min(r["rate"])) / med(r["rate"]) for r in (S, P) if len(r["rate"]) > 1), default=float("nan"))
    print(f"Encrypted/plain: throughput {ratio(ms, mp)} (target ≥ 0.9), RTT median {ratio(rs, rp)} (1.00 = no added latency). "
          f"Runs of one path spread by up to {fmt(spread * 100, 0)}% of their median here, so a ratio within that of 1 "
          "(or above 1) says only that the seal/open is not what limits guest traffic on this machine.")
    print()
    ra = [r for r, _ in alone if r is not None]
    ua = [u for _, u in alone if u is not None]
    print("Boot to network (process start of `bulkhead-hypervisor run` to the console marker; the card is "
          "already running, as the controller starts it before the hypervisor):")
    print()
    print("| Guest | runs | → BULKHEAD-GUEST-READY s (median) | → BULKHEAD-NET-UP s (median) | DHCP after READY s |")
    print("|---|---|---|---|---|")
    print(f"| one guest, one sealed card, booting alone | {len(ua)}/{BOOTS} | {fmt(med(ra))} | {fmt(med(ua))} | {fmt(med(ua) - med(ra))} |")
    for label, (r, u) in zip(("guest A of the pair (two cards; both guests boot at once)", "guest B of the pair"), boots2):
        print(f"| {label} | 1 | {fmt(r)} | {fmt(u)} | {fmt(u - r if r is not None and u is not None else None)} |")
    if len(ua) < BOOTS:
        notes.append(f"{BOOTS - len(ua)} of {BOOTS} lone boots got no BULKHEAD-NET-UP.")
    print()
    print("Not measured here: time from RunInstances (control plane → controller → card → hypervisor) to "
          "network up — this is the hypervisor-process part of it (RunInstances → BULKHEAD-GUEST-READY through "
          "the whole stack is in the attach section); the card's rate without guests (frame generator, TAP mode) is in the tunnel "
          "section above; a vhost-mode frame generator (a vhost-user frontend flooding the TX ring) is not built.")
    if notes:
        print()
        print("Notes: " + " ".join(notes))
    if float(load) >= 1.0:
        print()
        print(f"Noisy: other work was running (load {load} on {os.cpu_count()} cores); guests on this "
              "software KVM are slowed by every other process, so compare only the two paths of this run.")
    print()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a failed benchmark is reported, `make bench` goes on
        log(f"failed: {e}")
        print(TITLE + "\n\nNot measured: the benchmark failed (" + str(e).splitlines()[0] +
              "; run `scripts/bench-vpc.sh` alone to see why).\n")
