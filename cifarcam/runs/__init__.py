"""The run directory: its files, formats, locks and atomic writes."""
