"""Scans with known lesions -> metrics and figures."""
