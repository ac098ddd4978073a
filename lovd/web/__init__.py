"""lovd's HTTP layer."""
