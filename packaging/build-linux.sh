#!/usr/bin/env bash
# Builds the Linux packages of Z-Image Studio:
#   OUT/zimage-studio_<version>_amd64.deb            (cargo-packager, packaging/Packager.toml)
#   OUT/Z-Image_Studio-<version>-x86_64.AppImage     (cargo-packager when it can, else our own:
#                                                     AppDir + mksquashfs + packaging/appimage-runtime)
#   OUT/sizes.txt                                     binary and package sizes
#
# Usage: packaging/build-linux.sh [--no-build] [OUT_DIR]     (default OUT_DIR: target-packages/)
#   --no-build   package the release binaries already in $CARGO_TARGET_DIR/release
# Env:
#   CARGO_TARGET_DIR      where the release binaries are built (default ~/.cache/zimage/target)
#   ZIMAGE_PKG_TARGET_DIR target dir of the AppImage runtime (default ~/.cache/zimage/target-pkg)
#   ZIMAGE_APPIMAGE=auto|packager|own   auto (default): try cargo-packager's AppImage (needs
#                         GitHub to download linuxdeploy), fall back to our own; own: skip the try
#   SOURCE_DATE_EPOCH     timestamp stored in the AppImage's SquashFS (default: last commit)
#
# Installs what it needs when missing: squashfs-tools and binutils with apt-get,
# cargo-packager with cargo install into ~/.cache/zimage/tools.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=1
if [ "${1:-}" = "--no-build" ]; then BUILD=0; shift; fi
OUT=$(realpath -m "${1:-$ROOT/target-packages}")
TARGET=${CARGO_TARGET_DIR:-$HOME/.cache/zimage/target}
PKG_TARGET=${ZIMAGE_PKG_TARGET_DIR:-$HOME/.cache/zimage/target-pkg}
TOOLS=$HOME/.cache/zimage/tools
PACKAGER_VERSION=0.11.8          # the version Packager.toml was written and tested against
APPIMAGE_MODE=${ZIMAGE_APPIMAGE:-auto}
# Packager.toml reads the binaries from here (cargo-packager 0.11 ignores --binaries-dir
# when --config is given), so this folder is fixed whatever OUT is.
STAGE=$ROOT/target-packages/stage
NICE="nice -n 10"                # the build machines are shared: stay in the background

step() { printf '\n== %s\n' "$*"; }
die() { echo "build-linux.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- version
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
[ -n "$VERSION" ] || die "no [workspace.package] version in Cargo.toml"
for cfg in Packager.toml packager-macos.toml packager-windows.toml; do
    v=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ROOT/packaging/$cfg" | head -1)
    [ "$v" = "$VERSION" ] || die "packaging/$cfg has version \"$v\", Cargo.toml has \"$VERSION\": update it"
done
ARCH=$(uname -m)
[ "$ARCH" = x86_64 ] || echo "warning: only x86_64 was tested (this is $ARCH)"

# ---------------------------------------------------------------- tools
step "tools"
need=()
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v strip >/dev/null || need+=(binutils)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$TOOLS/bin:$PATH"
if ! command -v cargo-packager >/dev/null; then
    echo "installing cargo-packager $PACKAGER_VERSION into $TOOLS (a few minutes, once)"
    $NICE cargo install cargo-packager --version "$PACKAGER_VERSION" --locked --root "$TOOLS"
fi
have=$(cargo packager --version 2>/dev/null | awk '{print $2}')
echo "cargo-packager $have ($(command -v cargo-packager))"
[ "$have" = "$PACKAGER_VERSION" ] || echo "warning: Packager.toml was tested with cargo-packager $PACKAGER_VERSION"

# ---------------------------------------------------------------- release binaries
if [ $BUILD = 1 ]; then
    step "release build ($TARGET)"
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET $NICE cargo build --release \
        -p zimage-studio -p zimage-engine --bin zimage-studio --bin zimage)
fi
for b in zimage-studio zimage; do
    [ -x "$TARGET/release/$b" ] || die "$TARGET/release/$b not found (build it, or drop --no-build)"
done

step "staging stripped binaries ($STAGE)"
rm -rf "$STAGE"
mkdir -p "$STAGE" "$OUT"
for b in zimage-studio zimage; do
    # The release profile keeps the symbol table; packages ship without it (~20% smaller).
    strip --strip-all -o "$STAGE/$b" "$TARGET/release/$b"
