"""umT5 text encoder: official <-> transformers converter, parity with an independent re-implementation
of Wan's `T5Encoder` math, loading from every layout, tokenizer behaviour (offline, tiny tokenizer)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer

from dcvg_wan import CheckpointError, InputError, TextEncoder
from dcvg_wan.text_encoder import (
    OFFICIAL_FILE,
    OFFICIAL_TOKENIZER,
    TEXT_PRESETS,
    build_text_model,
    clean_prompt,
    load_text_model,
    pad_context,
    t5_from_official,
    t5_to_official,
)

CFG = TEXT_PRESETS["debug"]


# ---- fixtures ----------------------------------------------------------------------------------
def make_t5(seed: int = 0):
    """Debug umT5 with every weight random (norms around 1, relative biases large enough to matter)."""
    torch.manual_seed(seed)
    model = build_text_model("debug")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model.eval()


def save_tiny_tokenizer(directory) -> None:
    """A 56-token Unigram tokenizer with T5's specials (<pad> 0, </s> 1, <unk> 2) and EOS appended."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(c, -3.0) for c in letters] + [("▁", -4.0)] + [("▁" + c, -2.0) for c in letters]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    wrapped.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def t5():
    return make_t5()


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, t5):
    """An official-style checkpoint directory: the .pth (official names) + google/umt5-xxl/."""
    root = tmp_path_factory.mktemp("wan_official")
    official = {k: v.clone() for k, v in t5_to_official(t5.state_dict()).items()}
    torch.save(official, root / OFFICIAL_FILE)
    save_tiny_tokenizer(root / OFFICIAL_TOKENIZER)
    return root


# ---- the independent reference: Wan's T5Encoder math on official-layout weights ---------------------
def _bucket(rel: torch.Tensor, num_buckets: int, max_dist: int) -> torch.Tensor:
    half = num_buckets // 2  # bidirectional: one half per direction (keys after the query: upper half)
    out = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    large = exact + (torch.log(dist.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return out + torch.where(dist < exact, dist, large)


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def official_t5_forward(sd, ids, mask, cfg=CFG):
    b, s = ids.shape
    n, d = cfg.num_heads, cfg.head_dim
    x = sd["token_embedding.weight"][ids]
    pos = torch.arange(s)
    buckets = _bucket(pos[None, :] - pos[:, None], cfg.num_buckets, cfg.max_distance)  # [q, k]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        h = _rms(x, sd[p + "norm1.weight"])
        q, k, v = ((h @ sd[p + f"attn.{c}.weight"].T).view(b, s, n, d) for c in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None].repeat(b, 1, 1, 1)
        bias = bias.masked_fill(mask.view(b, 1, 1, s) == 0, torch.finfo(x.dtype).min)
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)  # no 1/sqrt(d)
        x = x + torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, s, n * d) @ sd[p + "attn.o.weight"].T
        h = _rms(x, sd[p + "norm2.weight"])
        gated = _gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T) * (h @ sd[p + "ffn.fc1.weight"].T)
        x = x + gated @ sd[p + "ffn.fc2.weight"].T
    return _rms(x, sd["norm.weight"])


