"""``vk.backends.use``: plain call and ``with`` block, and the backward runs on the backend chosen at
forward time even when autograd runs it on another thread (as it always does on CUDA)."""

import threading

import pytest
import torch
from torch import nn

import vcon_kernels as vk
from vcon_kernels import backends
from vcon_kernels.backends.torch_backend import TorchBackend


@pytest.fixture(autouse=True)
def reset_choice():
    yield
    backends.use(None)


def test_plain_call_forces_until_reset():
    assert backends.forced() is None
    backends.use("torch")
    assert backends.forced() == "torch" and backends.select("cpu").name == "torch"
    backends.use(None)
    assert backends.forced() is None


def test_with_block_restores_previous_choice():
    backends.use("torch")
    with backends.use("cpp"):
        assert backends.select("cpu").name == "cpp"
    assert backends.forced() == "torch"


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'cpp', 'triton'\), got 'cuda'"):
        backends.use("cuda")


def test_backward_on_another_thread_uses_forward_time_backend(monkeypatch):
    calls = []
    original = TorchBackend.linear_backward

    def spy(self, *args):
        calls.append((self.name, threading.current_thread().name))
        return original(self, *args)

    monkeypatch.setattr(TorchBackend, "linear_backward", spy)
    layer = vk.VCONLinear.from_linear(nn.Linear(8, 4), vk.Prune(sparsity=0.5))
    with backends.use("torch"):
        y = layer(torch.randn(3, 8))
    worker = threading.Thread(target=lambda: y.sum().backward(), name="backward-thread")
    worker.start()
    worker.join()
    # Without the recorded choice the other thread would select the default (C++) backend,
    # whose class overrides linear_backward and never reaches the spy.
    assert calls == [("torch", "backward-thread")]
    assert layer.weight.grad is not None
