#!/bin/sh
# Encodes a guest script (stdin) as the value of the kernel argument bulkhead.run=
# (see guest/README.md): bytes other than [A-Za-z0-9_./,:=+-] become \0ooo escapes.
#   qemu ... -append "console=ttyS0 ... bulkhead.run=$(guest/encode-run.sh <checks.sh)"
LC_ALL=C od -An -v -tu1 | tr -s ' \n' '\n\n' | awk '
  NF {
    c = $1 + 0
    if ((c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) ||
        c == 95 || c == 46 || c == 47 || c == 44 || c == 58 || c == 61 || c == 43 || c == 45)
      printf "%c", c
    else
      printf "\\0%03o", c
  }'
