"""A GPT-style decoder in one file.

Pre-norm transformer blocks (LayerNorm, as GPT-NeoX/Pythia), rotary position embeddings, causal
attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash-attn's kernel when it is
installed and the tensors are on CUDA in half precision), a GELU MLP, and an untied lm_head.

The training loss is computed inside the forward of the lm_head module (:class:`DomainLossHead`) from
the final hidden states and its weight by :func:`aioli_fast.kernels.linear_domain_cross_entropy`.
Keeping the loss in the forward of the module that owns the weight is what lets DeepSpeed ZeRO-3 gather
that weight for the loss (ZeRO-3 gathers a module's own parameters around that module's forward; the
fused kernel never materialises the [N, V] logits), and gives the per-domain loss sums and token counts
that the mixers consume on every step at no extra cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import DomainLoss, linear_domain_cross_entropy

try:  # optional: flash-attn only installs on CUDA machines
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


@dataclass
class GPTConfig:
    """Shape of the decoder. ``vocab_size`` is usually the tokenizer's, rounded up to 64."""

    vocab_size: int = 320
    max_seq_len: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        rot = self.rotary_dims
        if not 0.0 < self.rotary_fraction <= 1.0 or rot < 2:
            raise ValueError(
                f"model.rotary_fraction must be in (0, 1] and rotate at least 2 dims per head, "
                f"got {self.rotary_fraction}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dims(self) -> int:
        """Number of leading dims per head that RoPE rotates (even)."""
        return int(self.head_dim * self.rotary_fraction) // 2 * 2


# Presets from a CPU demo to the paper's 160M setting. "pythia-160m" follows Pythia-160M's shape
# (12 layers, d=768, 12 heads, 4x MLP, 25% rotary dims, vocab 50304, context 2048) with sequential
# (not parallel) residual blocks.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_seq_len=256),
    "mini": dict(d_model=192, n_layers=4, n_heads=6, d_ff=768, max_seq_len=256),
    "small": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=512),
    "medium": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, max_seq_len=1024),
    "pythia-160m": dict(
        d_model=768,
        n_layers=12,
        n_heads=12,
        d_ff=3072,
        max_seq_len=2048,
        vocab_size=50304,
        rotary_fraction=0.25,
    ),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig of a preset, with keyword overrides (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return GPTConfig(**fields)


# The model returns the kernels' result type: (loss [], loss_sum [D], count [D]), all fp32.
ModelOutput = DomainLoss


class Rotary(nn.Module):
    """Rotary position embedding on the first ``rotary_dims`` dims of each head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.dims, self.theta, self.max_seq_len = cfg.rotary_dims, cfg.rope_theta, cfg.max_seq_len
        shape = (cfg.max_seq_len, self.dims // 2)
        self.register_buffer("cos_TR", torch.empty(shape), persistent=False)
        self.register_buffer("sin_TR", torch.empty(shape), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the cos/sin tables in place (also after a model built on the meta device)."""
        if self.cos_TR.is_meta:
            return
        device = self.cos_TR.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dims, 2, device=device).float() / self.dims))
        freqs_TR = torch.outer(torch.arange(self.max_seq_len, device=device).float(), inv_freq)
        self.cos_TR.copy_(freqs_TR.cos())
        self.sin_TR.copy_(freqs_TR.sin())

    def forward(self, x_BHTDh: torch.Tensor) -> torch.Tensor:
        T = x_BHTDh.shape[-2]
        rot, rest = x_BHTDh[..., : self.dims], x_BHTDh[..., self.dims :]
        x1, x2 = rot.float().chunk(2, dim=-1)  # [B, H, T, dims/2] each
        cos, sin = self.cos_TR[:T], self.sin_TR[:T]
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x_BHTDh.dtype)
        return torch.cat((rotated, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=True)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.rotary = Rotary(cfg)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = self.qkv(x_BTC).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = self.rotary(q.transpose(1, 2)), self.rotary(k.transpose(1, 2))  # [B, H, T, Dh]
        v = v.transpose(1, 2)
        if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            y = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            y = y.reshape(B, T, C)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=True)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class DomainLossHead(nn.Module):
    """The output projection (``weight`` [V, C], no bias) with the per-domain loss in its forward.

    ``forward(hidden [N, C], labels [N], domain_ids [N], num_domains)`` returns the
    :class:`~aioli_fast.kernels.DomainLoss` of the projected hidden states without building the
    [N, V] logits; ``forward(hidden)`` alone returns the logits (inference). Both go through this
    module's forward, so DeepSpeed ZeRO-3 has the weight gathered whenever it is used.
    """

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))

    def forward(
        self,
        hidden_NC: torch.Tensor,
        labels_N: torch.Tensor | None = None,
        domain_ids_N: torch.Tensor | None = None,
        num_domains: int = 1,
        *,
        ignore_index: int = -100,
        loss_backend: str | None = None,
        grad_scale: float = 1.0,
    ):
        if labels_N is None:
            return F.linear(hidden_NC, self.weight)
        if domain_ids_N is None:
            raise ValueError("DomainLossHead needs domain_ids with labels")
        return linear_domain_cross_entropy(
            hidden_NC,
            self.weight,
            labels_N,
            domain_ids_N,
            num_domains,
            ignore_index=ignore_index,
            grad_scale=grad_scale,
            backend=loss_backend,
        )


