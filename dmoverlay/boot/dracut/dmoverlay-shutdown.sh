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
# shellcheck source-path=SCRIPTDIR source=dmoverlay-lib.sh
. /lib/dmoverlay-lib.sh

if [ -e /run/dmoverlay/live.json ]; then
    dmoverlay_run dmoverlay teardown --name live --moved-under /oldsys || :
fi
:
