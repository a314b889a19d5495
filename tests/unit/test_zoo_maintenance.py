"""verify, gc, crash safety and concurrency of the zoo, with real files and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from blockllm.zoo import Zoo
from blockllm.zoo.fsutil import is_temp
from tests.unit.test_zoo_support import finetune

# Runs an import that SIGKILLs itself on the 3rd block rename: the 3rd block's temp file is
# complete and fsynced but never renamed, exactly like a crash between write and publish.
KILLED_IMPORT = """
import os, signal, sys
real_replace = os.replace
renames = 0
def replace_then_die(src, dst):
    global renames
    if str(dst).endswith(".safetensors"):
        renames += 1
        if renames == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace_then_die
from blockllm.zoo import Zoo
Zoo(sys.argv[1]).import_checkpoint(sys.argv[2], "victim")
"""


def _temps(zoo: Zoo) -> list:
    return [p for p in zoo.root.rglob("*") if is_temp(p)]


def test_verify_catches_flipped_byte(tmp_path, tiny_checkpoint):
    zoo = Zoo(tmp_path)
    a = zoo.import_checkpoint(tiny_checkpoint("llama"), "a")
    b = zoo.import_checkpoint(tiny_checkpoint("llama"), "b")
    assert zoo.verify().ok
    victim = a.chain[2]
    path = zoo.block_path(victim)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = zoo.verify()
    assert not report.ok
    [bad] = report.bad
    assert (bad.kind, bad.id, bad.models) == ("block", victim, ("a", "b"))
    assert "hashes to" in bad.reason
    zoo.block_path(b.chain[0]).unlink()
    reasons = {x.id: x.reason for x in zoo.verify().bad}
    assert reasons[b.chain[0]] == "missing" and victim in reasons


def test_gc_removes_unreferenced_blocks_tokenizers_and_temps(tmp_path, tiny_checkpoint):
    zoo = Zoo(tmp_path)
    base = zoo.import_checkpoint(tiny_checkpoint("llama"), "base")
    other = zoo.import_checkpoint(tiny_checkpoint("qwen2"), "other")
    stale = zoo.block_path(base.chain[0]).with_name(".x.safetensors.123.abcd.tmp")
    stale.write_bytes(b"partial")
    report = zoo.gc()
    assert (report.removed_blocks, report.removed_temp_files) == (0, 1)
    zoo.remove("other")
    report = zoo.gc()
    assert report.removed_blocks == len(set(other.chain))
    assert report.freed_bytes == sum(other.block_bytes)
    assert report.removed_tokenizers == 0  # same tokenizer as base
    assert {p.stem for p in zoo.iter_block_files()} == set(base.chain)
    assert zoo.verify().ok and _temps(zoo) == []
    zoo.remove("base")
    assert zoo.gc().removed_tokenizers == 1
    assert list(zoo.iter_block_files()) == [] and zoo.du()["physical_bytes"] == 0


def test_killed_import_leaves_no_partial_block(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("llama")
    zoo = Zoo(tmp_path / "zoo")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_IMPORT, str(zoo.root), str(src)],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert zoo.list_models() == []
    assert len(list(zoo.iter_block_files())) == 2  # renamed before the kill: complete
    assert len(_temps(zoo)) == 1  # the third block: only ever a temp name
    assert zoo.verify().ok  # every visible block is whole
    report = zoo.gc()
    assert report.removed_temp_files == 1 and report.removed_blocks == 2
    assert _temps(zoo) == []
    m = zoo.import_checkpoint(src, "victim")
    assert zoo.verify().ok and len(set(m.chain)) == len(list(zoo.iter_block_files()))


def test_two_concurrent_import_processes(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("llama", layers=6)
    ft = finetune(src, tmp_path / "ft", {1: 1e-2})
    root = tmp_path / "zoo"
    cmd = [sys.executable, "-m", "blockllm.client.cli", "zoo", "import", "--zoo", str(root)]
    procs = [
        subprocess.Popen([*cmd, str(path), "--name", name], stderr=subprocess.PIPE)
        for path, name in ((src, "base"), (ft, "ft"))
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    zoo = Zoo(root)
    assert zoo.list_models() == ["base", "ft"]
    assert zoo.verify().ok
    usage = zoo.du()
    assert usage["blocks"] == 9 and usage["shared_blocks"] == 7
    assert _temps(zoo) == []


def _waiting_for_lock(path) -> bool:
    """True when some process/thread is blocked on a flock of `path` (/proc/locks '->')."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return any("->" in line and f":{ino} " in line for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks")
def test_gc_waits_for_an_inflight_import(tmp_path, tiny_checkpoint):
    """gc during an import must not delete blocks the import wrote but has not published."""
    zoo = Zoo(tmp_path)
    gc_reports = []
    gc = threading.Thread(target=lambda: gc_reports.append(zoo.gc()))
    lock_file = zoo.root / "locks" / "collect.lock"

    def progress(done: int, total: int) -> None:
        if done == 2:  # two blocks written, nothing references them yet
            gc.start()
            deadline = time.monotonic() + 30
            while gc.is_alive() and not _waiting_for_lock(lock_file):
                assert time.monotonic() < deadline, "gc neither ran nor blocked"
                time.sleep(0.001)  # polling a condition with a deadline, not a fixed wait
            assert gc.is_alive(), "gc ran while an import held the shared lock"

    m = zoo.import_checkpoint(tiny_checkpoint("llama"), "m", progress)
    gc.join(timeout=30)
    assert gc_reports and gc_reports[0].removed_blocks == 0
    assert zoo.verify().ok and all(zoo.has_block(b) for b in m.chain)
