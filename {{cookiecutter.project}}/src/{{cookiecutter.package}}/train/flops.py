"""Peak FLOPS of the training device, for model FLOPs utilisation (MFU).

MFU = achieved model FLOPs per second / peak FLOPS of the hardware. Hard-coding one GPU's peak (nanoGPT uses the
A100's 312 TFLOPS) reports nonsense elsewhere (> 100 % on an H100), so the peak comes from, in order:

1. ``--train.peak_tflops`` when given (per device);
2. for bf16 runs, the table below for known CUDA GPUs (dense bf16 tensor-core numbers from the vendors' data
   sheets, no sparsity), matched against ``torch.cuda.get_device_name()``;
3. a measurement: the best of a few large matmuls in the training dtype. That is the *achievable* peak (below the
   data-sheet number), so MFU on CPUs and unknown GPUs reads a little high compared with published figures.
"""

from __future__ import annotations

import time

import torch

# Dense bf16 TFLOPS per device (vendor data sheets). More specific names first: matching is by substring, first hit.
# None = a variant whose clocks differ from its namesake's data sheet: measure it instead of guessing.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A40", 150.0),
    ("A30", 165.0),
    ("A10G", None),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 155.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)

_measured: dict[tuple[str, torch.dtype], float] = {}


def lookup_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak in FLOPS for a known GPU name, else None."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return None if tflops is None else tflops * 1e12
    return None


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, iters: int = 5
) -> float:
    """Best observed FLOPS of a ``size`` x ``size`` matmul on ``device`` (cached per device and dtype)."""
    key = (str(device), dtype)
    if key in _measured:
        return _measured[key]
    # A private generator: measuring must not consume the global RNG, or a run's randomness would depend on
    # whether the measurement was cached (breaking exact resume).
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: the first calls pay for thread-pool start-up and kernel selection
        a @ b
    sync()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    _measured[key] = 2 * size**3 / max(best, 1e-9)
    return _measured[key]


def peak_flops(
    device: torch.device, dtype: torch.dtype | None = None, override_tflops: float | None = None
) -> tuple[float, str]:
    """(peak FLOPS of one ``device`` for MFU, where it came from): the override, the GPU table for bf16 (its numbers
    are dense bf16 tensor-core peaks, wrong for fp32), or a measurement in the run's dtype (see module docstring)."""
    if override_tflops:
        return override_tflops * 1e12, "override"
    if device.type == "cuda" and dtype == torch.bfloat16:
        known = lookup_peak_flops(torch.cuda.get_device_name(device))
        if known is not None:
            return known, "table"
    # Large enough to reach the kernel's peak (a GPU needs bigger matrices), small enough to take ~0.1 s on a CPU.
    size = 4096 if device.type == "cuda" else 1024
    return measure_peak_flops(device, dtype or torch.float32, size=size), "measured_matmul"
