"""Booting with dmoverlay: what the initramfs carries (`initramfs`), the
dracut module that carries it (the `dracut` directory, installed by
`dmoverlay initramfs install`), and the kernel command line's updates
applied before switch_root without ever stopping the boot (`updates`).

A layer above `overlay` and `apply`: it may use both, neither uses it."""
