"""`dmoverlay mkupdates`: the updates images `apply` reads, made from a tree
or from the difference between two.

A layer over `apply`, as `boot` is, not a job beside it: what it makes must
be what apply takes, so it reads its inputs with apply's readers and judges
its output with apply's planner (`check`), instead of a second copy of the
rules.  `listing` reads a side into entries, `diff` decides what goes in
(pure), `check` asks the planner, `formats` writes cpio, tar.zst or
squashfs, and `make` runs the steps.

Nothing is imported here: `dmoverlay --version` imports the CLI only."""
