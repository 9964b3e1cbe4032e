"""Quantizer grid and bit accounting shared by every solver."""
