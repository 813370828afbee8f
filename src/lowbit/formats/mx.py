"""Microscaling formats (SPEC.md §4): mxfp4, mxfp6_e2m3, mxfp6_e3m2, mxfp8_e4m3, mxint8, nvfp4."""
