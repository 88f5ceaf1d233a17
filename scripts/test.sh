#!/usr/bin/env bash
# Run every Basalt test: unit tests, the openraft storage suite, and the cluster tests that
# start real multi-node clusters (grouped so only one runs at a time on a small machine).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Build everything once, with one feature set: the binaries the cluster tests start
# (storaged) and every test. Building subsets with different features would rebuild RocksDB.
cargo build --workspace --all-targets
cargo nextest run --workspace --profile ci "$@"
# A short real fuzz run of the iSCSI parsers (the corpus replay above already ran on stable).
# Nightly only; its own target dir, so sanitizer builds never invalidate the main cache. New
# inputs go to a scratch corpus: the checked-in seeds are only read.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  for t in pdu login_keys scsi_cdb; do
    mkdir -p "$scratch/$t"
    (cd iscsi/fuzz && CARGO_TARGET_DIR=/var/tmp/basalt-fuzz-target \
      cargo +nightly fuzz run "$t" "$scratch/$t" "corpus/$t" -- -max_total_time=20 -rss_limit_mb=2048)
  done
else
  echo "################################################################" >&2
  echo "### SKIP: iSCSI fuzzing (no nightly toolchain: rustup toolchain install nightly)" >&2
  echo "################################################################" >&2
fi