def _ids_and_mask(lengths, total, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CFG.vocab_size, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


# ---- converter ---------------------------------------------------------------------------------------
def test_official_key_names_and_shapes(t5):
    """The names and shapes of Wan's T5Encoder state dict (wan/modules/t5.py, shared_pos=False)."""
    sd = t5_to_official(t5.state_dict())
    inner, ffn, dim = CFG.num_heads * CFG.head_dim, CFG.ffn_dim, CFG.dim
    expected = {"token_embedding.weight": (CFG.vocab_size, dim), "norm.weight": (dim,)}
    for i in range(CFG.num_layers):
        p = f"blocks.{i}."
        expected |= {
            p + "norm1.weight": (dim,),
            p + "norm2.weight": (dim,),
            p + "attn.q.weight": (inner, dim),
            p + "attn.k.weight": (inner, dim),
            p + "attn.v.weight": (inner, dim),
            p + "attn.o.weight": (dim, inner),
            p + "ffn.gate.0.weight": (ffn, dim),
            p + "ffn.fc1.weight": (ffn, dim),
            p + "ffn.fc2.weight": (dim, ffn),
            p + "pos_embedding.embedding.weight": (CFG.num_buckets, CFG.num_heads),
        }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_round_trip(t5):
    hf = t5.state_dict()
    back = t5_from_official(t5_to_official(hf))
    assert set(back) == set(hf) - {"encoder.embed_tokens.weight"}
    for k, v in back.items():
        assert torch.equal(v, hf[k]), k


def test_parity_with_official_math(t5):
    """transformers on our weights == Wan's T5 math on the converted weights (fp32 <= 1e-5), with a
    padding mask and a sequence longer than max_distance so the log buckets and the clamp are used."""
    ids, mask = _ids_and_mask([24, 9, 1], 24)
    ref = official_t5_forward(t5_to_official(t5.state_dict()), ids, mask)
    with torch.no_grad():
        out = t5(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, n in enumerate([24, 9, 1]):
        torch.testing.assert_close(out[i, :n], ref[i, :n], atol=1e-5, rtol=1e-5)
    assert ref[0].std() > 0.1


def test_swapped_ffn_branches_are_caught(t5):
    """The check above is sensitive: exchanging gate and fc1 changes the output."""
    ids, mask = _ids_and_mask([12], 12)
    sd = t5_to_official(t5.state_dict())
    swapped = dict(sd)
    swapped["blocks.0.ffn.gate.0.weight"], swapped["blocks.0.ffn.fc1.weight"] = (
        sd["blocks.0.ffn.fc1.weight"],
        sd["blocks.0.ffn.gate.0.weight"],
    )
    assert (official_t5_forward(swapped, ids, mask) - official_t5_forward(sd, ids, mask)).abs().max() > 1e-3


# ---- loading -------------------------------------------------------------------------------------
def test_encode_from_official_directory(official_dir, t5):
    enc = TextEncoder.from_pretrained(official_dir)
    assert enc.config == CFG  # recognised from the shapes (max_distance 16 from the preset)
    prompts = ["a cat", "hello   wonderful world &amp; sun"]
    out = enc.encode(prompts)
    tok = AutoTokenizer.from_pretrained(str(official_dir / OFFICIAL_TOKENIZER), local_files_only=True)
    for prompt, feat in zip(prompts, out, strict=True):
        ids = tok([clean_prompt(prompt)])["input_ids"][0]
        assert ids[-1] == 1 and feat.shape == (len(ids), CFG.dim)  # EOS kept, cut to the true length
        ref = official_t5_forward(t5_to_official(t5.state_dict()), torch.tensor([ids]), torch.ones(1, len(ids)))
        torch.testing.assert_close(feat, ref[0], atol=1e-5, rtol=1e-5)
    padded = enc.encode_padded(prompts)
    assert padded.shape == (2, 512, CFG.dim)
    assert torch.equal(padded[0, : out[0].shape[0]], out[0]) and not padded[0, out[0].shape[0] :].any()


def test_encoding_ignores_padding(official_dir):
    """A prompt's features do not depend on the other prompts of the batch (padding is masked)."""
    enc = TextEncoder.from_pretrained(official_dir / OFFICIAL_FILE)
    alone = enc.encode(["a dog runs"])[0]
    batched = enc.encode(["a dog runs", "a much longer prompt about many things"])[0]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)


def test_diffusers_layout_and_tied_embedding(tmp_path, t5, official_dir):
    t5.save_pretrained(str(tmp_path / "text_encoder"))
    save_tiny_tokenizer(tmp_path / "tokenizer")
    ref = TextEncoder.from_pretrained(official_dir).encode(["two birds"])[0]
    for path in (tmp_path, tmp_path / "text_encoder"):
        enc = TextEncoder.from_pretrained(path)
        torch.testing.assert_close(enc.encode(["two birds"])[0], ref, atol=0, rtol=0)
    model = enc.model
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_single_file_transformers_names_and_dtype(tmp_path, t5):
    """e.g. ComfyUI's umt5_xxl_*.safetensors: transformers names, no config; cast on load."""
    sd = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd, tmp_path / "umt5.safetensors")
    model = load_text_model(tmp_path / "umt5.safetensors", dtype=torch.bfloat16)
    assert model.shared.weight.dtype == torch.bfloat16
    assert torch.equal(model.encoder.final_layer_norm.weight, sd["encoder.final_layer_norm.weight"].bfloat16())
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")  # some files keep only the alias
    save_file(sd, tmp_path / "alias.safetensors")
    assert torch.equal(load_text_model(tmp_path / "alias.safetensors").shared.weight, t5.shared.weight)


