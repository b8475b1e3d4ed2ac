"""umT5-xxl text encoder (Wan-2.1's T5) through transformers' `UMT5EncoderModel`.

Weights come from the official `models_t5_umt5-xxl-enc-bf16.pth` (keys of Wan's `T5Encoder`,
converted here), a diffusers/transformers `text_encoder/` directory, or a single file in
transformers' names (e.g. ComfyUI's `umt5_xxl_*.safetensors`). The tokenizer is always read from
a local directory (`google/umt5-xxl/` next to the official file, `tokenizer/` in diffusers).

Official behaviour reproduced: prompts cleaned (ftfy when installed, double HTML unescape,
whitespace collapsed), EOS appended, padded/truncated to 512 tokens with a mask, and each
output cut to its prompt's true length; the DiT zero-pads the rows back to 512 (`pad_context`).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from dcvg_wan.encoder_files import (
    load_strict,
    locate_weights,
    read_weights,
    strip_prefix,
)
from dcvg_wan.errors import CheckpointError, InputError

TEXT_LEN = 512
OFFICIAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER = "google/umt5-xxl"
TIED = {"encoder.embed_tokens.weight": "shared.weight"}  # transformers shares the token embedding
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """Architecture of a umT5 encoder; names follow Wan's `T5Encoder`."""

    vocab_size: int
    dim: int
    ffn_dim: int
    num_heads: int
    head_dim: int
    num_layers: int
    num_buckets: int = 32  # relative-position buckets, one bias table per layer (umT5)
    max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"{f.name} must be positive, got {value}")
        if self.num_buckets % 4:
            raise ValueError(f"num_buckets must be a multiple of 4 (bidirectional, exact half), got {self.num_buckets}")

    def to_hf(self) -> UMT5Config:
        return UMT5Config(
            vocab_size=self.vocab_size,
            d_model=self.dim,
            d_kv=self.head_dim,
            d_ff=self.ffn_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            layer_norm_epsilon=self.eps,
            feed_forward_proj="gated-gelu",  # GELU with tanh approximation on the gate
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
            tie_word_embeddings=True,
        )

    @classmethod
    def from_hf(cls, c: UMT5Config) -> TextEncoderConfig:
        if c.feed_forward_proj != "gated-gelu":
            raise CheckpointError(f"expected a gated-gelu umT5 (Wan's T5), the config says {c.feed_forward_proj!r}")
        return cls(
            vocab_size=c.vocab_size,
            dim=c.d_model,
            ffn_dim=c.d_ff,
            num_heads=c.num_heads,
            head_dim=c.d_kv,
            num_layers=c.num_layers,
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
            eps=c.layer_norm_epsilon,
        )


TEXT_PRESETS: dict[str, TextEncoderConfig] = {
    "umt5-xxl": TextEncoderConfig(vocab_size=256384, dim=4096, ffn_dim=10240, num_heads=64, head_dim=64, num_layers=24),
    "debug": TextEncoderConfig(
        vocab_size=64, dim=32, ffn_dim=48, num_heads=4, head_dim=8, num_layers=2, num_buckets=8, max_distance=16
    ),
}


def build_text_model(config: TextEncoderConfig | str) -> UMT5EncoderModel:
    """An untrained encoder (on the current default device: `with torch.device("meta")` is instant)."""
    config = _config(config)
    return UMT5EncoderModel(config.to_hf()).eval()


def _config(config: TextEncoderConfig | str) -> TextEncoderConfig:
    if isinstance(config, TextEncoderConfig):
        return config
    if config not in TEXT_PRESETS:
        raise ValueError(f"unknown text encoder preset {config!r}; valid: {', '.join(TEXT_PRESETS)}")
    return TEXT_PRESETS[config]


# ---- official <-> transformers key names -------------------------------------------------------
_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU-gated branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}


def t5_from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan `T5Encoder` names -> `UMT5EncoderModel` names (unknown keys kept, so checks list them)."""
    out = {}
    for k, v in sd.items():
        m = _OFFICIAL_BLOCK.match(k)
        if m and m[2] in _BLOCK:
            out[f"encoder.block.{m[1]}.{_BLOCK[m[2]]}"] = v
        else:
            out[_TOP.get(k, k)] = v
    return out


def t5_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`UMT5EncoderModel` names -> Wan `T5Encoder` names (the tied embedding alias is dropped)."""
    out = {}
    for k, v in sd.items():
        if k in TIED:
            continue
        m = _HF_BLOCK.match(k)
        if m and m[2] in _BLOCK_INV:
            out[f"blocks.{m[1]}.{_BLOCK_INV[m[2]]}"] = v
        else:
            out[_TOP_INV.get(k, k)] = v
    return out


def t5_layout(keys: Sequence[str]) -> str:
    if "token_embedding.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return "official"
    if "shared.weight" in keys or any(k.startswith("encoder.block.") for k in keys):
        return "transformers"
    raise CheckpointError(
        f"not a umT5 encoder: no official (token_embedding.*, blocks.N.*) or transformers (shared.*, "
        f"encoder.block.N.*) key names; {len(keys)} keys, e.g. {sorted(keys)[:5]}"
    )


