"""Produce numeric oracles from NVIDIA's own DC-AE-V code for our parity tests.

Needs a checkout of github.com/dc-ai-projects/DC-Gen (commit cae2205 was used) and omegaconf:

    pip install omegaconf
    python tools/reference/nvidia_fixture.py --dc-gen /path/to/DC-Gen \
        --out tests/dcae_v/fixtures/nvidia_reference.safetensors

NVIDIA's modules are imported from that checkout, never copied here. Weights and inputs come
from `deterministic_tensor` (a closed-form hash, identical on every machine), so the test only
needs the stored outputs. Everything runs in float64.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from safetensors.torch import save_file

WIDTHS, DEPTHS, LATENT = (16, 16, 16, 32, 32, 64, 64), (0, 1, 1, 1, 1, 1, 1), 8
# (name, temporal mode, chunk, frames, size)
CASES = [
    ("chunk_causal", "chunk_causal", 8, 16, 64),
    ("chunk_causal_image", "chunk_causal", 8, 4, 32),
    ("causal", "causal", 8, 12, 32),
    ("non_causal", "non_causal", 8, 12, 32),
]


def deterministic_tensor(shape, seed: int, scale: float) -> torch.Tensor:
    """Uniform values in [-scale, scale) from a sine hash of the flat index (no RNG involved)."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    u = torch.frac(torch.sin(i * 12.9898 + seed * 78.233) * 43758.5453)  # in (-1, 1)
    return (u * scale).reshape(shape)


def fill_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for seed, (k, v) in enumerate(state_dict.items()):
        if k.endswith("norm.weight") or k.endswith("op_list.0.weight"):
            out[k] = 1.0 + deterministic_tensor(v.shape, seed, 0.1)
        elif v.ndim == 1:
            out[k] = deterministic_tensor(v.shape, seed, 0.05)
        else:
            fan_in = v[0].numel()
            out[k] = deterministic_tensor(v.shape, seed, 1.0 / math.sqrt(fan_in))
    return out


def _block_strings(mode: str, cs: int) -> str:
    lat = cs // 4
    n = len(WIDTHS)
    if mode == "chunk_causal":
        rb, rbl = f"ChunkCausalResBlock3d@3@3@{cs}", f"ChunkCausalResBlock3d@3@3@{lat}"
        dn, dnt = f"ChunkCausalConvPixelUnshuffle@2@1@3@3@{cs}", f"ChunkCausalConvPixelUnshuffle@1@4@3@3@{cs}"
        up, upt = f"ChunkCausalConvPixelShuffle@2@1@3@3@{cs}", f"ChunkCausalConvPixelShuffle@1@4@3@3@{lat}"
        pin, pout = dn, f"ChunkCausalConvLayer3d@3@3@{lat}"
        dpin, dpout = f"ChunkCausalConvLayer3d@3@3@{lat}", up
    else:
        c = "Causal" if mode == "causal" else ""
        rb = rbl = f"{c}ResBlock3d@3@3"
        dn, dnt = f"{c}ConvPixelUnshuffle@2@1@3@3", f"{c}ConvPixelUnshuffle@1@4@3@3"
        up, upt = f"{c}ConvPixelShuffle@2@1@3@3", f"{c}ConvPixelShuffle@1@4@3@3"
        pin, pout, dpin, dpout = dn, f"{c}ConvLayer3d@3@3", f"{c}ConvLayer3d@3@3", up
    lst = lambda a, b, k: "[" + ",".join([a] * (k - 1) + [b]) + "]"
    w, d = "[" + ",".join(map(str, WIDTHS)) + "]", "[" + ",".join(map(str, DEPTHS)) + "]"
    return (
        f"latent_channels={LATENT} encoder.project_in_block_type={pin} encoder.width_list={w} encoder.depth_list={d} "
        f"encoder.block_type={lst(rb, rbl, n)} encoder.downsample_block_type={lst(dn, dnt, n - 1)} "
        f"encoder.project_out_block_type={pout} decoder.project_in_block_type={dpin} decoder.width_list={w} "
        f"decoder.depth_list={d} decoder.block_type={lst(rb, rbl, n)} decoder.upsample_block_type={lst(up, upt, n - 1)} "
        f"decoder.project_out_block_type={dpout}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dc-gen", required=True, help="path to a DC-Gen checkout")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, args.dc_gen)
    from dc_videogen.dc_ae_v import DCAEV as NvidiaDCAEV
    from dc_videogen.dc_ae_v import DCAEVConfig as NvidiaConfig
    from omegaconf import OmegaConf

    tensors, meta = {}, {}
    for name, mode, cs, frames, size in CASES:
        cfg = OmegaConf.merge(OmegaConf.structured(NvidiaConfig), OmegaConf.from_dotlist(_block_strings(mode, cs).split(" ")))
        model = NvidiaDCAEV(OmegaConf.to_object(cfg)).double().eval()
        model.load_state_dict(fill_weights(model.state_dict()))
        x = deterministic_tensor((1, 3, frames, size, size), 1000, 1.0)
        with torch.no_grad():
            z = model.encoder(x)
            y = model.decoder(z)
        tensors[f"{name}.latent"], tensors[f"{name}.video"] = z.float().contiguous(), y.float().contiguous()
        meta[name] = {"temporal": mode, "chunk_size": cs, "frames": frames, "size": size}
        print(name, tuple(z.shape), tuple(y.shape), f"|z|max={z.abs().max():.3g} |y|max={y.abs().max():.3g}")
    info = {"widths": WIDTHS, "depths": DEPTHS, "latent_channels": LATENT, "cases": meta, "dc_gen_commit": "cae2205"}
    save_file(tensors, args.out, metadata={"info": json.dumps(info)})


if __name__ == "__main__":
    main()
