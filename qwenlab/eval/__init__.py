"""Task accuracy, perplexity, GSM8K-style and JSONL evaluation, and the lm-evaluation-harness bridge."""
