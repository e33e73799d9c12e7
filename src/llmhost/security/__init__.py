"""Authentication, rate limits and redaction."""
