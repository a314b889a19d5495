"""Tensor frames in and out of a worker on a CUDA device: pinned host memory, non-blocking
copies; on the CPU, exactly what the worker did before (one copy out of the zmq frame in, the
engine's tensor out).

In: the IO thread copies a received frame into pinned host memory (`host_copy`: the one copy
it makes anyway, out of the zmq frame), and the compute loop starts a non-blocking upload of
it (`to_device`). Torch's caching host allocator pools the pinned blocks and keeps a block
from reuse until the copies that read it are done.

Out: the compute loop starts a non-blocking download of a stage's output into pinned memory
and records an event (`to_host`); the IO thread waits on that event right before it encodes
the frame, so the next step starts while the copy and the send are under way (no step waits
on a send). Untested on a GPU here: `python -m tests.gpu` runs the `cuda` tests where one is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def pinned_frames(device: str) -> bool:
    """Whether a worker on `device` stages its frames in pinned host memory."""
    return device.startswith("cuda") and torch.cuda.is_available()


def host_copy(view: torch.Tensor, pinned: bool) -> torch.Tensor:
    """A copy of a received frame's tensor `view` (which zmq owns), in pinned memory if
    `pinned`."""
    if not pinned:
        return view.clone()
    out = torch.empty(view.shape, dtype=view.dtype, pin_memory=True)
    out.copy_(view)
    return out


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`x` on `device`: the same tensor on the CPU; from pinned memory, a non-blocking copy
    (ordered before the kernels queued after it on the current stream)."""
    device = torch.device(device)
    if device.type == "cpu" or x.device == device:
        return x
    return x.to(device, non_blocking=x.is_pinned())


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """A CPU, contiguous version of `t` for a frame, and what to call before its bytes are
    read (None: ready now). On CUDA: a non-blocking copy into pinned memory and the event that
    marks its end."""
    if t.device.type == "cpu":
        return t.contiguous(), None
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return out, done.synchronize
