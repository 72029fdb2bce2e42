"""What every job uses and nothing job-specific: errors and their hints,
running commands, progress lines, sizes, the entry model every reader yields,
decompression, the one tar reader, superblocks, debugfs (the one place that
writes its requests and scripts), the room left in a COW, and the rule for
RUNDIR/dmoverlay.

Nothing here imports from `build`, `overlay` or `apply`."""
