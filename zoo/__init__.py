"""BlockLLM zoo."""
