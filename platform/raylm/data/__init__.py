"""Prepare: read sharded raw text, clean, filter, deduplicate and split it (Ray Data)."""
