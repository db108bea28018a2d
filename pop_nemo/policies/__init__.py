"""Trainable policies behind one protocol (see base.py)."""
