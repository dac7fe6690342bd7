"""Subcommands of the momtune CLI (one module each)."""
