#!/usr/bin/env bash
# Installs the system packages the build, the tests and the app need on a
# fresh Debian/Ubuntu machine (only what is missing; needs root or sudo).
# Rust itself comes from rustup (https://rustup.rs); this script does not install it.
set -euo pipefail

packages=(
  build-essential pkg-config            # C toolchain for -sys crates
  libegl1 libgl1 libgl1-mesa-dri        # OpenGL/EGL (Mesa llvmpipe renders without a GPU)
  mesa-vulkan-drivers libvulkan1        # Vulkan (lavapipe) for wgpu
  libxkbcommon0 libxkbcommon-x11-0 libx11-6 libxcursor1 libxrandr2 libxi6 libwayland-client0
  xvfb xdotool imagemagick x11-apps     # tests/xvfb_screenshot.sh: a real window under Xvfb
  fonts-dejavu-core fonts-wqy-microhei  # Latin + CJK (Chinese prompts) in the UI
)

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: not a Debian/Ubuntu system; install the equivalents of: ${packages[*]}" >&2
  exit 0
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
