#!/bin/sh
# Shell functions the module's hooks share (installed as /lib/dmoverlay-lib.sh).

# The command line dracut reads (getcmdline): /etc/cmdline.d/*.conf, then
# /etc/cmdline, then the kernel's, one line each, under ROOT ($1, for
# tests; / at boot).  Unlike getcmdline it leaves out the comment lines a
# conf file may hold: dracut joins them into the line, where a double quote
# in a comment ("don't" is fine, "say "hi" is not) would run on into the
# kernel's own options, and dmoverlay would refuse the line.
dmoverlay_cmdline() {
    for dmoverlay_f in "$1"/etc/cmdline.d/*.conf "$1"/etc/cmdline "$1"/proc/cmdline; do
        [ -f "$dmoverlay_f" ] || continue
        while read -r dmoverlay_l || [ -n "$dmoverlay_l" ]; do
            case "$dmoverlay_l" in
                '#'* | '') ;;
                *) printf '%s\n' "$dmoverlay_l" ;;
            esac
        done < "$dmoverlay_f"
    done
    unset dmoverlay_f dmoverlay_l
}

# dmoverlay_run COMMAND...: run it, and say each line it printed through
# dracut's info (it succeeded) or warn (it failed), which reach the console
# and the booted system's journal; its exit status is returned.
dmoverlay_run() {
    dmoverlay_out=$("$@" 2>&1)
    dmoverlay_rc=$?
    printf '%s\n' "$dmoverlay_out" | while IFS= read -r dmoverlay_line; do
        [ -z "$dmoverlay_line" ] && continue
        if [ "$dmoverlay_rc" -eq 0 ]; then
            info "dmoverlay: $dmoverlay_line"
        else
            warn "dmoverlay: $dmoverlay_line"
        fi
    done
    unset dmoverlay_out dmoverlay_line
    return "$dmoverlay_rc"
}
