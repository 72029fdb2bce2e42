#!/bin/sh
# dracut pre-pivot hook: apply the command line's updates (rd.live.updates=,
# inst.updates=) onto the new root, each all or nothing.  An update that
# cannot be fetched, checked or applied is left out and the boot goes on;
# why is said on the console and in the kernel log, which the booted
# system's journal keeps.

# shellcheck source=/dev/null
type getcmdline >/dev/null 2>&1 || . /lib/dracut-lib.sh
# shellcheck source-path=SCRIPTDIR source=dmoverlay-lib.sh
. /lib/dmoverlay-lib.sh

if [ -e /run/dmoverlay.cmdline ] && ismounted "$NEWROOT"; then
    # dmoverlay -q apply --from-cmdline FILE --root DIR, without click's start-up
    dmoverlay_run dmoverlay-boot apply /run/dmoverlay.cmdline "$NEWROOT" || :  # the boot goes on
fi
