"""Masked-conditioning generative models for engineering design."""
