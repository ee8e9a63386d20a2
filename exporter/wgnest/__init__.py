"""wgnest: shows where each WireGuard tunnel's transport packets really go."""

__version__ = "0.1.0"
