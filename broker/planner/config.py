"""PlannerConfig: everything the planner process is started with (one frozen dataclass)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BROKER = "tcp://127.0.0.1:5555"


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """Planner settings; the CLI parses flags into this and calls `run_planner_process(cfg)`.

    Memory: a worker may hold `memory_budget_bytes` (its own, from READY) or, when it gives
    none, `worker_memory_bytes` (0: unlimited) of weights + KV; the placement fits each
    worker's weights into that budget minus its KV pool.
    """

    broker: str = DEFAULT_BROKER
    stats: str = ""  # the broker's STATS endpoint; "" = ask the broker (STATUS)
    zoo_dir: str | None = None
    keys_dir: str | None = None
    worker_memory_bytes: int = 0
    # placement
    replan_interval_s: float = 5.0  # demand-driven re-placement at most this often
    min_demand: float = 0.5  # tokens/s over all models before demand decides placement
    settle_s: float = 10.0  # ... and for this long without a break (a burst moves nothing)
    unload_delay_s: float = 20.0  # superseded stages stay this long after the new routes
    demand_halflife_s: float = 5.0
    # a demand re-placement is made only when it cuts the estimated cost per token (placement.py
    # layout_cost: the busiest worker's batched work + a fixed cost per hop) by this fraction
    min_gain: float = 0.15
    batch_exponent: float = 0.5  # the cost model's batching: a batch of B costs B**this
    hop_cost_bytes: float = 8 << 20  # a hop's fixed time, as block bytes streamed meanwhile
    replicate: bool = True  # replicate hot models across workers (else one replica each)
    catalog_interval_s: float = 1.0  # re-read the zoo at most this often (unknown models)
    load_timeout_s: float = 60.0  # a LOAD_STAGE not visible after this is sent again
    load_tries: int = 3
    # LOAD_STAGEs on their way to one worker at most (a worker queues 64: worker/loader.py);
    # the rest go as those arrive, so thousands of stages for one worker are never refused
    loads_in_flight: int = 32
    drain_s: float = 30.0  # requests get this long to leave a stage being unloaded
    # speculative duplicates of stragglers
    duplicates: bool = True
    dup_factor: float = 3.0  # step p50 > factor x the other workers' median: a straggler
    dup_min_ms: float = 20.0  # ... and above this
    dup_step_ms: float = 1000.0  # step p50 above this: a straggler whatever the others do
    dup_hold_s: float = 10.0  # healthy this long: its duplicate is retired
    dup_confirm_s: float = 2.0  # slow in every snapshot this long before it is duplicated
    # running requests move to the duplicate (a replay-prefill each) only when the straggler
    # is this much slower than the others, or over dup_step_ms; otherwise only new ones go
    dup_move_factor: float = 6.0
    probe_weight: float = 0.05  # share of new requests a straggler keeps (to see it recover)
    # per-stage batch size tuning: keep workers' step p95 near this (0: off)
    batch_target_ms: float = 0.0
    batch_cooldown_s: float = 5.0
    # spawning workers on this node (broker/planner/spawn.py): at most this many at once; 0 = never
    max_spawn: int = 0
    # "" = a child `blockllm worker`; else a command template ({n}, {name}) for a supervisor,
    # e.g. "systemctl start --no-block blockllm-worker@spare{n}", with its stop template
    spawn_command: str = ""
    stop_command: str = ""
    spawn_prefix: str = "spare"  # spawned workers are named PREFIX0, PREFIX1, ...
    spawn_worker_args: tuple[str, ...] = ()  # more `blockllm worker` flags of a child
    spawn_after_s: float = 2.0  # coverage lost this long (and no room left): spawn
    spawn_timeout_s: float = 120.0  # not registered by then: stopped, next try that much later
    spawn_hold_s: float = 30.0  # unneeded this long: retired
    spawn_stop_s: float = 15.0  # a retired child gets SIGTERM, then SIGKILL after this
    # adaptive chain assembly: (model, KL tolerance) pairs; a model absent is served exactly
    tolerance: tuple[tuple[str, float], ...] = ()
    # process
    log_level: str = "INFO"
    parent_pid: int | None = None
    ready_timeout_s: float = 60.0  # how long to wait for the broker at start
    # Prometheus endpoint (broker/prom.py; needs prometheus_client): None = off, 0 = OS pick
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.replan_interval_s <= 0 or self.demand_halflife_s <= 0:
            raise ValueError("replan_interval_s and demand_halflife_s must be > 0")
        if self.dup_factor <= 1 or not 0 < self.probe_weight <= 1:
            raise ValueError("dup_factor must be > 1 and probe_weight in (0, 1]")
        if not 0 <= self.batch_exponent <= 1 or self.hop_cost_bytes < 0 or self.min_gain >= 1:
            raise ValueError("batch_exponent in [0, 1], hop_cost_bytes >= 0, min_gain < 1")
        if self.dup_confirm_s < 0 or self.dup_move_factor < 1:
            raise ValueError("dup_confirm_s must be >= 0 and dup_move_factor >= 1")
        if self.max_spawn < 0 or bool(self.spawn_command) != bool(self.stop_command):
            raise ValueError("max_spawn must be >= 0; spawn_command needs a stop_command")
        if any(kl < 0 for _, kl in self.tolerance):
            raise ValueError("tolerances are KL values >= 0")
