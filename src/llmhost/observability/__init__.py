"""Logging, metrics and probes of the running service."""
