"""`dmoverlay apply / rollback`: an update written over a root, guarded,
atomic per file, and all-or-nothing.

`update.apply_update` is the one entry point: it runs the others in order.
`readers/` read updates (one module per kind: directory, cpio, image,
download, and detect to tell them apart), `plan` and `xattrpolicy` decide
(pure), `inroot` resolves paths beneath the root, `execute` and `workers`
write, `journal` and `undo` make it undoable.

Nothing is imported here: `dmoverlay --version` imports this package."""
