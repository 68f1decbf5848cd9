"""Low-rank adapters for nn.Linear: LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024); and
LoRA / rsLoRA for nn.Embedding (the word embeddings).

The adapted module keeps the frozen base `weight`/`bias` under their original state-dict keys and adds
`lora_A` (r, in), `lora_B` (out, r) and, for DoRA, `magnitude` (out,); an embedding's `in` is its vocabulary and
`out` its width. The numerics follow PEFT's LoRA layers.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import DictConfig

VARIANTS = ("lora", "rslora", "dora")
MODES = ("lll", "fm")  # last-linear-layer (adapters only) / full-model (all but the adapted base weights)
SCALINGS = ("alpha_over_r", "alpha")  # s = α/r (Hu et al. 2021 and PEFT) or s = α (a CS224N project's reading)
ADAPTER_PARAMS = ("lora_A", "lora_B", "magnitude")
OUTSIDE_TARGETS = ("heads", "streams")  # targets that name every Linear of the multi-task heads / streams


class LoRALinear(nn.Module):
    """W₀x + b + s·B A dropout(x) (Hu et al. 2021, eq. 3); `variant` and `scaling` set s, the variant the DoRA
    re-normalisation."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, variant: str = "lora", dropout: float = 0.0,
                 scaling: str = "alpha_over_r"):
        super().__init__()
        if variant not in VARIANTS or scaling not in SCALINGS:
            raise ValueError(f"LoRA variant must be one of {VARIANTS} and scaling one of {SCALINGS}, got "
                             f"{variant!r} and {scaling!r}")
        if variant == "rslora" and scaling != "alpha_over_r":
            raise ValueError("rsLoRA's scale is α/√r by definition; leave the scaling at alpha_over_r")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features, self.r, self.variant = base.in_features, base.out_features, r, variant
        # rsLoRA: α/√r keeps the update's scale rank-independent (Kalajdzievski 2023); else α/r, or plain α
        self.scaling = alpha / math.sqrt(r) if variant == "rslora" else alpha / r if scaling == "alpha_over_r" \
            else float(alpha)
        self.weight = base.weight.requires_grad_(False)  # (out, in), the same Parameter: no copy
        self.bias = None if base.bias is None else base.bias.requires_grad_(False)  # (out,)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))  # (out, r): B = 0, ΔW = 0 at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if variant == "dora":  # m₀ = ‖W₀‖_c, one norm per output row (Liu et al. 2024, eq. 5)
            with torch.no_grad():
                self.magnitude = nn.Parameter(self.weight_norm())  # (out,)

    def adapted_weight(self) -> torch.Tensor:
        """W₀ + s·B A, (out, in)."""
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def weight_norm(self) -> torch.Tensor:
        """‖W₀ + s·B A‖ of each output row, (out,)."""
        return torch.linalg.norm(self.adapted_weight(), dim=1)

    def merged_weight(self) -> torch.Tensor:
        """The one weight equivalent with dropout off: W₀ + s·BA, its rows rescaled by m/‖·‖ for DoRA."""
        w = self.adapted_weight()  # (out, in)
        return w if self.variant != "dora" else (self.magnitude / self.weight_norm())[:, None] * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        y = F.linear(x, self.weight, self.bias)  # W₀x + b
        xd = self.dropout(x)
        delta = F.linear(F.linear(xd, self.lora_A), self.lora_B) * self.scaling  # s·B A xd
        if self.variant != "dora":
            return y + delta
        # DoRA, eq. 5: m/‖W₀ + s·BA‖_c, the norm a constant in backward (§4.3). As PEFT, active dropout
        # feeds only the rescaled terms: W₀x + b + (m/‖·‖ - 1)·W₀xd + m/‖·‖·s·BA xd, eq. 5 when xd = x
        scale = self.magnitude / self.weight_norm().detach()  # (out,)
        if isinstance(self.dropout, nn.Dropout) and self.training:
            w0x = F.linear(xd, self.weight)
        else:
            w0x = y if self.bias is None else y - self.bias
        return y + (scale - 1) * w0x + scale * delta

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, " \
               f"variant={self.variant!r}, scaling={self.scaling:g}"


