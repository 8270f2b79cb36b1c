"""Reporting: ``results.json`` files -> tables, plots (single- and multi-task) and a W&B report. Reads only files."""
