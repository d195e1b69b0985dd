#!/usr/bin/env python3
"""Network-volume benchmark (issue 15), driven by scripts/bench-netvol.sh.

One real `bulkhead-storage` node (file engine, its own qemu-storage-daemon) on this machine, one
volume created and granted to host `host-1` over the node's mTLS control API, and in alternating
rounds, on that same volume and the same NBD-over-TLS export:

  card XTS     the block card (`bulkhead-blockcard --nbd`), AES-256-XTS, 4 KiB crypto sectors
  card plain   the same card, same volume, unencrypted (key kind `plain`)
  qsd LUKS     qemu-storage-daemon: nbd client (tls-creds-x509 endpoint=client, host-1's
               certificate) -> luks (aes-xts-plain64, AES-256) -> vhost-user-blk export
  qsd raw      the same qemu-storage-daemon without the luks layer (transport reference)

Every backend is driven by the same vhost-user frontend as the card's own benchmark
(crates/blockcard/examples/blkbench.rs). Prints the markdown section on stdout (progress on
stderr). Env: BENCH_SECONDS (per workload, 3), BENCH_ROUNDS (alternating rounds, 3),
BENCH_SIZE_MB (volume, 256).
"""
import datetime
import json
import os
import shutil
import signal
import socket
import struct
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
# BENCH_CARD: another card binary (e.g. an older build, to compare before/after).
CARD = os.environ.get("BENCH_CARD") or os.path.join(REL, "bulkhead-blockcard")
NODE = os.path.join(REL, "bulkhead-storage")
BB = os.path.join(REL, "examples", "blkbench")
PKI = os.path.join(REL, "examples", "netvolpki")
SECS = int(os.environ.get("BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SIZE_MB = int(os.environ.get("BENCH_SIZE_MB", "256"))
NODE_NAME, HOST, VOLUME = "storage-1", "host-1", "vol-netbench"
WORKLOADS = [("randread4k", 1), ("randread4k", 32), ("randwrite4k", 1), ("randwrite4k", 32),
             ("seqread1m", 8), ("seqwrite1m", 8)]
BACKENDS = ["card-xts", "card-plain", "qsd-luks", "qsd-raw"]
TITLE = "## Network volume: block card over NBD+TLS vs qemu-storage-daemon LUKS (scripts/bench-netvol.sh)"


def log(*a):
    print("bench-netvol:", *a, file=sys.stderr, flush=True)


class NotMeasured(Exception):
    pass


def root():
    return os.geteuid() == 0


def drop_args():
    return ["--uid", "65534", "--gid", "65534"] if root() else []


def wait_path(p, what, proc=None, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(p):
            return
        if proc is not None and proc.poll() is not None:
            raise NotMeasured(f"{what} exited with {proc.returncode} before {p} appeared")
        time.sleep(0.05)
    raise NotMeasured(f"{what}: {p} never appeared")


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Bench:
    def __init__(self, work):
        self.w = work
        self.ca = os.path.join(work, "ca")
        self.creds = os.path.join(work, "qemu-creds")
        self.procs = []
        self.node = None
        self.nbd_port = None
        self.control = None
        self.header = os.path.join(work, "luks-header.img")
        self.header_tool = "?"
        self.results = {}  # (backend, workload, qd) -> [result dicts]
        self.socks = {}  # backend -> vhost-user socket
        self.ctls = {}  # card backend -> (control socket, process)
        self.metrics = {}  # card backend -> GetMetrics counters

    # ---- set-up -------------------------------------------------------------------------------
    def pki(self):
        subprocess.run([PKI, self.ca, NODE_NAME, HOST], check=True, stdout=subprocess.DEVNULL)
        os.makedirs(self.creds)
        shutil.copy(os.path.join(self.ca, "ca.pem"), os.path.join(self.creds, "ca-cert.pem"))
        shutil.copy(os.path.join(self.ca, f"{HOST}.pem"), os.path.join(self.creds, "client-cert.pem"))
        shutil.copy(os.path.join(self.ca, f"{HOST}.key"), os.path.join(self.creds, "client-key.pem"))

    def start_node(self):
        state = os.path.join(self.w, "node")
        os.makedirs(state, mode=0o700)
        self.node_log = open(os.path.join(self.w, "node.log"), "w")
        self.node = subprocess.Popen(
            [NODE, "--ca-dir", self.ca, "--name", NODE_NAME, "--state-dir", state,
             "--listen-control", "127.0.0.1:0", "--listen-nbd", "127.0.0.1:0", *drop_args()],
            stdout=subprocess.PIPE, stderr=self.node_log, text=True,
            env={**os.environ, "BULKHEAD_LOG": "warn"})
        line = self.node.stdout.readline()
        if not line:
            raise NotMeasured("bulkhead-storage exited before its ready line: "
                              + open(os.path.join(self.w, "node.log")).read()[-400:])
        ready = json.loads(line)
        if ready.get("event") != "ready":
            raise NotMeasured(f"bulkhead-storage: unexpected first line {line!r}")
        self.control = ready["control"]
        self.nbd_port = int(ready["nbd"].rsplit(":", 1)[1])
        self.data_file = os.path.join(state, "data", f"{VOLUME}.raw")
        log(f"storage node up: control {self.control}, nbd {ready['nbd']}, engine {ready['engine']}")

    def call(self, op, body):
        r = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "--tlsv1.3", "--cacert", os.path.join(self.ca, "ca.pem"),
             "--cert", os.path.join(self.ca, "control.pem"), "--key", os.path.join(self.ca, "control.key"),
             "-H", "Content-Type: application/json", "-d", json.dumps(body),
             f"https://{self.control}/v1/{op}"], capture_output=True, text=True)
        if r.returncode != 0:
            raise NotMeasured(f"storage node control API {op}: {r.stdout.strip()} {r.stderr.strip()}")
        return json.loads(r.stdout)

    def volume(self):
        self.call("CreateVolume", {"volume_id": VOLUME, "size_bytes": SIZE_MB << 20})
        g = self.call("Grant", {"volume_id": VOLUME, "host": HOST, "generation": 1})
        if g["volume"]["granted_to"] != HOST:
            raise NotMeasured(f"grant did not take: {g}")
        # No holes: every read below reads real blocks (the storage node's page cache, the same
        # for every backend) rather than a sparse file's holes.
        with open(self.data_file, "r+b") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(SIZE_MB):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        # LUKS1 header (QEMU 7.2's luks driver writes LUKS1; it cannot open LUKS2), AES-256
        # XTS plain64 (512-bit key), written over NBD+TLS before the qsd LUKS peer opens the volume.
        # cryptsetup makes it with a fixed PBKDF2 count (only the open pays it); qemu-img's own
        # PBKDF2 calibration fails on this loaded machine most of the time ("Unable to get accurate
        # CPU usage"), so it is only the fallback.
        if shutil.which("cryptsetup"):
            keyf = os.path.join(self.w, "luks.pass")
            with open(keyf, "w") as f:
                f.write("benchpass")
            with open(self.header, "wb") as f:
                f.truncate(4 << 20)
            subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks1", "--cipher", "aes-xts-plain64",
                            "--key-size", "512", "--hash", "sha256", "--pbkdf-force-iterations", "1000",
                            "--key-file", keyf, self.header], check=True, capture_output=True)
            dump = subprocess.run(["cryptsetup", "luksDump", self.header], check=True, capture_output=True,
                                  text=True).stdout
            sectors = int([l.split(":")[1] for l in dump.splitlines() if l.startswith("Payload offset")][0])
            with open(self.header, "r+b") as f:
                f.truncate(sectors * 512)
            self.header_tool = "cryptsetup luksFormat, PBKDF2-SHA256, 1000 iterations"
            return
        err = ""
        for it in (10, 10, 50, 100, 200):
            r = subprocess.run(["qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=sec0,data=benchpass",
                                "-o", f"key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time={it}",
                                self.header, "0"], capture_output=True, text=True)
            if r.returncode == 0:
                self.header_tool = "qemu-img create -f luks"
                return
            err = r.stderr.strip()
        raise NotMeasured(f"qemu-img could not create the LUKS header: {err}")

    def nbd_opts(self, prefix=""):
        return (f"{prefix}driver=nbd,{prefix}server.type=inet,{prefix}server.host=127.0.0.1,"
                f"{prefix}server.port={self.nbd_port},{prefix}export={VOLUME},{prefix}tls-creds=tls0")

    def tls_obj(self):
        return f"tls-creds-x509,id=tls0,dir={self.creds},endpoint=client"

    def write_luks_header(self):
        r = subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "--object", self.tls_obj(), self.header,
                            "--target-image-opts", "driver=raw," + self.nbd_opts("file.")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise NotMeasured(f"writing the LUKS header over NBD failed: {r.stderr.strip()}")

    # ---- backends ---------------------------------------------------------------------------
    def run_one(self, backend, wl, qd):
        sock = self.socks[backend]
        r = subprocess.run([BB, "run", sock, wl, str(qd), str(SECS)], capture_output=True, text=True)
        if r.returncode != 0:
            raise NotMeasured(f"{backend} {wl} QD {qd}: blkbench failed: {r.stderr.strip()[-300:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        self.results.setdefault((backend, wl, qd), []).append(res)
        log(backend, json.dumps(res))

    def start_card(self, backend, key):
        ctl = os.path.join(self.w, f"{backend}.ctl")
        sock = os.path.join(self.w, f"{backend}.sock")
        logf = open(os.path.join(self.w, "card.log"), "a")
        p = subprocess.Popen(
            [CARD, "--control-socket", ctl, "--vhost-socket", sock, "--nbd", f"127.0.0.1:{self.nbd_port}",
             "--nbd-export", VOLUME, "--nbd-server-name", NODE_NAME, "--tls-ca", os.path.join(self.ca, "ca.pem"),
             "--tls-cert", os.path.join(self.ca, f"{HOST}.pem"), "--tls-key", os.path.join(self.ca, f"{HOST}.key"),
             *drop_args()], stdout=subprocess.DEVNULL, stderr=logf, env={**os.environ, "BULKHEAD_LOG": "warn"})
        self.procs.append(p)
        wait_path(ctl, "bulkhead-blockcard", p)
        a = subprocess.run([BB, "attach", ctl, VOLUME, key, "4096"], capture_output=True, text=True)
        if a.returncode != 0 or "Attached" not in a.stdout:
            raise NotMeasured(f"card attach ({key}) failed: {a.stdout} {a.stderr[-300:]}")
        want_enc = "encrypted: true" if key != "plain" else "encrypted: false"
        if want_enc not in a.stdout:
            raise NotMeasured(f"card attach ({key}) answered {a.stdout.strip()}")
        self.socks[backend] = sock
        self.ctls[backend] = (ctl, p)

    def start_qsd(self, backend, luks):
        sock = os.path.join(self.w, f"{backend}.sock")
        args = ["qemu-storage-daemon", "--object", self.tls_obj(), "--blockdev", "node-name=nbd0," + self.nbd_opts()]
        top = "nbd0"
        if luks:
            self.write_luks_header()
            args += ["--object", "secret,id=sec0,data=benchpass",
                     "--blockdev", "driver=luks,node-name=disk0,file=nbd0,key-secret=sec0"]
            top = "disk0"
        args += ["--export", f"type=vhost-user-blk,id=exp0,node-name={top},addr.type=unix,addr.path={sock},"
                 "writable=on,num-queues=1,logical-block-size=4096"]
        logf = open(os.path.join(self.w, "qsd.log"), "a")
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=logf)
        self.procs.append(p)
        wait_path(sock, "qemu-storage-daemon", p)
        self.socks[backend] = sock

    def start_all(self):
        # The LUKS peer first: it reads the header once, when it opens the volume.
        self.start_qsd("qsd-luks", True)
        self.start_qsd("qsd-raw", False)
        self.start_card("card-xts", "ephemeral")
        self.start_card("card-plain", "plain")

    def card_metrics(self):
        """GetMetrics on each card's control socket (frame: u32 LE length, version 1, kind 3)."""
        for backend, (ctl, _) in self.ctls.items():
            try:
                with socket.socket(socket.AF_UNIX) as c:
                    c.settimeout(5)
                    c.connect(ctl)
                    c.sendall(struct.pack("<I", 2) + bytes([1, 3]))
                    hdr = c.recv(4, socket.MSG_WAITALL)
                    body = c.recv(struct.unpack("<I", hdr)[0], socket.MSG_WAITALL)
                if body[1] != 0x83:
                    raise ValueError(f"answer kind {body[1]:#x}")
                m, i = {}, 3
                for _ in range(body[2]):
                    n = body[i]
                    name = body[i + 1:i + 1 + n].decode()
                    m[name] = struct.unpack("<Q", body[i + 1 + n:i + 9 + n])[0]
                    i += 9 + n
                self.metrics[backend] = m
            except (OSError, ValueError, IndexError, struct.error) as e:
                log(f"{backend}: GetMetrics failed: {e}")

    def detach_cards(self):
        for backend, (ctl, p) in self.ctls.items():
            d = subprocess.run([BB, "detach", ctl], capture_output=True, text=True)
            if "Detached" not in d.stdout:
                log(f"{backend}: detach answered {d.stdout.strip()} {d.stderr.strip()[-200:]}")
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def cleanup(self):
        for p in self.procs:
            stop(p)
        stop(self.node)


