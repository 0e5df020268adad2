"""Serve: an OpenAI-compatible Ray Serve application for exported models."""
