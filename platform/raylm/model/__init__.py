"""The GPT model, single-device code, and its on-disk artifact format."""
