"""Operator tasks: doctor, plan, backups, deploys, benchmarks."""
