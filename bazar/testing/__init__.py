"""Helpers that run real Bazar processes on this machine, for the tests and for bazar-bench."""
