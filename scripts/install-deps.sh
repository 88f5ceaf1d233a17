#!/usr/bin/env bash
# Installs the Debian packages Basalt needs to build, run and test. Idempotent and quiet
# when everything is already there.
set -euo pipefail
PKGS=(build-essential pkg-config libclang-dev clang qemu-utils libnbd-bin fio
      libiscsi-bin qemu-block-extra  # iSCSI initiators for basalt-iscsi tests
      tgt  # the baseline target of `basalt bench iscsi` (it runs its own tgtd, not the service)
      awscli python3-boto3 s3cmd rclone)  # real S3 clients for the s3gw tests
missing_pkgs() {
  missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}
# Installing one package can remove another: qemu-block-extra must match qemu-utils' version,
# so on a machine whose qemu-utils came from elsewhere (backports) apt replaces it by removing
# it. Hence a second pass for what the first removed, and a loud failure if anything is
# still missing after it.
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
updated=0
for pass in 1 2; do
  missing_pkgs
  ((${#missing[@]})) || break
  echo "installing: ${missing[*]}" >&2
  if [ "$updated" = 0 ]; then $SUDO apt-get update -qq; updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done
missing_pkgs
if ((${#missing[@]})); then
  echo "could not install: ${missing[*]} (apt removed them again; see /var/log/apt/history.log)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (rustup) first" >&2; exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest >/dev/null
fi
# cargo-fuzz drives the nightly fuzz run in scripts/test.sh; useless without nightly.
if rustup run nightly rustc --version >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz >/dev/null
fi
