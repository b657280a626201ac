"""Interpretability benchmarks (issue #19): meta-SAE composition and automated interpretability."""
