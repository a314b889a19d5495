"""deploy/: the systemd units pass `systemd-analyze verify` and keep their lifecycle and
hardening settings; the environment and Prometheus examples match the units and the config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockllm.broker.cluster_config import load_cluster_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = DEPLOY / "systemd"
SERVICES = (
    "blockllm-broker.service",
    "blockllm-planner.service",
    "blockllm-worker@.service",
    "blockllm-http.service",
)
INSTALLED_BIN = "/opt/blockllm/venv/bin/blockllm"

systemd_analyze = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    systemd_analyze is None, reason="systemd-analyze is not installed (Debian: apt install systemd)"
)


def _settings(unit: str) -> dict[str, list[str]]:
    """KEY -> values of a unit file (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _staged_units(tmp_path: Path) -> Path:
    """The units with ExecStart's binary swapped for one that exists here (verify checks it)."""
    exe = shutil.which("blockllm") or str(Path(sys.executable).with_name("blockllm"))
    if not Path(exe).exists():
        exe = sys.executable
    for src in UNITS.iterdir():
        if src.suffix in (".service", ".target"):
            (tmp_path / src.name).write_text(src.read_text().replace(INSTALLED_BIN, exe))
    return tmp_path


def _verify(directory: Path, *units: str) -> subprocess.CompletedProcess[str]:
    assert systemd_analyze is not None
    return subprocess.run(
        [systemd_analyze, "verify", *(f"./{u}" for u in units)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _our_complaints(stderr: str, directory: Path) -> list[str]:
    # Only lines about our files: a container's own units may draw unrelated warnings.
    return [
        line
        for line in stderr.splitlines()
        if str(directory) in line or "blockllm" in line or "gpu.conf" in line
    ]


@needs_systemd_analyze
def test_units_verify(tmp_path: Path) -> None:
    staged = _staged_units(tmp_path)
    units = (*SERVICES, "blockllm-worker@0.service", "blockllm.target")
    result = _verify(staged, *units)
    assert result.returncode == 0, result.stderr
    assert _our_complaints(result.stderr, staged) == []


@needs_systemd_analyze
def test_worker_gpu_dropin_verifies(tmp_path: Path) -> None:
    staged = _staged_units(tmp_path)
    dropin = staged / "blockllm-worker@.service.d"
    dropin.mkdir()
    shutil.copy(UNITS / "gpu.conf", dropin / "gpu.conf")
    result = _verify(staged, "blockllm-worker@gpu0.service")
    assert result.returncode == 0, result.stderr
    assert _our_complaints(result.stderr, staged) == []


@needs_systemd_analyze
def test_verify_catches_a_typo(tmp_path: Path) -> None:
    """Guard for the two tests above: verify exits 0 on unknown keys, so stderr is the signal."""
    staged = _staged_units(tmp_path)
    unit = staged / "blockllm-broker.service"
    unit.write_text(unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = _verify(staged, "blockllm-broker.service")
    assert any("NoNewPrivilege" in line for line in _our_complaints(result.stderr, staged))


@needs_systemd_analyze
def test_security_exposure(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [systemd_analyze, "security", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    if "--offline" not in help_text:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 252)")
    staged = _staged_units(tmp_path)
    for unit in (
        "blockllm-broker.service",
        "blockllm-planner.service",
        "blockllm-worker@0.service",
        "blockllm-http.service",
    ):
        result = subprocess.run(
            [systemd_analyze, "security", "--offline=true", f"./{unit}"],
            cwd=staged,
            capture_output=True,
            text=True,
            timeout=60,
        )
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout + result.stderr)
        assert m, result.stdout + result.stderr
        # 3.2-3.6 today ("OK"); anything above 5 means hardening was dropped.
        assert float(m.group(1)) <= 5.0, (unit, m.group(1))


@pytest.mark.parametrize("unit", SERVICES)
def test_service_lifecycle_and_hardening(unit: str) -> None:
    s = _settings(unit)
    command = unit.split("-", 1)[1].split("@")[0].split(".")[0]
    exec_start = s["ExecStart"][0]
    assert exec_start.startswith(f"{INSTALLED_BIN} {command} --config /etc/blockllm/cluster.toml")
    if command == "worker":
        assert "--name %i" in exec_start
    assert s["User"] == ["blockllm"] and s["Group"] == ["blockllm"]
    # readiness by sd_notify (broker/lifecycle.py), from the `blockllm` process itself only
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] and s["WatchdogSec"][0].endswith("s")  # processes send WATCHDOG=1
    assert s["EnvironmentFile"] == ["-/etc/blockllm/blockllm.env"]
    assert s["Restart"] == ["on-failure"]
    assert s["KillSignal"] == ["SIGTERM"] and s["KillMode"] == ["mixed"]
    assert s["RestartPreventExitStatus"] == ["2 78"]  # usage / EX_CONFIG: no restart loop
    assert int(s["TimeoutStopSec"][0].rstrip("s")) >= 30
    assert s["StateDirectory"] == ["blockllm"]
    assert "network-online.target" in s["Wants"][0]
    assert "Requires" not in s  # a worker node has no local broker
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "LockPersonality",
    ):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["ReadWritePaths"] == ["/var/lib/blockllm"]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert int(s["LimitNOFILE"][0]) >= 65536
    # torch's JIT (oneDNN on CPU, CUDA's PTX JIT) needs W+X memory: only the worker allows it.
    assert s["MemoryDenyWriteExecute"] == ["no" if command == "worker" else "yes"]


def test_env_example_matches_the_units() -> None:
    lines = [
        line
        for line in (DEPLOY / "blockllm.env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    env = dict(line.split("=", 1) for line in lines)
    assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*", k) for k in env), env  # EnvironmentFile syntax
    for unit in SERVICES:
        for var in re.findall(r"\$(\w+)", _settings(unit)["ExecStart"][0]):
            assert var in env, (unit, var)


def test_prometheus_example_matches_the_config() -> None:
    yaml = pytest.importorskip("yaml")
    prom = yaml.safe_load((DEPLOY / "prometheus.example.yml").read_text())
    ports = {
        job["job_name"]: {
            int(t.rsplit(":", 1)[1]) for sc in job["static_configs"] for t in sc["targets"]
        }
        for job in prom["scrape_configs"]
    }
    cfg = load_cluster_config(DEPLOY / "cluster.example.toml")
    assert ports["blockllm-broker"] == {cfg.broker()["metrics_port"]}
    assert ports["blockllm-planner"] == {cfg.planner()["metrics_port"]}
    assert ports["blockllm-worker"] == {cfg.worker(n)["metrics_port"] for n in cfg.worker_names()}


def _documented_commands(text: str) -> list[tuple[list[str], set[str]]]:
    """(command path, --flags written after it) for each `blockllm CMD [SUB] ...` in `text`."""
    import click

    from blockllm.client.cli import cli

    out = []
    for line in text.replace("\\\n", " ").splitlines():
        for m in re.finditer(r"\bblockllm ((?:[a-z][a-z-]* ?)+)(.*)", line):
            cmd, path, words = cli, [], m.group(1).split()
            for w in words:
                if not (isinstance(cmd, click.Group) and w in cmd.commands):
                    break
                cmd, path = cmd.commands[w], [*path, w]
            if not path:
                continue
            # the flags up to the end of the command (a closing backquote, a shell operator)
            rest = re.split(r"`|\)|;|&&|\|", " ".join(words[len(path) :]) + " " + m.group(2))[0]
            flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest))
            known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            out.append((path, flags - known))
    return out


def test_documented_commands_and_flags_exist() -> None:
    """Every `blockllm ...` command line in the guide and the units names real flags."""
    texts = [(DEPLOY / "README.md").read_text()]
    texts += [(UNITS / unit).read_text() for unit in SERVICES]
    found = [entry for text in texts for entry in _documented_commands(text)]
    assert len(found) >= 10  # the parser still finds the guide's commands
    assert [(path, unknown) for path, unknown in found if unknown] == []


_MDWE_PROBE = r"""
import ctypes, importlib, importlib.util, sys
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE (65), PR_MDWE_REFUSE_EXEC_GAIN (1): what MemoryDenyWriteExecute=yes enforces.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    print("no-mdwe"); sys.exit(0)
import torch
from blockllm.broker import frames, protocol
for name in (
    "blockllm.broker.proc",
    "blockllm.broker.broker",
    "blockllm.broker.planner.proc",
    "blockllm.client.http.app",
):
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)
t = torch.arange(6, dtype=torch.bfloat16).view(2, 3)
wire = bytes(frames.tensor_frame(t))
assert torch.equal(frames.tensor_from_frame(wire, protocol.TensorMeta("bfloat16", (2, 3))), t)
from tokenizers import Tokenizer, models, pre_tokenizers  # the broker detokenizes
tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
assert tok.encode("a b").ids == [0, 1]
print("ok")
"""


def test_broker_code_runs_with_write_execute_memory_denied() -> None:
    """The broker, planner and HTTP units set MemoryDenyWriteExecute=yes: their imports and the
    frame codec must work under it (the kernel's PR_SET_MDWE gives the same refusal here)."""
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_PROBE], capture_output=True, text=True, timeout=120
    )
    if result.stdout.strip() == "no-mdwe":
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_guide_installs_what_the_example_config_needs() -> None:
    """19.1: the example config turns metrics ports on, so every `pip install` of blockllm in
    the guide installs the metrics extra (without prometheus_client the broker exits 78)."""
    cfg = load_cluster_config(DEPLOY / "cluster.example.toml")
    assert cfg.broker()["metrics_port"]
    installs = [
        line
        for line in (DEPLOY / "README.md").read_text().splitlines()
        if "pip install" in line and "/opt/blockllm/src" in line
    ]
    assert len(installs) >= 2 and all("[metrics]" in line for line in installs), installs


