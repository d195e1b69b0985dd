#!/usr/bin/env python3
"""An independent decryptor for the net card's wire format (crates/netcard/README.md).

Reads a pcap taken on a host link (`tcpdump -w`), finds every net-card datagram in it and opens
it with AES-256-GCM under the per-direction key derived from the VPC epoch key, using only the
Python `cryptography` package: no Bulkhead code. Auditors use it to check that what crosses the
host network is ciphertext that opens to the guests' frames only with the VPC's key; tests use it
to prove the same.

    scripts/vpc-decrypt.py --pcap F --key VPC:EPOCH:HEX64 [--key ...] --cards 1,2,3 \
        [--marker TEXT] [--attack-dir DIR]

Prints one JSON object: datagrams found, opened, failed (no key opened them), whether the marker
was found in an opened frame and whether it appears anywhere in the raw capture, and whether
any (vpc, epoch, sender, receiver, sequence) was seen twice. With --attack-dir, writes the last
opened datagram verbatim (`replay`), with one sequence bit flipped (`flip`) and cut to 30 bytes
(`trunc`), plus `meta.json` with its source and destination address and port.
"""
import argparse
import json
import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABEL = b"bulkhead-netcard v1"
HEADER = 24
TAG = 16


def direction_key(master, vpc, epoch, sender, receiver):
    info = LABEL + struct.pack(">IIII", vpc, epoch, sender, receiver)
    return AESGCM(HKDF(hashes.SHA256(), 32, LABEL, info).derive(master))


def udp_datagrams(raw):
    """Yields (src_ip, src_port, dst_ip, dst_port, payload) of every IPv4/UDP packet."""
    magic = struct.unpack("<I", raw[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", raw[20:24])[0]
    # Ethernet, Linux cooked v1 and v2 (`-i any`).
    l2 = {1: (14, 12), 113: (16, 14), 276: (20, 0)}
    if linktype not in l2:
        sys.exit(f"unsupported pcap link type {linktype}")
    hdr_len, proto_off = l2[linktype]
    off = 24
    while off + 16 <= len(raw):
        _, _, incl, _ = struct.unpack(endian + "IIII", raw[off:off + 16])
        off += 16
        pkt = raw[off:off + incl]
        off += incl
        if pkt[proto_off:proto_off + 2] != b"\x08\x00" or len(pkt) < hdr_len + 28:
            continue
        ip = pkt[hdr_len:]
        ihl = (ip[0] & 15) * 4
        if ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        udp = ip[ihl:]
        sport, dport, ulen = struct.unpack(">HHH", udp[:6])
        yield ip[12:16], sport, ip[16:20], dport, udp[8:ulen]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pcap", required=True)
    ap.add_argument("--key", action="append", default=[], help="VPC:EPOCH:HEX64")
    ap.add_argument("--cards", required=True, help="card ids that may be receivers")
    ap.add_argument("--marker", default="")
    ap.add_argument("--attack-dir")
    a = ap.parse_args()
    keys = {}
    for k in a.key:
        vpc, epoch, hexkey = k.split(":")
        master = bytes.fromhex(hexkey)
        assert len(master) == 32, "an epoch key is 32 bytes"
        keys[(int(vpc), int(epoch))] = master
    cards = [int(c) for c in a.cards.split(",") if c]
    marker = a.marker.encode()
    raw = open(a.pcap, "rb").read()
    found = opened = failed = 0
    marker_found = False
    seen, repeats, last = set(), 0, None
    for src, sport, dst, dport, d in udp_datagrams(raw):
        if len(d) < HEADER + TAG or d[0] != 1 or d[1] != 1:
            continue
        found += 1
        _, _, _, vpc, epoch, sender, seq = struct.unpack(">BBHIIIQ", d[:HEADER])
        master = keys.get((vpc, epoch))
        pt = None
        for receiver in cards:
            if master is None or receiver == sender:
                continue
            try:
                pt = direction_key(master, vpc, epoch, sender, receiver).decrypt(
                    struct.pack(">IQ", epoch, seq), d[HEADER:], d[:HEADER])
            except InvalidTag:
                continue
            ident = (vpc, epoch, sender, receiver, seq)
            repeats += ident in seen
            seen.add(ident)
            break
        if pt is None:
            failed += 1
            continue
        opened += 1
        marker_found = marker_found or (bool(marker) and marker in pt)
        last = (src, sport, dst, dport, d)
    if a.attack_dir and last is not None:
        src, sport, dst, dport, d = last
        flip = bytearray(d)
        flip[18] ^= 0x10
        for name, body in (("replay", d), ("flip", bytes(flip)), ("trunc", d[:30])):
            open(f"{a.attack_dir}/{name}", "wb").write(body)
        meta = {"src": ".".join(map(str, src)), "sport": sport,
                "dst": ".".join(map(str, dst)), "dport": dport}
        open(f"{a.attack_dir}/meta.json", "w").write(json.dumps(meta))
    print(json.dumps({
        "datagrams": found, "opened": opened, "failed": failed,
        "marker_found": marker_found,
        "plaintext_marker_in_capture": bool(marker) and marker in raw,
        "repeated_nonces": repeats,
    }))


if __name__ == "__main__":
    main()
