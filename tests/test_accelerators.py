"""One accelerator table (pretrain/accelerators.py) for training's MFU, `pretrain plan` and the
benchmarks, matched by exact device names."""

import dataclasses

import pytest
import torch

from pretrain import accelerators, plan
from pretrain.accelerators import BY_KEY, by_device_name, peak_flops
from pretrain.config import load
from pretrain.metrics import throughput


@pytest.mark.parametrize("device_name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA A100-SXM4-40GB", "a100-40g"), ("NVIDIA A800-SXM4-80GB", "a800"),
    ("NVIDIA A10G", "a10g"), ("NVIDIA RTX A6000", "a6000")])
def test_devices_are_found_by_their_exact_names(device_name, key):
    assert by_device_name(device_name) is BY_KEY[key]


def test_substrings_do_not_match():
    assert by_device_name("NVIDIA H100") is None and by_device_name("H200") is None
    assert by_device_name("NVIDIA GH200 480GB").peak_tflops == 989  # its own entry, not the H200's
    assert by_device_name("NVIDIA GH200 480GB").memory_gib < BY_KEY["h200"].memory_gib


def test_h100_pcie_mfu_logged_equals_the_plans(monkeypatch):
    """Training logs MFU against the peak the plan predicts with, and the PCIe part plans with
    PCIe bandwidth rather than NVLink's."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    device = torch.device("cuda", 0)
    pcie = accelerators.of_device(device)
    assert pcie is BY_KEY["h100-pcie"] and peak_flops(device) == 756e12
    assert pcie.intra_node_gbps < BY_KEY["h100"].intra_node_gbps

    config = load(None, ["model.vocab_size=32000", "train.global_batch_size=8", "data.source=synthetic"])
    predicted = plan.plan(config, 8, pcie)
    logged = throughput(int(predicted.tokens_per_sec * 10), 10.0, config.model.flops_per_token(), 8, peak_flops(device))
    print(f"H100 PCIe: plan MFU {predicted.mfu:.4f}, logged MFU at the plan's tokens/s {logged['mfu']:.4f}")
    assert logged["mfu"] == pytest.approx(predicted.mfu, rel=1e-6)
    nvlink = plan.plan(config, 8, dataclasses.replace(pcie, intra_node_gbps=BY_KEY["h100"].intra_node_gbps))
    assert predicted.time_s["data_parallel"] > nvlink.time_s["data_parallel"]

