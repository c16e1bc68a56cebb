"""The shared encoder and its heads."""
