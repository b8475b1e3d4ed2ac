"""Paired-latent cache: for each clip, its base-autoencoder latent, its new-autoencoder latent and
its text embedding, in safetensors shards. Built once, so that neither autoencoder nor the text
encoder is in memory while the DiT trains.

Layout: `index.json` (format, autoencoder and text-encoder names, shapes, shard list) and
`shard-00000.safetensors`, ... with keys `<sample index>.<field>` (fields: base, new, context,
and whatever `extra` adds, e.g. base_y / new_y / clip_fea for image-to-video), and with
`null_prompt=` a `null.safetensors` holding that prompt's text embedding: the conditioning of
DC-Gen's text dropout (`LatentCache.null_cond()`).
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ae_adapt.errors import CacheError, ShapeError
from ae_adapt.files import save_safetensors, write_text
from ae_adapt.trainer import describe_changes

FORMAT = "ae-adapt-latent-cache/1"
INDEX = "index.json"
NULL = "null.safetensors"
PARTIAL = "partial.json"  # an unfinished build's shards, so that a rerun resumes it

Encoder = Callable[[torch.Tensor], torch.Tensor]


def build_cache(
    clips: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    base_encode: Encoder,
    new_encode: Encoder,
    text_encode: Callable[[str], torch.Tensor],
    base_ae: str,
    new_ae: str,
    text_encoder: str = "",
    extra: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None,
    new_patch: Sequence[int] | None = None,
    null_prompt: str | None = None,
    shard_size: int = 256,
    dtype: torch.dtype = torch.float32,
    inputs: dict[str, Any] | None = None,
) -> Path:
    """Encode every clip ({"video": [3, T, H, W] in [-1, 1], "prompt": str, ...}) with both
    autoencoders and the text encoder and write the cache. `base_ae`/`new_ae` name the
    autoencoders (checked when training reads the cache); `new_patch`, when given, is checked
    against the new latent's shape here rather than hours later. `null_prompt` (e.g. the model's
    negative prompt) is encoded once and stored for condition dropout. `inputs` (JSON-able: e.g.
    clip size, frame count, a digest of the data list) is stored in the index and in the
    fingerprint, so that `cache_input_changes` can tell a rerun with other inputs, and a stage
    trained on this cache refuses to resume on another one. Files are written atomically with
    ordinary permissions; `index.json` comes last.

    Resumable: after each shard, `partial.json` records the shards written so far. A build that
    was interrupted resumes from it when called again with the same autoencoders, text encoder,
    `inputs`, `shard_size` and `dtype`: the clips already cached are drawn from `clips` and
    skipped, not encoded again (the source must give the clips in the same order). Without
    `inputs` a build always starts over (nothing would tell it the data is the same)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "base_ae": base_ae, "new_ae": new_ae, "text_encoder": text_encoder}
    inputs = json.loads(json.dumps(inputs)) if inputs is not None else None
    shards, pending, shapes, count, text_len = [], {}, {}, 0, 0
    build_key = {"meta": meta, "inputs": inputs, "shard_size": shard_size, "dtype": str(dtype)}
    done = _partial_build(out, build_key) if inputs is not None else None
    if done is not None:
        shards, shapes, count, text_len = done["shards"], done["shapes"], done["count"], done["text_len"]
        clips = itertools.islice(clips, count, None)  # drawn (cheap: decoding), not encoded again
        warnings.warn(f"resuming the latent cache in {out}: {count} clips in {len(shards)} shards are already "
                      "cached", stacklevel=2)
    null = None
    if null_prompt is not None:
        with torch.no_grad():
            null = text_encode(null_prompt).detach().to("cpu", dtype).contiguous().clone()
        text_len = int(null.shape[0])  # contexts and the null one are padded to one length

    def flush() -> None:
        if pending:
            name = f"shard-{len(shards):05d}.safetensors"
            save_safetensors(pending, out / name, metadata={k: str(v) for k, v in meta.items()})
            shards.append({"file": name, "count": len({k.split(".")[0] for k in pending})})
            pending.clear()
            if inputs is not None:
                write_text(out / PARTIAL, json.dumps({**build_key, "shards": shards, "shapes": shapes, "count": count,
                                                      "text_len": text_len}, indent=2))

    with torch.no_grad():
        for clip in clips:
            sample = {
                "base": base_encode(clip["video"]),
                "new": new_encode(clip["video"]),
                "context": text_encode(clip["prompt"]),
            }
            sample.update(extra(clip) if extra is not None else {})
            for field, tensor in sample.items():
                shape = list(tensor.shape) if field != "context" else list(tensor.shape[1:])
                if shapes.setdefault(field, shape) != shape:
                    raise CacheError(
                        f"clip {count}: {field} has shape {shape}, earlier clips {shapes[field]}; "
                        "a cache holds one resolution and length: resize the clips or build one "
                        "cache per resolution"
                    )
                pending[f"{count:08d}.{field}"] = tensor.detach().to("cpu", dtype).contiguous().clone()
            text_len = max(text_len, int(sample["context"].shape[0]))
            if count == 0 and new_patch is not None:
                check_tiling(shapes["new"], new_patch)
            count += 1
            if count % shard_size == 0:
                flush()
    flush()
    if count == 0:
        raise CacheError("no clips to cache: the clip source is empty")
    index = {**meta, "count": count, "shapes": shapes, "text_len": text_len, "shards": shards}
    if inputs is not None:
        index["inputs"] = inputs
    if null is not None:
        if list(null.shape[1:]) != shapes["context"]:
            raise CacheError(
                f"the null prompt's embedding has rows of shape {list(null.shape[1:])}, the prompts' "
                f"{shapes['context']}: encode both with the same text encoder"
            )
        save_safetensors({"context": null}, out / NULL, metadata={k: str(v) for k, v in meta.items()})
        index["null"] = {"file": NULL, "prompt": null_prompt}
    write_text(out / INDEX, json.dumps(index, indent=2))
    (out / PARTIAL).unlink(missing_ok=True)
    return out


