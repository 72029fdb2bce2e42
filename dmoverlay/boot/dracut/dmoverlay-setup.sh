#!/bin/sh
# dracut pre-mount hook: make the live root writable and mount it on
# $NEWROOT.  A failure stops the boot (there is no root to boot) with
# dmoverlay's message on the console.

# dracut sets root (from root=) and NEWROOT before its hooks run
# shellcheck disable=SC2154

# shellcheck source=/dev/null
type getcmdline >/dev/null 2>&1 || . /lib/dracut-lib.sh

if [ "${root%%:*}" = "live" ] && ! ismounted "$NEWROOT"; then
    # dracut's command line: what was built into the initramfs
    # (/etc/cmdline.d), then the kernel's
    # shellcheck source-path=SCRIPTDIR source=dmoverlay-lib.sh
    . /lib/dmoverlay-lib.sh
    dmoverlay_cmdline "" > /run/dmoverlay.cmdline
    info "dmoverlay: setting up the live root on $NEWROOT"
    # dmoverlay setup --from-cmdline FILE --target DIR, without click's start-up
    if ! dmoverlay-boot setup /run/dmoverlay.cmdline "$NEWROOT"; then
        die "dmoverlay could not set up the live root (the reason is above)"
    fi
    # the booted system's dracut-shutdown.service then unpacks this
    # initramfs at shutdown, where the shutdown hook tears the root down
    need_shutdown
fi
