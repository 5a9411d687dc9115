"""The device-agnostic paths on every available device: clustering, both EMoE executors, MIGU statistics.

Each test runs on CPU everywhere and on CUDA where a GPU is present (``benchmarks/gpu_check.sh``
runs this file there), and compares the device's result with the CPU reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modulart as mt
from modulart.emoe.cluster import balanced_kmeans, cluster_sizes

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


class GatedFFN(nn.Module):
    """SwiGLU FFN ``x [T, d] -> [T, d]``: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _blobs(k: int, per: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    return torch.repeat_interleave(10 * centres, per, dim=0) + torch.randn(k * per, d, generator=g)


@pytest.mark.parametrize("device", DEVICES)
def test_clustering_on_device_finds_the_cpu_partition(device: str) -> None:
    x = _blobs(6, 20, 32, seed=0)
    cpu = balanced_kmeans(x, 6, cache=False)
    dev = balanced_kmeans(x.to(device), 6, cache=False)
    assert dev.device.type == device
    assert cluster_sizes(dev.cpu(), 6).tolist() == [20] * 6
    pairs = set(zip(cpu.tolist(), dev.cpu().tolist(), strict=True))
    assert len(pairs) == 6  # the same partition up to relabelling


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("executor", ["masked", "sparse"])
def test_emoe_executor_on_device_matches_cpu(device: str, executor: str) -> None:
    torch.manual_seed(0)
    cpu_model = GatedFFN(16, 64)
    dev_model = copy.deepcopy(cpu_model).to(device)
    cfg = {"num_experts": 8, "top_k": 2, "layers": "all", "split": "random", "executor": executor}
    h_cpu, h_dev = mt.emoe.apply(cpu_model, **cfg), mt.emoe.apply(dev_model, **cfg)
    x = torch.randn(37, 16)
    y_cpu = cpu_model(x)
    y_dev = dev_model(x.to(device))
    assert y_dev.device.type == device
    torch.testing.assert_close(y_dev.cpu(), y_cpu, atol=1e-5, rtol=1e-4)
    y_cpu.square().mean().backward()
    y_dev.square().mean().backward()
    for (name, p_cpu), p_dev in zip(cpu_model.named_parameters(), dev_model.parameters(), strict=True):
        assert p_cpu.grad is not None and p_dev.grad is not None, name
        torch.testing.assert_close(p_dev.grad.cpu(), p_cpu.grad, atol=1e-5, rtol=1e-4, msg=name)
    h_cpu.remove()
    h_dev.remove()


@pytest.mark.parametrize("device", DEVICES)
def test_migu_statistics_and_step_on_device_match_cpu(device: str) -> None:
    torch.manual_seed(0)
    cpu_model = nn.Sequential(nn.Linear(12, 48), nn.GELU(), nn.Linear(48, 12))
    dev_model = copy.deepcopy(cpu_model).to(device)
    x = torch.randn(32, 12)
    results = []
    for model, xb in ((cpu_model, x), (dev_model, x.to(device))):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = mt.migu.apply(model, keep_ratio=0.25, select="topk", optimizer=opt)
        model(xb).square().sum().backward()
        scores = {k: v.cpu() for k, v in handle.scores().items()}  # read before the step resets them
        opt.step()
        results.append((scores, handle.masks()))
        handle.remove()
    (s_cpu, m_cpu), (s_dev, m_dev) = results
    assert set(s_cpu) == set(m_cpu) == set(s_dev) == set(m_dev) == {"0", "2"}
    assert all(int(m.sum()) == m.numel() // 4 for m in m_cpu.values())  # topk, keep ratio 0.25
    for path in s_cpu:
        torch.testing.assert_close(s_dev[path], s_cpu[path], atol=1e-4, rtol=1e-4, msg=path)
        assert torch.equal(m_dev[path].cpu(), m_cpu[path]), path  # well-separated scores: the same units
    for (name, p_cpu), p_dev in zip(cpu_model.named_parameters(), dev_model.parameters(), strict=True):
        torch.testing.assert_close(p_dev.detach().cpu(), p_cpu.detach(), atol=1e-5, rtol=1e-4, msg=name)
