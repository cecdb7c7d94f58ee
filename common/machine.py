"""Which machine a measurement came from, and how busy it was.

Shared by the benchmarks of both stages (``fusedit.tools.bench``, ``repae.bench``): a timing
without the CPU model, core count, thread count and load average cannot be compared with another.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (what a reader needs to compare numbers)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """Everything needed to say which machine a number came from, and how busy it was."""
    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per GPU. H200 has H100's compute, more memory.
PEAK_BF16_DENSE = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak(
    device: torch.device, dtype: torch.dtype, override_tflops: float | None, override_source: str = "--peak-tflops"
) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from). None on CPU: there is no single dense peak a CPU's
    fp32 GEMMs run against (vector width, clocks and core count all vary), so MFU is omitted."""
    if override_tflops:
        return override_tflops * 1e12, override_source
    if device.type != "cuda":
        return None, "CPU: MFU is not meaningful (no fixed dense peak); omitted"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_DENSE.items():
        if key in name:
            note = f"{key} bf16 dense peak {peak / 1e12:.0f} TFLOP/s"
            if dtype != torch.bfloat16:
                note += f" (this run computes in {dtype}; MFU against the bf16 peak)"
            return peak, note
    return None, f"unknown GPU {name!r}: pass {override_source} for an MFU"