class GPT(nn.Module):
    """Decoder-only language model with a per-domain loss in ``forward``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = DomainLossHead(cfg.d_model, cfg.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases; residual output projections scaled by depth.

        Also recomputes the RoPE tables, so ``GPT`` built on the meta device, then ``to_empty()`` and
        ``reset_parameters()``, equals a model built directly.
        """
        std = self.cfg.init_std
        for block in self.blocks:
            block.attn.rotary.reset_tables()
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if "ln" in name and name.endswith("weight"):
                    nn.init.ones_(p)
                else:
                    nn.init.zeros_(p)
            elif name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def hidden_states(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states [B, T, C] for input ids [B, T]."""
        if input_ids_BT.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids_BT.shape)}")
        T = input_ids_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids_BT)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def logits(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Full logits [B, T, V] (inference and tests; training never materialises them here)."""
        return self.lm_head(self.hidden_states(input_ids_BT))

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        domain_ids: torch.Tensor,
        num_domains: int,
        *,
        ignore_index: int = -100,
        loss_backend: str | None = None,
        grad_scale: float = 1.0,
    ) -> ModelOutput:
        """Loss of next-token prediction, with per-domain statistics.

        Args:
            input_ids: [B, T] token ids (< vocab_size).
            labels: [B, T] target ids, ``ignore_index`` where no loss is taken.
            domain_ids: [B] domain of each sequence (every token of a sequence shares it) or [B, T].
            num_domains: D.
            loss_backend: the kernel backend of the loss (``"triton"``, ``"reference"``; default: the
                dispatch of :func:`aioli_fast.kernels.linear_domain_cross_entropy`). The reference allows
                several backward passes through one forward (``retain_graph``), as per-domain gradients need.
            grad_scale: the gradient ``loss`` will receive (the kernels' gradient contract): 1 / the
                gradient-accumulation steps when the trainer divides the loss by them. Any gradient is
                correct; the promised one spares backward a rescaling.

        Returns:
            ModelOutput(loss [], loss_sum [D], count [D]), fp32.
        """
        hidden_BTC = self.hidden_states(input_ids)
        B, T, C = hidden_BTC.shape
        if labels.shape != (B, T):
            raise ValueError(f"labels must have shape {(B, T)}, got {tuple(labels.shape)}")
        if domain_ids.shape == (B,):
            domain_ids = domain_ids[:, None].expand(B, T)
        elif domain_ids.shape != (B, T):
            raise ValueError(f"domain_ids must have shape ({B},) or {(B, T)}, got {tuple(domain_ids.shape)}")
        return self.lm_head(
            hidden_BTC.reshape(B * T, C),
            labels.reshape(B * T),
            domain_ids.reshape(B * T),
            num_domains,
            ignore_index=ignore_index,
            loss_backend=loss_backend,
            grad_scale=grad_scale,
        )
