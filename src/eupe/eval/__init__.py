"""Evaluations of frozen encoders: one module per benchmark, plus the report."""
