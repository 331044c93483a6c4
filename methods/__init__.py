"""Self-supervised methods, one module each, registered in ``bench.registry.METHODS`` by name.

Methods never import each other: shared parts live in ``methods/common``.
"""
