"""fp8 checkpoints (ComfyUI's plain, scaled and comfy_quant files) load dequantized: every weight
equals its closed form `fp8.float() * scale` (fp32) cast to the dtype, no key is left over, and formats that
are not fp8 are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dcvg_wan import CheckpointError, WanModel
from dcvg_wan.cli import main
from dcvg_wan.layouts import from_official
from dcvg_wan.quantized import dequantize
from dcvg_wan.text_encoder import load_text_model

from .conftest import make_inputs, make_model, tiny_text_encoder

E4M3 = torch.float8_e4m3fn


def _quantize(sd: dict, *, per_row: bool = False) -> tuple[dict, dict]:
    """(fp8 weights of every matrix, their float32 scales): the state a ComfyUI file holds."""
    q, scales = {}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2 and v.shape[1] > 1:
            amax = v.abs().amax(dim=1) if per_row else v.abs().amax()
            scale = (amax / 448.0).clamp_min(1e-12).float()
            shaped = scale.reshape(-1, 1) if per_row else scale
            q[k], scales[k.removesuffix(".weight")] = (v.float() / shaped).to(E4M3), scale
    return q, scales


def _expected(sd: dict, q: dict, scales: dict, dtype: torch.dtype) -> dict:
    """The closed form, written out independently of the loader."""
    out = {}
    for k, v in sd.items():
        if k in q:
            s = scales[k.removesuffix(".weight")]
            s = s.reshape(-1, 1) if s.ndim == 1 else s
            out[k] = (q[k].to(torch.float32) * s).to(dtype)
        else:
            out[k] = v.to(dtype)
    return out


@pytest.fixture(scope="module")
def model() -> WanModel:
    return make_model("debug-t2v", seed=4)


def _legacy_file(sd, q, scales, prefix=""):
    """ComfyUI's first form: `scaled_fp8` marker, `.scale_weight`, `.scale_input` per layer."""
    out = {prefix + k: q.get(k, v) for k, v in sd.items()}
    for layer, s in scales.items():
        out[f"{prefix}{layer}.scale_weight"] = s
        out[f"{prefix}{layer}.scale_input"] = torch.ones(())
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return out


def _comfy_quant_file(sd, q, scales, prefix=""):
    """ComfyUI's current form: `.comfy_quant` JSON bytes, `.weight_scale`, `.input_scale`."""
    out = {prefix + k: q.get(k, v) for k, v in sd.items()}
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    for layer, s in scales.items():
        out[f"{prefix}{layer}.weight_scale"] = s
        out[f"{prefix}{layer}.input_scale"] = torch.tensor(0.5)
        out[f"{prefix}{layer}.comfy_quant"] = conf.clone()
    return out


