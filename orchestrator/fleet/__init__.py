"""Fleets: ``spec`` (the YAML file, loaded and validated once) and ``reconcile`` (up, down, status, drift)."""
