"""graph layer (see README module map)."""
