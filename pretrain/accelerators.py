"""The table of accelerators: datasheet dense bf16 peak, memory as torch reports it, and the
bus bandwidth of an all-reduce inside a node and per GPU across nodes. Training's MFU, `pretrain
plan` and the benchmarks all read it. A CUDA device is found by its exact name
(`torch.cuda.get_device_name`), never by a substring: "NVIDIA H100 PCIe" is not the SXM part,
and a GH200 is not an H200."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accelerator:
    key: str  # what `pretrain plan --gpu` calls it
    name: str
    device_names: tuple[str, ...]  # torch.cuda.get_device_name() of this part, exactly
    memory_gib: float
    peak_tflops: float  # dense bf16, no sparsity
    intra_node_gbps: float  # all-reduce bus bandwidth inside a node (NVLink, or PCIe without it)
    inter_node_gbps: float  # per GPU across nodes (InfiniBand / RoCE)


ACCELERATORS = (
    Accelerator("h100", "H100 SXM 80GB", ("NVIDIA H100 80GB HBM3",), 79.1, 989, 450, 50),
    Accelerator("h100-pcie", "H100 PCIe 80GB", ("NVIDIA H100 PCIe",), 79.1, 756, 50, 50),
    Accelerator("h100-nvl", "H100 NVL 94GB", ("NVIDIA H100 NVL",), 93.1, 835, 50, 50),
    Accelerator("h200", "H200 SXM 141GB", ("NVIDIA H200",), 139.8, 989, 450, 50),
    Accelerator("gh200", "GH200 96GB", ("NVIDIA GH200 480GB", "NVIDIA GH200 120GB"), 95.0, 989, 450, 50),
    Accelerator("gh200-144g", "GH200 144GB", ("NVIDIA GH200 144G HBM3e",), 142.0, 989, 450, 50),
    Accelerator("b200", "B200 180GB", ("NVIDIA B200",), 178.4, 2250, 900, 50),
    Accelerator("a100-80g", "A100 SXM 80GB", ("NVIDIA A100-SXM4-80GB",), 79.1, 312, 240, 25),
    Accelerator("a100-40g", "A100 SXM 40GB", ("NVIDIA A100-SXM4-40GB",), 39.4, 312, 240, 25),
    Accelerator("a100-80g-pcie", "A100 PCIe 80GB", ("NVIDIA A100 80GB PCIe",), 79.1, 312, 25, 25),
    Accelerator("a100-40g-pcie", "A100 PCIe 40GB", ("NVIDIA A100-PCIE-40GB",), 39.4, 312, 25, 25),
    Accelerator("a800", "A800 SXM 80GB", ("NVIDIA A800-SXM4-80GB",), 79.1, 312, 160, 25),
    Accelerator("l40s", "L40S 48GB", ("NVIDIA L40S",), 44.4, 362, 25, 12.5),
    Accelerator("a10g", "A10G 24GB", ("NVIDIA A10G",), 22.0, 125, 12.5, 12.5),
    Accelerator("a6000", "RTX A6000 48GB", ("NVIDIA RTX A6000",), 47.5, 155, 25, 12.5),
)
BY_KEY = {accelerator.key: accelerator for accelerator in ACCELERATORS}
_BY_DEVICE_NAME = {name: accelerator for accelerator in ACCELERATORS for name in accelerator.device_names}


def by_device_name(name: str) -> Accelerator | None:
    """The entry whose device name is exactly `name`, or None (a device not in the table)."""
    return _BY_DEVICE_NAME.get(name)


def of_device(device: torch.device) -> Accelerator | None:
    """The entry of a CUDA device, or None (the CPU, a GPU not in the table: MFU is then not reported)."""
    if device.type != "cuda":
        return None
    return by_device_name(torch.cuda.get_device_name(device))


def peak_flops(device: torch.device) -> float | None:
    """Datasheet dense bf16 FLOP/s of the device, or None."""
    accelerator = of_device(device)
    return accelerator.peak_tflops * 1e12 if accelerator else None
