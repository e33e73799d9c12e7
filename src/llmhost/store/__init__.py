"""Model files on disk: the demo model builder now; pull, verify, manifests and encryption."""
