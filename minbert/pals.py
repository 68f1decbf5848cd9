"""Projected attention layers and low-rank layers (Stickland & Murray 2019, "BERT and PALs", §3).

Each layer gets a task-specific TS in parallel, h' = LN(h + SA(h) + TS(h)) (§3); as in the authors' code, TS sees the
layer input h and joins the residual before the layer's last LayerNorm (BertLayer does the adding). Our reading of §3:
TS(h) = V_D g(V_E h), V_E: d_m -> d_s "encoder", V_D: d_s -> d_m "decoder", both nn.Linear with bias as in their code,
  - "lowrank": g = identity, a rank-d_s linear map; d_s = 100.
  - "pal": g = multi-head self-attention in the d_s space without its output matrix, whose place V_D takes;
    d_s = 204, 12 heads, BERT's attention dropout. The paper's PALs share V_E/V_D across layers (share_ve_vd=True).
  - "mixed": PALs on layers i < L // 2, low-rank layers above.
The released code (Bert-n-Pals, modeling.py) departs from these equations: a GELU inside the low-rank layer and after
V_D in the PAL, and 6 heads in the PAL attention; this module follows the equations.
Initialisation follows that code: V_E, V_D and the PAL q/k/v weights N(0, initializer_range), biases zero. V_D is not
zero, so at initialisation a model with PALs differs from its base: on unit-scale h a low-rank TS(h) has std
σ² √(d_s d_m) per element (0.11 at σ = 0.02, d_s = 100, d_m = 768), a PAL's less (its attention averages tokens); on
all-MiniLM-L6-v2 the last hidden state moves by at most 0.09 (pal) / 0.39 (lowrank). Zero V_D gives exactly the base.
"""
from dataclasses import dataclass

import torch
from torch import nn

from .attention import BertSelfAttention, Unpadded
from .config import BertConfig, DictConfig
from .model import init_weights

KINDS = ("pal", "lowrank", "mixed")
DEFAULT_DIM = {"pal": 204, "lowrank": 100}  # the paper's d_s: about 1.13× BERT-base parameters for 8 tasks


@dataclass
class PALsConfig(DictConfig):
    """The PALs recipe, stored in a checkpoint's config.json; `dim` None means 204 for PALs, 100 for low-rank."""

    kind: str = "pal"
    dim: int | None = None
    share_ve_vd: bool = False
    share_attention: bool = False
    after_norm: bool = False  # add TS(h) after the layer's last LayerNorm (the alternative placement)
    num_heads: int = 12
    tasks: tuple[str, ...] | None = None  # the tasks that get PALs (None: all); the others use the plain encoder

    def __post_init__(self):
        self.tasks = None if self.tasks is None else tuple(self.tasks)
        if self.kind not in KINDS:
            raise ValueError(f"PALsConfig: kind must be one of {KINDS}, got {self.kind!r}")
        if self.share_attention and self.kind == "lowrank":
            raise ValueError("PALsConfig: share_attention needs PAL layers (kind 'pal' or 'mixed'), got 'lowrank'")
        if (self.dim is not None and self.dim <= 0) or self.num_heads <= 0:
            raise ValueError(f"PALsConfig: dim and num_heads must be positive, got {self.dim} and {self.num_heads}")
        pal_dim = self.d_s("pal")
        if self.kind != "lowrank" and pal_dim % self.num_heads:
            raise ValueError(f"PALsConfig: the PAL attention splits d_s = {pal_dim} into num_heads = "
                             f"{self.num_heads} heads: choose a multiple of {self.num_heads} (e.g. "
                             f"{max(1, round(pal_dim / self.num_heads)) * self.num_heads})")

    def d_s(self, kind: str) -> int:
        """The bottleneck width of a `kind` ('pal' or 'lowrank') layer: `dim`, or the paper's default for the kind."""
        return self.dim or DEFAULT_DIM[kind]

    def layer_plan(self, num_layers: int) -> list[tuple[str, int]]:
        """(kind, d_s) of each layer's TS: 'pal' or 'lowrank'."""
        kinds = ["pal" if self.kind == "pal" or (self.kind == "mixed" and i < num_layers // 2) else "lowrank"
                 for i in range(num_layers)]
        return [(k, self.d_s(k)) for k in kinds]


class TaskPALs(nn.Module):
    """One task's TS for every layer, a minbert.layers.Adapter: self(i, h, mask) = V_D g_i(V_E h) (§3), (B, T, H)."""

    def __init__(self, config: PALsConfig, bert_config: BertConfig):
        super().__init__()
        plan = config.layer_plan(bert_config.num_hidden_layers)
        H = bert_config.hidden_size
        self.after_norm = config.after_norm
        # shared V_E/V_D: one pair per d_s (mixed with default dims has two), else one pair per layer
        dims = list(dict.fromkeys(d for _, d in plan)) if config.share_ve_vd else [d for _, d in plan]
        self.proj_slot = [dims.index(d) if config.share_ve_vd else i for i, (_, d) in enumerate(plan)]
        self.ve = nn.ModuleList(nn.Linear(H, d) for d in dims)  # V_E: (B, T, H) -> (B, T, d_s)
        self.vd = nn.ModuleList(nn.Linear(d, H) for d in dims)  # V_D: (B, T, d_s) -> (B, T, H)
        pal_layers = [i for i, (k, _) in enumerate(plan) if k == "pal"]
        # PAL layers (i < L // 2 when mixed) come first, so unshared attn.{i} belongs to layer i
        self.attn_slot = [None if k != "pal" else 0 if config.share_attention else i for i, (k, _) in enumerate(plan)]
        attn_dims = [plan[i][1] for i in pal_layers][:1 if config.share_attention else None]
        self.attn = nn.ModuleList(
            BertSelfAttention(BertConfig(hidden_size=d, num_attention_heads=config.num_heads,
                                         attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
                                         attn_implementation=bert_config.attn_implementation))
            for d in attn_dims)
        self.apply(lambda m: init_weights(m, bert_config.initializer_range))

    def forward(self, i: int, h: torch.Tensor, mask: torch.Tensor | None, layout: Unpadded | None = None):
        """Layer i's TS on its input h (B, T, H), or the real tokens (N, H) of `layout`; mask additive
        (B, 1, 1, T) or None. Returns h's shape."""
        z = self.ve[self.proj_slot[i]](h)  # (B, T, d_s)
        if self.attn_slot[i] is not None:
            z = self.attn[self.attn_slot[i]](z, mask, layout)  # g = MH(z), (B, T, d_s)
        return self.vd[self.proj_slot[i]](z)


class PALs(nn.ModuleDict):
    """One TaskPALs per task, never shared across tasks; parameters `{task}.ve.{slot}`, `{task}.attn.{slot}.query`."""

    def __init__(self, config: PALsConfig, bert_config: BertConfig, tasks: list[str]):
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"PALs: tasks must be non-empty and distinct, got {tasks}")
        super().__init__({task: TaskPALs(config, bert_config) for task in tasks})
        self.config = config

    def route(self, task: str) -> TaskPALs:
        """The Adapter of `task`, to pass as BertModel(..., adapter=pals.route(task))."""
        if task not in self:
            raise KeyError(f"PALs: unknown task {task!r}; known tasks: {list(self.keys())}")
        return self[task]
