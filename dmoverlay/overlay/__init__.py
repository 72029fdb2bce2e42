"""`dmoverlay setup / status / teardown`: the boot-time overlay on loop
devices and device-mapper.

`dmtable` lays out the tables (pure), `persistent` and `devspec` read the
overlay and device options, `blockdev` is the libblockdev layer, and `setup`
records each step, unwinds and reports."""
