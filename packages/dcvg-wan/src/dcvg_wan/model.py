"""The Wan-2.1 DiT (T2V, I2V, FLF2V and the DC-VideoGen variants) with the official key names.

Numerics follow the official code: timestep embedding, modulation, norms, gates, the head and
the residual stream in float32 whatever the weight dtype; matmuls in the weight dtype.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcvg_wan.config import WanConfig, get_preset, preset_names
from dcvg_wan.errors import InputError
from dcvg_wan.rope import apply_rope, rope_cos_sin

Grid = tuple[int, int, int]


ATTENTION_BACKENDS = ("sdpa", "triton")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Unmasked softmax attention on [B, L, H, D] (scale 1/sqrt(D)); the one attention entry point.

    "sdpa": torch's scaled_dot_product_attention; "triton": `dcvg_kernels.attention` (Triton on
    CUDA, SDPA elsewhere)."""
    if backend == "triton":
        import dcvg_kernels

        return dcvg_kernels.attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def keeps_fp32(key: str) -> bool:
    """Parameters kept in float32 when the model is cast (the official code computes them in fp32)."""
    return key.startswith(("time_embedding.", "time_projection.", "head.")) or key.endswith(".modulation")


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain LayerNorm in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)


def _affine_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """An affine nn.LayerNorm computed in float32 whatever its weight dtype."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)


def _in(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` cast to the dtype of `layer`'s weight."""
    return x.to(layer.weight.dtype)


class RMSNorm(nn.Module):
    """Affine RMSNorm over the whole width (all heads together): normalised in fp32, as official."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _qk_norm(cfg: WanConfig) -> nn.Module:
    return RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = _qk_norm(cfg), _qk_norm(cfg)
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend=None) -> torch.Tensor:
        """`attend(q, k, v)` replaces the attention itself (sequence parallelism swaps it in)."""
        x = _in(self.q, x)
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attend(q, k, v) if attend is not None else attention(q, k, v, self.backend)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Attention to all text rows (no padding mask); I2V adds a second attention to the CLIP
    tokens with its own k/v, summed before the output projection."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = _qk_norm(cfg), _qk_norm(cfg)
        if cfg.image_dim is not None:
            self.k_img, self.v_img = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)
            self.norm_k_img = _qk_norm(cfg)
        self.backend = "sdpa"

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: torch.Tensor, text: torch.Tensor, img: torch.Tensor | None) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(_in(self.q, x))))
        k, v = self._heads(self.norm_k(self.k(text))), self._heads(self.v(text))
        out = attention(q, k, v, self.backend)
        if img is not None:
            k_img, v_img = self._heads(self.norm_k_img(self.k_img(img))), self._heads(self.v_img(img))
            out = out + attention(q, k_img, v_img, self.backend)
        return self.o(out.flatten(2))


class Block(nn.Module):
    """x += g1*SelfAttn(mod(LN(x))); x += CrossAttn(LN3(x)); x += g2*FFN(mod(LN(x)))."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e0, rope, text, img, attend=None):
        """x [B, L, dim] fp32 residual stream; e0 [B, 6, dim] fp32; `attend` see SelfAttention."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)
        y = self.self_attn(_layer_norm(x, self.eps) * (1 + scale1) + shift1, rope, attend)
        x = x + y.float() * gate1
        cross_in = _affine_norm(x, self.norm3) if isinstance(self.norm3, nn.LayerNorm) else x
        x = x + self.cross_attn(cross_in, text, img).float()
        y = self.ffn(_in(self.ffn[0], _layer_norm(x, self.eps) * (1 + scale2) + shift2))
        return x + y.float() * gate2


class Head(nn.Module):
    """Output projection with 2-way modulation from the time embedding e (not e0)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.patch_volume * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.float().unsqueeze(1)).chunk(2, dim=1)
        return self.head(_in(self.head, _layer_norm(x, self.eps) * (1 + scale) + shift)).float()


