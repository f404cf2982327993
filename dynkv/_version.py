"""The package version (one place: the face, env reports and the P/D handshake read it)."""

__version__ = "0.1.0"
