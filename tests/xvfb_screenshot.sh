#!/usr/bin/env bash
# Starts the real zimage-studio window under Xvfb on the tiny fixture models,
# types a prompt with xdotool, waits for the live image, refines it with Base
# (Ctrl+Enter), opens the help overlay, and saves screenshots:
#
#   $OUT/1-typing.png   shortly after typing (step previews / first image)
#   $OUT/2-live.png     the finished live image
#   $OUT/3-compare.png  Turbo vs Base after the refine
#   $OUT/4-help.png     the shortcut overlay
#   $OUT/5-wipe.png, 6-difference.png  other compare modes
#   $OUT/7-variations.png  the variations grid (one kept, one rejected)
#   $OUT/8-settings.png the settings window (device, memory, models, LoRAs)
#   $OUT/0-welcome.png  a first start (no settings yet): the welcome screen
#   $OUT/metrics.json   latency + frame times measured inside the app
#
# Usage: tests/xvfb_screenshot.sh [OUT_DIR]   (default /tmp/zimage-xvfb)
# Env:   ZIMAGE_STUDIO_BIN=path/to/zimage-studio to skip the cargo build;
#        ZIMAGE_XVFB_SIZE=256 image size for the tiny models;
#        ZIMAGE_XVFB_MODELS=demo to use the built-in demo pair (128², a prompt
#        in its grammar, Base 30 steps CFG 4) instead of the tiny fixtures;
#        ZIMAGE_XVFB_KEYS=N to time N single keys typed with the engine idle.
# Installs what it needs with apt-get when missing (xvfb, xdotool, imagemagick,
# Mesa GL/Vulkan). Builds the release binary if needed (honours CARGO_TARGET_DIR).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/zimage-xvfb}
MODELS=${ZIMAGE_XVFB_MODELS:-tiny}
if [ "$MODELS" = demo ]; then
    SIZE=${ZIMAGE_XVFB_SIZE:-128}
    TURBO=demo-turbo; BASE=demo-base; BASE_STEPS=30; BASE_GUIDANCE=4.0; STEPS_CHOSEN=false  # the models' own 4 / 30
    PROMPT="a large red circle in the center and a small yellow square at the top left on a blue background"
else
    SIZE=${ZIMAGE_XVFB_SIZE:-256}
    TURBO="$ROOT/tests/fixtures/tiny-turbo"; BASE="$ROOT/tests/fixtures/tiny-base"; BASE_STEPS=10; BASE_GUIDANCE=0.0; STEPS_CHOSEN=true
    PROMPT="a lighthouse on a cliff at dusk"
