#!/usr/bin/env bash
# Installs the system packages Bulkhead builds and tests with (Debian 12).
# Idempotent: does nothing when everything is present.
set -euo pipefail
PKGS=(linux-source-6.1 busybox-static build-essential bc flex bison libelf-dev libssl-dev
      cpio lz4 xz-utils qemu-system-x86 qemu-utils python3-cryptography swtpm swtpm-tools
      tpm2-tools libtss2-dev pkg-config clang iproute2 curl postgresql softhsm2
      tcpdump iputils-ping iperf3 wireguard-go wireguard-tools
      ceph-mon ceph-mgr ceph-osd ceph-common qemu-block-extra cryptsetup-bin
      ovmf systemd-boot-efi libseccomp-dev e2fsprogs)
# ceph-*: the single-node Ceph cluster scripts/with-ceph.sh starts for the RBD tests (plain
# processes; no systemd unit is enabled or started); qemu-block-extra: QEMU's rbd driver;
# cryptsetup-bin: the LUKS headers of the benchmarks' qemu-storage-daemon peer.
# ovmf, systemd-boot-efi: the sealed host image (UEFI firmware under QEMU; the UKI stub).
# e2fsprogs: e2fsck/debugfs check the file system a test guest left on its decrypted volume.
# libseccomp-dev: Firecracker's seccompiler links it (the benchmark peer, scripts/build-firecracker.sh).
# The tests' independent AES-XTS decryptor uses Python's `cryptography`, and the EC2 Query tests
# run botocore, boto3 and the aws CLI (unmodified from PyPI); the python3 on PATH may not
# be Debian's (e.g. pyenv), so make sure that interpreter has them.
python_deps() {
  local mod
  for mod in cryptography botocore boto3 awscli; do
    python3 -c "import $mod" 2>/dev/null && continue
    echo "install-deps: installing python $mod for $(command -v python3)"
    python3 -m pip install --quiet "$mod" 2>/dev/null \
      || python3 -m pip install --quiet --break-system-packages "$mod"
  done
}
trap python_deps EXIT
missing=()
for p in "${PKGS[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
echo "install-deps: installing ${missing[*]}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
