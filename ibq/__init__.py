"""ibq: a visual-tokenizer research platform built around Index Backpropagation Quantization."""

__version__ = "0.1.0"