fi
mkdir -p "$OUT"
rm -f "$OUT"/*.png "$OUT"/metrics.json

need=()
command -v Xvfb >/dev/null || need+=(xvfb)
command -v xdotool >/dev/null || need+=(xdotool)
command -v import >/dev/null || need+=(imagemagick)
dpkg -s libvulkan1 mesa-vulkan-drivers libegl-mesa0 libgl1-mesa-dri >/dev/null 2>&1 || need+=(libvulkan1 mesa-vulkan-drivers libegl-mesa0 libgl1-mesa-dri)
dpkg -s libxkbcommon-x11-0 libxcursor1 libxi6 libxrandr2 >/dev/null 2>&1 || need+=(libxkbcommon-x11-0 libxcursor1 libxi6 libxrandr2)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The binary: $ZIMAGE_STUDIO_BIN, else built (or reused) in $CARGO_TARGET_DIR.
BIN=${ZIMAGE_STUDIO_BIN:-}
if [ -z "$BIN" ]; then
    (cd "$ROOT" && cargo build --release -p zimage-studio)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/zimage-studio
fi

DATA=$(mktemp -d)
RUNTIME=$(mktemp -d)
cat > "$DATA/settings.json" <<EOF
{"welcome_done": true, "device": "cpu", "width": $SIZE, "height": $SIZE, "size_chosen": true, "steps_chosen": $STEPS_CHOSEN, "base_steps": $BASE_STEPS, "base_guidance": $BASE_GUIDANCE, "output_dir": "$OUT/saved"}
EOF

DISPLAY_NUM=:$(( 90 + RANDOM % 9 ))
Xvfb "$DISPLAY_NUM" -screen 0 1280x800x24 -nolisten tcp -noreset >"$OUT/xvfb.log" 2>&1 &
XVFB_PID=$!
APP_PID=""
cleanup() {
    [ -n "$APP_PID" ] && kill "$APP_PID" 2>/dev/null || true
    kill "$XVFB_PID" 2>/dev/null || true
    rm -rf "$DATA" "$RUNTIME"
}
trap cleanup EXIT
export DISPLAY=$DISPLAY_NUM XDG_RUNTIME_DIR=$RUNTIME
sleep 1

ZIMAGE_STUDIO_METRICS="$OUT/metrics.json" "$BIN" \
    --turbo "$TURBO" --base "$BASE" \
    --data-dir "$DATA" >"$OUT/app.log" 2>&1 &
APP_PID=$!

WIN=$(timeout 60 xdotool search --sync --name "Z-Image Studio" | head -1)
echo "window $WIN"
sleep 3   # first frames + model load (tiny models: milliseconds)
xdotool windowfocus --sync "$WIN"

metric() { python3 -c "import json,sys; d=json.load(open('$OUT/metrics.json')); v=d.get('$1'); print('' if v is None else v)" 2>/dev/null || true; }
wait_metric() { # name, timeout seconds
    for _ in $(seq 1 $(( $2 * 10 ))); do
        [ -n "$(metric "$1")" ] && return 0
        sleep 0.1
    done
    echo "timed out waiting for $1"; return 1
}

# The prompt box has focus at start: just type.
xdotool type --delay 40 "$PROMPT"
sleep 0.3
import -window root "$OUT/1-typing.png"
wait_metric final_image_ms 60
sleep 1.5
import -window root "$OUT/2-live.png"

# ZIMAGE_XVFB_KEYS=N: N more single keys (a space at the end of the prompt),
# each with the engine idle, printing the live image's latency after each.
for k in $(seq 1 "${ZIMAGE_XVFB_KEYS:-0}"); do
    xdotool key End space
    sleep 2.5
    echo "single key $k: final image $(metric final_image_ms) ms after the key, live $(metric live_status)"
done

# Refine with Base: wait for its image (the typing may have left several
# live images in the history, as many as finished before the next key).
before=$(metric history)
xdotool key ctrl+Return
for _ in $(seq 1 300); do
    now=$(metric history)
    [ "${now:-0}" -ge $(( ${before:-0} + 1 )) ] && break
    sleep 0.1
done
sleep 1.5
import -window root "$OUT/3-compare.png"

xdotool key Escape F1
sleep 1
import -window root "$OUT/4-help.png"
xdotool key Escape
sleep 0.3
xdotool key m        # side by side -> wipe
sleep 0.8
import -window root "$OUT/5-wipe.png"
xdotool key m m      # -> flicker -> difference
sleep 0.8
import -window root "$OUT/6-difference.png"
# 8 variations: wait for all of them.
before=$(metric history)
xdotool key ctrl+g
for _ in $(seq 1 600); do
    now=$(metric history)
    [ "${now:-0}" -ge $(( ${before:-0} + 8 )) ] && break
    sleep 0.1
done
xdotool key k Right x
sleep 1
import -window root "$OUT/7-variations.png"
sleep 1   # let the metrics file catch up
cat "$OUT/metrics.json"; echo
xdotool key ctrl+comma
sleep 1.5
import -window root "$OUT/8-settings.png"
kill "$APP_PID" 2>/dev/null || true
wait "$APP_PID" 2>/dev/null || true

# A first start: no settings, so the welcome screen shows.
FRESH=$(mktemp -d)
"$BIN" --data-dir "$FRESH" >"$OUT/app-first-run.log" 2>&1 &
APP_PID=$!
timeout 60 xdotool search --sync --name "Z-Image Studio" >/dev/null
sleep 3
import -window root "$OUT/0-welcome.png"
kill "$APP_PID" 2>/dev/null || true
rm -rf "$FRESH"
echo "screenshots in $OUT"
