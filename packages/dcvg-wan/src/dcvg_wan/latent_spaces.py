"""The two latent spaces a Wan DiT can run in, behind one small interface.

* `WanVAESpace`: the base model's Wan VAE (f8t4c16, normalised latents, frames 4k+1, the DiT
  patchifies 1x2x2, so pixel sizes are multiples of 16);
* `DCAEVSpace`: DC-VideoGen's DC-AE-V (f32t4c32, latents x scaling_factor, frames multiples of
  4, patch 1x1x1, pixel sizes multiples of 32).

I2V prepares the image as the reference of each space does: the Wan VAE as the official Wan2.1
code (size floored to the latent grid, the image resized in float with bicubic, no antialias);
DC-AE-V as NVIDIA's DC-Gen inference demo (`generate.py`/`pipeline_dc_videogen_wan_i2v.py`): the
size rounded to the nearest pixel before flooring to the grid, the image resized as PIL's default
`Image.resize` (antialiased bicubic to 8-bit pixels) and that resized image also fed to CLIP.

Both give the I2V conditioning `y` = concat(mask 4 channels, conditioning latent). For the Wan VAE
that is the official one (the image followed by F-1 zero frames, mid-gray in [-1, 1]); for DC-AE-V it is the paper's
image-chunk conditioning (section 3.4): the image replicated 4x to fill the first temporal group,
then F-4 zero frames, so that the first latent frame encodes the image as a whole chunk.

FLF2V (first and last frame) adds the last frame at the end the same way: official Wan2.1
(`wan/first_last_frame2video.py`) puts it as the last of F frames (F-2 zero frames between) and
marks pixel frame F-1 in the mask, which lands on the 4th mask channel of the last latent frame;
NVIDIA's `pipeline_dc_videogen_wan_i2v.py` (`last_image`) repeats it 4x as the last temporal group
(F-8 zero frames between) and marks the whole last latent frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcvg_wan.errors import InputError


@dataclass(frozen=True)
class Rounded:
    """A generation size after rounding to what the latent space and DiT accept."""

    frames: int
    height: int
    width: int
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"


class LatentSpace:
    """What the pipelines need from an autoencoder; subclasses wrap a model."""

    name: str
    channels: int
    spatial: int
    temporal: int = 4

    def __init__(self, model: torch.nn.Module, patch: tuple[int, int, int]):
        self.model = model
        self.patch = tuple(patch)
        self.channels = model.latent_channels

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def pixel_multiple(self) -> int:
        """Pixel height/width multiple: autoencoder stride x DiT patch."""
        return self.spatial * self.patch[1]

    def valid_frames(self, frames: int) -> int:
        raise NotImplementedError

    def latent_frames(self, frames: int) -> int:
        raise NotImplementedError

    def round_size(self, frames: int, height: int, width: int) -> Rounded:
        """Round (frames, height, width) down to the accepted values, with a note for each change."""
        if frames < 1 or height < 1 or width < 1:
            raise InputError(f"frame_num and size must be positive, got {frames} frames of {width}*{height}")
        m = self.pixel_multiple
        f = self.valid_frames(frames)
        h, w = max(m, height // m * m), max(m, width // m * m)
        notes = []
        if f != frames:
            notes.append(f"frame_num {frames} -> {f} ({self.name} needs {self.frame_rule})")
        if (h, w) != (height, width):
            notes.append(f"size {width}*{height} -> {w}*{h} (multiples of {m} for {self.name} + the DiT patch)")
        return Rounded(f, h, w, tuple(notes))

    def area_size(self, frames: int, max_area: int, aspect: float) -> Rounded:
        """I2V: the largest size of the image's aspect (h/w) within `max_area` pixels (official rule)."""
        stride, ph = self.spatial, self.patch[1]
        lat_h = round(math.sqrt(max_area * aspect) // stride // ph * ph)
        lat_w = round(math.sqrt(max_area / aspect) // stride // ph * ph)
        if lat_h < ph or lat_w < ph:
            raise InputError(f"the area {max_area} is too small for an image of aspect h/w={aspect:.3f}")
        rounded = self.round_size(frames, lat_h * stride, lat_w * stride)
        return rounded

    def prepare_image(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The first frame at the generation size, as the reference pipeline of this space resizes it."""
        return resize_image(image, height, width)

    # whether CLIP sees the resized image (NVIDIA) or the image as given (official Wan)
    clip_sees_resized = False

    def latent_shape(self, r: Rounded) -> tuple[int, int, int, int]:
        return (self.channels, self.latent_frames(r.frames), r.height // self.spatial, r.width // self.spatial)

    # ---- encode / decode / I2V conditioning ----------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> the DiT's latent."""
        raise NotImplementedError

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The DiT's latent -> [B, 3, F, H, W] in [-1, 1]."""
        raise NotImplementedError

    # pixel frames one conditioning image fills at each end (Wan VAE 1, DC-AE-V a temporal group)
    chunk_copies = 1

    def image_chunk(self, image: torch.Tensor, frames: int, last: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, H, W] -> the conditioning video [B, 3, frames, H, W]: the image `chunk_copies`
        times, zero frames, and (FLF2V) `last` `chunk_copies` times at the end."""
        return self._pad_with_zero_frames(image, self.chunk_copies, frames, last)

    def image_condition(self, image: torch.Tensor, frames: int, last: torch.Tensor | None = None) -> torch.Tensor:
        """y = concat(mask [B, 4, T', h, w] over the conditioned frames, encoded image chunk)."""
        latent = self.encode(self.image_chunk(image, frames, last))
        mask = self.condition_mask(frames, last is not None).to(latent.device, latent.dtype)
        mask = mask[None, :, :, None, None].expand(latent.shape[0], -1, -1, *latent.shape[3:])
        return torch.cat([mask, latent], dim=1)

    def condition_mask(self, frames: int, last: bool = False) -> torch.Tensor:
        """[4, T'] mask: 1 on the pixel frames holding the image (and the last image), grouped 4 per
        latent frame as the references do (the Wan VAE's first frame counted 4 times)."""
        pixel = torch.zeros(frames)
        pixel[: self.chunk_copies] = 1
        if last:
            pixel[-self.chunk_copies :] = 1
        pixel = self._mask_frames(pixel)
        return pixel.view(-1, 4).T.contiguous()

    def _mask_frames(self, pixel: torch.Tensor) -> torch.Tensor:
        return pixel

    @staticmethod
    def _pad_with_zero_frames(image: torch.Tensor, copies: int, frames: int, last: torch.Tensor | None = None) -> torch.Tensor:
        first = image.unsqueeze(2).expand(-1, -1, copies, -1, -1)
        end = [] if last is None else [last.to(image.dtype).unsqueeze(2).expand(-1, -1, copies, -1, -1)]
        empty = frames - copies * (1 + len(end))
        if empty < 0:
            raise InputError(f"{frames} frames cannot hold the conditioning images ({copies} frame(s) each)")
        rest = torch.zeros(*image.shape[:2], empty, *image.shape[2:], dtype=image.dtype, device=image.device)
        return torch.cat([first, rest, *end], dim=2)


class WanVAESpace(LatentSpace):
    name = "wan-vae"
    spatial = 8
    frame_rule = "4k+1 frames"

    def valid_frames(self, frames: int) -> int:
        return (frames - 1) // 4 * 4 + 1

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // 4 + 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.model.encode(video)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent)  # WanVAE.decode already clamps to [-1, 1]

    def _mask_frames(self, pixel: torch.Tensor) -> torch.Tensor:
        return torch.cat([pixel[:1].repeat(3), pixel])  # the causal first latent frame: 1 pixel frame, 4 mask rows


class DCAEVSpace(LatentSpace):
    name = "dcae-v"
    spatial = 32
    frame_rule = "a multiple of 4 frames"

    def __init__(self, model: torch.nn.Module, patch: tuple[int, int, int], frames_per_tile: int | None = None,
                 tile_size: int | None = None):
        from dcae_v.tiling import check_frames_per_tile

        super().__init__(model, patch)
        self.spatial = model.spatial_compression
        self.temporal = model.temporal_compression
        check_frames_per_tile(model, frames_per_tile)  # at load time, not after sampling
        self.frames_per_tile = frames_per_tile
        self.tile_size = tile_size  # spatial tiles in pixels (DCAEV.encode/decode tile_size)

    clip_sees_resized = True

    def valid_frames(self, frames: int) -> int:
        return max(self.temporal, frames // self.temporal * self.temporal)

    def area_size(self, frames: int, max_area: int, aspect: float) -> Rounded:
        """I2V, as NVIDIA's generate.py: h = round(sqrt(area * aspect)) // m * m (w likewise) with
        m = stride x patch; the official Wan rule floors sqrt() first, which can lose one step of m
        (sqrt = 703.8 -> 672 instead of 704)."""
        m = self.pixel_multiple
        h = round(math.sqrt(max_area * aspect)) // m * m
        w = round(math.sqrt(max_area / aspect)) // m * m
        if h < m or w < m:
            raise InputError(f"the area {max_area} is too small for an image of aspect h/w={aspect:.3f}")
        return self.round_size(frames, h, w)

    def prepare_image(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return resize_image_8bit(image, height, width)

    def latent_frames(self, frames: int) -> int:
        return frames // self.temporal

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        z = self.model.encode(video.to(self.model.dtype), frames_per_tile=self.frames_per_tile,
                              tile_size=self.tile_size)
        return (z * self.model.scaling_factor).float()  # scaled in the model dtype, as NVIDIA (bf16)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent.to(self.model.dtype) / self.model.scaling_factor  # cast first, as NVIDIA
        return self.model.decode(z, frames_per_tile=self.frames_per_tile,
                                 tile_size=self.tile_size).float().clamp(-1, 1)

    @property
    def chunk_copies(self) -> int:
        return self.temporal


def fit_last_frame(last: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLF2V: the central crop of the last frame [B, 3, h, w] with the first frame's aspect
    (height/width), before both are resized to the generation size (what official
    first_last_frame2video.py means to do when the sizes differ: scale the last frame to cover the
    first, then center-crop; its code crops with width and height swapped, not followed here)."""
    h, w = last.shape[-2:]
    if (h, w) == (height, width):
        return last
    ratio = max(width / w, height / h)  # scales the last frame to cover the first
    crop_h, crop_w = min(h, round(height / ratio)), min(w, round(width / ratio))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return last[..., top : top + crop_h, left : left + crop_w]


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, 3, h, w] in [-1, 1] -> [B, 3, height, width], bicubic as the official I2V (no crop, and
    no clamp of the bicubic overshoot, as official)."""
    return F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False)


def resize_image_8bit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, 3, h, w] in [-1, 1] -> [B, 3, height, width] in [-1, 1] holding 8-bit values: what
    NVIDIA's I2V gets from PIL's `Image.resize((w, h))` (bicubic, antialiased when shrinking) and
    diffusers' `x / 255 * 2 - 1` (see `dcvg_wan.pil_resize`)."""
    from dcvg_wan.pil_resize import pil_resize

    pixels = ((image.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if pixels.shape[-2:] != (height, width):
        pixels = pil_resize(pixels, height, width)
    return (pixels.float() / 255 * 2 - 1).to(image.device)
