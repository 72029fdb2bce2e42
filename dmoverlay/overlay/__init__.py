"""`dmoverlay setup / status / teardown`: the boot-time overlay on loop
devices and device-mapper.

Decided without touching the system: `options` (what a setup is asked for),
`dmtable` (names, tables, sizes), `persistent` and `devspec` (the overlay
and device options).  Touching it: `kernel` (modules, sysfs probes),
`blockdev` (loop devices and mounts, through `libblockdev` or `utillinux`),
`recorder` (each attach recorded in the `state` before it is made), `setup`
with `media` (finding the root filesystem), `ramcopy` (copying it into RAM)
and `store` (the persistent overlay's store), `teardown` (undoing the
recorded steps) and `status` (how full the COW is)."""
