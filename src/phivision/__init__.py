"""phivision."""
