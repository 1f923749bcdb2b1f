"""Comparing the runs of a sweep: tables (terminal, Markdown, CSV), PNG plots, W&B analysis runs and reports."""
