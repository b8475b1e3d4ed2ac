"""Where each component of a Wan-2.1 pipeline lives inside the checkpoint folders users have.

Four folder shapes are recognised, the ones the official repo, diffusers and NVIDIA ship:

* official `Wan-AI/Wan2.1-*`: the DiT at the top (`config.json` + `diffusion_pytorch_model*.safetensors`),
  `Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`, and for I2V
  `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (+ `xlm-roberta-large/`);
* diffusers `Wan-AI/Wan2.1-*-Diffusers`: `transformer/ vae/ text_encoder/ tokenizer/ image_encoder/`;
* NVIDIA's DC-Gen release `dc-ai/DC-Gen-Wan2.1-T2V-14B` / `dc-ai/DC-Gen-Wan2.1-I2V-14B` (one
  folder per task, DC-Gen `pipeline_dc_videogen.py`): `transformer/`, `dc-ae-v-f32t4c32-1.0-bf16.pt`
  at the top, `text_encoder/ tokenizer/ scheduler/`; no CLIP: NVIDIA's I2V takes it from
  `Wan-AI/Wan2.1-I2V-14B-720P-Diffusers` (subfolder `image_encoder`), looked for here inside the
  folder and in a sibling `Wan2.1-I2V-14B-720P-Diffusers/`;
* the earlier NVIDIA layout `DC-VideoGen-Wan2.1-14B`: `transformer_t2v/` or `transformer_i2v/`,
  `dc-ae-v-f32t4c32-1.0-bf16.pt`, `text_encoder/ tokenizer/`, the official CLIP `.pth`.

A folder with NVIDIA's DC-AE-V file and no Wan VAE is a DC-VideoGen folder: `default_autoencoder`
says "dcae-v" for it, so that it loads without `--ae`.

Every component may also be given explicitly (a path overrides the folder search). A missing one
raises a `CheckpointError` that lists every place looked at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from dcvg_wan.errors import CheckpointError

DIT_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_T5_TOKENIZER = "google/umt5-xxl"
OFFICIAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
NVIDIA_DCAE = "dc-ae-v-f32t4c32-1.0-bf16.pt"
NVIDIA_CLIP_SOURCE = "Wan2.1-I2V-14B-720P-Diffusers"  # where NVIDIA's DC-Gen I2V takes CLIP from (HF Wan-AI/...)
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclass(frozen=True)
class ComponentPaths:
    """Resolved files/folders; `None` where the task does not use the component."""

    dit: Path
    text_encoder: Path
    tokenizer: Path
    vae: Path | None = None
    dcae: Path | None = None
    image_encoder: Path | None = None
    scheduler: Path | None = None  # a DC-VideoGen folder's scheduler_config.json (optional)

    def describe(self) -> str:
        return "\n".join(f"  {f.name:<14} {getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name))


def _is_dit_dir(p: Path) -> bool:
    return p.is_dir() and any((p / name).is_file() for name in DIT_WEIGHTS)


def is_dcvg_folder(ckpt_dir: str | os.PathLike | None) -> bool:
    """NVIDIA's DC-AE-V file at the top and no Wan VAE: a DC-VideoGen release folder (either layout)."""
    if ckpt_dir is None:
        return False
    root = Path(ckpt_dir)
    return (root / NVIDIA_DCAE).is_file() and not (root / OFFICIAL_VAE).exists() and not (root / "vae").is_dir()


def default_autoencoder(ckpt_dir: str | os.PathLike | None) -> str:
    """The latent space a folder's DiT runs in: "dcae-v" for a DC-VideoGen folder, else "wan-vae"."""
    return "dcae-v" if is_dcvg_folder(ckpt_dir) else "wan-vae"


def folder_is_i2v(ckpt_dir: str | os.PathLike | None) -> bool:
    """Whether a DC-VideoGen folder holds only an I2V DiT (NVIDIA's `DC-Gen-Wan2.1-I2V-14B`:
    `transformer/config.json` with an image path), so that `generate` can pick the I2V task."""
    dit_i2v = folder_dit_is_i2v(ckpt_dir)
    if dit_i2v is not None:
        return dit_i2v
    root = Path(ckpt_dir) if ckpt_dir is not None else None  # the earlier layout: an I2V DiT only
    return is_dcvg_folder(root) and (root / "transformer_i2v").is_dir() and not (root / "transformer_t2v").is_dir()