def test_long_prompt_truncated_with_warning(official_dir):
    enc = TextEncoder.from_pretrained(official_dir)
    long_prompt = " ".join(["ab"] * 300)  # 600 tokens + EOS
    with pytest.warns(UserWarning, match=r"601 tokens.*truncated to text_len=512"):
        ids, mask = enc.tokenize([long_prompt, "short"])
    assert ids.shape == (2, 512) and mask[0].all() and ids[0, -1] == 1
    with pytest.warns(UserWarning):
        out = enc.encode([long_prompt, "short"])
    assert [o.shape[0] for o in out] == [512, 6]  # "short" -> ▁s h o r t + EOS


def test_clean_prompt():
    assert clean_prompt("  a\tcat&amp;amp;\n\n dog  ") == "a cat& dog"


def test_pad_context():
    rows = [torch.ones(3, 4), torch.ones(5, 4)]
    out = pad_context(rows, 6)
    assert out.shape == (2, 6, 4) and out[0, 3:].abs().sum() == 0 and out[1, :5].eq(1).all()
    with pytest.raises(InputError, match="exceed length=4"):
        pad_context(rows, 4)


# ---- bad input -----------------------------------------------------------------------------------
def test_missing_weights_lists_what_was_looked_for(tmp_path):
    with pytest.raises(CheckpointError, match=r"(?s)no umT5 text encoder weights in .*models_t5_umt5-xxl-enc-bf16"):
        TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "nope.pth")


def test_missing_tokenizer_lists_candidates(tmp_path, official_dir):
    (tmp_path / OFFICIAL_FILE).symlink_to(official_dir / OFFICIAL_FILE)
    with pytest.raises(CheckpointError, match=r"(?s)no umT5 tokenizer.*google/umt5-xxl.*tokenizer_dir="):
        TextEncoder.from_pretrained(tmp_path)
    enc = TextEncoder.from_pretrained(tmp_path, tokenizer_dir=official_dir / OFFICIAL_TOKENIZER)
    assert enc.encode(["ok"])[0].shape == (3, CFG.dim)


def test_bad_keys_are_listed(tmp_path, t5):
    sd = t5_to_official(t5.state_dict())
    sd.pop("blocks.1.ffn.fc2.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "t5.pth")
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*layer.1.DenseReluDense.wo.*1 unexpected.*extra"):
        load_text_model(tmp_path / "t5.pth", config="debug")
    with pytest.raises(CheckpointError, match="not a umT5 encoder"):
        torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
        load_text_model(tmp_path / "other.pth")


def test_full_size_preset_on_meta_is_fast():
    start = time.perf_counter()
    with torch.device("meta"):
        model = build_text_model("umt5-xxl")
    assert time.perf_counter() - start < 10
    n = sum(p.numel() for p in model.parameters())
    assert n == 256384 * 4096 + 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240 + 32 * 64 + 2 * 4096) + 4096
    attn = model.encoder.block[0].layer[0].SelfAttention
    assert attn.relative_attention_bias.weight.shape == (32, 64) and model.config.relative_attention_max_distance == 128
    assert model.config.dense_act_fn == "gelu_new" and model.config.is_gated_act


def test_same_as_diffusers_wan_pipeline(official_dir):
    """diffusers' WanPipeline._get_t5_prompt_embeds (clean, tokenize, trim, zero-pad) on the same model
    and tokenizer gives our encode_padded."""
    from types import SimpleNamespace

    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    enc = TextEncoder.from_pretrained(official_dir)
    prompts = ["a  cat &amp;amp; a dog", "zebra"]
    fake_pipe = SimpleNamespace(tokenizer=enc.tokenizer, text_encoder=enc.model)
    ref = WanPipeline._get_t5_prompt_embeds(fake_pipe, prompts, max_sequence_length=512, device=torch.device("cpu"))
    torch.testing.assert_close(enc.encode_padded(prompts), ref, atol=1e-6, rtol=1e-6)
