"""diffusers `AutoencoderKLWan` layout <-> official Wan VAE names (`Wan2.1_VAE.pth`).

The encoder keeps its flat list (`downsamples.i` = `down_blocks.i`); the decoder's flat
`upsamples.i` is grouped into `up_blocks.g.resnets.r` / `up_blocks.g.upsamplers.0`, the grouping
read from the keys themselves (a resampler closes a group), so any depth maps. Inside residual
blocks `residual.{0,2,3,6}` / `shortcut` are `norm1 / conv1 / norm2 / conv2 / conv_shortcut`.
Same facts as diffusers' `convert_wan_vae_to_diffusers`. Pure key renames, no I/O; keys outside
the map pass through unchanged, so the loader lists them as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

NAME = "diffusers"
MARKERS = ("quant_conv.", "post_quant_conv.", ".mid_block.", ".down_blocks.", ".up_blocks.", ".conv_in.")

# official prefix -> diffusers prefix, outside the numbered block lists
_STATIC = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
for _part in ("encoder", "decoder"):
    _STATIC += [
        (f"{_part}.conv1.", f"{_part}.conv_in."),
        (f"{_part}.head.0.", f"{_part}.norm_out."),
        (f"{_part}.head.2.", f"{_part}.conv_out."),
        (f"{_part}.middle.0.", f"{_part}.mid_block.resnets.0."),
        (f"{_part}.middle.1.", f"{_part}.mid_block.attentions.0."),
        (f"{_part}.middle.2.", f"{_part}.mid_block.resnets.1."),
    ]
# inside a residual block: official -> diffusers
_RESIDUAL = [
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
]
_ENC = re.compile(r"^encoder\.(?:downsamples|down_blocks)\.(\d+)\.(.+)$")
_DEC_OFFICIAL = re.compile(r"^decoder\.upsamples\.(\d+)\.(.+)$")
_DEC_DIFFUSERS = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$")


def matches(keys: Iterable[str]) -> bool:
    return any(k.startswith(MARKERS) or any(m in k for m in MARKERS) for k in keys)


def _swap(rest: str, table: list[tuple[str, str]], forward: bool) -> str:
    for a, b in table:
        src, dst = (a, b) if forward else (b, a)
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return rest


def _is_resampler(rest: str) -> bool:
    return rest.startswith(("resample.", "time_conv."))


def _decoder_groups(keys: Iterable[str]) -> dict[int, str]:
    """Official flat decoder index -> diffusers module path ("up_blocks.g.resnets.r" / ".upsamplers.0")."""
    blocks: dict[int, bool] = {}
    for k in keys:
        if m := _DEC_OFFICIAL.match(k):
            blocks[int(m[1])] = blocks.get(int(m[1]), False) or _is_resampler(m[2])
    out, group, pos = {}, 0, 0
    for i in sorted(blocks):
        if blocks[i]:
            out[i], group, pos = f"up_blocks.{group}.upsamplers.0", group + 1, 0
        else:
            out[i], pos = f"up_blocks.{group}.resnets.{pos}", pos + 1
    return out


def _decoder_flat(keys: Iterable[str]) -> dict[tuple[int, str], int]:
    """(group, "resnets.r" / "upsamplers.0") -> official flat decoder index."""
    resnets: dict[int, set[int]] = {}
    has_up: dict[int, bool] = {}
    for k in keys:
        if m := _DEC_DIFFUSERS.match(k):
            g = int(m[1])
            resnets.setdefault(g, set())
            if m[3] is not None:
                resnets[g].add(int(m[3]))
            else:
                has_up[g] = True
    out, start = {}, 0
    for g in sorted(resnets):
        n = max(resnets[g], default=-1) + 1
        out |= {(g, f"resnets.{r}"): start + r for r in range(n)}
        if has_up.get(g):
            out[(g, "upsamplers.0")] = start + n
        start += n + bool(has_up.get(g))
    return out


def from_official(sd: Mapping) -> dict:
    groups = _decoder_groups(sd)
    out = {}
    for k, v in sd.items():
        if m := _ENC.match(k):
            k = f"encoder.down_blocks.{m[1]}.{_swap(m[2], _RESIDUAL, True)}"
        elif (m := _DEC_OFFICIAL.match(k)) and int(m[1]) in groups:
            k = f"decoder.{groups[int(m[1])]}.{_swap(m[2], _RESIDUAL, True)}"
        else:
            k = _swap(k, _STATIC, True)
            if ".mid_block.resnets." in k:
                head, rest = k.split(".mid_block.resnets.", 1)
                idx, rest = rest.split(".", 1)
                k = f"{head}.mid_block.resnets.{idx}.{_swap(rest, _RESIDUAL, True)}"
        out[k] = v
    return out


def to_official(sd: Mapping) -> dict:
    flat = _decoder_flat(sd)
    out = {}
    for k, v in sd.items():
        if m := _ENC.match(k):
            k = f"encoder.downsamples.{m[1]}.{_swap(m[2], _RESIDUAL, False)}"
        elif m := _DEC_DIFFUSERS.match(k):
            k = f"decoder.upsamples.{flat[(int(m[1]), m[2])]}.{_swap(m[4], _RESIDUAL, False)}"
        else:
            if ".mid_block.resnets." in k:
                head, rest = k.split(".mid_block.resnets.", 1)
                idx, rest = rest.split(".", 1)
                k = f"{head}.mid_block.resnets.{idx}.{_swap(rest, _RESIDUAL, False)}"
            k = _swap(k, _STATIC, False)
        out[k] = v
    return out
