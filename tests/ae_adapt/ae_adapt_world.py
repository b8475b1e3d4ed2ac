"""A tiny clip world with two linear "autoencoders", and a base DiT pre-trained on one of them.

Clips are smooth coloured fields drifting over 2 frames of 32x32; the prompt embedding is a fixed
projection of the clip's coarse colours (so text carries information). The base autoencoder is
f2c4 (2x2 mean + channel mix), the new one f8c8 (8x8 space-to-depth + channel mix): the new token
grid (patch 1) is half the base grid (patch 2) on each spatial axis, as in Wan-VAE -> DC-AE-V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ae_adapt.example_dit import ExampleDiT, ExampleDiTConfig
from ae_adapt.flow import diffusion_loss

FRAMES, SIZE, TEXT_DIM, TEXT_ROWS = 2, 32, 16, 3
_G = torch.Generator().manual_seed(1234)
_BASE_MIX = torch.randn(4, 3, generator=_G) / 3**0.5
_NEW_MIX = torch.randn(8, 192, generator=_G) / 192**0.5
_TEXT_PROJ = torch.randn(48, TEXT_ROWS * TEXT_DIM, generator=_G) / 48**0.5


def clip(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(3, 1, 6, 6, generator=g)
    field = F.interpolate(coarse, size=(SIZE + 8, SIZE + 8), mode="bilinear", align_corners=False)
    dx, dy = torch.randint(1, 5, (2,), generator=g).tolist()
    frames = [field[:, 0, i * dy : i * dy + SIZE, i * dx : i * dx + SIZE] for i in range(FRAMES)]
    video = torch.tanh(torch.stack(frames, dim=1))  # [3, T, H, W] in [-1, 1]
    return {"video": video, "prompt": f"clip {seed}", "seed": seed}


def base_encode(video: torch.Tensor) -> torch.Tensor:
    x = F.avg_pool2d(video.transpose(0, 1), 2).transpose(0, 1)  # [3, T, 16, 16]
    return torch.einsum("oc,cthw->othw", _BASE_MIX, x) * 2.0


def new_encode(video: torch.Tensor) -> torch.Tensor:
    x = F.pixel_unshuffle(video.transpose(0, 1), 8).transpose(0, 1)  # [192, T, 4, 4]
    return torch.einsum("oc,cthw->othw", _NEW_MIX, x) * 2.0


def text_encode_clip(c: dict) -> torch.Tensor:
    coarse = F.adaptive_avg_pool2d(c["video"][:, 0], 4).flatten()
    return (coarse @ _TEXT_PROJ).reshape(TEXT_ROWS, TEXT_DIM)


def samples(n: int, start: int = 0, new=None) -> list[dict]:
    """Cache-like samples; `new` is the new autoencoder (default `new_encode`)."""
    new = new or new_encode
    out = []
    for s in range(start, start + n):
        c = clip(s)
        out.append({"base": base_encode(c["video"]), "new": new(c["video"]), "context": text_encode_clip(c)})
    return out


BASE_CONFIG = ExampleDiTConfig(
    dim=48, depth=2, num_heads=4, in_channels=4, out_channels=4, patch=(1, 2, 2), text_dim=TEXT_DIM
)


def pretrained_base(steps: int = 150, seed: int = 0) -> ExampleDiT:
    """The base DiT trained briefly on base latents (full fine-tune, AdamW)."""
    torch.manual_seed(seed)
    model = ExampleDiT(BASE_CONFIG)
    data = samples(64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (8,), generator=g).tolist()
        x0 = torch.stack([data[i]["base"] for i in idx])
        ctx = torch.stack([data[i]["context"] for i in idx])
        loss = diffusion_loss(model, x0, g, context=ctx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


_Q = torch.linalg.qr(torch.randn(16, 16, generator=_G))[0]


def twin_encode(video: torch.Tensor) -> torch.Tensor:
    """f4c16: the base latent folded 2x2 into channels and mixed by a fixed rotation (same token grid
    as the base model with patch (1, 2, 2), so an aligned embedder can match the base tokens exactly)."""
    x = F.pixel_unshuffle(base_encode(video).transpose(0, 1), 2).transpose(0, 1)  # [16, T, 8, 8]
    return torch.einsum("oc,cthw->othw", _Q, x)
