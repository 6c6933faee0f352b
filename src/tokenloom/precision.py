"""Which precision a training run computes in: one rule for the transformer and the VQGAN trainers.

bf16 autocast pays only where bf16 matmuls run in hardware (a CUDA GPU that supports it, a CPU with
AVX512-BF16 or AMX). Elsewhere PyTorch emulates them, many times slower than fp32 (measurements:
docs/training.md, from benchmarks/bench_train_precision.py)."""

from __future__ import annotations

import warnings

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware on `device` (on other CPUs they are emulated, many times slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where it is native on `device`, else "fp32"; warns on an explicit, emulated bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        warnings.warn(f"precision bf16: {device.type} has no native bf16 matmuls here, so autocast emulates them "
                      "and trains many times slower than fp32; use precision: auto or fp32", stacklevel=3)
    return precision
