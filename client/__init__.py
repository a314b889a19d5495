"""BlockLLM client."""