class ImageEmbedding(nn.Module):
    """CLIP features -> context tokens: LN, Linear, GELU, Linear, LN (official `MLPProj`)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.image_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.dim), nn.LayerNorm(cfg.dim)
        )
        if cfg.flf_pos_len is not None:
            self.emb_pos = nn.Parameter(torch.zeros(1, cfg.flf_pos_len, d))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        x = clip_fea.float()
        if hasattr(self, "emb_pos"):  # FLF2V: first- and last-frame features side by side
            x = x.reshape(-1, *self.emb_pos.shape[1:]) + self.emb_pos.float()
        norm_in, fc1, act, fc2, norm_out = self.proj
        x = fc2(act(fc1(_in(fc1, _affine_norm(x, norm_in)))))
        return _affine_norm(x, norm_out).to(fc2.weight.dtype)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] float64 features [cos(t*f_i), sin(t*f_i)], f_i = 10000^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class WanModel(nn.Module):
    """Wan-2.1 DiT. `model(x, t, context, clip_fea=None, y=None)`:

    x [B, C, F, H, W] latent (F, H, W multiples of `config.patch`); t [B] in [0, 1000];
    context [B, L <= text_len, text_dim] (zero-padded to text_len inside); for I2V, clip_fea
    [B, 257, image_dim] and y [B, in_dim - C, F, H, W], concatenated after x on channels.
    Returns [B, out_dim, F, H, W] in float32.
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.image_dim is not None:
            self.img_emb = ImageEmbedding(cfg)

    # ---- construction and checkpoints ------------------------------------------------------
    @classmethod
    def from_preset(
        cls, name: str, *, device: Any = None, dtype: torch.dtype | None = None, **overrides: Any
    ) -> WanModel:
        """A freshly initialised model of a named preset, with config overrides."""
        with torch.device(device or "cpu"):
            model = cls(get_preset(name, **overrides))
        return model.set_dtype(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        preset: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype | str | None = None,
    ) -> WanModel:
        """Load an official/diffusers directory or a single official/ComfyUI file (layout detected;
        see `dcvg_wan.checkpoint.load_wan`). `torch_dtype` is diffusers' name for `dtype`; dtype
        names ("bfloat16", "bf16") are accepted."""
        from dcae_v.checkpoint import as_torch_dtype
        from dcae_v.errors import InputError as AutoencoderInputError
        from dcvg_wan.checkpoint import load_wan
        from dcvg_wan.errors import InputError

        try:
            dtype = as_torch_dtype(dtype, torch_dtype)
        except AutoencoderInputError as e:
            raise InputError(str(e)) from None
        return load_wan(path, preset=preset, dtype=dtype, device=device)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """config.json + diffusion_pytorch_model.safetensors, official or diffusers layout."""
        from dcvg_wan.checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)

    def set_dtype(self, dtype: torch.dtype) -> WanModel:
        """Cast weights to `dtype`, keeping the fp32 parts (`keeps_fp32`) in float32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    def set_attention_backend(self, backend: str) -> WanModel:
        """Route every attention through "sdpa" (default) or "triton" (dcvg-kernels)."""
        if backend not in ATTENTION_BACKENDS:
            raise InputError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        if backend == "triton":
            try:
                import dcvg_kernels  # noqa: F401
            except ImportError as err:
                raise InputError("--attention triton needs the dcvg-kernels package: pip install dcvg-kernels") from err
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.backend = backend
        return self

    @property
    def preset_names(self) -> tuple[str, ...]:
        """The presets with this model's architecture (empty for a custom one)."""
        return tuple(preset_names(self.config))

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ---- pieces (a new latent space swaps patch_embed/head and reuses the rest) ----------
    def token_grid(self, latent_shape: tuple[int, ...] | torch.Size) -> Grid:
        """(F/pt, H/ph, W/pw) for a latent shape ending in (F, H, W)."""
        sizes = tuple(int(s) for s in latent_shape[-3:])
        if len(sizes) != 3 or any(s % p or s == 0 for s, p in zip(sizes, self.config.patch)):
            raise InputError(
                f"latent frames/height/width {sizes} must be non-zero multiples of the patch {self.config.patch}"
            )
        return tuple(s // p for s, p in zip(sizes, self.config.patch))

    def patch_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """[B, in_dim, F, H, W] -> (tokens [B, L, dim] in (f, h, w) order, grid)."""
        grid = self.token_grid(x.shape)
        tokens = self.patch_embedding(_in(self.patch_embedding, x))
        return tokens.flatten(2).transpose(1, 2), grid

    def unpatchify(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
        """[B, L, prod(patch)*out_dim] (per token laid out pt, ph, pw, c) -> [B, out_dim, F, H, W]."""
        (pt, ph, pw), c = self.config.patch, self.config.out_dim
        x = tokens.reshape(tokens.shape[0], *grid, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(tokens.shape[0], c, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] -> (e [B, dim], e0 [B, 6, dim]), both float32."""
        lin1 = self.time_embedding[0]
        e = self.time_embedding(_in(lin1, sinusoid(t, self.config.freq_dim))).float()
        e0 = self.time_projection(_in(self.time_projection[1], e)).float()
        return e, e0.unflatten(1, (6, self.config.dim))

    def embed_context(self, context: torch.Tensor, clip_fea: torch.Tensor | None = None):
        """(text tokens [B, text_len, dim], image tokens [B, N, dim] or None)."""
        pad = self.config.text_len - context.shape[1]
        if pad < 0:
            raise InputError(
                f"context has {context.shape[1]} rows, more than text_len={self.config.text_len}; truncate it"
            )
        context = F.pad(context, (0, 0, 0, pad))
        text = self.text_embedding(_in(self.text_embedding[0], context))
        img = self.img_emb(clip_fea) if clip_fea is not None else None
        return text, img

    def forward_from_embeddings(
        self,
        tokens: torch.Tensor,
        grid: Grid,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blocks + head + unpatchify on patch tokens [B, L, dim] (from `patch_embed`)."""
        return self.unpatchify(self.forward_tokens(tokens, grid, t, context, clip_fea), grid)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        grid: Grid,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attend=None,
    ) -> torch.Tensor:
        """Blocks + head on tokens [B, L, dim] -> [B, L, prod(patch)*out_dim] float32.

        `rope` defaults to the tables of the whole `grid`; a sequence-parallel caller passes the
        rows of its own tokens and an `attend` that exchanges them (see `dcvg_wan.parallel`)."""
        e, e0 = self.embed_time(t)
        text, img = self.embed_context(context, clip_fea)
        if rope is None:
            rope = rope_cos_sin(grid, self.config.head_dim, tokens.device)
        x = tokens.float()
        for block in self.blocks:
            x = block(x, e0, rope, text, img, attend)
        return self.head(x, e)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens, grid, t = self.embed_inputs(x, t, context, clip_fea, y)
        return self.forward_from_embeddings(tokens, grid, t, context, clip_fea)

    def embed_inputs(self, x, t, context, clip_fea=None, y=None) -> tuple[torch.Tensor, Grid, torch.Tensor]:
        """Check the forward's inputs, concatenate y, patch-embed: (tokens, grid, t as [B])."""
        t = _check_inputs(self.config, x, t, context, clip_fea, y)
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens, grid = self.patch_embed(x)
        return tokens, grid, t


def _check_inputs(cfg: WanConfig, x, t, context, clip_fea, y) -> torch.Tensor:
    """Raise InputError on anything the reference would reject or silently misuse; returns t as [B]."""
    if not _fits(x, (None,) * 5):
        raise InputError(f"x must be a latent tensor [B, C, F, H, W], got {_shape(x)}")
    b = x.shape[0]
    _check_conditioning(cfg, x, clip_fea, y)
    if not _fits(context, (b, None, cfg.text_dim)):
        raise InputError(f"context must be [B={b}, L, text_dim={cfg.text_dim}], got {_shape(context)}")
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0 or t.shape == (1,):
        t = t.reshape(1).expand(b)
    if t.shape != (b,):
        raise InputError(f"t must be a scalar or [B={b}] timesteps in [0, 1000], got shape {tuple(t.shape)}")
    return t


def _check_conditioning(cfg: WanConfig, x: torch.Tensor, clip_fea, y) -> None:
    """I2V needs clip_fea and y with x.C + y.C == in_dim; T2V takes neither."""
    b, c = x.shape[:2]
    if cfg.image_dim is None:
        if clip_fea is not None or y is not None:
            raise InputError("this is a T2V model (no image path): pass neither clip_fea nor y")
        if c != cfg.in_dim:
            raise InputError(f"x has {c} channels, the model takes in_dim={cfg.in_dim}")
        return
    if clip_fea is None or y is None:
        kind = cfg.model_type.upper()
        raise InputError(f"this is an {kind} model: clip_fea [B, 257, {cfg.image_dim}] and y are required")
    y_shape = (b, cfg.in_dim - c, *x.shape[2:])
    if not _fits(y, y_shape):
        expected = ", ".join(map(str, y_shape))
        raise InputError(f"y must be [{expected}] so that x and y give in_dim={cfg.in_dim} channels, got {_shape(y)}")
    per_sample = 2 if cfg.flf_pos_len is not None else 1  # FLF2V: first- and last-frame features
    if not _fits(clip_fea, (per_sample * b, None, cfg.image_dim)):
        raise InputError(f"clip_fea must be [{per_sample}*B, N, image_dim={cfg.image_dim}], got {_shape(clip_fea)}")
    if cfg.flf_pos_len is not None and 2 * clip_fea.shape[1] != cfg.flf_pos_len:
        raise InputError(f"FLF2V takes {cfg.flf_pos_len // 2} CLIP tokens per frame, got {clip_fea.shape[1]}")


def _fits(x: Any, shape: tuple[int | None, ...]) -> bool:
    """x is a tensor of this shape (None matches any size)."""
    return isinstance(x, torch.Tensor) and x.ndim == len(shape) and all(s in (None, n) for s, n in zip(shape, x.shape))


def _shape(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
