"""Surfaces: metrics, exposition, `check` output, the status page. No I/O."""
