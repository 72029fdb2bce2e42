"""What every job uses and nothing job-specific: errors and their hints,
running commands, progress lines, sizes, the entry model every reader yields,
decompression, the one tar reader, superblocks, and the room left in a COW.

Nothing here imports from `build`, `overlay` or `apply`."""