class LoRAEmbedding(nn.Module):
    """E[x] + s·(B A)ᵀ[x]: a low-rank update of an embedding table, as PEFT's LoRA Embedding (A starts at 0, B
    normal, no dropout); lora_A (r, V), lora_B (H, r)."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, variant: str = "lora", scaling: str = "alpha_over_r"):
        super().__init__()
        if variant == "dora":
            raise ValueError("DoRA adapts nn.Linear layers only: leave the embeddings out of the targets, or use "
                             "lora or rslora")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.num_embeddings, self.embedding_dim, self.r = base.num_embeddings, base.embedding_dim, r
        self.padding_idx, self.variant = base.padding_idx, variant
        self.scaling = alpha / math.sqrt(r) if variant == "rslora" else alpha / r if scaling == "alpha_over_r" \
            else float(alpha)
        self.weight = base.weight.requires_grad_(False)  # (V, H), the same Parameter
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(r, self.num_embeddings, **factory))  # (r, V): ΔE = 0 at start
        self.lora_B = nn.Parameter(torch.randn(self.embedding_dim, r, **factory))  # (H, r)

    def merged_weight(self) -> torch.Tensor:
        """E + s·(B A)ᵀ, (V, H)."""
        return self.weight + self.scaling * (self.lora_B @ self.lora_A).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., H)."""
        y = F.embedding(x, self.weight, self.padding_idx)
        return y + (F.embedding(x, self.lora_A.T) @ self.lora_B.T) * self.scaling  # (..., r) -> (..., H)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, r={self.r}, " \
               f"variant={self.variant!r}, scaling={self.scaling:g}"


ADAPTED = (LoRALinear, LoRAEmbedding)


def matches(name: str, targets) -> bool:
    """PEFT's list form of `target_modules`: the module name equals a target or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, targets=("query", "value"), variant: str = "lora",
               dropout: float = 0.0, scaling: str = "alpha_over_r") -> nn.Module:
    """Replace, in place, every nn.Linear (by a LoRALinear) and nn.Embedding (by a LoRAEmbedding) whose name matches
    `targets`; returns `model`."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    chosen = [(name, m) for name, m in layers if matches(name, targets)]
    if not chosen:
        linears = [name for name, m in layers if isinstance(m, nn.Linear)]
        suffixes = sorted({name.rsplit(".", 1)[-1] for name, _ in layers})
        raise ValueError(f"apply_lora: no nn.Linear or nn.Embedding matches targets {list(targets)}; their names "
                         f"end with {suffixes} (e.g. {', '.join(linears[:4])})")
    for name, layer in chosen:
        parent, _, child = name.rpartition(".")
        adapted = LoRAEmbedding(layer, r, alpha, variant, scaling) if isinstance(layer, nn.Embedding) else \
            LoRALinear(layer, r, alpha, variant, dropout, scaling)
        setattr(model.get_submodule(parent) if parent else model, child, adapted)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into a plain nn.Linear / nn.Embedding with the merged weight (same keys, same outputs);
    returns `model`."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRAEmbedding):
            plain = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, device=m.weight.device,
                                 dtype=m.weight.dtype)
        elif isinstance(m, LoRALinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                              dtype=m.weight.dtype)
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        else:
            continue
        plain.weight.copy_(m.merged_weight())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model


def mark_trainable(model: nn.Module, mode: str = "lll") -> nn.Module:
    """'lll': only adapter parameters train; 'fm': everything but the adapted base weight/bias trains."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for module in model.modules():
        adapted = isinstance(module, ADAPTED)
        for leaf, p in module.named_parameters(recurse=False):
            adapter = adapted and leaf in ADAPTER_PARAMS
            p.requires_grad_(adapter if mode == "lll" else adapter or not adapted)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied parameters counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors (lora_A, lora_B, magnitude), keyed as in `model.state_dict()`."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_PARAMS}


@dataclass
class LoRAConfig(DictConfig):
    """The adapter recipe, stored in a checkpoint's config.json so the swap can be re-applied before loading."""

    r: int = 8
    alpha: float = 16
    targets: tuple = ("query", "value")
    variant: str = "lora"
    dropout: float = 0.0
    mode: str = "lll"
    scaling: str = "alpha_over_r"

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if self.variant not in VARIANTS or self.mode not in MODES or self.scaling not in SCALINGS:
            raise ValueError(f"LoRAConfig: variant must be one of {VARIANTS}, mode one of {MODES} and scaling one "
                             f"of {SCALINGS}, got {self.variant!r}, {self.mode!r} and {self.scaling!r}")
        if self.variant == "rslora" and self.scaling != "alpha_over_r":
            raise ValueError("LoRAConfig: rsLoRA's scale is α/√r by definition; leave --lora_scaling at alpha_over_r")

    @property
    def encoder_targets(self) -> tuple:
        """The targets inside the encoder: all but `heads` and `streams` (the multi-task model's own layers)."""
        return tuple(t for t in self.targets if t not in OUTSIDE_TARGETS)

    def apply(self, model: nn.Module, targets: tuple | None = None) -> nn.Module:
        """apply_lora with these settings (to `targets`, default the encoder's), then mark_trainable(model, mode);
        with no target inside `model`, only the marking (lll: the whole model frozen)."""
        targets = self.encoder_targets if targets is None else targets
        if targets:
            apply_lora(model, self.r, self.alpha, targets, self.variant, self.dropout, self.scaling)
        return mark_trainable(model, self.mode)
