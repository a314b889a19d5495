"""BrokerConfig: everything the broker process is started with (one frozen dataclass)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_BIND = "tcp://127.0.0.1:5555"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Broker settings; the CLI parses flags into this and calls `run_broker_process(cfg)`.

    The bound endpoint (the real one: `tcp://127.0.0.1:0` becomes the port the OS chose) is
    reported, once the socket is bound and the zoo read, to whichever of these is set:
    - `ready_file`: the endpoint is written to this path atomically (temp file + rename), so
      a launcher polling for the file never reads a partial line;
    - `ready_conn`: a `multiprocessing.connection.Connection` (the sending end of a
      `Pipe(duplex=False)` given to a spawned child); the endpoint is sent as UTF-8 bytes with
      `send_bytes` (no pickle) and the connection is closed.
    It is also logged as `[ready] broker listening on ...`.
    """

    bind: str = DEFAULT_BIND
    zoo_dir: str | None = None
    # ping-pong liveness: a worker silent for heartbeat_s * liveness is purged
    heartbeat_s: float = 1.0
    liveness: int = 3
    # limits (typed errors: OVERLOADED, BAD_REQUEST, TIMEOUT)
    max_waiting: int = 256
    default_timeout_s: float = 300.0
    max_new_tokens_limit: int = 4096
    max_prompt_tokens: int = 8192
    # fail-over
    max_replays: int = 16
    ban_base_s: float = 0.1
    ban_max_s: float = 5.0
    # fallback EOS when a model's generation config and config name none
    eos_token_id: int | None = None
    # the unknown-model path re-reads the zoo at most this often
    reload_min_interval_s: float = 1.0
    # poll timeout of the event loop: deadlines and pings are checked at least this often
    tick_s: float = 0.05
    # SIGTERM: running requests get this long to finish before they fail
    drain_timeout_s: float = 5.0
    # how the bound endpoint is reported (see the class docstring)
    ready_file: str | None = None
    ready_conn: Any = None
    # when started as a child: the launcher's pid (arms PR_SET_PDEATHSIG on Linux)
    parent_pid: int | None = None
    log_level: str = "INFO"
    # CurveZMQ: a keys folder (`blockllm keys gen DIR`); None = plain TCP
    keys_dir: str | None = None
    # STATS PUB socket for the planner: None = the host of `bind` on a port the OS picks
    # (reported in STATUS as "stats_endpoint"); "" = publish nothing
    stats_bind: str | None = None
    stats_interval_s: float = 0.5
    # a full STATS every this many snapshots (and when the catalog changes); in between a
    # STATS_DELTA with what changed since the last full one (broker/stats_delta.py)
    stats_full_every: int = 10
    # routes shown recomputed per STATS build at most, the longest out of date first; the
    # others show their previous route, marked stale (broker/shown.py); 0: no bound
    stats_routes_per_build: int = 32
    # encoding a STATS snapshot takes at most about this long per turn of the broker's loop,
    # which routes in between (broker/stats_send.py); 0: all of it on one turn
    stats_turn_s: float = 0.05
    # UNLOAD_STAGE from a planner: requests get this long to leave the stage before it goes
    unload_drain_s: float = 30.0
    # hedging: a decode hop late by max(hedge_after_s, hedge_factor x the fastest worker's
    # step p50) is re-sent on a route avoiding its worker; first answer wins (0: never)
    hedge_after_s: float = 0.5
    hedge_factor: float = 4.0
    # Prometheus endpoint (broker/prom.py; needs prometheus_client): None = off, 0 = OS pick
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # a running request that moves migrates its KV (broker/migrate.py) instead of replaying;
    # a migration not done within migrate_timeout_s replays
    kv_migration: bool = True
    migrate_timeout_s: float = 5.0
    # speculative execution (worker/speculate.py), per model: (model, tolerance) pairs; a
    # decode step's input also goes to the hop after the one it is meant for (SPECULATE), and
    # that hop's real FORWARD is answered from the early run when its input is within the
    # relative L2 `tolerance` (0: only an identical input, i.e. exact). A model absent: off.
    speculate: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0 or self.liveness < 1:
            raise ValueError("heartbeat_s must be > 0 and liveness >= 1")
        if self.max_waiting < 0 or self.max_new_tokens_limit < 1 or self.max_prompt_tokens < 1:
            raise ValueError("max_waiting >= 0, max_new_tokens_limit >= 1, max_prompt_tokens >= 1")
        if self.default_timeout_s <= 0 or self.tick_s <= 0:
            raise ValueError("default_timeout_s and tick_s must be > 0")
        if self.stats_interval_s <= 0 or self.unload_drain_s < 0:
            raise ValueError("stats_interval_s must be > 0 and unload_drain_s >= 0")
        if self.stats_full_every < 1:
            raise ValueError("stats_full_every must be >= 1 (1: every STATS is full)")
        if self.stats_routes_per_build < 0:
            raise ValueError("stats_routes_per_build must be >= 0 (0: no bound)")
        if self.stats_turn_s < 0:
            raise ValueError("stats_turn_s must be >= 0 (0: a snapshot encoded on one turn)")
        if any(not tol >= 0 for _, tol in self.speculate):
            raise ValueError("speculation tolerances must be >= 0")

    def speculation_tolerance(self, model: str) -> float | None:
        """The speculation tolerance of `model`; None when it does not speculate (default)."""
        for name, tol in self.speculate:
            if name == model:
                return tol
        return None

    @property
    def expiry_s(self) -> float:
        """How long a silent worker stays registered."""
        return self.heartbeat_s * self.liveness
