"""attnprec.analysis.bounds."""
