"""Train: Ray Train workers running DeepSpeed on the GPT model."""
