"""Ulysses sequence parallelism for the Wan DiT (inference), on torch.distributed.

Each of P ranks holds a contiguous 1/P of the video tokens. Self-attention exchanges them with
two all-to-alls: [B, L/P, H, D] -> [B, L, H/P, D] (every rank sees the whole sequence for H/P
heads), attention, and back. Everything else (modulation, cross-attention to the text, FFN, head)
is per token and needs no communication; the head's outputs are all-gathered at the end.

Tokens are padded to a multiple of P. Unlike the official xDiT path, the padded keys are masked
out, so the result equals the single-process forward whatever the token count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcvg_wan.errors import InputError
from dcvg_wan.model import WanModel
from dcvg_wan.rope import rope_cos_sin


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Exchange the leading dim (size P) across the group: out[p] = what rank p held for us."""
    x = x.contiguous()  # (empty_like keeps a permuted view's strides; the collective writes linearly)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def ulysses_attention(q, k, v, *, group, key_len: int | None = None) -> torch.Tensor:
    """Attention of local tokens [B, S/P, H, D] over the whole sequence, split by heads.

    `key_len`: number of real tokens in the global sequence; keys beyond it (padding) are masked.
    """
    world = dist.get_world_size(group)
    b, s_local, h, d = q.shape

    def gather_sequence(t: torch.Tensor) -> torch.Tensor:  # [B, S/P, H, D] -> [B, S, H/P, D]
        t = t.reshape(b, s_local, world, h // world, d).permute(2, 0, 1, 3, 4)
        return _all_to_all(t, group).permute(1, 0, 2, 3, 4).reshape(b, world * s_local, h // world, d)

    q, k, v = (gather_sequence(t).transpose(1, 2) for t in (q, k, v))  # [B, H/P, S, D]
    mask = None
    if key_len is not None and key_len < world * s_local:
        mask = (torch.arange(world * s_local, device=q.device) < key_len)[None, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)  # [B, S, H/P, D]
    out = out.reshape(b, world, s_local, h // world, d).permute(1, 0, 2, 3, 4)
    out = _all_to_all(out, group)  # out[p] = heads group p for our tokens
    return out.permute(1, 2, 0, 3, 4).reshape(b, s_local, h, d)


@torch.no_grad()
def sequence_parallel_forward(
    model: WanModel,
    x: torch.Tensor,
    t: torch.Tensor | float,
    context: torch.Tensor,
    clip_fea: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    group=None,
) -> torch.Tensor:
    """`model(x, t, context, clip_fea, y)` computed by all ranks of `group` together (every rank
    passes the same inputs and gets the whole output). Inference only (no autograd through the
    all-to-alls)."""
    if not dist.is_available() or not dist.is_initialized():
        raise InputError("sequence parallelism needs torch.distributed initialised (run under torchrun)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    heads = model.config.num_heads
    if heads % world:
        raise InputError(f"the model has {heads} heads, not divisible by {world} sequence-parallel ranks")
    tokens, grid, t = model.embed_inputs(x, t, context, clip_fea, y)
    length = tokens.shape[1]
    s_local = -(-length // world)
    pad = s_local * world - length
    cos, sin = rope_cos_sin(grid, model.config.head_dim, tokens.device)
    tokens, cos, sin = (F.pad(a, (0, 0, 0, pad)) for a in (tokens, cos, sin))  # pad the token dim
    rows = slice(rank * s_local, (rank + 1) * s_local)

    def attend(q, k, v):
        return ulysses_attention(q, k, v, group=group, key_len=length)

    local = model.forward_tokens(
        tokens[:, rows], grid, t, context, clip_fea, rope=(cos[rows], sin[rows]), attend=attend
    )
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return model.unpatchify(torch.cat(pieces, dim=1)[:, :length], grid)


# ---- FSDP for inference (the official --dit_fsdp / --t5_fsdp) ----------------------------------
def shard_for_inference(units: list[torch.nn.Module]) -> None:
    """Shard each unit's parameters over the default process group (FSDP2 `fully_shard`): a unit
    gathers its full weights when its forward starts and frees them when it ends, so a rank holds
    1/P of the weights plus one unit at a time.

    Each unit is its own FSDP root, so that callers may run units directly (Ulysses runs the DiT's
    pieces, not its forward); FSDP keeps a root's weights gathered after forward (a training
    heuristic), so a hook frees them here, as inference has no backward to reuse them.
    """
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit)
        unit.register_forward_hook(lambda module, args, output: module.reshard())


def dit_shard_units(model: WanModel) -> list[torch.nn.Module]:
    """The DiT's blocks one by one, then every other top-level module that holds weights."""
    if any(True for _ in model.parameters(recurse=False)):
        raise InputError("this DiT holds weights outside its submodules; it cannot be sharded unit by unit")
    others = [m for name, m in model.named_children() if name != "blocks" and any(True for _ in m.parameters())]
    return [*model.blocks, *others]


def text_encoder_shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """umT5 (transformers' UMT5EncoderModel): its blocks, then the root (the tied token embedding
    and final norm); the root's forward is what the pipeline calls."""
    return [*model.encoder.block, model]
