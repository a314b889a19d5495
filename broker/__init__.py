"""BlockLLM broker."""
