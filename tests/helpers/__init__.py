"""Shared test helpers: tiny models, MLP-head inputs, the compile-for-GPU harness."""
