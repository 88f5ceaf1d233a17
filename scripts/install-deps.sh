#!/usr/bin/env bash
# Installs the Debian packages Basalt needs to build, run and test. Idempotent and quiet
# when everything is already there.
set -euo pipefail
PKGS=(build-essential pkg-config libclang-dev clang qemu-utils libnbd-bin fio
      libiscsi-bin qemu-block-extra  # iSCSI initiators for basalt-iscsi tests
      tgt  # the baseline target of `basalt bench iscsi` (it runs its own tgtd, not the service)
      awscli python3-boto3 s3cmd rclone)  # real S3 clients for the s3gw tests
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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