def test_the_guide_matches_the_example_config_and_names_reload() -> None:
    """19.7: the model the guide imports is the one the example's stages name; `blockllm
    reload` is in the guide; metrics listen on loopback unless the operator says otherwise."""
    import re

    guide = (DEPLOY / "README.md").read_text()
    cfg = load_cluster_config(DEPLOY / "cluster.example.toml")
    imported = set(re.findall(r"blockllm zoo import \S+ --name (\S+)", guide))
    staged = {s.rsplit(":", 1)[0] for n in cfg.worker_names() for s in cfg.worker(n)["stages"]}
    assert staged and staged <= imported, (staged, imported)
    assert "blockllm reload --broker" in guide
    assert cfg.broker()["metrics_host"] == "127.0.0.1"


def test_http_section_of_the_example_config() -> None:
    """[http] of the example config reaches `blockllm http` (bind, api_keys, broker address)."""
    cfg = load_cluster_config(DEPLOY / "cluster.example.toml")
    http = cfg.http()
    assert http["bind"] == "0.0.0.0:8000" and http["api_keys"].endswith("api_keys.toml")
    assert http["broker"] == cfg.broker_address() and http["keys"]
    assert "[http]" in (DEPLOY / "README.md").read_text()
    # `blockllm serve --config` takes the same section as its --http and --api-keys
    from blockllm.client.cli.http_api import serve_file_values

    assert serve_file_values(http) == {
        "http_bind": "0.0.0.0:8000",
        "api_keys_file": http["api_keys"],
        "default_max_tokens": 256,
        "request_timeout_s": 300.0,
    }


def test_the_guide_rotates_the_broker_key_with_the_command() -> None:
    """Issue 19.2: copying authorized/*.key by hand overwrote the new folder's own keys; the
    guide's steps (tested in tests/integration/test_key_rotation.py) use the command."""
    guide = (DEPLOY / "README.md").read_text()
    rotation = guide[guide.index("## 9. Rotate keys") : guide.index("## 10.")]
    assert "blockllm keys rotate-broker /etc/blockllm/keys /etc/blockllm/keys.new" in rotation
    assert "copy the old `authorized/*.key`" not in rotation


def test_the_guide_says_workers_pull_whole_models_and_how_to_size_disks() -> None:
    """Issue 19.7: the guide implied a worker pulls only the blocks it hosts; it pulls whole
    models (worker/fetch.py `fetch_model`: every block of the chain), so the guide says so."""
    guide = (DEPLOY / "README.md").read_text()
    assert "a worker pulls whole models" in guide and "physical_bytes" in guide
    assert "pulls the blocks it hosts" not in guide
