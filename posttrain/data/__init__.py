"""Datasets: reading user data with clear errors, and the embedded synthetic tasks."""
