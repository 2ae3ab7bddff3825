#!/usr/bin/env bash
# The project's one test command (README): system packages, then every test
# of the workspace in the release profile (tensor code is ~50x slower unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --workspace "$@"
