"""Evaluation: ROUGE and perplexity against the Hugging Face reference (see issue 7)."""
