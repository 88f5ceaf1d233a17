#!/usr/bin/env bash
# Build Basalt and start a local cluster on this machine.
#   scripts/up.sh [--nodes N] [--dir DIR] [--dead-timeout 30s]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release -p basalt-storaged -p basalt-cli
TARGET="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
DIR="basalt-dev"
ARGS=()
while (($#)); do
  case "$1" in
    --dir) DIR="$2"; shift 2;;
    *) ARGS+=("$1"); shift;;
  esac
done
export BASALT_STORAGED="$TARGET/release/storaged"
"$TARGET/release/basalt" --dir "$DIR" dev up "${ARGS[@]}"
echo
echo "The basalt CLI is $TARGET/release/basalt (use --dir $DIR)."
