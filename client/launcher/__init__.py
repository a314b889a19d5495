"""Starting and supervising the processes of one machine: the `Launcher` (the broker, workers
and the planner as spawned children) and `run_serve`, what `blockllm serve` runs."""

from blockllm.client.launcher.launcher import (
    BROKER_TARGET,
    PLANNER_TARGET,
    WORKER_TARGET,
    Death,
    Launcher,
    LaunchError,
)
from blockllm.client.launcher.serve import (
    ComputeWeighted,
    Interrupted,
    ServeConfig,
    Serving,
    default_threads,
    plan_workers,
    run_serve,
    spare_worker_args,
)

__all__ = [
    "BROKER_TARGET",
    "PLANNER_TARGET",
    "WORKER_TARGET",
    "ComputeWeighted",
    "Death",
    "Interrupted",
    "LaunchError",
    "Launcher",
    "ServeConfig",
    "Serving",
    "default_threads",
    "plan_workers",
    "run_serve",
    "spare_worker_args",
]
