#!/usr/bin/env python3
"""Hypervisor benchmark: Bulkhead vs QEMU microvm on the same kernel, initramfs and memory,
in the same run. Writes a markdown section to stdout.

(1) VMM start-up: process start to the first guest instruction. Bulkhead logs the CLOCK_MONOTONIC
    time at which vCPU 0 first enters KVM_RUN; QEMU is started with -S and a QMP socket, and the
    time at which QMP accepts `cont` (the VM is built and the next instruction is the guest's) is used.
(2) Process start to BULKHEAD-GUEST-READY on the serial console.
(3) VMM memory: PSS of the process minus the PSS of the guest-RAM mapping, sampled at READY.
"""
import json, os, re, socket, statistics, subprocess, sys, tempfile, time

GUEST = os.environ.get("BULKHEAD_GUEST_DIR", "target/guest")
KERNEL, INITRD = f"{GUEST}/vmlinux", f"{GUEST}/initramfs.cpio"
HV = os.environ.get("BULKHEAD_HV", "target/release/bulkhead-hypervisor")
ARGS = open("guest/cmdline").read().strip()
MEM = 128
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
# BENCH_QUICK=1: skip (2) and sample (3) SAMPLE_S seconds after start instead of at READY.
QUICK = os.environ.get("BENCH_QUICK") == "1"
SAMPLE_S = float(os.environ.get("BENCH_SAMPLE_S", "10"))
SCRIPT = "sleep\\0040600"  # "sleep 600", octal-escaped (guest/README.md): keeps the guest up for the memory sample


def mono():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


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
        time.sleep(0.02)
    raise RuntimeError("guest never became ready")


def bulkhead_run():
    t0 = mono()
    p = subprocess.Popen([HV, "run", "--kernel", KERNEL, "--initrd", INITRD, "--memory-mib", str(MEM),
                          "--cmdline", f"{ARGS} bulkhead.run={SCRIPT}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "BULKHEAD_LOG": "info"})
    ready = wait_ready(p, t0)
    mem = pss_minus_guest(p.pid, MEM << 20)
    p.kill(); _, err = p.communicate()
    err = re.sub(rb"\x1b\[[0-9;]*m", b"", err)
    m = re.search(rb"mono_ns=(\d+)", err)
    start = (int(m.group(1)) - t0) / 1e6 if m else float("nan")
    return start, ready, mem


def qemu_run():
    d = tempfile.mkdtemp()
    qmp = f"{d}/qmp.sock"
    t0 = mono()
    p = subprocess.Popen(["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", str(MEM), "-nodefaults",
                          "-no-user-config", "-nographic", "-serial", "stdio", "-S", "-qmp", f"unix:{qmp},server=on,wait=off",
                          "-kernel", KERNEL, "-initrd", INITRD, "-append", f"{ARGS} bulkhead.run={SCRIPT}"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    while not os.path.exists(qmp):
        time.sleep(0.0005)
    s = socket.socket(socket.AF_UNIX)
    while True:
        try:
            s.connect(qmp); break
        except OSError:
            time.sleep(0.0005)
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
    f.write(b'{"execute":"cont"}\n'); f.flush(); f.readline()
    start = (mono() - t0) / 1e6
    ready = wait_ready(p, t0)
    mem = pss_minus_guest(p.pid, MEM << 20)
    p.kill(); p.communicate()
    return start, ready, mem


def main():
    rows = {"bulkhead": [], "qemu": []}
    for _ in range(RUNS):
        rows["bulkhead"].append(bulkhead_run())
        rows["qemu"].append(qemu_run())
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in rows.items()}
    b, q = med["bulkhead"], med["qemu"]
    print("## Hypervisor: Bulkhead vs QEMU microvm\n")
    print(f"Command: `make bench` → `scripts/bench_hypervisor.py`, {RUNS} alternating runs each, medians; "
          f"same vmlinux/initramfs, {MEM} MiB, 1 vCPU, `-accel kvm`.\n")
    print("| metric | Bulkhead | QEMU microvm | ratio (Bulkhead/QEMU) | target |")
    print("|---|---|---|---|---|")
    print(f"| (1) process start → first guest instruction | {b[0]:.1f} ms | {q[0]:.1f} ms | {b[0]/q[0]:.2f} | ≤ 10 ms, ≤ 0.5× |")
    if not QUICK:
        print(f"| (2) process start → BULKHEAD-GUEST-READY | {b[1]:.2f} s | {q[1]:.2f} s | {b[1]/q[1]:.2f} | ≤ 1.0× |")
    when = f"{SAMPLE_S:.0f} s after start (quick mode)" if QUICK else "at READY"
    print(f"| (3) VMM memory (PSS minus guest RAM, {when}) | {b[2]:.2f} MiB | {q[2]:.2f} MiB | {b[2]/q[2]:.2f} | ≤ 5 MiB |")
    if QUICK:
        print("\n(2) was not measured in this run (BENCH_QUICK=1): see docs/status.md.")
    print()
    print("Raw runs (start ms, ready s, MiB): " + json.dumps({k: [[round(x, 2) for x in r] for r in v] for k, v in rows.items()}))
    print()


if __name__ == "__main__":
    main()
