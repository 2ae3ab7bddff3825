#!/usr/bin/env bash
# The project's one test command (README): system packages, then every test
# of the workspace in the release profile (tensor code is ~50x slower
# unoptimised), the CUDA build's library tests that need no GPU, then the
# Linux packages: the .deb and the AppImage are built, the .deb is installed
# into a clean folder and the app started from it under Xvfb
# (tests/package_linux.sh). Arguments go to `cargo test`; with arguments
# only those tests run (no packaging).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --workspace "$@"
if [ $# -eq 0 ]; then
    # The CUDA build's library tests that need no GPU (this machine has none):
    # the cuBLAS layout planning, and start-up without NVIDIA's driver.
    cargo test --release -p zimage-engine --features cuda --lib -- device:: cublas::
    (cd packaging/appimage-runtime && CARGO_TARGET_DIR="$HOME/.cache/zimage/target-pkg" cargo test --release --locked)
    tests/package_linux.sh "${ZIMAGE_PACKAGE_TEST_OUT:-$(mktemp -d)}"
fi
