"""Jinja2 templates of the Triton kernels (`*.py.j2`); shipped as package data."""