@pytest.mark.parametrize("form", ["legacy", "comfy_quant", "header"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_scaled_fp8_dit_loads_to_the_closed_form(tmp_path, model, form, prefix):
    sd = model.state_dict()
    q, scales = _quantize(sd)
    metadata = None
    if form == "legacy":
        stored = _legacy_file(sd, q, scales, prefix)
    elif form == "comfy_quant":
        stored = _comfy_quant_file(sd, q, scales, prefix)
    else:  # the layer map in the header, named without the file's prefix (as some converters write it)
        stored = {prefix + k: q.get(k, v) for k, v in sd.items()}
        stored |= {f"{prefix}{layer}.weight_scale": s for layer, s in scales.items()}
        metadata = {"_quantization_metadata": json.dumps({"layers": {layer: {"format": "float8_e4m3fn"}
                                                                       for layer in scales}})}
    save_file(stored, tmp_path / "wan_fp8.safetensors", metadata=metadata)

    loaded = WanModel.from_pretrained(tmp_path / "wan_fp8.safetensors", dtype=torch.bfloat16)
    expected = _expected(sd, q, scales, torch.bfloat16)
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for k, v in got.items():
        want = expected[k] if k in q else sd[k].to(v.dtype)  # the fp32 parts stay fp32
        assert torch.equal(v, want), k
    assert len(q) > 10  # the test quantized the DiT's matrices, not nothing


def test_default_dtype_is_bf16_and_fp32_keeps_the_exact_product(tmp_path, model):
    sd = model.state_dict()
    q, scales = _quantize(sd, per_row=True)  # one scale per output row
    stored = _legacy_file(sd, q, scales)
    stored = {k: v.half() if v.dtype == torch.float32 and k not in [f"{n}.scale_weight" for n in scales] else v
              for k, v in stored.items()}  # ComfyUI keeps what it does not quantize in fp16
    save_file(stored, tmp_path / "w.safetensors")
    as_stored = WanModel.from_pretrained(tmp_path / "w.safetensors")
    key = "blocks.0.self_attn.q.weight"
    assert as_stored.state_dict()[key].dtype == torch.bfloat16
    # one compute dtype: the fp16 rest follows the dequantized weights (the fp32 parts stay fp32)
    from dcvg_wan.model import keeps_fp32

    for k, v in as_stored.state_dict().items():
        assert v.dtype == (torch.float32 if keeps_fp32(k) else torch.bfloat16), k
    fp32 = WanModel.from_pretrained(tmp_path / "w.safetensors", dtype=torch.float32)
    assert torch.equal(fp32.state_dict()[key], _expected(sd, q, scales, torch.float32)[key])
    # fp8 weights approximate the originals: the DiT's output stays close
    inputs = make_inputs(model, batch=1)
    with torch.no_grad():
        ref, out = model(**inputs), fp32(**inputs)
    assert (out - ref).norm() / ref.norm() < 0.1


def test_plain_fp8_file_is_cast(tmp_path, model):
    """`*_fp8_e4m3fn.safetensors`: fp8 matrices, no scales."""
    sd = model.state_dict()
    stored = {k: v.to(E4M3) if v.ndim == 2 else v for k, v in sd.items()}
    save_file(from_official(stored, "comfy"), tmp_path / "plain.safetensors")
    loaded = WanModel.from_pretrained(tmp_path / "plain.safetensors", dtype=torch.float16)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, stored[k].to(v.dtype)), k


def test_dcvg_wan_convert_turns_an_fp8_file_into_a_bf16_folder(tmp_path, model):
    sd = model.state_dict()
    q, scales = _quantize(sd)
    save_file(_legacy_file(sd, q, scales, "model.diffusion_model."), tmp_path / "w.safetensors")
    code = main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "out"), "--layout", "diffusers",
                 "--dtype", "bf16"])
    assert code == 0
    again = WanModel.from_pretrained(tmp_path / "out")
    key = "blocks.1.ffn.0.weight"
    assert again.state_dict()[key].dtype == torch.bfloat16
    assert torch.equal(again.state_dict()[key], _expected(sd, q, scales, torch.bfloat16)[key])


@pytest.mark.parametrize("fmt", ["nvfp4", "int8_tensorwise"])
def test_other_quantization_formats_are_refused_by_name(tmp_path, model, fmt):
    sd = model.state_dict()
    q, scales = _quantize(sd)
    stored = _comfy_quant_file(sd, q, scales)
    stored["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    save_file(stored, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=f"'blocks.0.ffn.0' is quantized as '{fmt}'"):
        WanModel.from_pretrained(tmp_path / "w.safetensors")


def test_scale_that_fits_no_axis_is_refused():
    w = torch.ones(4, 6).to(E4M3)
    with pytest.raises(CheckpointError, match="block-wise scales are not supported"):
        dequantize({"a.weight": w, "a.weight_scale": torch.ones(3)}, source="f")


def test_unquantized_state_dict_is_returned_as_is():
    sd = {"a.weight": torch.randn(2, 2), "a.bias": torch.randn(2)}
    out = dequantize(sd)
    assert out.keys() == sd.keys() and all(out[k] is sd[k] for k in sd)


def test_scaled_fp8_umt5_file_loads(tmp_path):
    """ComfyUI's `umt5_xxl_fp8_e4m3fn_scaled.safetensors`: transformers names + legacy scales."""
    encoder = tiny_text_encoder()
    sd = {k: v for k, v in encoder.model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    q, scales = _quantize(sd)
    q.pop("shared.weight")  # ComfyUI keeps the embedding in 16 bits
    scales.pop("shared")
    save_file(_legacy_file(sd, q, scales), tmp_path / "umt5_fp8_scaled.safetensors")
    loaded = load_text_model(tmp_path / "umt5_fp8_scaled.safetensors", dtype=torch.float32)
    expected = _expected(sd, q, scales, torch.float32)
    got = loaded.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    default = load_text_model(tmp_path / "umt5_fp8_scaled.safetensors")  # no dtype: bf16 throughout
    assert {p.dtype for p in default.parameters()} == {torch.bfloat16}


def test_gguf_files_are_refused_with_the_alternative(tmp_path):
    (tmp_path / "wan2.1-t2v-14b-Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="GGUF files .* are not read here; use the .safetensors file"):
        WanModel.from_pretrained(tmp_path / "wan2.1-t2v-14b-Q4_K_M.gguf")