def config_from_shapes(sd: Mapping[str, torch.Tensor]) -> TextEncoderConfig:
    """The architecture of a transformers-named state dict. max_distance is not stored: the preset's
    when the shapes match one, else umT5's 128."""
    try:
        vocab, dim = sd["shared.weight"].shape
        buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
        inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
        ffn = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"cannot read the umT5 architecture from the weights: key {e} is missing") from None
    layers = 1 + max(int(m[1]) for k in sd if (m := _HF_BLOCK.match(k)))
    cfg = TextEncoderConfig(
        vocab_size=vocab,
        dim=dim,
        ffn_dim=ffn,
        num_heads=heads,
        head_dim=inner // heads,
        num_layers=layers,
        num_buckets=buckets,
    )
    same_shapes = (p for p in TEXT_PRESETS.values() if p == dataclasses.replace(cfg, max_distance=p.max_distance))
    return next(same_shapes, cfg)


# ---- loading -----------------------------------------------------------------------------------
def load_text_model(
    path: str | os.PathLike,
    *,
    config: TextEncoderConfig | str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> UMT5EncoderModel:
    """A `UMT5EncoderModel` from any supported layout (see the module docstring), checked strictly."""
    path = Path(path)
    files, json_dir = _locate_weights(path)
    sd = strip_prefix(read_weights(files, dtype), ("module.", "model."))
    layout = t5_layout(list(sd))
    if layout == "official":
        sd = t5_from_official(sd)
    alias = sd.pop("encoder.embed_tokens.weight", None)  # the same tensor as shared.weight, re-tied on load
    if alias is not None and "shared.weight" not in sd:  # files that kept only the alias
        sd["shared.weight"] = alias
    if config is not None:
        cfg = _config(config)
    elif json_dir is not None:
        cfg = TextEncoderConfig.from_hf(UMT5Config.from_pretrained(str(json_dir), local_files_only=True))
    else:
        cfg = config_from_shapes(sd)
    build = functools.partial(build_text_model, cfg)
    return load_strict(build, sd, what=f"umT5 encoder {cfg}", path=path, layout=layout, tied=TIED, device=device)


def _locate_weights(path: Path) -> tuple[list[Path], Path | None]:
    return locate_weights(path, what="umT5 text encoder weights", subfolder="text_encoder", official_file=OFFICIAL_FILE,
                          official_dir="official Wan2.1 checkpoint directory")


def locate_tokenizer(weights: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """The local tokenizer directory: `tokenizer_dir`, else the usual places next to the weights."""
    weights = Path(weights)
    if tokenizer_dir is not None:
        candidates = [Path(tokenizer_dir)]
    else:
        base = weights.parent if weights.is_file() else weights
        candidates = [
            base / OFFICIAL_TOKENIZER,  # official checkpoint directory
            base / "tokenizer",  # diffusers pipeline directory
            base.parent / "tokenizer",  # diffusers text_encoder/ passed directly
            base.parent / OFFICIAL_TOKENIZER,
            base,
        ]
    for d in candidates:
        if d.is_dir() and any((d / f).is_file() for f in _TOKENIZER_FILES):
            return d
    looked = "\n  ".join(str(d) for d in candidates)
    raise CheckpointError(
        f"no umT5 tokenizer found (a directory with one of {', '.join(_TOKENIZER_FILES)}); looked in:\n  {looked}\n"
        f"pass tokenizer_dir= (the official one is {OFFICIAL_TOKENIZER}/ in the Wan2.1 checkpoint directory)"
    )


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy (if installed), HTML unescaped twice, whitespace collapsed."""
    try:
        import ftfy
    except ImportError:  # optional, as in diffusers; only matters for mis-encoded text
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def pad_context(contexts: Sequence[torch.Tensor], length: int = TEXT_LEN) -> torch.Tensor:
    """[L_i, dim] rows -> [B, length, dim], zero-padded at the end as the DiT does."""
    too_long = [c.shape[0] for c in contexts if c.shape[0] > length]
    if too_long:
        raise InputError(f"context rows {too_long} exceed length={length}; encode with text_len <= {length}")
    return torch.stack([F.pad(c, (0, 0, 0, length - c.shape[0])) for c in contexts])


class TextEncoder:
    """Prompts -> umT5 features, one [L_i, dim] tensor per prompt (L_i <= text_len, EOS included)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, *, text_len: int = TEXT_LEN):
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.config = TextEncoderConfig.from_hf(model.config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        config: TextEncoderConfig | str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        text_len: int = TEXT_LEN,
    ) -> TextEncoder:
        """path: official .pth, transformers/diffusers directory, or a Wan/diffusers checkpoint root.
        dtype: cast while loading (default: as stored; the official file is bf16)."""
        _locate_weights(Path(path))  # report missing weights before a missing tokenizer
        tok_dir = locate_tokenizer(path, tokenizer_dir)
        model = load_text_model(path, config=config, dtype=dtype, device=device)
        return cls(model, load_tokenizer(tok_dir), text_len=text_len)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the model (e.g. to CPU between stages, as the official `--offload_model`)."""
        self.model.to(device)
        return self

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), each [B, text_len]; warns for prompts longer than text_len tokens."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [clean_prompt(p) for p in prompts]
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > self.text_len:
                warnings.warn(
                    f"prompt {i} has {len(ids)} tokens (EOS included); it is truncated to text_len={self.text_len} "
                    f"and its last {len(ids) - self.text_len} tokens are ignored",
                    stacklevel=3,
                )
        out = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One [L_i, dim] tensor per prompt, on the model's device and dtype."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return [h[:n] for h, n in zip(hidden, mask.sum(dim=1).tolist(), strict=True)]

    def encode_padded(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, text_len, dim]: `encode` zero-padded to text_len (what the DiT consumes)."""
        return pad_context(self.encode(prompts), self.text_len)


def load_tokenizer(directory: str | os.PathLike):
    """AutoTokenizer from a local directory only (never the hub)."""
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {directory}: {str(e).splitlines()[0]}") from None
