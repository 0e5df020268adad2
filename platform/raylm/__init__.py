"""raylm: a Ray-native platform that takes raw, sharded text to a served language model."""

__version__ = "0.1.0"
