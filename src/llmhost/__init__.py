"""llmhost: run large language models on your own machines behind one OpenAI-compatible service."""

__version__ = "0.1.0"
