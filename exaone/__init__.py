"""exaone: EXAONE language models from a Hugging Face checkpoint to fast quantized inference."""

__version__ = "0.1.0"
