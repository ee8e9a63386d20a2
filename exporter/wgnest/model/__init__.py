"""Plain frozen data: what the sources and the prober produce and the rest reads. No I/O."""
