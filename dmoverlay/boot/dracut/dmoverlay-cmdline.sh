#!/bin/sh
# dracut cmdline hook: a live root (root=live:..., or rd.live.image with a
# device in root=) is dmoverlay's; dracut is told so and waits for the
# medium.  Whether the rest of the command line makes sense is dmoverlay's
# to say, at pre-mount, in one message naming the option.

[ -z "$root" ] && root=$(getarg root=)
if getargbool 0 rd.live.image -d -y liveimg && [ "${root%%:*}" != "live" ]; then
    root="live:$root"
fi
if [ "${root%%:*}" = "live" ]; then
    # shellcheck disable=SC2034  # read by dracut after its cmdline hooks
    rootok=1
    dmoverlay_dev=${root#live:}
    case "$dmoverlay_dev" in
        CDLABEL=*) dmoverlay_dev=$(label_uuid_to_dev "LABEL=${dmoverlay_dev#CDLABEL=}") ;;
        LABEL=* | UUID=* | PARTUUID=* | PARTLABEL=*)
            dmoverlay_dev=$(label_uuid_to_dev "$dmoverlay_dev") ;;
    esac
    case "$dmoverlay_dev" in
        /dev/*) wait_for_dev -n "$dmoverlay_dev" ;;
    esac
    unset dmoverlay_dev
fi
