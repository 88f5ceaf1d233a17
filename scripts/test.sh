#!/usr/bin/env bash
# Run every Basalt test: unit tests, the openraft storage suite, and the cluster tests that
# start real multi-node clusters (grouped so only one runs at a time on a small machine).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Binaries the cluster tests start (storaged) and drive (basalt).
cargo build -p basalt-storaged -p basalt-cli
cargo nextest run --workspace --profile ci "$@"
