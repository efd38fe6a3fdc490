"""attnprec.lognum."""
