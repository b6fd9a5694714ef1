"""Scan -> model space: presets, alignment to the reference head, the brain and xray presets, and the mapping of results
back onto the scan's grid."""
