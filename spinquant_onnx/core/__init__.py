"""core layer (see README module map)."""
