"""The benchmarks (`blockllm bench ...`, `python -m blockllm.client.bench.<name>`) and the demo:
programs built on the client library, the launcher and the engine. Library code with no click:
the commands that run them live in `blockllm.client.cli`."""
