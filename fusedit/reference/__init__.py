"""Interoperability with the reference Fuse-DiT code: its formulation and its checkpoint converter."""
