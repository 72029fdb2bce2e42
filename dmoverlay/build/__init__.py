"""`dmoverlay build`: a root tree or archive becomes LiveOS/squashfs.img
holding LiveOS/rootfs.img, without root; optionally a partitioned disk.

`source` reads the tree into a manifest, `ext4` and `debugfs` make the
filesystem, `squashfs` wraps it, `disk` partitions, `image` runs the steps."""
