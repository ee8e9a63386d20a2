"""Pure functions over a Snapshot: no I/O."""