done
# The .deb declares libc6 (>= 2.35): make sure the build did not start needing more.
DECLARED=$(sed -n 's/.*"libc6 (>= \([0-9.]*\))".*/\1/p' "$ROOT/packaging/Packager.toml")
NEEDED=$(objdump -T "$STAGE"/* | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -1)
if [ "$(printf '%s\n%s\n' "$DECLARED" "$NEEDED" | sort -V | tail -1)" != "$DECLARED" ]; then
    die "the binaries need glibc $NEEDED but Packager.toml declares libc6 (>= $DECLARED): update Depends"
fi
echo "glibc needed: $NEEDED (declared >= $DECLARED)"

# ---------------------------------------------------------------- .deb
step ".deb (cargo-packager)"
DEB=$OUT/zimage-studio_${VERSION}_amd64.deb
rm -f "$DEB"
(cd "$ROOT" && $NICE cargo packager --config packaging/Packager.toml --formats deb --out-dir "$OUT")
[ -f "$DEB" ] || die "cargo-packager did not write $DEB"

# ---------------------------------------------------------------- AppImage
APPIMAGE=$OUT/Z-Image_Studio-$VERSION-$ARCH.AppImage
rm -f "$APPIMAGE"
BUILT_BY=""
if [ "$APPIMAGE_MODE" != own ]; then
    step "AppImage (cargo-packager: downloads linuxdeploy from GitHub)"
    PK_OUT=$OUT/.packager-appimage
    rm -rf "$PK_OUT"
    if (cd "$ROOT" && $NICE cargo packager --config packaging/Packager.toml --formats appimage --out-dir "$PK_OUT") \
        && ls "$PK_OUT"/*.AppImage >/dev/null 2>&1; then
        mv "$PK_OUT"/*.AppImage "$APPIMAGE"
        BUILT_BY="cargo-packager (linuxdeploy)"
    elif [ "$APPIMAGE_MODE" = packager ]; then
        die "cargo-packager could not build the AppImage (ZIMAGE_APPIMAGE=packager)"
    else
        echo "cargo-packager's AppImage failed (no access to GitHub?): building our own"
    fi
fi

if [ -z "$BUILT_BY" ]; then
    step "AppImage (own: AppDir + mksquashfs + packaging/appimage-runtime)"
    WORK=$OUT/.appimage
    APPDIR=$WORK/Z-Image_Studio.AppDir
    rm -rf "$WORK"
    mkdir -p "$WORK"

    # The runtime: our extract-and-run AppImage runtime, a separate small crate.
    (cd "$ROOT/packaging/appimage-runtime" && CARGO_TARGET_DIR=$PKG_TARGET $NICE cargo build --release --locked)
    RUNTIME=$WORK/runtime
    cp "$PKG_TARGET/release/zimage-appimage-runtime" "$RUNTIME"
    # The AppImage type-2 magic, "AI" + version 2, at offset 8 of the ELF header (the
    # EI_ABIVERSION/EI_PAD bytes the kernel and loader ignore for executables).
    printf 'AI\002' | dd of="$RUNTIME" bs=1 seek=8 conv=notrunc status=none
    # The image must start where the runtime thinks the ELF file ends.
    OFFSET=$("$RUNTIME" --appimage-offset)
    [ "$OFFSET" = "$(stat -c %s "$RUNTIME")" ] || die "runtime ELF end $OFFSET != file size $(stat -c %s "$RUNTIME")"

    # The AppDir: exactly the .deb's files, plus what the AppImage format asks for at
    # the top: AppRun, the desktop entry, the icon and .DirIcon.
    dpkg-deb -x "$DEB" "$APPDIR"
    install -m 755 "$ROOT/packaging/AppRun" "$APPDIR/AppRun"
    cp "$ROOT/packaging/zimage-studio.desktop" "$APPDIR/zimage-studio.desktop"
    cp "$ROOT/packaging/icons/256x256.png" "$APPDIR/zimage-studio.png"
    ln -s zimage-studio.png "$APPDIR/.DirIcon"

    EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}
    $NICE mksquashfs "$APPDIR" "$WORK/image.squashfs" -comp gzip -root-owned -no-xattrs \
        -noappend -mkfs-time "$EPOCH" -all-time "$EPOCH" -processors 1 -quiet -no-progress
    cat "$RUNTIME" "$WORK/image.squashfs" > "$APPIMAGE"
    chmod 755 "$APPIMAGE"
    "$APPIMAGE" --appimage-version >/dev/null || die "the AppImage does not start"
    BUILT_BY="packaging/appimage-runtime ($(stat -c %s "$RUNTIME") bytes) + SquashFS (gzip)"
fi

# ---------------------------------------------------------------- sizes
step "sizes"
size() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
{
    echo "Z-Image Studio $VERSION packages, $(date -u +%Y-%m-%dT%H:%MZ), $(uname -m)"
    for b in zimage-studio zimage; do
        printf '%-44s %10s bytes  %s\n' "$b (release, not stripped)" "$(size "$TARGET/release/$b")" "$(mib "$(size "$TARGET/release/$b")")"
        printf '%-44s %10s bytes  %s\n' "$b (stripped, as packaged)" "$(size "$STAGE/$b")" "$(mib "$(size "$STAGE/$b")")"
    done
    printf '%-44s %10s bytes  %s\n' "assets/demo (demo model)" "$(du -sb "$ROOT/assets/demo" | cut -f1)" "$(mib "$(du -sb "$ROOT/assets/demo" | cut -f1)")"
    printf '%-44s %10s bytes  %s\n' "$(basename "$DEB")" "$(size "$DEB")" "$(mib "$(size "$DEB")")"
    printf '%-44s %10s bytes  %s\n' "$(basename "$APPIMAGE")" "$(size "$APPIMAGE")" "$(mib "$(size "$APPIMAGE")")"
    echo "AppImage built by: $BUILT_BY"
} | tee "$OUT/sizes.txt"
echo
echo "packages in $OUT"