def _partial_build(out: Path, build_key: dict[str, Any]) -> dict[str, Any] | None:
    """The state of an interrupted build of the same cache, when its shards are all there."""
    try:
        state = json.loads((out / PARTIAL).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(state.get(k) != v for k, v in build_key.items()):
        return None
    if not all((out / shard["file"]).is_file() for shard in state.get("shards", [])):
        return None
    return state


def module_digest(module: torch.nn.Module, config: Any = None, *, sample: int = 16384) -> str:
    """A content digest of a module's weights (e.g. an autoencoder, to tell a cache built with other
    weights under the same file name): sha256 over `config` (JSON) and, per tensor in name order,
    its name, shape, dtype and up to `sample` evenly strided values (copied exactly, so the digest
    is the same on every device; no sums, whose rounding depends on the device). Cheap (no full
    hash of gigabytes) and independent of the file layout the weights were loaded from; two
    trainings differ in every tensor, so the sample tells them apart."""
    import hashlib

    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            flat = t.detach().reshape(-1)
            stride = max(1, flat.numel() // sample)
            values = flat[::stride][:sample].to("cpu", torch.float64)
            digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def cache_input_changes(directory: str | os.PathLike, inputs: dict[str, Any], **identity: str) -> list[str]:
    """["field: old -> new", ...]: how the `inputs` (and autoencoder names given as `identity`, e.g.
    new_ae=...) of a rerun differ from those the cache in `directory` was built from."""
    index = json.loads((Path(directory) / INDEX).read_text())
    changed = [c for k, v in identity.items() for c in describe_changes(index.get(k), v, f"{k}.")]
    if "inputs" not in index:
        return changed + ["inputs: not recorded (a cache of an earlier version) -> recorded"]
    return changed + describe_changes(index["inputs"], json.loads(json.dumps(inputs)))


def check_tiling(latent_shape: Sequence[int], patch: Sequence[int]) -> None:
    """Raise ShapeError unless the latent's (F, H, W) are non-zero multiples of `patch`."""
    sizes = tuple(int(s) for s in latent_shape[-len(patch) :])
    if any(s == 0 or s % p for s, p in zip(sizes, patch)):
        raise ShapeError(
            f"new latents of frames/height/width {sizes} cannot be tiled by the new patch embedder's "
            f"patch {tuple(patch)}: pick a clip size whose latent is a multiple of the patch"
        )


class LatentCache:
    """The cache as a dataset: `cache[i]` -> {"base", "new", "context" (zero-padded to text_len), ...}.

    Passing `base_ae`/`new_ae` (the run's autoencoders) refuses a cache built with others."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        base_ae: str | None = None,
        new_ae: str | None = None,
        new_patch: Sequence[int] | None = None,
    ):
        self.dir = Path(directory)
        path = self.dir / INDEX
        if not path.is_file():
            raise CacheError(f"{self.dir} is not a latent cache ({INDEX} is missing); build it with build_cache")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != FORMAT:
            raise CacheError(f"{path}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        for role, want in (("base_ae", base_ae), ("new_ae", new_ae)):
            if want is not None and self.index[role] != want:
                raise CacheError(
                    f"{self.dir} holds latents of {role.replace('_ae', '')} autoencoder "
                    f"{self.index[role]!r}, but this run uses {want!r}: rebuild the cache with the "
                    "run's autoencoders or point the run at the matching cache"
                )
        if new_patch is not None:
            check_tiling(self.index["shapes"]["new"], new_patch)
        self._where = [(s["file"]) for s in self.index["shards"] for _ in range(s["count"])]
        self._open: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.index["count"]

    @property
    def fields(self) -> list[str]:
        return list(self.index["shapes"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a cache with {len(self)}")
        name = self._where[i]
        if name not in self._open:
            self._open[name] = safe_open(str(self.dir / name), framework="pt")
        shard = self._open[name]
        sample = {field: shard.get_tensor(f"{i:08d}.{field}") for field in self.fields}
        ctx = sample["context"]
        sample["context"] = F.pad(ctx, (0, 0, 0, self.index["text_len"] - ctx.shape[0]))
        return sample

    def null_cond(self) -> dict[str, torch.Tensor] | None:
        """{"context": the null prompt's embedding, zero-padded to text_len} (the conditioning of
        condition dropout), or None for a cache built without `null_prompt`."""
        entry = self.index.get("null")
        if entry is None:
            return None
        with safe_open(str(self.dir / entry["file"]), framework="pt") as f:
            ctx = f.get_tensor("context")
        return {"context": F.pad(ctx, (0, 0, 0, self.index["text_len"] - ctx.shape[0]))}

    def fingerprint(self) -> dict[str, Any]:
        """What a training run depends on (stored in its checkpoints)."""
        keys = ("base_ae", "new_ae", "text_encoder", "count", "shapes")
        fp = {k: self.index[k] for k in keys}
        if "inputs" in self.index:  # absent from caches built without inputs (their fingerprint is unchanged)
            fp["inputs"] = self.index["inputs"]
        return fp
