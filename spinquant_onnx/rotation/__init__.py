"""rotation layer (see README module map)."""
