"""Subcommands of ``pop-nemo``: each module here defines ``register(subparsers)``."""
