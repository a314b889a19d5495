"""BlockLLM worker."""
