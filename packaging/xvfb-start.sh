# Sourced by tests/package_linux.sh and packaging/measure-startup.sh: starts
# Xvfb on a free display and exports DISPLAY, XDG_RUNTIME_DIR and XVFB_PID.
# Needs $TMP (a scratch folder) and $OUT (where xvfb.log goes).
#
# Xvfb picks a free display itself (-displayfd) and writes its number when it
# is ready, so parallel Xvfb runs (other tests on the same machine) cannot collide.
# -noreset: by default Xvfb resets itself when its last client disconnects, and
# a client that connects during the reset is refused ("Failed to open
# connection to X server"): that is what happens when one app is stopped and
# the next one started at once (4 clients connecting in a loop: 22 of 600
# refused without the flag, 0 with it).
Xvfb -displayfd 3 -screen 0 1280x800x24 -nolisten tcp -noreset 3>"$TMP/display" >"$OUT/xvfb.log" 2>&1 &
XVFB_PID=$!
# Up to 30 s: a cold Xvfb (fonts, xkbcomp) on a busy 2-core machine can take more than 5.
for _ in $(seq 1 600); do [ -s "$TMP/display" ] && break; sleep 0.05; done
[ -s "$TMP/display" ] || { echo "Xvfb did not start: $(cat "$OUT/xvfb.log")"; exit 1; }
export DISPLAY=:$(head -1 "$TMP/display")
mkdir -p "$TMP/runtime" && chmod 700 "$TMP/runtime"
export XDG_RUNTIME_DIR=$TMP/runtime
