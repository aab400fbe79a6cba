"""io layer (see README module map)."""
