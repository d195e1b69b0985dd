#!/usr/bin/env python3
"""Hypervisor benchmark: Bulkhead vs QEMU microvm vs Firecracker on the same kernel, initramfs,
kernel arguments, memory and vCPU count, in the same run (alternating: one run of each per round).
Writes a markdown section to stdout.

Every peer is timed the same way, from outside its code:
(1) VMM start-up: process start to the first guest instruction, i.e. the CLOCK_MONOTONIC time at
    which the process first calls ioctl(KVM_RUN) (the VMM has built the VM and hands vCPU 0 to KVM).
    Taken by the LD_PRELOAD shim scripts/kvm_run_stamp.c in libc's ioctl wrapper, identical for all
    three; no peer is paused or driven over a control socket.
(2) Process start to BULKHEAD-GUEST-READY on the serial console (the VMM's stdout).
(3) VMM memory: PSS of the process minus the PSS of the guest-RAM mapping, sampled at READY.
Medians and p99 (nearest rank: the maximum below 100 runs) over BENCH_RUNS rounds; the 1-minute
load average is recorded before every run.

Firecracker is built from its public source by scripts/build-firecracker.sh (a pinned release,
cached under target/peers/); FIRECRACKER_BIN names a ready binary instead. When it cannot be built
or cannot boot the guest, its column says "not measured" and the section gives the reason with the
evidence (its log, the exit).
"""
import json, math, os, re, statistics, subprocess, sys, tempfile, time

GUEST = os.environ.get("BULKHEAD_GUEST_DIR", "target/guest")
KERNEL, INITRD = f"{GUEST}/vmlinux", f"{GUEST}/initramfs.cpio"
TARGET = os.environ.get("CARGO_TARGET_DIR", "target")
HV = os.environ.get("BULKHEAD_HV", f"{TARGET}/release/bulkhead-hypervisor")
ARGS = open("guest/cmdline").read().strip()
MEM = 128
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
# BENCH_QUICK=1: skip (2) and sample (3) SAMPLE_S seconds after start instead of at READY.
QUICK = os.environ.get("BENCH_QUICK") == "1"
SAMPLE_S = float(os.environ.get("BENCH_SAMPLE_S", "10"))
SCRIPT = "sleep\\0040600"  # "sleep 600", octal-escaped (guest/README.md): keeps the guest up for the memory sample
CMDLINE = f"{ARGS} bulkhead.run={SCRIPT}"
SHIM_SRC = "scripts/kvm_run_stamp.c"
SHIM = f"{TARGET}/peers/kvm_run_stamp.so"
PEERS = ["bulkhead", "qemu", "firecracker"]
# Firecracker is run two ways in every round: with --enable-pci (the table's column: its kernel
# command line is then exactly the others'), and as shipped by default (virtio-mmio only, where it
# appends `pci=off` to the command line itself, so the guest skips PCI probing), reported below the table.
RUNS_OF = PEERS + ["firecracker_default"]


class NotReady(Exception):
    def __init__(self, why, output):
        super().__init__(why)
        self.why, self.output = why, output


def mono():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def load1():
    return float(open("/proc/loadavg").read().split()[0])


def build_shim():
    os.makedirs(os.path.dirname(SHIM), exist_ok=True)
    if not os.path.exists(SHIM) or os.path.getmtime(SHIM) < os.path.getmtime(SHIM_SRC):
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", SHIM, SHIM_SRC, "-ldl"], check=True)
    return os.path.abspath(SHIM)


