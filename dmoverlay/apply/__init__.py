"""`dmoverlay apply / rollback`: an update written over a root, guarded,
atomic per file, and all-or-nothing.

`readers` and `cpio` read updates, `plan` and `xattrpolicy` decide (pure),
`inroot` resolves paths beneath the root, `execute` and `workers` write,
`journal` and `undo` make it undoable."""
