"""Shared helpers: debug-size models with non-trivial random weights, and matching inputs."""

from __future__ import annotations

import pytest
import torch

from dcvg_wan import WanModel


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every 1-D parameter (norm weights around 1, biases around 0) so that a swapped or
    dropped norm, bias or gate changes the output; matrices keep their default random init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return module


def make_model(name: str = "debug-t2v", seed: int = 0, **overrides) -> WanModel:
    torch.manual_seed(seed)
    return randomize_(WanModel.from_preset(name, **overrides), seed).eval()


def make_inputs(model: WanModel, batch: int = 2, latent=(4, 8, 8), text_rows: int = 7, seed: int = 1) -> dict:
    """Keyword inputs for `model(**inputs)`: x, t, context (+ clip_fea, y for I2V/FLF2V)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    x_channels = cfg.out_dim if cfg.image_dim is not None else cfg.in_dim
    inputs = {
        "x": torch.randn(batch, x_channels, *latent, generator=gen),
        "t": torch.tensor([999.0, 250.0, 0.0, 500.0][:batch]),
        "context": torch.randn(batch, text_rows, cfg.text_dim, generator=gen),
    }
    if cfg.image_dim is not None:
        per_sample = 2 if cfg.flf_pos_len is not None else 1
        tokens = cfg.flf_pos_len // 2 if cfg.flf_pos_len is not None else 257
        inputs["clip_fea"] = torch.randn(per_sample * batch, tokens, cfg.image_dim, generator=gen)
        inputs["y"] = torch.randn(batch, cfg.in_dim - x_channels, *latent, generator=gen)
    return inputs


@pytest.fixture(scope="module")
def t2v() -> WanModel:
    return make_model("debug-t2v")


@pytest.fixture(scope="module")
def i2v() -> WanModel:
    return make_model("debug-i2v")


@pytest.fixture(scope="session")
def new_model():
    """Factory: new_model("debug-i2v", seed=1, patch=(1, 1, 1))."""
    return make_model


@pytest.fixture(scope="session")
def inputs_for():
    """Factory: inputs_for(model, batch=2, latent=(4, 8, 8), text_rows=7)."""
    return make_inputs


@pytest.fixture(scope="session")
def randomize():
    return randomize_


TINY_WORDS = ["a", "red", "blue", "circle", "square", "moving", "left", "right"]


def tiny_text_encoder(directory=None, text_len: int = 16):
    """A word-level tokenizer over TINY_WORDS and a seeded 1-layer umT5 of width 32 (debug DiT's
    text_dim); saved as `tokenizer/` + `text_encoder/` under `directory` when given."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from dcvg_wan.text_encoder import TextEncoder, TextEncoderConfig, build_text_model

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(TINY_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    cfg = TextEncoderConfig(vocab_size=len(vocab), dim=32, ffn_dim=48, num_heads=4, head_dim=8, num_layers=1,
                            num_buckets=8, max_distance=16)
    torch.manual_seed(0)
    model = build_text_model(cfg)
    if directory is not None:
        fast.save_pretrained(directory / "tokenizer")
        model.save_pretrained(directory / "text_encoder")
    return TextEncoder(model, fast, text_len=text_len)
