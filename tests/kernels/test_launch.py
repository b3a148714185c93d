"""Kernel launches and tuning run on the device of their tensors (Triton launches on the
current device, wherever the pointers are)."""

from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastsam_core.kernels import tuning
from fastsam_core.kernels.launch import Launch
from fastsam_core.kernels.tuning import Tuner


class RecordingKernel:
    """Stands for a @triton.jit function: `kernel[grid](*args)` records the current device."""

    def __init__(self, current: list) -> None:
        self.current = current
        self.launched_on: list = []

    def __getitem__(self, grid: tuple):
        return lambda *args, **meta: self.launched_on.append(self.current[-1])


def test_launches_and_tuning_make_their_tensors_device_current(monkeypatch):
    current = ["cuda:0"]

    @contextmanager
    def device(d):
        current.append(str(d))
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    with FakeTensorMode():  # CUDA tensors without a GPU: only their device is used
        x = torch.empty(4, device="cuda:1")
    kernel = RecordingKernel(current)
    Launch(kernel, (1,), (x, 4), {})()
    Launch(kernel, (1,), (torch.empty(4), 4), {})()  # a CPU tensor (interpreter): no switch
    Launch(kernel, (1,), (torch.empty(4), x), {})()  # the first CUDA tensor decides
    assert kernel.launched_on == ["cuda:1", "cuda:0", "cuda:1"]

    monkeypatch.setattr(tuning, "rel_l2", lambda out, ref: 0.0)  # fake tensors hold no values
    timed_on = []
    tuner = Tuner("k", timer=lambda fn: timed_on.append(current[-1]) or 1.0)
    tuner._store = lambda *args: None
    tuner.tune("gpu", "s", {"a": lambda: x}, x)
    assert timed_on == ["cuda:1"]  # the timer's events on the kernel's device
