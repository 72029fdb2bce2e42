#!/bin/sh
# dracut shutdown hook: tear the live root down in order once the old root
# is unmounted (live-rw, live-base, their loop devices, then the medium), so
# that the medium holding a persistent overlay is unmounted cleanly, not
# left for the next boot to recover.  dracut's shutdown moved the old
# system's /run, and the mounts under it, to /oldsys/run.
#
# Always a success: dracut retries a failing hook up to 40 times, and what
# this one cannot free now (the reason is on the console) stays for dracut's
# dm hook and the power-off.

# shellcheck source=/dev/null
type warn >/dev/null 2>&1 || . /lib/dracut-lib.sh

if [ -e /run/dmoverlay/live.json ]; then
    dmoverlay_out=$(dmoverlay teardown --name live --moved-under /oldsys 2>&1)
    dmoverlay_rc=$?
    printf '%s\n' "$dmoverlay_out" | while IFS= read -r dmoverlay_line; do
        [ -z "$dmoverlay_line" ] && continue
        if [ "$dmoverlay_rc" -eq 0 ]; then
            info "dmoverlay: $dmoverlay_line"
        else
            warn "dmoverlay: $dmoverlay_line"
        fi
    done
    unset dmoverlay_out dmoverlay_rc dmoverlay_line
fi
:
