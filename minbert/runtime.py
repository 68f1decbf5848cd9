"""Where and in which precision a model runs: the device choice and mixed-precision autocast."""
from contextlib import nullcontext

import torch

from .errors import ConfigError

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA on a machine without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}, but torch sees no CUDA device (use --device cpu or auto)")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (CUDA compute capability 8.0 or newer: A100, H100, RTX 30xx ...)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(device: torch.device, amp: str = "auto") -> str:
    """--amp -> the compute precision, "bf16", "fp16" or "fp32". auto: bf16 on GPUs with native bf16, fp16 with
    a gradient scaler on older GPUs (T4, V100), float32 on the CPU (bf16 is only faster there with AMX). A resolved
    precision passes through unchanged."""
    if amp not in (*AMP_CHOICES, "fp32"):
        raise ConfigError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "auto":
        return "fp32" if device.type != "cuda" else "bf16" if bf16_supported(device) else "fp16"
    return "fp32" if amp == "off" else amp


def autocast(device: torch.device, precision: str):
    """Autocast to `precision` ("bf16" or "fp16") on `device`; full precision for "fp32"."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
