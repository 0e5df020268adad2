"""Compress: knowledge distillation into smaller students and int8 quantization."""