def folder_dit_is_i2v(ckpt_dir: str | os.PathLike | None) -> bool | None:
    """For a DC-Gen folder with one DiT (`transformer/config.json`): whether that DiT is I2V (has an
    image path); None for any other folder, where --task picks the DiT."""
    if not is_dcvg_folder(ckpt_dir) or not (Path(ckpt_dir) / "transformer" / "config.json").is_file():
        return None
    from dcvg_wan.config_json import read_config

    return read_config(Path(ckpt_dir) / "transformer" / "config.json").get("image_dim") is not None


def _first(candidates: list[Path], what: str, looked: list[str], check=Path.exists) -> Path | None:
    for c in candidates:
        if check(c):
            return c
    if candidates:
        looked.append(f"{what}: " + ", ".join(str(c) for c in candidates))
    return None


def locate_components(
    ckpt_dir: str | os.PathLike | None,
    *,
    i2v: bool,
    ae: str | None = None,
    dit: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    dcae: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
) -> ComponentPaths:
    """Find the pipeline's files in `ckpt_dir` (any of the three shapes) or take the given paths.

    `ae` is "wan-vae" (the base model) or "dcae-v" (DC-VideoGen: the DiT is NVIDIA's
    `transformer/` or `transformer_t2v/`/`transformer_i2v/`, or an adapted model from `dcvg-wan
    adapt`); None: `default_autoencoder(ckpt_dir)`."""
    ae = ae or default_autoencoder(ckpt_dir)
    if ae not in ("wan-vae", "dcae-v"):
        raise CheckpointError(f"unknown autoencoder {ae!r}: choose wan-vae or dcae-v")
    root = Path(ckpt_dir) if ckpt_dir is not None else None
    if root is not None and not root.is_dir():
        raise CheckpointError(f"--ckpt_dir {root} is not a directory")
    looked: list[str] = []

    def pick(given, candidates: list[Path], what: str, check=Path.exists) -> Path | None:
        if given is not None:
            given = Path(given)
            if not given.exists():
                looked.append(f"{what}: {given} (given explicitly, does not exist)")
                return None
            return given
        return _first(candidates if root is not None else [], what, looked, check)

    r = root or Path(".")
    kind = "i2v" if i2v else "t2v"
    dit_candidates = [r / f"transformer_{kind}", r / "transformer", r] if ae == "dcae-v" else [r / "transformer", r]
    found = {
        "dit": pick(dit, dit_candidates, "DiT (config.json + diffusion_pytorch_model*.safetensors)", _is_dit_dir),
        "text_encoder": pick(text_encoder, [r / OFFICIAL_T5, r / "text_encoder"], "umT5 text encoder"),
        "tokenizer": pick(tokenizer, [r / OFFICIAL_T5_TOKENIZER, r / "tokenizer"], "umT5 tokenizer folder", Path.is_dir),
    }
    if ae == "wan-vae":
        found["vae"] = pick(vae, [r / OFFICIAL_VAE, r / "vae"], "Wan VAE")
    elif str(dcae) == "default":  # the small DC-AE-V that ships inside dcae-v
        found["dcae"] = None
    else:
        found["dcae"] = pick(dcae, [r / NVIDIA_DCAE, r / "dcae"], "DC-AE-V checkpoint (--dcae_ckpt PATH, or "
                             "--dcae_ckpt default for the one shipped with dcae-v)")
    if i2v:
        clip = [r / OFFICIAL_CLIP, r / "image_encoder"]
        what = "CLIP image encoder"
        if ae == "dcae-v":  # NVIDIA's DC-Gen I2V folder has none: theirs loads Wan's diffusers one
            clip.append(r.absolute().parent / NVIDIA_CLIP_SOURCE / "image_encoder")
            what += (f" (NVIDIA's DC-Gen I2V uses Wan-AI/{NVIDIA_CLIP_SOURCE}, subfolder image_encoder: download it "
                     "next to this folder, or pass --image_encoder PATH)")
        found["image_encoder"] = pick(image_encoder, clip, what)
    if ae == "dcae-v" and is_dcvg_folder(root) and (root / SCHEDULER_CONFIG).is_file():
        found["scheduler"] = root / SCHEDULER_CONFIG
    if looked:
        where = f"in {root}" if root is not None else "(no --ckpt_dir given)"
        raise CheckpointError(
            f"missing checkpoint files {where}; looked for:\n  " + "\n  ".join(looked)
            + ("\nThis is a DC-VideoGen folder: complete it from NVIDIA's release (dc-ai/DC-Gen-Wan2.1-T2V-14B / "
               "-I2V-14B), or give the missing component's path explicitly." if is_dcvg_folder(root) else
               "\nDownload the Wan2.1 checkpoint folder (official or -Diffusers) and pass it as --ckpt_dir,"
               " or give the missing component's path explicitly.")
        )
    return ComponentPaths(**found)
