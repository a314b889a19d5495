"""The planner process (`blockllm planner`): its IO (`proc`), its pure policy (`planner`) and
the policy's parts: placement search, stragglers, weight budgets, chain assembly, batch sizes,
spawned workers. See docs/internals.md, "Planner"."""
