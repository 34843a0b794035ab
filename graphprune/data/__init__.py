"""Package data: the default calibration text (`wiki_excerpt.txt`, see ATTRIBUTION.md)."""
