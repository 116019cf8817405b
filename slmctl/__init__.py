"""slmctl: pretrain, distill, add vision to, evaluate, export and benchmark small
encoder-decoder language models."""

__version__ = "0.1.0"
