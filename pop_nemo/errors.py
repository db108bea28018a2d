"""Errors that are the user's to fix. Base layer: every module may raise them, the CLI prints
them as one line and exits 2 (``pop_nemo.cli``)."""

from __future__ import annotations


class UserError(Exception):
    """Base for errors that are the user's to fix: printed as one line, exit code 2."""


class ResumeError(UserError, RuntimeError):
    """A run cannot go on from its checkpoint (missing, damaged, another config, ranks disagree)."""
