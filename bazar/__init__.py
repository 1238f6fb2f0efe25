"""Bazar: a replicated, cached, three-tier book store on Twisted."""

__version__ = "0.1.0"
