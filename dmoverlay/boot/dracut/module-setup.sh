#!/bin/bash
# moddir is dracut's; installed.conf, written at install, sets dmoverlay_python
# and dmoverlay_path; dracut.conf may set dmoverlay_updates_keys,
# dmoverlay_updates_revoked and dmoverlay_https
# shellcheck disable=SC2154
# dracut module "dmoverlay": sets up the live root that root=live:... and the
# rd.live.* options ask for, as dmsquash-live does, with dmoverlay; then
# applies rd.live.updates= / inst.updates= before switch_root.
# Installed by `dmoverlay initramfs install`, which writes installed.conf
# beside this file: the Python that has dmoverlay (dmoverlay_python).

# Only when asked for: dracut --add dmoverlay, or add_dracutmodules.
check() {
    require_binaries losetup mount umount blkid dmsetup || return 1
    return 255
}

# dm: dmsetup and the udev rules that make /dev/mapper/NAME.
depends() {
    echo dm
}

installkernel() {
    hostonly='' instmods loop squashfs ext4 isofs vfat dm-mod dm-snapshot dm-thin-pool
}

# The libraries an ELF file links, by ldd, installed.
inst_libdir_deps() {
    local lib
    for lib in $(ldd "$1" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p'); do
        inst_library "$lib"
    done
}

# Signed updates: the keys dracut.conf names (dmoverlay_updates_keys=FILE,
# dmoverlay_updates_revoked=FILE) go into the initramfs where dmoverlay's
# boot looks for them (dmoverlay/boot/updates.py: KEYS, REVOKED); with them
# there, every update the command line names must be signed by one of
# them.  ssh-keygen checks the signatures; it is needed then, and carried
# anyway when present, for rd.live.updates.verify=.  A file named but
# missing stops dracut: an initramfs without the keys asked for would
# apply nothing, and say so only at boot.
inst_update_keys() {
    if [ -n "${dmoverlay_updates_revoked-}" ] && [ -z "${dmoverlay_updates_keys-}" ]; then
        dfatal "dmoverlay: dmoverlay_updates_revoked is set without dmoverlay_updates_keys"
        exit 1
    fi
    inst_update_file keys "${dmoverlay_updates_keys-}"
    inst_update_file revoked "${dmoverlay_updates_revoked-}"
    if [ -n "${dmoverlay_updates_keys-}" ]; then
        inst_binary ssh-keygen || {
            dfatal "dmoverlay: dmoverlay_updates_keys is set but ssh-keygen is not" \
                "installed (openssh-client, or openssh-clients on Fedora)"
            exit 1
        }
    else
        inst_multiple -o ssh-keygen
    fi
}

# inst_update_file WHAT FILE: FILE (if named) at /etc/dmoverlay/updates.WHAT
inst_update_file() {
    [ -n "$2" ] || return 0
    if [ ! -f "$2" ]; then
        dfatal "dmoverlay: dmoverlay_updates_$1=$2: no such file"
        exit 1
    fi
    inst_simple "$2" "/etc/dmoverlay/updates.$1"
}

install() {
    # shellcheck source=/dev/null
    . "$moddir/installed.conf"
    local stage="$DRACUT_TMPDIR/dmoverlay-stage" elf tls=()
    mkdir -p "$stage"
    # dmoverlay_https=no: updates by http:// only (signed, or by #sha256=),
    # and neither the ssl module nor OpenSSL's libraries (5.4 MiB) carried
    case "${dmoverlay_https:-yes}" in
        yes) ;;
        no) tls=(--without-https) ;;
        *)
            dfatal "dmoverlay: dmoverlay_https=${dmoverlay_https}: say yes or no"
            exit 1
            ;;
    esac
    # The Python dmoverlay runs with, and only the modules its boot path
    # imports: a zip of bytecode and a wrapper are staged, the interpreter
    # and extension modules listed, one per line, for dracut to install
    # with the libraries they link.  From /: `-m` puts the current
    # directory first on the path, and dracut runs where it was typed.
    # A failure stops dracut: an initramfs made without the module would
    # not boot a live root, and would say so only at the next boot.
    elf=$(cd / && PYTHONPATH="$dmoverlay_path" "$dmoverlay_python" -m dmoverlay initramfs \
        stage "$stage" "${tls[@]}") || {
        dfatal "dmoverlay: $dmoverlay_python could not stage dmoverlay's Python;" \
            "install dmoverlay again (dmoverlay initramfs install), or remove" \
            "/etc/dracut.conf.d/90-dmoverlay.conf and $moddir"
        exit 1
    }
    local f
    while IFS= read -r f; do
        case "$f" in
            # dracut resolves the libraries of executables only, and an
            # extension module is not one: its libraries are named here
            *.so)
                inst_library "$f"
                inst_libdir_deps "$f"
                ;;
            ?*) inst_binary "$f" ;;
        esac
    done <<< "$elf"
    while IFS= read -r -d '' f; do
        inst_simple "$stage/$f" "/$f"
    done < <(cd "$stage" && find . -type f -printf '%P\0')
    inst_multiple losetup mount umount blkid dmsetup modprobe
    inst_multiple -o sfdisk debugfs zstd xz
    inst_update_keys
    inst_simple "$moddir/dmoverlay-lib.sh" /lib/dmoverlay-lib.sh
    inst_hook cmdline 30 "$moddir/dmoverlay-cmdline.sh"
    inst_hook pre-mount 50 "$moddir/dmoverlay-setup.sh"
    inst_hook pre-pivot 50 "$moddir/dmoverlay-updates.sh"
    # before dracut's dm hook (25), which would remove the devices but leave
    # the medium mounted
    inst_hook shutdown 20 "$moddir/dmoverlay-shutdown.sh"
}
