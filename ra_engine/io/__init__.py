"""Reading and writing scans and radiographs, and the data sources a run reads (folders, globs, CSVs)."""
