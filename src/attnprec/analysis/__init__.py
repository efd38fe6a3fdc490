"""attnprec.analysis."""
