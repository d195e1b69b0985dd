#!/usr/bin/env python3
"""Independent check of the block card's on-disk format: AES-256-XTS, tweak = little-endian
sector number (dm-crypt aes-xts-plain64). Uses the `cryptography` package (OpenSSL), not the card's
code. Usage: xts_decrypt.py KEYHEX IMAGE SECTOR_BYTES OUT

(This host has no device-mapper, so `cryptsetup open --type plain -c aes-xts-plain64` cannot be used
in tests; this script is the same transform.)"""
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

key = bytes.fromhex(sys.argv[1])
data = open(sys.argv[2], "rb").read()
sector = int(sys.argv[3])
out = bytearray()
for i in range(0, len(data) - len(data) % sector, sector):
    tweak = (i // sector).to_bytes(16, "little")
    d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
    out += d.update(data[i:i + sector]) + d.finalize()
open(sys.argv[4], "wb").write(out)
