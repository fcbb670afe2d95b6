"""Bundles (and, in later issues, serving and export)."""
