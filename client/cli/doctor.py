"""`blockllm doctor --config F`: check a node before its first start and say what to fix.

Checks what the processes named (`--broker`, `--planner`, `--worker NAME`, `--http`; none:
everything the file configures) need on this node: the file itself, the Python packages
(metrics, HTTP, torch), the keys folder (pairs, roles, file modes), paths (zoos: present,
writable), ports (bindable now: nothing else listens there), the zoo (the models the stages
name). Exit 0 when all pass, 1 when any fails. It starts nothing and writes nothing.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from blockllm.client.cli.common import CliError, echo_json, json_option


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool
    what: str
    fix: str = ""


class Checks:
    """The findings of one run (pure but for reading the disk and test-binding ports)."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, ok: bool, what: str, fix: str = "") -> bool:
        self.findings.append(Finding(ok, what, "" if ok else fix))
        return ok

    def package(self, module: str, why: str, extra: str) -> None:
        found = importlib.util.find_spec(module) is not None
        self.add(found, f"package {module} ({why})", f"pip install '{extra}'")

    def port(self, who: str, host: str, port: int) -> None:
        if port == 0:
            return
        host = "0.0.0.0" if host in ("*", "") else host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            self.add(False, f"{who}: {host}:{port}", f"the host does not resolve ({e})")
            return
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                self.add(
                    False,
                    f"{who}: {host}:{port} bindable",
                    f"{e.strerror}: stop what listens there (ss -ltnp) or pick another port; "
                    "a host that is not this node's address cannot be bound",
                )
                return
        self.add(True, f"{who}: {host}:{port} bindable")

    def endpoint(self, who: str, endpoint: str | None) -> None:
        if not endpoint or not endpoint.startswith("tcp://"):
            return
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        if port.isdigit():
            self.port(who, host, int(port))

    def keys(self, keys_dir: str, roles: list[str], broker: bool) -> None:
        from blockllm.broker import security

        path = Path(keys_dir)
        if not self.add(
            path.is_dir(),
            f"keys folder {path}",
            f"make it: `blockllm keys gen {path}` on the broker node, `keys gen {path} "
            "--broker-key broker.key` on the others",
        ):
            return
        if broker:
            try:
                security.load_server_keys(path)
                security.authorized_keys(path)
                self.add(True, f"broker key pair and authorized/ in {path}")
            except security.KeysError as e:
                self.add(False, "broker key pair and authorized/", str(e))
        for role in roles:
            secret = path / f"{role}{security.SECRET_SUFFIX}"
            if role != security.CLIENT and not secret.is_file():
                self.add(
                    False,
                    f"{role} key pair in {path}",
                    f"no {secret.name}: the {role} would present client.key and be refused; "
                    f"`blockllm keys gen {path} --role {role}` (admit its .key on the broker)",
                )
                continue
            try:
                security.load_client_keys(path, role)
            except security.KeysError as e:
                self.add(False, f"{role} key pair and broker.key in {path}", str(e))
                continue
            if secret.is_file() and secret.stat().st_mode & 0o077:
                self.add(False, f"{secret} private", f"chmod 600 {secret}")
            elif not os.access(path / f"{role}{security.SECRET_SUFFIX}", os.R_OK) and (
                secret.is_file()
            ):
                self.add(False, f"{secret} readable", "chown it to the service user")
            else:
                self.add(True, f"{role} key pair and broker.key in {path}")

    def zoo(self, who: str, zoo_dir: str | None, models: list[str], must_have: bool) -> None:
        if not zoo_dir:
            self.add(not must_have, f"{who}: zoo", "set `zoo` in the file")
            return
        path = Path(zoo_dir)
        there = path if path.exists() else path.parent
        writable = os.access(there, os.W_OK | os.X_OK)
        make = f"mkdir -p {path} && chown -R blockllm: {path} (the service user)"
        self.add(
            path.is_dir() or (not must_have and writable),
            f"{who}: zoo {path} exists",
            f"{make}, then `blockllm zoo import DIR --name NAME --zoo {path}`"
            if must_have
            else f"{make}: the worker pulls its models into it",
        )
        self.add(writable, f"{who}: zoo {path} writable", f"chown -R blockllm: {there}")
        if models and not path.is_dir() and not must_have:
            pulled = ", ".join(models)
            self.add(True, f"{who}: {pulled} not in {path} yet: pulled from the broker at start")
            return
        if not models:
            return
        from blockllm.zoo import Zoo

        have = set(Zoo(path).list_models())
        for model in models:
            present = model in have
            if must_have:
                fix = f"`blockllm zoo import DIR --name {model} --zoo {path}`"
                fix += f" (it has: {', '.join(sorted(have)) or 'none'})"
                self.add(present, f"{who}: model {model} in {path}", fix)
            elif not present:
                self.add(True, f"{who}: model {model} not in {path}: pulled from the broker")


