"""`python -m blockllm.client.cli ...`: the `blockllm` command (spawned workers run this way)."""

from blockllm.client.cli import main

main()
