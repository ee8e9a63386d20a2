"""Probing: which addresses to ping per peer, ICMP sockets, and the background prober."""
