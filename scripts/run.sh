#!/usr/bin/env bash
# Runs Z-Image Studio (the built-in demo model when no real weights are configured).
# Extra arguments go to the app, e.g. `scripts/run.sh --turbo /path/to/Z-Image-Turbo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo run --release -p zimage-studio -- "$@"
