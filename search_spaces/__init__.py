"""Search spaces (TOML), shipped as package data."""
