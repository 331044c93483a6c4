"""Downstream tasks, one module each, registered in ``bench.registry.TASKS`` by name."""
