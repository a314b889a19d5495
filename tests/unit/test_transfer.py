"""Frames in and out of a worker (worker/transfer.py): on the CPU, the copies the worker always
made and nothing else; on CUDA (`-k cuda`, run by `python -m tests.gpu`), pinned and
non-blocking, with the bytes right."""

from __future__ import annotations

import pytest
import torch

from blockllm.broker import frames
from blockllm.worker.messages import result_message
from blockllm.worker.transfer import host_copy, pinned_frames, to_device, to_host
from blockllm.worker.worker import ErrorCode, WorkResult


def test_cpu_frames_are_plain_copies_and_need_no_wait() -> None:
    assert not pinned_frames("cpu")
    src = torch.arange(12, dtype=torch.float32)
    view = src.view(3, 4)
    copy = host_copy(view, pinned=False)
    src.zero_()  # zmq reuses the frame: the copy must not see it
    assert copy.tolist() == torch.arange(12, dtype=torch.float32).view(3, 4).tolist()
    assert not copy.is_pinned()
    assert to_device(copy, "cpu") is copy  # no copy on the way in
    out, ready = to_host(view.t())  # a non-contiguous engine output
    assert ready is None and out.is_contiguous() and out.device.type == "cpu"
    msg, tensors, ready = result_message(WorkResult("r", 3, hidden=torch.ones(1, 4)))
    assert ready is None and msg.tensors == (frames.meta_of(tensors[0]),)
    _err, none, ready = result_message(WorkResult("r", 3, error=ErrorCode.KV_MISS, message="gone"))
    assert none == () and ready is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_frames_are_pinned_and_copied_without_blocking() -> None:
    assert pinned_frames("cuda")
    view = torch.arange(4096, dtype=torch.float32)
    staged = host_copy(view, pinned=True)
    assert staged.is_pinned() and torch.equal(staged, view)
    on_gpu = to_device(staged, "cuda")
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), view)
    out, ready = to_host(on_gpu * 2)
    assert ready is not None and out.is_pinned()
    ready()  # the download is done once this returns
    assert torch.equal(out, view * 2)
