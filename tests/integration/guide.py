"""Runs deploy/README.md's marked command blocks on one machine, as three nodes (test_guide.py).

A block marked `<!-- guide-test: STEP on NODE -->` is read from the guide as written. Every
substitution that makes it run here is in this file and nowhere else:

- PATHS: each node is a folder: its `/etc/blockllm`, `/var/lib/blockllm` and `/tmp/` live
  under it; `/opt/blockllm/venv/bin/blockllm` is this venv's `blockllm`, `/opt/blockllm/src`
  this checkout; `/path/to/...` checkpoints are the test's tiny ones (`Site.checkpoints`).
- ADDRESSES: 10.0.0.1 and 0.0.0.0 are 127.0.0.1; each port the guide names (`GUIDE_PORTS`)
  is one the OS picked, the same on every node (one machine: no two nodes share a port).
- USERS: `sudo` and `sudo -u blockllm` run as the test's user; `chown` and `install -g` (no
  such user or group here) are skipped; `sudoedit FILE` applies `CONFIG_EDITS`.
- NODES: `scp nodeX:PATH` / `ssh nodeX CMD` copy from / run on node X's folder; a text file
  copied to a node has its node folder swapped (on real machines the paths are the same).
- SYSTEMD: `systemctl enable --now|start|restart|stop|disable --now UNIT...` runs each unit's
  `ExecStart=` as systemd would (deploy/systemd/*.service parsed: `EnvironmentFile=`, `%i`,
  `$VARS` split into words, `WorkingDirectory=`/`StateDirectory=`, units ordered by their
  `After=`/`Before=`), waits for its `READY=1` on a `NOTIFY_SOCKET` within
  `TimeoutStartSec=`, and stops it with SIGTERM expecting exit 0 within `TimeoutStopSec=`.
- CONFIG_EDITS: the edits an operator makes to the example for this cluster: the tiny model's
  split (4 layers: chain 0..5) and no GPU, small KV budgets.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.acceptance_nodes import Node

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "deploy" / "README.md"
UNITS = REPO / "deploy" / "systemd"
BLOCKLLM = Path(sys.executable).with_name("blockllm")  # the venv's console script
GUIDE_PORTS = (5555, 5556, 8000, 9100, 9101, 9110, 9111, 9112)
NODES = ("nodeA", "nodeB", "nodeC")
CONFIG_EDITS = (
    (r'"smollm2:0-16"', '"smollm2:0-3"'),  # the tiny model: 4 decoder layers, chain 0..5
    (r'"smollm2:16-32"', '"smollm2:3-6"'),
    (r'device = "cuda:\d+"', 'device = "cpu"'),  # no GPU here (nor in CI)
    (r'kv_budget_bytes = "\d+GiB"', 'kv_budget_bytes = "32MiB"'),  # the arena is zeroed at once
)
_MARK = re.compile(
    r"^( *)<!-- guide-test: (\S+) on (nodeA|nodeB|nodeC|every node) -->\n\1```(\w+)\n(.*?)\n\1```",
    re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    step: str
    node: str  # nodeA/B/C or "every node"
    lang: str
    text: str


def guide_blocks() -> dict[str, Block]:
    """step -> its block, as the guide has it (a list item's indent removed)."""
    out: dict[str, Block] = {}
    for m in _MARK.finditer(GUIDE.read_text()):
        indent, step, node, lang, body = m.groups()
        text = "\n".join(line.removeprefix(indent) for line in body.splitlines())
        assert step not in out, f"two blocks marked {step!r} in {GUIDE}"
        out[step] = Block(step, node, lang, text)
    return out


def logical_lines(text: str) -> list[str]:
    """Shell lines with `\\` continuations joined; comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [
        line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def unit_settings(unit_file: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit_file).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, f"unit time {value!r}"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


@dataclass
class Service:
    unit: str  # e.g. blockllm-worker@gpu0.service
    node: Node
    stop_timeout: float


@dataclass
class Site:
    """The three nodes under `root`, the ports the OS picked, the running units per node."""

    root: Path
    ports: dict[int, int]
    checkpoints: dict[str, Path]  # "/path/to/checkpoint" -> a folder
    services: dict[str, list[Service]] = field(default_factory=dict)
    env: dict[str, dict[str, str]] = field(default_factory=dict)  # `export`s, per node

    def home(self, node: str) -> Path:
        return self.root / node

    # -- substitutions -----------------------------------------------------------------------
    def localize(self, text: str, node: str) -> str:
        """The guide's `text` as it runs on `node` (PATHS, ADDRESSES, checkpoints), one pass."""
        home = self.home(node)
        table = {
            "/opt/blockllm/venv/bin/blockllm": str(BLOCKLLM),
            "/opt/blockllm/src": str(REPO),
            "/etc/blockllm": str(home / "etc/blockllm"),
            "/var/lib/blockllm": str(home / "var/lib/blockllm"),
            "/tmp/": f"{home / 'tmp'}/",
            "10.0.0.1": "127.0.0.1",
            "0.0.0.0": "127.0.0.1",
            **{guide: str(path) for guide, path in self.checkpoints.items()},
        }
        literal = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
        ports = "|".join(str(p) for p in self.ports)
        rx = re.compile(rf"{literal}|:(?:{ports})(?!\d)")

        def swap(m: re.Match[str]) -> str:
            hit = m.group(0)
            return table[hit] if hit in table else f":{self.ports[int(hit[1:])]}"

        return rx.sub(swap, text)

    def move_text(self, text: str, src: str, dst: str) -> str:
        """A text file copied from node `src` to `dst`: its node folder swapped."""
        return text.replace(str(self.home(src)), str(self.home(dst)))

    def edit_config(self, text: str) -> str:
        for pattern, repl in CONFIG_EDITS:
            text = re.sub(pattern, repl, text)
        return text

    # -- running a block ---------------------------------------------------------------------
    def run(self, step: str, node: str, rename: dict[str, str] | None = None) -> list[str]:
        """Run the guide's block `step` on `node`; the stdout of each command, in order."""
        block = guide_blocks()[step]
        assert block.node in (node, "every node") or rename, (block, node)
        assert block.lang == "bash", block
        text = block.text
        for old, new in (rename or {}).items():
            text = text.replace(old, new)
        for d in ("etc", "var/lib/blockllm", "tmp"):
            (self.home(node) / d).mkdir(parents=True, exist_ok=True)
        return [
            out for line in logical_lines(text) if (out := self.command(line, node)) is not None
        ]

    def append_config(self, step: str, node: str) -> None:
        """A `toml` block the guide adds to the node's cluster.toml (edited as the rest)."""
        block = guide_blocks()[step]
        assert block.lang == "toml" and block.node == node, block
        path = self.home(node) / "etc/blockllm/cluster.toml"
        added = self.edit_config(self.localize(block.text, node))
        path.write_text(path.read_text() + "\n" + added + "\n")

    def command(self, line: str, node: str) -> str | None:
        argv = shlex.split(line, comments=True)
        while argv and argv[0] == "sudo":  # USERS
            argv = argv[3:] if argv[1:2] == ["-u"] else argv[1:]
        if not argv or argv[0] == "chown":
            return None
        tool = argv[0]
        if tool == "ssh":
            return self.command(shlex.join(argv[2:]), argv[1])
        if tool == "scp":
            (src_node, src), (dst_node, dst) = (self._remote(a, node) for a in argv[1:3])
            self._copy(src_node, Path(src), dst_node, Path(dst))
            return None
        if tool == "install":
            return self._install(argv[1:], node)
        if tool == "sudoedit":
            path = Path(self.localize(argv[1], node))
            path.write_text(self.edit_config(path.read_text()))
            return None
        if tool == "export":
            key, _, value = argv[1].partition("=")
            self.env.setdefault(node, {})[key] = self.localize(value, node)
            return None
        if tool == "systemctl":
            self.systemctl(argv[1:], node)
            return None
        argv = [self.localize(a, node) for a in argv]
        env = dict(os.environ, **self.env.get(node, {}))
        env["PATH"] = f"{BLOCKLLM.parent}{os.pathsep}{env.get('PATH', '')}"
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, env=env, cwd=self.home(node)
        )
        assert done.returncode == 0, (
            f"{node}$ {line}\n-> exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout

    def _remote(self, arg: str, node: str) -> tuple[str, str]:
        host, sep, path = arg.partition(":")
        if sep and host in NODES:
            return host, self.localize(path, host)
        return node, self.localize(arg, node)

    def _copy(
        self, src_node: str, src: Path, dst_node: str, dst: Path, mode: int | None = None
    ) -> None:
        data = src.read_bytes()
        with contextlib.suppress(UnicodeDecodeError):
            data = self.move_text(data.decode(), src_node, dst_node).encode()
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        if mode is not None:
            dst.chmod(mode)

    def _install(self, args: list[str], node: str) -> None:
        mode, directory, paths, i = None, False, [], 0
        while i < len(args):
            a = args[i]
            if a in ("-m", "-g", "-o"):
                mode = int(args[i + 1], 8) if a == "-m" else mode  # -g/-o: USERS
                i += 2
                continue
            if a == "-d":
                directory = True
            else:
                paths.append(self.localize(a, node))
            i += 1
        if directory:
            for p in paths:
                Path(p).mkdir(parents=True, exist_ok=True)
                if mode is not None:
                    Path(p).chmod(mode)
            return None
        src, dst = Path(paths[0]), Path(paths[1])
        text = src.read_text()
        if src.is_relative_to(REPO):  # a file of this checkout: the guide's paths in it
            text = self.localize(text, node)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text)
        if mode is not None:
            dst.chmod(mode)
        return None

    # -- systemd -----------------------------------------------------------------------------
    def systemctl(self, args: list[str], node: str) -> None:
        verb, rest = args[0], [a for a in args[1:] if a != "--now"]
        units = [u if "." in u else f"{u}.service" for u in rest]
        services = [u for u in units if u.endswith(".service")]
        if verb in ("daemon-reload",):
            return
        if verb in ("enable", "start"):
            for unit in _ordered(services):
                self.start(unit, node)
        elif verb in ("disable", "stop"):
            if "blockllm.target" in units:  # every unit of the node, in reverse start order
                services = [s.unit for s in self.services.get(node, [])]
            for unit in reversed(_ordered(services)):
                self.stop(unit, node)
        elif verb == "restart" and "blockllm.target" in units:  # the node's units, in order
            order = _ordered([s.unit for s in self.services.get(node, [])])
            for unit in reversed(order):
                self.stop(unit, node)
            for unit in order:
                self.start(unit, node)
        elif verb == "restart":
            for unit in services:
                self.stop(unit, node)
                self.start(unit, node)
        else:
            raise AssertionError(f"systemctl {verb}: not emulated")

    def start(self, unit: str, node: str) -> Service:
        name, _, instance = unit.removesuffix(".service").partition("@")
        settings = unit_settings(f"{name}@.service" if instance else unit)
        assert settings["Type"] == ["notify"], unit
        env: dict[str, str] = {}
        for env_file in settings.get("EnvironmentFile", []):
            path = Path(self.localize(env_file.removeprefix("-"), node))
            if path.exists() or not env_file.startswith("-"):
                env.update(_environment_file(path.read_text()))
        env.update(self.env.get(node, {}))
        (exec_start,) = settings["ExecStart"]
        argv: list[str] = []
        for word in shlex.split(self.localize(exec_start.replace("%i", instance), node)):
            argv += env.get(word[1:], "").split() if word.startswith("$") else [word]
        for state in settings.get("StateDirectory", []):
            (self.home(node) / "var/lib" / state).mkdir(parents=True, exist_ok=True)
        (cwd,) = settings["WorkingDirectory"]
        proc = Node(f"{node}-{unit}", argv, Path(self.localize(cwd, node)), extra_env=env)
        service = Service(unit, proc, _seconds(settings["TimeoutStopSec"][0]))
        self.services.setdefault(node, []).append(service)
        deadline = time.monotonic() + _seconds(settings["TimeoutStartSec"][0])
        while True:  # READY=1, or the process ended (a failed start), within TimeoutStartSec=
            try:
                proc.wait_notify("READY=1", min(1.0, max(0.0, deadline - time.monotonic())))
                break
            except TimeoutError as e:
                if proc.popen.poll() is not None or time.monotonic() >= deadline:
                    raise AssertionError(f"{e} (exit {proc.popen.poll()})\n{proc.tail()}") from None
        return service

    def stop(self, unit: str, node: str) -> None:
        running = self.services.get(node, [])
        (service,) = [s for s in running if s.unit == unit]
        service.node.popen.send_signal(signal.SIGTERM)
        rc = service.node.wait_exit(service.stop_timeout)
        assert rc == 0, f"{unit} on {node} exited {rc}:\n{service.node.tail()}"
        running.remove(service)

    def running(self) -> list[Service]:
        return [s for services in self.services.values() for s in services]

    def tails(self) -> str:
        return "\n".join(f"--- {s.node.name}:\n{s.node.tail(25)}" for s in self.running())

    def close(self) -> None:
        for service in self.running():
            service.node.close()


def _environment_file(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _ordered(units: list[str]) -> list[str]:
    """`units` in systemd's start order (After=/Before= among them), else as given."""

    def file_of(unit: str) -> str:
        name, _, instance = unit.removesuffix(".service").partition("@")
        return f"{name}@.service" if instance else unit

    def names(unit: str, key: str) -> set[str]:
        values = unit_settings(file_of(unit)).get(key, [])
        return {n for v in values for n in v.split()}

    order: list[str] = []
    left = list(units)
    while left:
        for u in left:
            before_u = {
                o
                for o in left
                if o != u and (file_of(o) in names(u, "After") or file_of(u) in names(o, "Before"))
            }
            if not before_u:
                order.append(u)
                left.remove(u)
                break
        else:
            raise AssertionError(f"ordering cycle among {left}")
    return order
