"""The audit log of requests."""
