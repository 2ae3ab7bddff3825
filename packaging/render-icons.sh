#!/usr/bin/env bash
# Renders packaging/icons/zimage-studio.svg to the files the packages ship:
#   icons/NxN.png (32, 64, 128, 256, 512)  hicolor theme icons (.deb, AppImage), and
#                                           the PNGs cargo-packager turns into the macOS .icns
#   icons/zimage-studio.ico                 Windows installers (16..256 px in one file)
# The outputs are committed, so building packages needs neither this script nor its
# tools; run it after editing the SVG.
#
# Usage: packaging/render-icons.sh
# Needs: rsvg-convert (apt install librsvg2-bin), convert (apt install imagemagick).
set -euo pipefail
DIR=$(cd "$(dirname "$0")/icons" && pwd)
SVG=$DIR/zimage-studio.svg
command -v rsvg-convert >/dev/null || { echo "rsvg-convert not found: apt install librsvg2-bin" >&2; exit 1; }
command -v convert >/dev/null || { echo "convert not found: apt install imagemagick" >&2; exit 1; }

for s in 32 64 128 256 512; do
    rsvg-convert -w "$s" -h "$s" "$SVG" -o "$DIR/${s}x${s}.png"
    echo "$DIR/${s}x${s}.png"
done

# The .ico gets the small sizes Windows asks for too (taskbar 16/24, Explorer 48),
# each rendered from the SVG rather than scaled from a PNG.
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for s in 16 24 32 48 64 128 256; do
    rsvg-convert -w "$s" -h "$s" "$SVG" -o "$TMP/$s.png"
done
convert "$TMP"/{16,24,32,48,64,128,256}.png "$DIR/zimage-studio.ico"
echo "$DIR/zimage-studio.ico"
