"""Data: tokenizers, TFDS builders and the Grain input pipeline."""
