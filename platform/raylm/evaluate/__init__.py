"""Evaluate: perplexity, size and speed of exported models."""
