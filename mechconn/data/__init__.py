"""Datasets and batching."""