def med(rs, k):
    return statistics.median(r[k] for r in rs)


def cpu_model():
    try:
        return [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except (OSError, IndexError):
        return "unknown CPU"


def report(b, load0, load1, started, elapsed):
    R = b.results

    def cell(backend, wl, qd):
        rs = R.get((backend, wl, qd))
        if not rs:
            return "n/a"
        p99 = int(med(rs, "p99_us"))
        if wl.startswith("seq"):
            return f"{med(rs, 'mbps'):.0f} MB/s, p99 {p99} µs"
        return f"{med(rs, 'iops'):.0f} IOPS, p99 {p99} µs"

    def ratio(x, y, wl, qd, target):
        rx, ry = R.get((x, wl, qd)), R.get((y, wl, qd))
        if not rx or not ry or not med(ry, "iops"):
            return "n/a"
        v = med(rx, "iops") / med(ry, "iops")
        return f"{v:.2f} {'✓' if v >= target else '✗'}"

    out = [
        "<!-- netvol:begin -->",
        TITLE,
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC on {cpu_model()}, {os.cpu_count()} cores shared with other "
        f"work (1-min load average {load0} at start, {load1} at end; {elapsed:.0f} s). One "
        f"`bulkhead-storage` node on this machine (file engine: one qemu-storage-daemon, the volume a "
        f"{SIZE_MB} MiB raw file opened buffered — QEMU's default cache=writeback — so reads are served "
        "from the node's page cache and this measures the network-volume path, not a disk), reached over "
        "loopback TCP with NBD + STARTTLS, TLS 1.3 and host-1's client certificate, the volume created "
        "and granted over the node's mTLS control API. All four backends are started once and stay "
        "connected to that same volume and export (idle when not measured); for each workload they "
        "take turns, in a rotating order, round after round "
        f"({ROUNDS} round{'s' if ROUNDS != 1 else ''} × {len(WORKLOADS)} workloads × 4 backends × {SECS} s), so "
        "each comparison is between runs seconds apart; figures are medians over the rounds, p99 is the "
        "median of the rounds' p99 request latency as the frontend sees it. Every backend is driven by the same Rust vhost-user frontend "
        "as the card benchmark (crates/blockcard/examples/blkbench.rs: memfd guest memory, split "
        "virtqueue, one queue, no guest kernel, guest-side I/O is O_DIRECT-like: no guest page cache).",
        "",
        "- **card XTS**: `bulkhead-blockcard --nbd` (the card as the node's NBD client), AES-256-XTS "
        "(aes-xts-plain64, 512-bit key) with **4 KiB crypto sectors**, ciphertext on the wire.",
        "- **card plain**: the same card and volume, key kind `plain` (no encryption).",
        "- **qsd LUKS** (the peer doing the same job): `qemu-storage-daemon` with QEMU's nbd client "
        "(`tls-creds-x509,endpoint=client`, the same host certificate) under a `luks` layer, "
        "exported as vhost-user-blk with 4 KiB logical blocks; LUKS1 aes-xts-plain64, AES-256 "
        "(512-bit key) with **512-byte crypto sectors** (QEMU's luks driver; QEMU 7.2 cannot open "
        f"LUKS2; header made by {b.header_tool}); its header is written over NBD before it opens the volume (it reads it once, at "
        "open; the other backends' writes overwrite the blocks later, which changes only what the "
        "bytes decrypt to, not the work done).",
        "- **qsd raw**: the same qemu-storage-daemon without the luks layer (transport reference, "
        "no encryption).",
        "",
        "| workload | QD | card XTS | card plain | qsd LUKS | qsd raw | card XTS / qsd LUKS (≥ 1.0) | card XTS / card plain (≥ 0.90) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for wl, qd in WORKLOADS:
        out.append(f"| {wl} | {qd} | " + " | ".join(cell(x, wl, qd) for x in BACKENDS)
                   + f" | {ratio('card-xts', 'qsd-luks', wl, qd, 1.0)} | {ratio('card-xts', 'card-plain', wl, qd, 0.90)} |")
    spread = []
    for wl, qd in WORKLOADS:
        rs = R.get(("card-xts", wl, qd)) or []
        if len(rs) > 1:
            lo, hi = min(r["iops"] for r in rs), max(r["iops"] for r in rs)
            spread.append(f"{wl} QD {qd} {lo:.0f}–{hi:.0f}")
    m = b.metrics.get("card-xts", {})
    if m:
        bad = sum(m.get(k, 0) for k in ("io_errors", "nbd_failed_requests", "nbd_protocol_errors", "nbd_reply_errors"))
        out += ["", f"Card XTS counters after the run: {m.get('reads', 0)} reads, {m.get('writes', 0)} writes, "
                f"{bad} I/O, reply or protocol errors, {m.get('nbd_reconnects', 0)} reconnects; at most "
                f"**{m.get('nbd_inflight_peak', '?')} NBD requests in flight** (`nbd_inflight_peak`; the card "
                "allows up to 32 per queue, its I/O workers, one queue here; QEMU's nbd client keeps up to 16)."]
    else:
        out += ["", "Card counters: not read (GetMetrics failed, see stderr)."]
    out += [
        "",
        "Spread of card XTS IOPS over the rounds (min–max): " + (", ".join(spread) or "one round") + ".",
        "",
        f"Command: `make bench`, or alone `BENCH_SECONDS={SECS} BENCH_ROUNDS={ROUNDS} BENCH_SIZE_MB={SIZE_MB} "
        "scripts/bench-netvol.sh` (root: the card and the node drop to nobody).",
        "<!-- netvol:end -->",
        "",
    ]
    return "\n".join(out)


def not_measured(reason):
    print("<!-- netvol:begin -->")
    print(TITLE + "\n")
    print(f"**Not measured: {' '.join(str(reason).split())}**")
    print("<!-- netvol:end -->\n")


def main():
    for f, how in ((CARD, "cargo build --release -p bulkhead-blockcard"), (BB, "--examples"),
                   (PKI, "--examples"), (NODE, "cargo build --release -p bulkhead-storage")):
        if not os.access(f, os.X_OK):
            not_measured(f"{os.path.basename(f)} is not built ({how})")
            log(f"NOT MEASURED: {f} missing")
            return 1
    for t in ("qemu-storage-daemon", "qemu-img", "curl"):
        if not shutil.which(t):
            not_measured(f"{t} is not installed (scripts/install-deps.sh)")
            log(f"NOT MEASURED: {t} missing")
            return 1
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = open("/proc/loadavg").read().split()[0]
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="bhnetvol.")
    os.chmod(work, 0o755)  # the node and the card run as nobody below it (keys stay 0600, root's)
    b = Bench(work)
    try:
        b.pki()
        b.start_node()
        b.volume()
        b.start_all()
        for r in range(ROUNDS):
            log(f"round {r + 1}/{ROUNDS}")
            for i, (wl, qd) in enumerate(WORKLOADS):
                k = (r + i) % len(BACKENDS)
                for x in BACKENDS[k:] + BACKENDS[:k]:
                    b.run_one(x, wl, qd)
        b.card_metrics()
        b.detach_cards()
    except (NotMeasured, subprocess.CalledProcessError, OSError, ValueError) as e:
        log(f"NOT MEASURED: {e}")
        for name in ("node.log", "card.log", "qsd.log"):
            p = os.path.join(work, name)
            if os.path.exists(p):
                log(f"--- {name} (tail) ---\n" + open(p).read()[-1500:])
        not_measured(f"the run failed: {e}")
        return 1
    finally:
        b.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    load1 = open("/proc/loadavg").read().split()[0]
    print(report(b, load0, load1, started, time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
