"""attnprec.testing."""
