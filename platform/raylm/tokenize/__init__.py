"""Tokenize: train a byte-level BPE tokenizer, encode and pack fixed-length token sequences."""
