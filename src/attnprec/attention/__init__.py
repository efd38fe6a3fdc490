"""attnprec.attention."""
