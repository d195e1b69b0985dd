#!/usr/bin/env python3
"""Attach benchmark with real guests: `bulkhead up --hosts 1` with the real host backend, one
customer instance booting the test guest under bulkhead-hypervisor, then N AttachVolume /
DetachVolume cycles of an encrypted volume on that running instance.

AttachVolume returns when the guest's virtio driver has bound the hot-plugged disk (the
hypervisor waits for DRIVER_OK; the disk is registered right after), so its latency is
customer call → control plane → KMS → controller → new block card → hot-plug → guest driver up.
DetachVolume returns when the guest has released the disk and the card has zeroized the key.

When `bulkhead-storage` is built, `bulkhead up` starts a storage node (file engine) and every
volume is a network volume (issue 15): the card the controller starts is then the node's
NBD-over-TLS client, so AttachVolume also includes the node's Grant (fencing any earlier holder)
and the card's TLS connection to the node. The section says which kind was measured, checked
on the node's data directory, not assumed.

Prints a markdown section on stdout. Run from the repository root after `make build` and
`make guest`. ATTACH_CYCLES (default 20) sets N.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release")
CYCLES = int(os.environ.get("ATTACH_CYCLES", "20"))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    if not os.path.exists("target/guest/vmlinux") or not os.path.exists("/dev/kvm"):
        print("## Attach with real guests\n\nNot measured: no /dev/kvm or no test guest (make guest).\n")
        return
    load0 = open("/proc/loadavg").read().split()[0]
    d = tempfile.mkdtemp()
    up = subprocess.Popen([f"{BIN}/bulkhead", "up", "--hosts", "1", "--backend", "auto", "--dir", d],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if os.path.exists(f"{d}/cluster.json") and os.path.getsize(f"{d}/cluster.json") > 0:
                break
            time.sleep(0.1)
        ctl = json.load(open(f"{d}/cluster.json"))["control"]
        subprocess.run([f"{BIN}/bulkhead-control", "create-customer", "--config", f"{d}/control.toml",
                        "--tenant", "bench", "--out", f"{d}/bench.json"], check=True, stdout=subprocess.DEVNULL)

        def call(action, body):
            t0 = time.monotonic()
            r = subprocess.run([f"{BIN}/bulkhead-control", "call", "--endpoint", ctl, "--ca", f"{d}/ca/ca.pem",
                                "--credentials", f"{d}/bench.json", action, json.dumps(body)],
                               capture_output=True, text=True)
            dt = time.monotonic() - t0
            if r.returncode != 0:
                raise SystemExit(f"{action} failed: {r.stdout} {r.stderr}")
            return json.loads(r.stdout), dt

        idle = "while :; do read -r x </proc/uptime; done"
        t0 = time.monotonic()
        out, run_s = call("RunInstances", {"ImageId": "test-guest", "VcpuCount": 1, "UserData": idle})
        inst = out["Instances"][0]["InstanceId"]
        while True:
            con, _ = call("GetConsoleOutput", {"InstanceId": inst})
            if "BULKHEAD-GUEST-READY" in con["Output"]:
                break
            if time.monotonic() - t0 > 900:
                raise SystemExit("guest did not boot")
            time.sleep(0.5)
        ready_s = time.monotonic() - t0
        vol, _ = call("CreateVolume", {"SizeGiB": 1})
        vid = vol["VolumeId"]
        # The file engine keeps the volume's ciphertext in <node state>/data/<volume>.raw.
        network = os.path.exists(f"{d}/storage-1/data/{vid}.raw")
        kind = ("network volume (file-engine storage node, NBD over TLS)" if network
                else "host-local volume (no storage node: bulkhead-storage not built)")
        print(f"bench_attach: measuring a {kind}", file=sys.stderr)
        attach, detach = [], []
        for _ in range(CYCLES):
            _, a = call("AttachVolume", {"VolumeId": vid, "InstanceId": inst})
            _, b = call("DetachVolume", {"VolumeId": vid})
            attach.append(a * 1000)
            detach.append(b * 1000)
        call("TerminateInstances", {"InstanceIds": [inst]})
        # The control plane's own per-step times (operators' metrics, operator certificate).
        steps = {}
        op = json.load(open(f"{d}/cluster.json")).get("operator", "")
        if op:
            m = subprocess.run(["curl", "-sS", "--cacert", f"{d}/ca/ca.pem", "--cert", f"{d}/ca/operator.pem",
                                "--key", f"{d}/ca/operator.key", f"https://{op}/v1/operator/metrics"],
                               capture_output=True, text=True)
            for line in m.stdout.splitlines():
                for metric in ("bulkhead_workflow_step_seconds_sum", "bulkhead_workflow_step_seconds_count",
                               "bulkhead_workflow_step_max_seconds"):
                    if line.startswith(metric + "{"):
                        labels, value = line[len(metric) + 1:].split("} ")
                        kv = dict(x.split("=", 1) for x in labels.split(","))
                        key = (kv["kind"].strip('"'), kv["step"].strip('"'))
                        steps.setdefault(key, {})[metric.rsplit("_", 1)[-1]] = float(value)
        # The controller's split of its Plug step (log line "attach phases").
        phases = {"spawn_ms": [], "key_ms": [], "plug_ms": []}
        for log in sorted(os.listdir(f"{d}/logs")) if os.path.isdir(f"{d}/logs") else []:
            if not log.startswith("host-"):
                continue
            for l in open(f"{d}/logs/{log}", errors="replace"):
                if "attach phases" in l:
                    for k in phases:
                        m = re.search(k + r"=([0-9.]+)", l)
                        if m:
                            phases[k].append(float(m.group(1)))
        # Each attach of a network volume is one card opening the export on the node.
        opens = 0
        if network and os.path.exists(f"{d}/logs/storage-1.log"):
            opens = sum(1 for l in open(f"{d}/logs/storage-1.log", errors="replace")
                        if "nbd export opened" in l and vid in l)
    finally:
        up.terminate()
        up.wait()
        subprocess.run(["rm", "-rf", d])

    print("## Attach with real guests\n")
    print(f"Volume: **{kind}**, 1 GiB, encrypted (sealed key from the KMS)"
          + (f"; the storage node logged {opens} NBD opens of it by the host's card for {CYCLES} attaches" if network else "")
          + f". 1-min load average {load0} at start, {open('/proc/loadavg').read().split()[0]} at end "
          f"({os.cpu_count()} cores).\n")
    print("One host (`bulkhead up --hosts 1`, real backend; attested by its own swtpm and in its own "
          "network namespace when swtpm and root are available), one 1-vCPU guest booted under "
          "bulkhead-hypervisor; each figure is one signed customer call through the CLI "
          "(process start included), end to end over mTLS; every AttachVolume includes the "
          "KMS nonce → TPM quote → verification round. No peer in this run: QEMU's "
          "device_add of a vhost-user-blk-pci disk into the same guest is not scripted yet.\n")
    print("| metric | p50 | p99 (max of N) | N |")
    print("|---|---|---|---|")
    print(f"| RunInstances call (guest created and started) | {run_s*1000:.0f} ms | — | 1 |")
    print(f"| RunInstances → BULKHEAD-GUEST-READY on the console API | {ready_s:.1f} s | — | 1 |")
    short = "network volume" if network else "local volume"
    print(f"| AttachVolume ({short}) → guest driver bound the hot-plugged disk | {pct(attach, 50):.0f} ms | {max(attach):.0f} ms | {CYCLES} |")
    print(f"| DetachVolume ({short}) → guest released the disk, card zeroized the key | {pct(detach, 50):.0f} ms | {max(detach):.0f} ms | {CYCLES} |")
    print()
    if steps:
        print("Where the time goes, as the control plane measured each workflow step "
              "(`bulkhead_workflow_step_seconds` from `GET /v1/operator/metrics`; mean and max over "
              "the successful runs; the CLI's own process start and TLS set-up are outside these):\n")
        print("| workflow | step | mean | max | runs |")
        print("|---|---|---|---|---|")
        for (kind, step), v in sorted(steps.items(), key=lambda kv: (kv[0][0], -kv[1].get("sum", 0))):
            if kind not in ("attach", "detach"):
                continue
            n = v.get("count", 0) or 1
            print(f"| {kind} | {step} | {v.get('sum', 0) / n * 1000:.0f} ms | {v.get('seconds', 0) * 1000:.0f} ms | {int(v.get('count', 0))} |")
        print()
    else:
        print("Per-step times: not measured (the operator API did not answer).\n")
    if all(phases.values()):
        print("The host's `Plug`, as the controller split it (its \"attach phases\" log line; p50 of the attaches):\n")
        print("| phase | what | p50 | max |")
        print("|---|---|---|---|")
        what = {"spawn_ms": "launcher starts the block card until its control socket answers",
                "key_ms": "card opens the sealed key (and, for a network volume, its NBD/TLS connection)",
                "plug_ms": "hypervisor hot-plugs the vhost-user disk until the guest's driver is bound"}
        for k, v in phases.items():
            print(f"| {k[:-3]} | {what[k]} | {pct(v, 50):.0f} ms | {max(v):.0f} ms |")
        print()


if __name__ == "__main__":
    sys.exit(main())
