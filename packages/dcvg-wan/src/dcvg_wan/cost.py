"""Tokens and FLOPs of one DiT forward on Wan-VAE latents versus DC-AE-V latents (paper Table 7).

Counts matmul FLOPs (2 per multiply-add), the ones torch.utils.flop_counter counts: linear
layers, the patch-embedding conv, and attention scores/values (4 * Lq * Lk * dim per attention).
Norms, RoPE, modulation and softmax are left out (well under 1 % here). One forward of batch 1;
a sampling step with classifier-free guidance runs two, which leaves every ratio unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dcvg_wan.config import PRESETS, WanConfig
from dcvg_wan.errors import InputError

CLIP_TOKENS = 257  # CLIP ViT-H/14 tokens in I2V context (FLF2V: 2 * 257)


@dataclass(frozen=True)
class LatentSpace:
    """An autoencoder's compression: f{spatial}t{temporal}c{channels}. Wan's VAE is causal (the
    first frame alone, then groups of 4: 1 + 4k frames); DC-AE-V takes groups of 4 (4k frames)."""

    name: str
    spatial: int
    temporal: int
    channels: int
    causal: bool

    def latent_frames(self, frame_num: int) -> int:
        if self.causal:
            return 1 + (frame_num - 1) // self.temporal
        return frame_num // self.temporal

    def pixel_frames(self, frame_num: int) -> int:
        """Frames actually generated for a request of `frame_num` (rounded down, at least one latent frame)."""
        t = max(1, self.latent_frames(frame_num))
        return 1 + self.temporal * (t - 1) if self.causal else self.temporal * t


LATENT_SPACES = {
    "wan-vae": LatentSpace("Wan-VAE f8t4c16", 8, 4, 16, causal=True),
    "dcae-v": LatentSpace("DC-AE-V f32t4c32", 32, 4, 32, causal=False),
}

# Paper latencies, TensorRT on one H100, transformer only, minutes per video:
# (H, W) -> (base, DC-VideoGen, speedup as printed). 1.3B: Table 7(a); 14B at 720p: Tables 3, 4.
PAPER_TABLE7 = {
    (480, 832): (1.49, 0.24, 6.2),
    (720, 1280): (5.76, 0.70, 8.2),
    (1080, 1920): (25.46, 2.27, 11.2),
    (2160, 3840): (375.12, 25.41, 14.8),
}
PAPER_LATENCY = {
    "t2v-1.3B": ("Table 7", PAPER_TABLE7),
    "t2v-14B": ("Table 3", {(720, 1280): (27.52, 3.58, 7.7)}),
    "i2v-14B": ("Table 4", {(720, 1280): (27.88, 3.67, 7.6)}),
}
STANDARD_SIZES = {"480p": (832, 480), "720p": (1280, 720), "1080p": (1920, 1080), "2160p": (3840, 2160)}


def dcvg_config(base: WanConfig) -> WanConfig:
    """The DC-VideoGen DiT of a base model: same blocks, patch (1,1,1), DC-AE-V channels in and
    out (T2V 32; I2V 32 noise + 4 mask + 32 image chunk = 68), as the "dcvg-" presets."""
    c = LATENT_SPACES["dcae-v"].channels
    in_dim = c if base.image_dim is None else 2 * c + 4
    return base.replace(patch=(1, 1, 1), in_dim=in_dim, out_dim=c)


def base_task(task: str) -> str:
    """Preset name of the base (Wan-VAE) model: "dcvg-X" -> "X"; "i2v-14B" -> "i2v-14B-720p"."""
    name = task.removeprefix("dcvg-")
    name = "i2v-14B-720p" if name == "i2v-14B" else name
    if name not in PRESETS or name.startswith("debug"):
        valid = [n for n in PRESETS if not n.startswith(("debug", "dcvg"))]
        raise InputError(f"unknown task {task!r} for the cost model; valid: {', '.join(valid)}")
    return name


# ---- counting -----------------------------------------------------------------------------------
def latent_grid(ae: str, width: int, height: int, frame_num: int, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent (frames, height, width) for a video as the pipelines round it: each spatial side down
    to a multiple of the autoencoder's stride times the patch, frames down to the autoencoder's
    rule, and up to one latent frame / one patch where less than that was asked."""
    if frame_num < 1 or width < 1 or height < 1:
        raise InputError(f"frame_num and size must be positive, got {frame_num} frames of {width}x{height}")
    space = LATENT_SPACES[ae]
    t = max(1, space.latent_frames(frame_num))
    h = max(1, height // (space.spatial * patch[1])) * patch[1]
    w = max(1, width // (space.spatial * patch[2])) * patch[2]
    if t % patch[0]:
        raise InputError(f"{frame_num} frames give {t} latent frames, not a multiple of the temporal patch {patch[0]}")
    return t, h, w


def forward_flops(cfg: WanConfig, grid: tuple[int, int, int]) -> dict[str, int]:
    """Matmul FLOPs of one forward at batch 1 on a latent of `grid` (frames, height, width), by part.

    self_attn: softmax(QK^T)V over all tokens (the quadratic term); cross_attn: the same against
    the text (+ CLIP) rows; linear: q/k/v/o projections and the FFN on video tokens; context:
    cross-attention k/v of the text/CLIP rows (per block) and the text/image embedders;
    embed: patch embedding, head and time embedding."""
    tokens = math.prod(g // p for g, p in zip(grid, cfg.patch))
    d, n = cfg.dim, cfg.num_layers
    text = cfg.text_len  # the model zero-pads the context to text_len rows and attends to all
    img = 0 if cfg.image_dim is None else CLIP_TOKENS * (2 if cfg.flf_pos_len else 1)
    per_block = {
        "self_attn": 4 * tokens * tokens * d,
        "cross_attn": 4 * tokens * (text + img) * d,
        "linear": 2 * tokens * d * (6 * d + 2 * cfg.ffn_dim),  # self q,k,v,o + cross q,o; FFN up + down
        "context": 4 * (text + img) * d * d,  # cross k,v (+ k_img, v_img)
    }
    parts = {k: n * v for k, v in per_block.items()}
    parts["context"] += 2 * text * d * (cfg.text_dim + d)
    if img:
        parts["context"] += 2 * img * cfg.image_dim * (cfg.image_dim + d)
    pv = cfg.patch_volume
    parts["embed"] = 2 * tokens * d * pv * (cfg.in_dim + cfg.out_dim) + 2 * d * (cfg.freq_dim + 7 * d)
    return parts


@dataclass(frozen=True)
class StepCost:
    """One model in one latent space at one video size."""

    ae: str
    config: WanConfig
    size: tuple[int, int]  # (width, height) actually generated
    frames: int  # frames actually generated
    latent: tuple[int, int, int, int]  # (channels, frames, height, width)
    tokens: int
    parts: dict[str, int]

    @property
    def flops(self) -> int:
        return sum(self.parts.values())

    @property
    def attention_share(self) -> float:
        return self.parts["self_attn"] / self.flops


def step_cost(cfg: WanConfig, ae: str, width: int, height: int, frame_num: int = 81) -> StepCost:
    if ae not in LATENT_SPACES:
        raise InputError(f"unknown autoencoder {ae!r}; choose one of {', '.join(LATENT_SPACES)}")
    space = LATENT_SPACES[ae]
    grid = latent_grid(ae, width, height, frame_num, cfg.patch)
    tokens = math.prod(g // p for g, p in zip(grid, cfg.patch))
    size = (grid[2] * space.spatial, grid[1] * space.spatial)
    return StepCost(ae, cfg, size, space.pixel_frames(frame_num), (space.channels, *grid), tokens, forward_flops(cfg, grid))


@dataclass(frozen=True)
class CostRow:
    task: str
    requested: tuple[int, int]  # (width, height)
    base: StepCost
    dc: StepCost

    @property
    def token_ratio(self) -> float:
        return self.base.tokens / self.dc.tokens

    @property
    def flop_ratio(self) -> float:
        return self.base.flops / self.dc.flops

    @property
    def paper(self) -> tuple[float, float, float] | None:
        """(base min, DC min, speedup) the paper reports for this model and (H, W), if any."""
        name = base_task(self.task).removesuffix("-480p").removesuffix("-720p")
        table = PAPER_LATENCY.get(name, ("", {}))[1]
        w, h = self.requested
        return table.get((h, w)) or table.get((w, h))


def parse_size(text: str) -> tuple[int, int]:
    """"832*480" (W*H, as generate.py) or "480p"/"720p"/"1080p"/"2160p" -> (width, height)."""
    if text in STANDARD_SIZES:
        return STANDARD_SIZES[text]
    try:
        w, h = (int(v) for v in text.lower().replace("x", "*").split("*"))
    except ValueError:
        raise InputError(f"size must be W*H (e.g. 832*480) or one of {', '.join(STANDARD_SIZES)}, got {text!r}") from None
    if w < 1 or h < 1:
        raise InputError(f"size must be positive, got {text!r}")
    return w, h


def cost_table(task: str = "t2v-1.3B", sizes=None, frame_num: int = 81) -> list[CostRow]:
    """Base model on Wan-VAE latents vs its DC-VideoGen variant on DC-AE-V latents, per size
    ((width, height) pairs; default 480p, 720p, 1080p, 2160p)."""
    base = PRESETS[base_task(task)]
    dc = dcvg_config(base)
    rows = []
    for w, h in sizes or STANDARD_SIZES.values():
        base_cost, dc_cost = step_cost(base, "wan-vae", w, h, frame_num), step_cost(dc, "dcae-v", w, h, frame_num)
        rows.append(CostRow(task, (w, h), base_cost, dc_cost))
    return rows


def _cell(c: StepCost) -> str:
    _, t, h, w = c.latent
    return f"{f'{t}x{h}x{w}':>10} | {c.tokens:>7,} | {c.flops / 1e12:>8.1f} | {100 * c.attention_share:>3.0f}%"


def format_table(rows: list[CostRow]) -> str:
    """The table `dcvg-wan cost` prints (plain text, one row per size)."""
    task, base = rows[0].task, rows[0].base.config
    ref = PAPER_LATENCY.get(base_task(task).removesuffix("-480p").removesuffix("-720p"), ("paper",))[0]
    lines = [
        (
            f"# one DiT forward, batch 1: {task} (dim {base.dim}, {base.num_layers} blocks); TFLOP = matmul FLOPs "
            "(CFG runs two forwards per step: FLOPs double, ratios do not); attn = self-attention share"
        ),
        f"# base: {LATENT_SPACES['wan-vae'].name} + patch 1x2x2 | DC: {LATENT_SPACES['dcae-v'].name} + patch 1x1x1",
        (
            f"{'size WxH':<11} | {'base TxHxW':>10} | {'tokens':>7} | {'TFLOP':>8} | attn | {'DC TxHxW':>10} | "
            f"{'tokens':>7} | {'TFLOP':>8} | attn | tokens x | FLOP x | paper x ({ref}, H100 latency)"
        ),
    ]
    lines.append("-" * len(lines[-1]))
    notes = []
    for r in rows:
        paper = f"{r.paper[2]:.1f}x ({r.paper[0]} -> {r.paper[1]} min)" if r.paper else "-"
        size = f"{r.requested[0]}x{r.requested[1]}"
        lines.append(
            f"{size:<11} | {_cell(r.base)} | {_cell(r.dc)} | {r.token_ratio:>7.2f}x | {r.flop_ratio:>5.2f}x | {paper}"
        )
        for c in (r.base, r.dc):
            if c.size != r.requested:
                notes.append(f"{size} on {LATENT_SPACES[c.ae].name}: generates {c.size[0]}x{c.size[1]}, {c.frames} frames")
            elif c.ae == "dcae-v" and c.frames != r.base.frames:
                notes.append(f"{size} on {LATENT_SPACES[c.ae].name}: {c.frames} frames (multiple of 4)")
    return "\n".join(lines + [f"# note: {n}" for n in dict.fromkeys(notes)])