def build_firecracker():
    """(path, build-info text) or (None, reason)."""
    if os.environ.get("FIRECRACKER_BIN"):
        return os.environ["FIRECRACKER_BIN"], "FIRECRACKER_BIN (a binary built elsewhere)"
    r = subprocess.run(["scripts/build-firecracker.sh"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(r.stderr)
    if r.returncode != 0:
        lines = [l for l in r.stderr.splitlines() if "SKIPPED" in l or "error" in l.lower()]
        return None, (lines[0] if lines else f"scripts/build-firecracker.sh exited {r.returncode}")
    path = r.stdout.strip().splitlines()[-1]
    info = open(os.path.join(os.path.dirname(path), "build-info.txt")).read()
    return path, info


def pss_minus_guest(pid, guest_bytes):
    total = guest = 0
    cur_size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                cur_size = int(m.group(2), 16) - int(m.group(1), 16)
                continue
            if line.startswith("Pss:"):
                kb = int(line.split()[1])
                total += kb
                if cur_size >= guest_bytes // 2:
                    guest += kb
    return (total - guest) / 1024.0


def wait_ready(proc, t0, timeout=600):
    if QUICK:
        time.sleep(SAMPLE_S)
        if proc.poll() is not None:
            raise NotReady(f"exited with status {proc.returncode} before the sample", b"")
        return float("nan")
    buf = b""
    os.set_blocking(proc.stdout.fileno(), False)
    end = time.time() + timeout
    while time.time() < end:
        try:
            chunk = proc.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            buf += chunk
            if b"BULKHEAD-GUEST-READY" in buf:
                return (mono() - t0) / 1e9
        elif proc.poll() is not None:
            raise NotReady(f"exited with status {proc.returncode} before BULKHEAD-GUEST-READY", buf)
        time.sleep(0.02)
    raise NotReady(f"no BULKHEAD-GUEST-READY within {timeout} s", buf)


def timed(argv, env=None, stderr=subprocess.DEVNULL):
    """Starts argv under the KVM_RUN shim; returns (proc, t0, stamp file)."""
    fd, stamp = tempfile.mkstemp(prefix="kvm-run-stamp-")
    os.close(fd)
    env = {**(env or os.environ), "LD_PRELOAD": SHIM_PATH, "KVM_RUN_STAMP": stamp}
    t0 = mono()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env)
    return p, t0, stamp


def finish(p, t0, stamp):
    """Kills p; returns start-up in ms from the shim's stamp (nan when there is none)."""
    if p.poll() is None:
        p.kill()
    p.communicate()
    try:
        txt = open(stamp).read().strip("\0\n ")
        return (int(txt) - t0) / 1e6 if txt else float("nan")
    finally:
        os.unlink(stamp)


def measure(p, t0, stamp):
    try:
        ready = wait_ready(p, t0)
        mem = pss_minus_guest(p.pid, MEM << 20)
    except BaseException:
        finish(p, t0, stamp)
        raise
    return finish(p, t0, stamp), ready, mem


def bulkhead_run():
    with tempfile.TemporaryFile() as err:
        p, t0, stamp = timed([HV, "run", "--kernel", KERNEL, "--initrd", INITRD, "--memory-mib", str(MEM),
                              "--cmdline", CMDLINE], env={**os.environ, "BULKHEAD_LOG": "info"}, stderr=err)
        r = measure(p, t0, stamp)
        err.seek(0)
        m = re.search(rb"mono_ns=(\d+)", re.sub(rb"\x1b\[[0-9;]*m", b"", err.read()))
        INTERNAL.append(round((int(m.group(1)) - t0) / 1e6, 2) if m else None)
    return r


def qemu_run():
    p, t0, stamp = timed(["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", str(MEM), "-smp", "1",
                          "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                          "-kernel", KERNEL, "-initrd", INITRD, "-append", CMDLINE])
    return measure(p, t0, stamp)


def firecracker_run(pci=True):
    d = tempfile.mkdtemp(prefix="bench-fc-")
    cfg = {"boot-source": {"kernel_image_path": os.path.abspath(KERNEL), "initrd_path": os.path.abspath(INITRD),
                           "boot_args": CMDLINE},
           "drives": [],
           "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM, "smt": False}}
    with open(f"{d}/vm.json", "w") as f:
        json.dump(cfg, f)
    log = f"{d}/firecracker.log"
    try:
        with open(log, "wb") as err:
            p, t0, stamp = timed([FC, "--no-api", "--config-file", f"{d}/vm.json", "--level", "Info",
                                  "--show-level", "--show-log-origin"] + (["--enable-pci"] if pci else []),
                                 stderr=err)
            try:
                return measure(p, t0, stamp)
            except NotReady as e:
                e.output += open(log, "rb").read()
                raise
    finally:
        for n in os.listdir(d):
            os.unlink(f"{d}/{n}")
        os.rmdir(d)


def p99(xs):
    xs = sorted(x for x in xs if not math.isnan(x))
    return xs[max(0, math.ceil(0.99 * len(xs)) - 1)] if xs else float("nan")


def main():
    global SHIM_PATH, FC, INTERNAL, T_START
    T_START = time.time()
    SHIM_PATH = build_shim()
    INTERNAL = []
    FC, fc_info = build_firecracker()
    fc_failure = None if FC else ("not built", fc_info, b"")
    runs = {"bulkhead": bulkhead_run, "qemu": qemu_run, "firecracker": firecracker_run,
            "firecracker_default": lambda: firecracker_run(pci=False)}
    rows = {k: [] for k in RUNS_OF}
    loads = {k: [] for k in RUNS_OF}
    for _ in range(RUNS):
        for k in RUNS_OF:
            if k.startswith("firecracker") and fc_failure:
                continue
            loads[k].append(load1())
            try:
                rows[k].append(runs[k]())
            except OSError as e:
                if not k.startswith("firecracker"):
                    raise
                fc_failure = ("did not start", str(e), b"")
                rows[k] = []
            except NotReady as e:
                if not k.startswith("firecracker"):
                    raise RuntimeError(f"{k}: {e.why}\n{e.output[-2000:].decode(errors='replace')}")
                fc_failure = ("did not boot" + (" (default, pci=off)" if k != "firecracker" else ""), e.why, e.output)
                rows[k] = []
    def stat(k, i, f):
        v = [r[i] for r in rows[k]]
        return f(v) if v and not all(math.isnan(x) for x in v) else float("nan")
    med = {k: [stat(k, i, statistics.median) for i in range(3)] for k in RUNS_OF}
    tail = {k: [stat(k, i, p99) for i in range(3)] for k in RUNS_OF}

    def cell(k, i, fmt, unit):
        m, t = med[k][i], tail[k][i]
        if math.isnan(m):
            return "n/a (not measured)"
        return f"{m:{fmt}} {unit} (p99 {t:{fmt}})"

    def ratio(k, i):
        b, q = med["bulkhead"][i], med[k][i]
        return "n/a" if math.isnan(b) or math.isnan(q) or q == 0 else f"{b / q:.2f}"

    print("## Hypervisor: Bulkhead vs QEMU microvm and Firecracker\n")
    print(f"Measured {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime(T_START))}. "
          f"Command: `make bench` → `scripts/bench_hypervisor.py` (alone: `BENCH_RUNS={RUNS} python3 "
          f"scripts/bench_hypervisor.py`), {RUNS} rounds of one run per peer, alternating, medians and p99 "
          f"(nearest rank: the maximum below 100 runs); same vmlinux, initramfs and kernel arguments, {MEM} MiB, "
          f"1 vCPU, KVM. (1) is timed identically for every peer: the monotonic time of the process's first "
          f"`ioctl(KVM_RUN)`, stamped by an LD_PRELOAD shim (`scripts/kvm_run_stamp.c`) in libc's ioctl "
          f"wrapper; no peer is paused or driven over a control socket.\n")
    print("(1) process start → the first guest instruction (the first `ioctl(KVM_RUN)`); (2) process start → "
          "`BULKHEAD-GUEST-READY` on the serial console; (3) VMM memory: PSS of the process minus the PSS of "
          "the guest-RAM mapping.\n")
    print("| metric | Bulkhead | QEMU microvm | Firecracker | Bulkhead / QEMU | Bulkhead / Firecracker | target |")
    print("|---|---|---|---|---|---|---|")
    # Short metric names: the chart labels them "<metric> — Bulkhead / <peer>" in 48 characters.
    metrics = [(0, "(1) start → 1st KVM_RUN", ".1f", "ms", "≤ 10 ms, ≤ 0.5× QEMU, ≤ 1.0× Firecracker"),
               (1, "(2) start → GUEST-READY", ".2f", "s", "≤ 1.0× QEMU, ≤ 1.0× Firecracker"),
               (2, "(3) VMM memory" + (f" at {SAMPLE_S:.0f} s" if QUICK else " at READY"),
                ".2f", "MiB", "≤ 5 MiB, ≤ 1.0× Firecracker")]
    for i, name, fmt, unit, target in metrics:
        if QUICK and i == 1:
            continue
        print(f"| {name} | " + " | ".join(cell(k, i, fmt, unit) for k in PEERS)
              + f" | {ratio('qemu', i)} | {ratio('firecracker', i)} | {target} |")
    print()
    if QUICK:
        print("(2) was not measured in this run (BENCH_QUICK=1): see docs/status.md.\n")
    fd = "firecracker_default"
    if rows[fd]:
        print(f"Firecracker as shipped (no `--enable-pci`: virtio-mmio only, and it appends `pci=off` to the "
              f"command line, so the guest skips PCI probing; same rounds): (1) {cell(fd, 0, '.1f', 'ms')}"
              + ("" if QUICK else f", (2) {cell(fd, 1, '.2f', 's')}") + f", (3) {cell(fd, 2, '.2f', 'MiB')}; "
              f"Bulkhead / it: {ratio(fd, 0)}" + ("" if QUICK else f", {ratio(fd, 1)}") + f", {ratio(fd, 2)}.\n")
    allload = [x for k in RUNS_OF for x in loads[k]]
    print(f"Load (1-minute average before each run): min {min(allload):.2f}, median {statistics.median(allload):.2f}, "
          f"max {max(allload):.2f}; per peer: " + json.dumps(loads) + "\n")
    print("Raw runs (start ms, ready s, MiB): " + json.dumps({k: [[round(x, 2) for x in r] for r in v] for k, v in rows.items()}))
    print(f"\nBulkhead's own log stamp of its first KVM_RUN (ms after start, cross-check of the shim): {INTERNAL}\n")
    print("Peers: QEMU `-M microvm -accel kvm -smp 1 -nodefaults -serial stdio -kernel -initrd -append`. "
          "Firecracker (table column): `firecracker --no-api --config-file vm.json --enable-pci` (boot-source with the "
          "same kernel, initramfs and boot_args, machine-config 1 vCPU, 128 MiB, no drives, no network; it loads "
          "the vmlinux through its PVH note, like Bulkhead). Build: "
          + "; ".join(l for l in (fc_info or "").split("\n") if l.strip()) + ".\n")
    if fc_failure:
        what, why, out = fc_failure
        print(f"**Firecracker not measured ({what}): {why}.** See docs/status.md (issue 18) for the analysis.")
        if out:
            lines = out.decode(errors="replace").splitlines()
            keep = [l for l in lines if re.search(r"error|fail|panic|exit|unsupported|KVM", l, re.I)][-8:] or lines[-8:]
            print("\nIts output (last relevant lines):\n\n```\n" + "\n".join(l[:200] for l in keep) + "\n```")
        print()


if __name__ == "__main__":
    main()
