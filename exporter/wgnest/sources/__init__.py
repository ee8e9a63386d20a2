"""Sources: read the host (netlink, UAPI) and return plain model objects."""
