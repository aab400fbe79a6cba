"""Run-level checks and records shared by every entry point (output gate, metadata, tolerances)."""
