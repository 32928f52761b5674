"""The image repository: ``catalog`` (records, clone, snapshot, verify) and ``lifecycle`` (build, remove)."""
