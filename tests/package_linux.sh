#!/usr/bin/env bash
# End-to-end test of the Linux packages: builds them (packaging/build-linux.sh) or takes
# existing ones, then
#   .deb       checks the control fields, the md5sums and every file (binaries, desktop
#              entry, icons, AppStream metadata, the whole demo model), extracts it into a
#              clean folder with `dpkg-deb -x`, runs the extracted CLI (generate, models)
#              and starts the extracted app under Xvfb: types a prompt, waits for the image,
#              takes screenshots; one more start on a fresh data folder shows the welcome;
#   AppImage   checks the magic and options, starts it under Xvfb with an empty
#              XDG_CACHE_HOME (first start extracts, the app must run from the cache),
#              types a prompt, waits for the image, takes a screenshot; extracts it with
#              --appimage-extract and runs the CLI inside.
# The demo model must come from the package, not from the source tree the binaries were
# built in (they fall back to it): with strace present, the files the programs open are
# checked; without, only that the package holds them.
# It fails when a check fails, a window never appears or an app dies.
#
# Usage: tests/package_linux.sh [OUT_DIR]             (default /tmp/zimage-package-test)
# Env:   ZIMAGE_PACKAGES=DIR   test the packages in DIR instead of building them
#        ZIMAGE_BUILD_ARGS     arguments for build-linux.sh (e.g. --no-build)
# Output: OUT_DIR/*.png screenshots, *.log app logs, cli-*.png CLI images.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-/tmp/zimage-package-test}")
PROMPT="a large red circle in the center on a blue background"
mkdir -p "$OUT"
rm -f "$OUT"/*.png "$OUT"/*.log "$OUT"/*.json

FAILS=0
ok() { echo "ok    $*"; }
bad() { echo "FAIL  $*"; FAILS=$((FAILS + 1)); }
check() { # description, command...
    local what=$1; shift
    if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi
}
die() { echo "FAIL  $*"; exit 1; }

# ---------------------------------------------------------------- tools
need=()
command -v Xvfb >/dev/null || need+=(xvfb)
command -v xdotool >/dev/null || need+=(xdotool)
command -v import >/dev/null || need+=(imagemagick)
command -v desktop-file-validate >/dev/null || need+=(desktop-file-utils)
command -v appstreamcli >/dev/null || need+=(appstream)
command -v strace >/dev/null || need+=(strace)
dpkg -s libvulkan1 mesa-vulkan-drivers libegl-mesa0 libgl1-mesa-dri >/dev/null 2>&1 || need+=(libvulkan1 mesa-vulkan-drivers libegl-mesa0 libgl1-mesa-dri)
dpkg -s libxkbcommon-x11-0 libxcursor1 libxi6 libx11-xcb1 >/dev/null 2>&1 || need+=(libxkbcommon-x11-0 libxcursor1 libxi6 libx11-xcb1)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null || true
fi
# strace may be refused (no ptrace in some containers): then the path checks are skipped.
STRACE=""
if command -v strace >/dev/null && strace -f -qq -e trace=openat -o /dev/null true 2>/dev/null; then
    STRACE="strace -f -qq --seccomp-bpf -e trace=openat"
    $STRACE -o /dev/null true 2>/dev/null || STRACE="strace -f -qq -e trace=openat"
fi

# ---------------------------------------------------------------- packages
PKGS=${ZIMAGE_PACKAGES:-}
if [ -z "$PKGS" ]; then
    PKGS=$ROOT/target-packages
    # shellcheck disable=SC2086
    "$ROOT/packaging/build-linux.sh" ${ZIMAGE_BUILD_ARGS:-} "$PKGS"
fi
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
DEB=$PKGS/zimage-studio_${VERSION}_amd64.deb
APPIMAGE=$(ls "$PKGS"/*.AppImage 2>/dev/null | head -1 || true)
[ -f "$DEB" ] || die "no $DEB"
[ -n "$APPIMAGE" ] || die "no AppImage in $PKGS"
APPIMAGE=$(realpath "$APPIMAGE")   # what the runtime will report as $APPIMAGE
echo "testing $DEB"
echo "        $APPIMAGE"

TMP=$(mktemp -d /tmp/zimage-pkgtest.XXXXXX)
XVFB_PID=""
APP_PID=""
stop_app() {
    if [ -n "$APP_PID" ]; then
        # Under strace, the app is strace's child: end it first (strace alone would detach).
        for c in $(ps -o pid= --ppid "$APP_PID" 2>/dev/null); do kill "$c" 2>/dev/null || true; done
        kill "$APP_PID" 2>/dev/null || true
        wait "$APP_PID" 2>/dev/null || true
        APP_PID=""
    fi
}
cleanup() {
    stop_app
    [ -n "$XVFB_PID" ] && kill "$XVFB_PID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# ---------------------------------------------------------------- .deb: metadata
echo; echo "== .deb: control fields and contents"
INFO=$(dpkg-deb -I "$DEB")
field() { dpkg-deb -f "$DEB" "$1"; }
check "Package: zimage-studio" test "$(field Package)" = zimage-studio
check "Version: $VERSION" test "$(field Version)" = "$VERSION"
check "Architecture: amd64" test "$(field Architecture)" = amd64
check "Section: graphics" test "$(field Section)" = graphics
check "Installed-Size > 40 MB" test "$(field Installed-Size)" -gt 40000
for dep in "libc6 (>= 2." libvulkan1 libegl1 libxkbcommon-x11-0 libx11-6 libxcursor1 libxi6 libwayland-client0; do
    check "Depends has $dep" grep -qF "$dep" <<<"$(field Depends)"
done
check "Description" grep -q "Description: Text-to-image" <<<"$INFO"

DEBROOT=$TMP/deb-root
dpkg-deb -x "$DEB" "$DEBROOT"
dpkg-deb -e "$DEB" "$TMP/deb-control"
check "md5sums of every file" bash -c "cd '$DEBROOT' && md5sum --quiet -c '$TMP/deb-control/md5sums'"
for f in usr/bin/zimage-studio usr/bin/zimage; do
    check "$f is an executable" test -x "$DEBROOT/$f"
done
for f in usr/share/applications/zimage-studio.desktop usr/share/metainfo/io.zimage.Studio.metainfo.xml \
    usr/share/icons/hicolor/scalable/apps/zimage-studio.svg usr/share/doc/zimage-studio/copyright; do
    check "$f" test -s "$DEBROOT/$f"
done
for s in 32 64 128 256 512; do
    check "hicolor ${s}x${s} icon" test -s "$DEBROOT/usr/share/icons/hicolor/${s}x${s}/apps/zimage-studio.png"
done
check "desktop-file-validate" desktop-file-validate "$DEBROOT/usr/share/applications/zimage-studio.desktop"
check "appstreamcli validate --no-net" appstreamcli validate --no-net "$DEBROOT/usr/share/metainfo/io.zimage.Studio.metainfo.xml"
DEMO=$DEBROOT/usr/share/zimage-studio/assets/demo
check "demo model: turbo/model_index.json" test -f "$DEMO/turbo/model_index.json"
check "demo model: base/model_index.json" test -f "$DEMO/base/model_index.json"
check "demo model: every file of assets/demo, identical" diff -r "$ROOT/assets/demo" "$DEMO"
check "no dangling symlinks" test -z "$(find "$DEBROOT" -xtype l)"

# ---------------------------------------------------------------- .deb: CLI from the extracted root
echo; echo "== .deb: the extracted CLI"
cd "$TMP"
if env -u ZIMAGE_ASSETS ${STRACE:+$STRACE -o "$TMP/cli.strace"} "$DEBROOT/usr/bin/zimage" generate -p "$PROMPT" --seed 7 -o "$OUT/cli-deb.png" >"$OUT/cli-deb.log" 2>&1 \
    && [ -s "$OUT/cli-deb.png" ]; then
    ok "zimage generate (demo-turbo) -> cli-deb.png"
else
    bad "zimage generate: $(tail -3 "$OUT/cli-deb.log")"
fi
if [ -n "$STRACE" ]; then
    opened=$(grep -o '"[^"]*turbo/model_index.json"' "$TMP/cli.strace" | head -1)
    check "CLI read the demo model from the package ($opened)" grep -q "^\"$DEBROOT/usr/bin/../share/zimage-studio/assets/demo/" <<<"$opened"
fi
check "zimage models runs" env -u ZIMAGE_ASSETS "$DEBROOT/usr/bin/zimage" models
check "zimage-studio --help runs" "$DEBROOT/usr/bin/zimage-studio" --help

# ---------------------------------------------------------------- Xvfb helpers
. "$ROOT/packaging/xvfb-start.sh"

alive() { [ -n "$APP_PID" ] && kill -0 "$APP_PID" 2>/dev/null; }
xvfb_note() { kill -0 "$XVFB_PID" 2>/dev/null || echo " (Xvfb $DISPLAY is gone: $(tail -2 "$OUT/xvfb.log"))"; }
# Waits for the app's window to be mapped (eframe shows it after the first frame);
# sets WIN to its id. Fails if the app dies or after 60 s.
wait_window() { # name-of-run
    WIN=""
    for _ in $(seq 1 600); do
        alive || { bad "$1: the app died: $(tail -5 "$OUT/$1.log")$(xvfb_note)"; return 1; }
        WIN=$(xdotool search --onlyvisible --name "Z-Image Studio" 2>/dev/null | head -1 || true)
        [ -n "$WIN" ] && return 0
        sleep 0.1
    done
    bad "$1: no window after 60 s"; return 1
}
metric() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); v=d.get(sys.argv[2]); print('' if v is None else v)" "$1" "$2" 2>/dev/null || true; }
# Types the prompt into the live box (it has focus at start), waits for the finished
# image (the app's metrics file says when) and takes a screenshot.
type_and_wait() { # window name-of-run metrics-file
    local win=$1 name=$2 metrics=$3
    sleep 2   # first frames, model load
    xdotool windowfocus --sync "$win" 2>/dev/null || true
    xdotool type --delay 40 "$PROMPT"
    for _ in $(seq 1 900); do
        alive || { bad "$name: the app died while generating: $(tail -5 "$OUT/$name.log")$(xvfb_note)"; return 1; }
        [ -n "$(metric "$metrics" final_image_ms)" ] && break
        sleep 0.1
    done
    if [ -z "$(metric "$metrics" final_image_ms)" ]; then bad "$name: no image after 90 s"; return 1; fi
    sleep 1.5
    import -window root "$OUT/$name.png"
    ok "$name: window, prompt typed, image $(printf %.0f "$(metric "$metrics" final_image_ms)") ms after the last key -> $name.png"
}
new_data_dir() { # welcome_done: true|false
    local d
    d=$(mktemp -d "$TMP/data.XXXX")
    [ "$1" = true ] && echo '{"welcome_done": true}' >"$d/settings.json"
    echo "$d"
}

# ---------------------------------------------------------------- .deb: the app from the extracted root
echo; echo "== .deb: the extracted app under Xvfb"
DATA=$(new_data_dir true)
env -u ZIMAGE_ASSETS ZIMAGE_STUDIO_METRICS="$OUT/deb-metrics.json" \
    ${STRACE:+$STRACE -o "$TMP/app.strace"} "$DEBROOT/usr/bin/zimage-studio" --data-dir "$DATA" >"$OUT/deb-live.log" 2>&1 &
APP_PID=$!
if wait_window deb-live; then
    type_and_wait "$WIN" deb-live "$OUT/deb-metrics.json" || true
    if [ -n "$STRACE" ]; then
        opened=$(grep -o '"[^"]*turbo/model_index.json"' "$TMP/app.strace" | head -1)
        check "app read the demo model from the package ($opened)" grep -q "^\"$DEBROOT/usr/bin/../share/zimage-studio/assets/demo/" <<<"$opened"
    fi
fi
alive && ok "deb app still running at the end" || bad "deb app exited early: $(tail -5 "$OUT/deb-live.log")"
stop_app

# The first-run welcome (fresh data folder, no settings): just a screenshot.
DATA=$(new_data_dir false)
"$DEBROOT/usr/bin/zimage-studio" --data-dir "$DATA" >"$OUT/deb-welcome.log" 2>&1 &
APP_PID=$!
if wait_window deb-welcome; then
    sleep 3
    import -window root "$OUT/deb-welcome.png"
    ok "deb-welcome: first-run window -> deb-welcome.png"
fi
stop_app

# ---------------------------------------------------------------- AppImage
echo; echo "== AppImage"
check "AppImage magic AI\\x02 at offset 8" test "$(od -An -tx1 -j8 -N3 "$APPIMAGE" | tr -d ' ')" = 414902
check "--appimage-version" "$APPIMAGE" --appimage-version
CACHE=$TMP/xdg-cache
DATA=$(new_data_dir true)
env -u ZIMAGE_ASSETS XDG_CACHE_HOME="$CACHE" ZIMAGE_STUDIO_METRICS="$OUT/appimage-metrics.json" \
    "$APPIMAGE" --data-dir "$DATA" >"$OUT/appimage-live.log" 2>&1 &
APP_PID=$!
if wait_window appimage-live; then
    # The runtime execs AppRun, which execs the app: same process, now running from the cache.
    exe=$(readlink "/proc/$APP_PID/exe" || true)
    check "app runs from the extracted cache ($exe)" grep -q "^$CACHE/zimage-studio/appimage/[0-9a-f]\{16\}/usr/bin/zimage-studio$" <<<"$exe"
    check "APPIMAGE and APPDIR are set" bash -c "tr '\0' '\n' </proc/$APP_PID/environ | grep -q '^APPIMAGE=$APPIMAGE$' && tr '\0' '\n' </proc/$APP_PID/environ | grep -q '^APPDIR=$CACHE/zimage-studio/appimage/'"
    check "demo model in the extracted AppImage" test -f "$(dirname "$exe")/../share/zimage-studio/assets/demo/turbo/model_index.json"
    type_and_wait "$WIN" appimage-live "$OUT/appimage-metrics.json" || true
fi
alive && ok "AppImage app still running at the end" || bad "AppImage app exited early: $(tail -5 "$OUT/appimage-live.log")"
stop_app
check "no temporary folders left in the cache" test -z "$(find "$CACHE/zimage-studio/appimage" -maxdepth 1 -name '.*tmp*')"

mkdir -p "$TMP/extract" && cd "$TMP/extract"
check "--appimage-extract" "$APPIMAGE" --appimage-extract
check "extracted AppImage: the .deb's files" diff -r "$DEBROOT/usr" squashfs-root/usr
check "extracted AppImage: AppRun, desktop entry, icon, .DirIcon" \
    test -x squashfs-root/AppRun -a -s squashfs-root/zimage-studio.desktop -a -s squashfs-root/zimage-studio.png -a -L squashfs-root/.DirIcon
if env -u ZIMAGE_ASSETS ${STRACE:+$STRACE -o "$TMP/cli2.strace"} squashfs-root/usr/bin/zimage generate -p "$PROMPT" --seed 7 -o "$OUT/cli-appimage.png" >"$OUT/cli-appimage.log" 2>&1; then
    ok "zimage generate inside the AppImage -> cli-appimage.png"
    # Same pixels (the PNG metadata differs: it names the model folder).
    check "same pixels as the .deb's CLI image" test "$(compare -metric AE "$OUT/cli-deb.png" "$OUT/cli-appimage.png" null: 2>&1)" = 0
else
    bad "zimage generate inside the AppImage: $(tail -3 "$OUT/cli-appimage.log")"
fi
cd "$TMP"

echo
if [ "$FAILS" -gt 0 ]; then
    echo "$FAILS check(s) failed; logs and screenshots in $OUT"
    exit 1
fi
echo "all package checks passed; screenshots in $OUT"
