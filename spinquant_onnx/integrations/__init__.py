"""integrations layer (see README module map)."""
