"""`dmoverlay build`: a root tree or archive becomes LiveOS/squashfs.img
holding LiveOS/rootfs.img, without root; optionally a partitioned disk.

`source` reads the tree into a manifest, `ext4` makes the filesystem
(through core's `debugfs`), `squashfs` wraps it, `disk` partitions, and
`image` runs the steps."""
