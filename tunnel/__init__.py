"""tunnel: a reverse tunnel for Twisted, wire-compatible with koding/tunnel."""

__version__ = "0.1.0"
