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
