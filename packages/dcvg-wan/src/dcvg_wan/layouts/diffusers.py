"""diffusers `WanTransformer3DModel` layout <-> official names.

Module paths map one to one (weight/bias suffixes unchanged), except that the affine LayerNorm
before cross-attention is official `norm3` but diffusers `norm2` (the plain ones hold no weights).
Keys outside the map pass through unchanged, so the loader lists them as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

NAME = "diffusers"
MARKERS = ("condition_embedder.", "scale_shift_table", ".attn1.", ".attn2.")

# official module path (or parameter) -> diffusers
TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}
# inside blocks.N: official -> diffusers
BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def matches(keys: list[str]) -> bool:
    return any(m in k for k in keys for m in MARKERS)


def _rename(key: str, top: dict[str, str], block: dict[str, str]) -> str:
    m = _BLOCK_KEY.match(key)
    table, prefix, rest = (block, f"blocks.{m[1]}.", m[2]) if m else (top, "", key)
    if rest in table:  # a parameter held directly (modulation, emb_pos)
        return prefix + table[rest]
    path, _, leaf = rest.rpartition(".")
    return prefix + table[path] + "." + leaf if path in table else key


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


_TOP_BACK, _BLOCK_BACK = _invert(TOP), _invert(BLOCK)


def to_official(sd: Mapping) -> dict:
    return {_rename(k, _TOP_BACK, _BLOCK_BACK): v for k, v in sd.items()}


def from_official(sd: Mapping) -> dict:
    return {_rename(k, TOP, BLOCK): v for k, v in sd.items()}
