"""Polars metrics and tables, matplotlib figures and the Markdown report."""
