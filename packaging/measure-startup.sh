#!/usr/bin/env bash
# Measures the start time of the packaged app under Xvfb: the time from exec to the
# window being mapped (eframe maps it after the first frame is painted), polled with
# xdotool every ~10 ms. Runs, RUNS times each:
#   deb-cold        the app extracted from the .deb, page cache dropped before each start
#   deb-warm        the same, files already in the page cache
#   appimage-first  the AppImage with an empty XDG_CACHE_HOME (extraction included), cold cache
#   appimage-later  the AppImage again (already extracted), cold cache
#   appimage-warm   the AppImage again, files in the page cache
#   help-first/-later  `AppImage --help` (no window: the runtime's own cost), fresh cache
#                   then extracted, warm page cache
# Dropping the page cache (echo 3 > /proc/sys/vm/drop_caches) needs root; without it
# the "cold" rows are reported as not measured.
#
# Usage: packaging/measure-startup.sh [PACKAGES_DIR] [OUT_DIR]
#        (defaults: target-packages/, /tmp/zimage-startup); RUNS=5 by default.
# Writes OUT_DIR/startup.txt (the table) and OUT_DIR/startup.csv (every run).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PKGS=$(realpath "${1:-$ROOT/target-packages}")
OUT=$(realpath -m "${2:-/tmp/zimage-startup}")
RUNS=${RUNS:-5}
mkdir -p "$OUT"
DEB=$(ls "$PKGS"/zimage-studio_*_amd64.deb | head -1)
APPIMAGE=$(ls "$PKGS"/*.AppImage | head -1)
for t in Xvfb xdotool python3 dpkg-deb; do command -v $t >/dev/null || { echo "needs $t (see tests/package_linux.sh)"; exit 1; }; done

TMP=$(mktemp -d /tmp/zimage-startup.XXXXXX)
XVFB_PID=""
APP_PID=""
cleanup() {
    [ -n "$APP_PID" ] && kill "$APP_PID" 2>/dev/null || true
    [ -n "$XVFB_PID" ] && kill "$XVFB_PID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

dpkg-deb -x "$DEB" "$TMP/root"
mkdir -p "$TMP/data"
echo '{"welcome_done": true}' >"$TMP/data/settings.json"

. "$ROOT/packaging/xvfb-start.sh"

CAN_DROP=0
if sync && echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then CAN_DROP=1; fi
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Starts the command, waits for the visible window, stops it; sets MS to the milliseconds.
# (Not run in $(...): the app's pid must stay known to the cleanup trap.)
start_ms() {
    local t0 t1 w=""
    t0=$EPOCHREALTIME
    "$@" --data-dir "$TMP/data" >>"$OUT/app.log" 2>&1 &
    APP_PID=$!
    for _ in $(seq 1 6000); do
        w=$(xdotool search --onlyvisible --name "Z-Image Studio" 2>/dev/null | head -1 || true)
        [ -n "$w" ] && break
        kill -0 "$APP_PID" 2>/dev/null || {
            echo "the app died: $(tail -1 "$OUT/app.log")" >&2
            kill -0 "$XVFB_PID" 2>/dev/null || echo "(Xvfb $DISPLAY is gone: $(tail -3 "$OUT/xvfb.log"))" >&2
            exit 1
        }
        sleep 0.01
    done
    t1=$EPOCHREALTIME
    [ -n "$w" ] || { echo "no window after 60 s" >&2; exit 1; }
    kill "$APP_PID"; wait "$APP_PID" 2>/dev/null || true
    APP_PID=""
    # Let the X server forget the window before the next run.
    for _ in $(seq 1 100); do [ -z "$(xdotool search --name "Z-Image Studio" 2>/dev/null)" ] && break; sleep 0.05; done
    MS=$(python3 -c "import sys; print(round((float(sys.argv[2]) - float(sys.argv[1])) * 1000))" "$t0" "$t1")
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "case,run,ms" >"$OUT/startup.csv"
measure() { # case run command...
    local c=$1 i=$2; shift 2
    start_ms "$@"
    echo "$c,$i,$MS" >>"$OUT/startup.csv"
    echo "  $c #$i: $MS ms"
}
CACHE=$TMP/xdg-cache
# `env` execs the program, so $! is the app itself (the AppImage runtime execs it too).
DEB_APP=(env -u ZIMAGE_ASSETS "$TMP/root/usr/bin/zimage-studio")
APPIMAGE_APP=(env -u ZIMAGE_ASSETS XDG_CACHE_HOME="$CACHE" "$APPIMAGE")

start_ms "${DEB_APP[@]}"   # one unmeasured start (Mesa's shader cache etc.)
for i in $(seq 1 "$RUNS"); do
    if [ $CAN_DROP = 1 ]; then drop; measure deb-cold "$i" "${DEB_APP[@]}"; fi
    measure deb-warm "$i" "${DEB_APP[@]}"
done
for i in $(seq 1 "$RUNS"); do
    rm -rf "$CACHE"
    if [ $CAN_DROP = 1 ]; then drop; fi
    measure appimage-first "$i" "${APPIMAGE_APP[@]}"
    if [ $CAN_DROP = 1 ]; then drop; measure appimage-later "$i" "${APPIMAGE_APP[@]}"; fi
    measure appimage-warm "$i" "${APPIMAGE_APP[@]}"
done

# The runtime alone, no window: `AppImage --help` (the app prints its usage and exits),
# warm page cache; first = extraction + run, later = hash check + run.
cli_ms() {
    local t0=$EPOCHREALTIME
    "$@" --help >/dev/null
    MS=$(python3 -c "import sys; print(round((float(sys.argv[2]) - float(sys.argv[1])) * 1000))" "$t0" "$EPOCHREALTIME")
}
for i in $(seq 1 "$RUNS"); do
    rm -rf "$CACHE"
    cli_ms "${APPIMAGE_APP[@]}"; echo "help-first,$i,$MS" >>"$OUT/startup.csv"; echo "  help-first #$i: $MS ms"
    cli_ms "${APPIMAGE_APP[@]}"; echo "help-later,$i,$MS" >>"$OUT/startup.csv"; echo "  help-later #$i: $MS ms"
done

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$OUT/startup.csv" "$CAN_DROP" "$DEB" "$APPIMAGE" >"$OUT/startup.txt" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cases = ["deb-cold", "deb-warm", "appimage-first", "appimage-later", "appimage-warm", "help-first", "help-later"]
what = {
    "deb-cold": ".deb app, cold page cache",
    "deb-warm": ".deb app, warm page cache",
    "appimage-first": "AppImage first run (extracts), cold",
    "appimage-later": "AppImage later run, cold page cache",
    "appimage-warm": "AppImage later run, warm page cache",
    "help-first": "`AppImage --help` (no window), first run: extraction, warm page cache",
    "help-later": "`AppImage --help` (no window), later run, warm page cache",
}
print(f"exec -> window mapped (first frame), ms; {sys.argv[3].rsplit('/',1)[-1]}, {sys.argv[4].rsplit('/',1)[-1]}")
print()
print("| case | median | min | max | runs |")
print("|---|---:|---:|---:|---:|")
for c in cases:
    v = [int(r["ms"]) for r in rows if r["case"] == c]
    if not v:
        print(f"| {what[c]} | not measured (page cache cannot be dropped) | | | |")
        continue
    print(f"| {what[c]} | {statistics.median(v):.0f} | {min(v)} | {max(v)} | {len(v)} |")
EOF
{
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), load average before $LOAD_BEFORE, after $LOAD_AFTER"
    grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ */CPU: /'
} >>"$OUT/startup.txt"
echo
cat "$OUT/startup.txt"
