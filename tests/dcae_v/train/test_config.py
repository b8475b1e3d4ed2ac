"""Training config: precedence defaults <- file <- overrides, printing, and errors before compute."""

import json

import pytest

from dcae_v.train import ConfigError, TrainConfig, load_config
from dcae_v.train.config import validate


def _file(tmp_path, data, name="train.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_precedence_file_then_overrides(tmp_path, media_dir):
    p = _file(tmp_path, {"data": {"source": str(media_dir), "frames": 8}, "optim": {"lr": 3e-4, "batch_size": 2}})
    cfg = load_config(p, ["optim.lr=1e-4", "optim.betas=0.5,0.9", "model.chunk_size=8", "run.max_minutes=none",
                           "run.autocast=none"])
    assert cfg.optim.lr == 1e-4  # override beats file
    assert cfg.optim.batch_size == 2  # file beats default
    assert cfg.optim.weight_decay == TrainConfig().optim.weight_decay  # default kept
    assert cfg.optim.betas == (0.5, 0.9) and isinstance(cfg.optim.betas, tuple)
    assert cfg.model.chunk_size == 8 and cfg.run.max_minutes is None and cfg.run.autocast == "none"
    text = str(cfg)
    assert "optim:\n" in text and "  lr: 0.0001" in text and "  source: " in text


def test_yaml_file(tmp_path, media_dir):
    pytest.importorskip("yaml")  # optional: JSON is the format that always works
    p = _file(tmp_path, f"data:\n  source: {media_dir}\n  frames: 8\nmodel:\n  chunk_size: 8\n", "train.yaml")
    assert load_config(p).data.frames == 8


def test_frozen_and_round_trip(media_dir):
    cfg = load_config(None, [f"data.source={media_dir}", "data.frames=8", "model.chunk_size=8"])
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0
    from dcae_v.train.config import from_dict

    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.preset=f32t4c999"], r"unknown model.preset 'f32t4c999'; valid presets: .*f32t4c32"),
        (["model.chunk_size=6"], r"model.chunk_size=6 is not a positive multiple of the temporal compression factor 4"),
        (["data.frames=12"], r"data.frames=12 is not a multiple of the chunk size 8"),
        (["data.frames=6"], r"data.frames=6 must be a multiple of the temporal compression factor 4"),
        (["data.size=48"], r"data.size=48 must be a positive multiple of the spatial compression 32"),
        (["optim.batch_size=3", "optim.grad_accum=2"], r"optim.batch_size=3 must be divisible by .* 1 x 2 = 2"),
        (["optim.lr=-1"], r"optim.lr must be > 0"),
        (["optim.lr=fast"], r"optim.lr must be a number, got 'fast'"),
        (["optim.max_steps=2.5"], r"optim.max_steps must be an integer"),
        (["optim.betas=0.9"], r"optim.betas needs 2 values"),
        (["optim.speed=3"], r"unknown field optim.speed; valid fields of optim: \[.*'lr'"),
        (["optimizer.lr=3"], r"unknown config section 'optimizer'"),
        (["lr=3"], r"must look like section.field=value"),
        (["gan.loss=wgan"], r"gan.loss must be one of hinge, non_saturating"),
        (["run.grad_checkpointing=maybe"], r"run.grad_checkpointing must be true or false"),
        (["loss.l1=0"], r"all reconstruction weights are 0"),
        (["loss.lpips=1", "loss.lpips_heads=alex.pth"], r"LPIPS needs both"),
        (["ema.decay=1.5"], r"ema.decay must be in \[0, 1\)"),
        (["data.source="], r"data.source is empty"),
        (["run.parallel=fsdp", "gan.weight=0.1"], r"adaptive needs .* run.parallel=fsdp use gan.weight_mode=scheduled"),
        (["run.device=gpu"], r"unknown run.device 'gpu'; use auto, cpu, cuda or cuda:N"),
        (["run.max_minutes=0"], r"run.max_minutes must be > 0 \(or none for no time limit\), got 0"),
        (["run.max_minutes=-1"], r"run.max_minutes must be > 0"),
        (["run.out_dir="], r"run.out_dir is empty"),
        (["run.out_dir= "], r"run.out_dir is empty"),
        (["run.threads=0"], r"run.threads must be >= 1"),
    ],
)
def test_bad_values_fail_before_compute(media_dir, overrides, match):
    base = [f"data.source={media_dir}", "data.frames=8", "model.chunk_size=8"]
    with pytest.raises(ConfigError, match=match):
        load_config(None, base + overrides)


def test_batch_divisible_by_world(media_dir):
    cfg = load_config(None, [f"data.source={media_dir}", "data.frames=8", "model.chunk_size=8", "optim.batch_size=3"])
    with pytest.raises(ConfigError, match=r"processes x optim.grad_accum = 2 x 1 = 2"):
        validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"run.parallel=none with 2 processes would train unsynchronised copies"):
        validate(cfg.override(["optim.batch_size=2", "run.parallel=none"]), world_size=2)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(_file(tmp_path, "{oops", "bad.json"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_file(tmp_path, [1, 2]))


def test_default_frames_are_one_chunk_of_the_model(media_dir):
    """The defaults run as they are: data.frames unset means one chunk (the debug preset's 40
    frames, or model.chunk_size); an explicit value is kept and still checked."""
    assert TrainConfig().data.frames is None
    assert load_config(None, [f"data.source={media_dir}"]).data.frames == 40
    assert load_config(None, [f"data.source={media_dir}", "model.chunk_size=8"]).data.frames == 8
    assert load_config(None, [f"data.source={media_dir}", "model.chunk_size=8", "data.frames=16"]).data.frames == 16
    cfg = load_config(None, [f"data.source={media_dir}", "model.chunk_size=8"])
    assert validate(cfg) == cfg  # resolving is idempotent (the trainer validates again)


def test_text_fields_take_the_text_as_typed(media_dir):
    """Only numbers, flags and lists are parsed: a folder named `1e-4` or `lr_1e-4,bs_2` stays that name."""
    base = [f"data.source={media_dir}", "model.chunk_size=8"]
    assert load_config(None, [*base, "run.out_dir=1e-4"]).run.out_dir == "1e-4"
    assert load_config(None, [*base, "run.out_dir=runs/lr_1e-4,bs_2"]).run.out_dir == "runs/lr_1e-4,bs_2"
    cfg = load_config(None, [*base, "model.temporal=null", "model.init=none", "run.autocast=none", "optim.betas=0.5,0.9"])
    assert (cfg.model.temporal, cfg.model.init, cfg.run.autocast, cfg.optim.betas) == (None, None, "none", (0.5, 0.9))