def run_checks(path: Path, broker: bool, planner: bool, workers: list[str], http: bool) -> Checks:
    from blockllm.broker.cluster_config import ConfigError, load_cluster_config

    c = Checks()
    try:
        cfg = load_cluster_config(path)
        cfg.broker_address()  # a wildcard bind without `public` is an error
    except (ConfigError, OSError) as e:
        c.add(False, f"config {path}", str(e))
        return c
    c.add(True, f"config {path}")
    if not (broker or planner or workers or http):
        broker, planner = "broker" in cfg.sections, "planner" in cfg.sections
        workers, http = cfg.worker_names(), "http" in cfg.sections
    keys = cfg.sections.get("security", {}).get("keys")
    roles = (["planner"] if planner else []) + (["worker"] if workers else [])
    roles += ["client"] if http else []
    if keys:
        c.keys(keys, roles, broker)
    metrics = cfg.sections.get("metrics", {})
    host = metrics.get("host", "127.0.0.1")
    stage_models: dict[str, list[str]] = {}
    for name in workers:
        w = cfg.worker(name)
        stage_models[name] = list(dict.fromkeys(s.rsplit(":", 1)[0] for s in w.get("stages", [])))
    metrics_on = (broker and metrics.get("broker_port", 0)) or (
        planner and metrics.get("planner_port", 0)
    )
    metrics_on = bool(metrics_on) or any(cfg.worker(n).get("metrics_port", 0) for n in workers)
    if metrics_on:
        c.package("prometheus_client", "metrics ports are set", "blockllm[metrics]")
    if workers:
        c.package("torch", "workers", "torch")
    if http:
        for module in ("fastapi", "uvicorn"):
            c.package(module, "the HTTP API", "blockllm")
    if broker:
        b = cfg.broker()
        c.endpoint("broker bind", b.get("bind"))
        c.endpoint("broker stats_bind", b.get("stats_bind"))
        c.port("broker metrics", host, metrics.get("broker_port", 0))
        wanted = sorted({m for ms in stage_models.values() for m in ms})
        c.zoo("broker", b.get("zoo"), wanted, must_have=True)
    if planner:
        c.port("planner metrics", host, metrics.get("planner_port", 0))
    for name in workers:
        w = cfg.worker(name)
        c.port(f"worker {name} metrics", w.get("metrics_host", host), w.get("metrics_port", 0))
        c.zoo(f"worker {name}", w.get("zoo"), stage_models[name], must_have=False)
    if http:
        h = cfg.http()
        bind = h.get("bind", "127.0.0.1:8000")
        hhost, _, hport = bind.rpartition(":")
        c.port("http bind", hhost, int(hport))
        if h.get("api_keys"):
            api = Path(h["api_keys"])
            fix = f"`blockllm keys api-add NAME --models M --file {api}`"
            c.add(api.is_file(), f"http api_keys {api}", fix)
    return c


@click.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The cluster file this node's units read.",
)
@click.option("--broker", "broker", is_flag=True, help="This node runs the broker.")
@click.option("--planner", "planner", is_flag=True, help="This node runs the planner.")
@click.option("--worker", "workers", multiple=True, help="This node runs worker NAME (repeat).")
@click.option("--http", "http", is_flag=True, help="This node runs the HTTP API.")
@json_option
def doctor(
    config_path: Path,
    broker: bool,
    planner: bool,
    workers: tuple[str, ...],
    http: bool,
    as_json: bool,
) -> None:
    """Check this node before its first start: packages, keys, paths, ports, zoo.

    Name what the node runs (--broker, --planner, --worker NAME, --http); without any, every
    process the file configures is checked (on a node that runs only some, name them).
    Prints one line per check with what to fix; exits 1 when any fails. Starts nothing.
    """
    checks = run_checks(config_path, broker, planner, list(workers), http)
    failed = [f for f in checks.findings if not f.ok]
    if as_json:
        echo_json({"ok": not failed, "checks": [vars_of(f) for f in checks.findings]})
    else:
        for f in checks.findings:
            click.echo(
                f"{'ok  ' if f.ok else 'FAIL'}  {f.what}"
                + (f"\n      fix: {f.fix}" if f.fix else "")
            )
    if failed:
        raise CliError(f"{len(failed)} of {len(checks.findings)} checks failed", exit_code=1)


def vars_of(f: Finding) -> dict[str, Any]:
    return {"ok": f.ok, "check": f.what, "fix": f.fix}
