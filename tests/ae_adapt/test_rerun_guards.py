"""What a rerun, a divergence or an interrupt leaves behind: a NaN/Inf stops a stage before its
last good checkpoint is overwritten; a finished stage is not restored for other settings; a
stage's outputs are written atomically with done.json last; restarted logs hold each step once;
outputs get the permissions of the umask; --set values are checked against the field types."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
from torch import nn

from ae_adapt import AdaptError, ResumeError, get_preset, lora_io, run_all
from ae_adapt.errors import DivergedError, PresetError
from ae_adapt.example_dit import PRESETS as DIT_PRESETS
from ae_adapt.example_dit import ExampleDiT
from ae_adapt.files import save_safetensors
from ae_adapt.overrides import preset_overrides
from ae_adapt.trainer import CHECKPOINT, DONE, LOG, TrainConfig, Trainer, read_log


class _Quadratic(nn.Module):
    """loss = mean((w - x)^2): converges at a small lr, overflows to inf at a huge one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, batch, generator):
        return ((self.w - batch["x"]) ** 2).mean()


class _NaNGradient(nn.Module):
    """A finite loss (0) whose gradient is NaN: sqrt'(0) = inf times 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))

    def forward(self, batch, generator):
        return torch.sqrt((self.w**2).sum()) * batch["x"].mean()


def _data(n=8):
    return [{"x": torch.full((4,), float(i))} for i in range(n)]


def _cfg(**kw):
    return TrainConfig(**{"lr": 1e-2, "steps": 6, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "progress": False, **kw})


def _fit(task, run_dir, cfg, **kw):
    return Trainer(task, _data(), cfg, run_dir, stage="t").fit(**kw)


def test_a_non_finite_loss_stops_before_the_last_good_checkpoint_is_overwritten(tmp_path):
    """Finding 1: with lr 1e30 the weights blow up at step 3 and the loss is inf at step 4: the
    stage stops there, the step-2 checkpoint stays, no done.json, no NaN row in the log, and a
    rerun with a sane lr resumes from step 2."""
    _fit(_Quadratic(), tmp_path, _cfg(), stop_at=2)
    good = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    with pytest.warns(UserWarning, match="lr: 0.01 -> 1e"), pytest.raises(DivergedError) as err:
        _fit(_Quadratic(), tmp_path, _cfg(lr=1e30))
    message = str(err.value)
    assert "loss is inf at step 4" in message and f"{tmp_path / CHECKPOINT} (step 2)" in message
    assert "Lower the stage's lr" in message and err.value.step == 4 and isinstance(err.value, AdaptError)
    kept = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert kept["step"] == 2 and torch.equal(kept["weights"]["w"], good["weights"]["w"])
    assert not (tmp_path / DONE).exists()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the log")) for line in
            (tmp_path / LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    result = _fit(_Quadratic(), tmp_path, _cfg())  # the checkpoint still has the old lr: no note
    assert result.step == 6 and len(result.losses) == 4 and (tmp_path / DONE).is_file()
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_non_finite_gradient_with_a_finite_loss_also_stops(tmp_path):
    task = _NaNGradient()
    with pytest.raises(DivergedError, match="gradient norm is nan at step 1.*no checkpoint was written yet"):
        _fit(task, tmp_path, _cfg())
    assert torch.equal(task.w.detach(), torch.zeros(4)), "the bad step must not reach the weights"
    assert not (tmp_path / CHECKPOINT).exists() and not (tmp_path / DONE).exists()


def test_a_run_killed_before_its_first_checkpoint_leaves_no_stale_log_rows(tmp_path):
    """Finding 8: the rerun starts from step 0, so the rows of the killed run go."""
    _fit(_Quadratic(), tmp_path, _cfg(), stop_at=3)
    (tmp_path / CHECKPOINT).unlink()  # what a kill before the first checkpoint leaves: log rows only
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    _fit(_Quadratic(), tmp_path, _cfg())
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]


# ---- run_all: finished stages, interrupted writes ------------------------------------------------
def _preset(**kw):
    preset = get_preset("debug", lora_targets=("qkv", "fc2"), resolution=())
    small = {"embedder": preset.embedder.replace(steps=3), "head": preset.head.replace(steps=3),
             "lora": preset.lora.replace(steps=2, warmup_steps=1)}
    return preset.replace(**{**small, **kw})


def _run(base_dit, pairs, out, preset=None):
    model = copy.deepcopy(base_dit)
    assert run_all(model, pairs[:8], preset or _preset(), out, in_channels=8, out_channels=8, patch=(1, 1, 1))
    return model


def _same(a, b):
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_finished_stages_are_not_restored_for_other_settings(base_dit, pairs, tmp_path):
    """Finding 2: a rerun with another lora_rank, embedder lr or input fingerprint is refused with
    the changed field named, instead of restoring the old results."""
    _run(base_dit, pairs, tmp_path)
    done = json.loads((tmp_path / "3-lora" / DONE).read_text())
    assert done["fingerprint"]["rank"] == 4 and done["config"]["steps"] == 2
    with pytest.raises(ResumeError, match=r"stage lora in .*3-lora has already finished with other settings: rank: 4 -> 8"):
        _run(base_dit, pairs, tmp_path, _preset(lora_rank=8))
    embedder = _preset().embedder.replace(lr=5e-3)
    with pytest.raises(ResumeError, match=r"align_embedder .*lr: 0.01 -> 0.005") as err:
        _run(base_dit, pairs, tmp_path, _preset(embedder=embedder))
    assert "2-align-head" in str(err.value) and "3-lora" in str(err.value)  # the later folders to delete too
    with pytest.raises(ResumeError, match=r"new_ae: 'a' -> 'b'"):
        run_all(copy.deepcopy(base_dit), pairs[:8], _preset(), tmp_path / "fp", in_channels=8, out_channels=8,
                patch=(1, 1, 1), fingerprint={"new_ae": "a"})
        run_all(copy.deepcopy(base_dit), pairs[:8], _preset(), tmp_path / "fp", in_channels=8, out_channels=8,
                patch=(1, 1, 1), fingerprint={"new_ae": "b"})
    # log_every / progress / ckpt_every change nothing a finished stage made
    quiet = _preset(embedder=_preset().embedder.replace(log_every=1, ckpt_every=7))
    _run(base_dit, pairs, tmp_path, quiet)


def test_an_interrupted_output_write_is_redone_by_the_rerun(base_dit, pairs, tmp_path, monkeypatch):
    """Finding 5: a Ctrl-C while stage 3 writes its adapter leaves no done.json and no partial
    adapter; the plain rerun finishes with the model of an uninterrupted run."""
    reference = _run(base_dit, pairs, tmp_path / "ref")
    real = lora_io.save_file

    def interrupted(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_io, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(base_dit, pairs, tmp_path / "run")
    d3 = tmp_path / "run" / "3-lora"
    assert (d3 / CHECKPOINT).is_file() and not (d3 / DONE).exists()
    assert sorted(p.name for p in d3.iterdir()) == [CHECKPOINT, LOG]  # no partial adapter, no temp folder
    monkeypatch.setattr(lora_io, "save_file", real)
    _same(_run(base_dit, pairs, tmp_path / "run"), reference)
    assert (d3 / DONE).is_file() and (d3 / "adapter" / "adapter_config.json").is_file()
    # a finished stage whose output went missing (or is damaged) writes it again from its checkpoint
    (tmp_path / "run" / "1-align-embedder" / "embedder.safetensors").unlink()
    (tmp_path / "run" / "2-align-head" / "head.safetensors").write_bytes(b"\0" * 10)
    with pytest.warns(UserWarning, match="missing or unreadable"):
        _same(_run(base_dit, pairs, tmp_path / "run"), reference)
    assert (tmp_path / "run" / "1-align-embedder" / "embedder.safetensors").is_file()


def test_outputs_get_the_permissions_of_the_umask(tmp_path):
    """Finding 15: safetensors (0.8) and mkstemp write 0600 files; outputs follow the umask."""
    old = os.umask(0o027)
    try:
        save_safetensors({"a": torch.ones(2)}, tmp_path / "x.safetensors")
        torch.manual_seed(0)
        model = ExampleDiT(DIT_PRESETS["tiny"])
        model.replace_patch_embedder(8, (1, 1, 1))
        model.replace_output_head(8, (1, 1, 1))
        lora_io.add_lora(model, rank=2, alpha=2, target_modules=("fc1",))
        (tmp_path / ".adapter.k1ll3d.tmp").mkdir()  # what a kill -9 during a write leaves
        (tmp_path / ".comfy.safetensors.k1ll3d.tmp").write_bytes(b"x")
        lora_io.save_lora(model, tmp_path / "adapter")
        lora_io.save_lora(model, tmp_path / "adapter")  # over an existing one
        lora_io.save_export(model, tmp_path / "comfy.safetensors", "comfy")
        from ae_adapt.cli import main

        assert main(["export-lora", str(tmp_path / "adapter"), "-o", str(tmp_path / "cli.safetensors")]) == 0
    finally:
        os.umask(old)
    files = [tmp_path / "x.safetensors", tmp_path / "comfy.safetensors", tmp_path / "cli.safetensors",
             *(tmp_path / "adapter").iterdir()]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o640 for f in files}
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_cache_records_its_inputs_and_module_digest_tells_weights_apart(clip_world, tmp_path):
    from ae_adapt import LatentCache, build_cache
    from ae_adapt.cache import cache_input_changes, module_digest

    old = os.umask(0o022)
    try:
        build_cache([clip_world.clip(s) for s in range(2)], tmp_path, base_encode=clip_world.base_encode,
                    new_encode=clip_world.new_encode, text_encode=lambda p: torch.ones(2, clip_world.TEXT_DIM),
                    base_ae="b", new_ae="n", inputs={"size": "32*32", "data": {"videos": 2}})
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}
    assert LatentCache(tmp_path).fingerprint()["inputs"] == {"size": "32*32", "data": {"videos": 2}}
    assert cache_input_changes(tmp_path, {"size": "32*32", "data": {"videos": 2}}, new_ae="n") == []
    assert cache_input_changes(tmp_path, {"size": "64*64", "data": {"videos": 3}}, new_ae="m") == [
        "new_ae: 'n' -> 'm'", "size: '32*32' -> '64*64'", "data.videos: 2 -> 3"]
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    assert module_digest(a) != module_digest(b)
    b.load_state_dict(a.state_dict())
    assert module_digest(a) == module_digest(b) and module_digest(a, {"c": 1}) != module_digest(a, {"c": 2})


# ---- --set values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"lora_rank": "abc"}, "lora_rank: expected an integer, got 'abc'"),
    ({"lora_rank": 2.5}, r"lora_rank: expected an integer, got 2.5 \(not rounded"),
    ({"lora_rank": 0}, "lora_rank must be a positive integer"),
    ({"cond_dropout": "abc"}, "cond_dropout: expected a number"),
    ({"flow_shift": True}, "flow_shift: expected a number, got True"),
    ({"embedder": {"steps": 2.5}}, r"embedder.steps: expected an integer, got 2.5"),
    ({"embedder": {"stepz": 3}}, "unknown field embedder.stepz; the fields of embedder are: lr, steps, "),
    ({"lora_rnak": 3}, "unknown ae-adapt preset field 'lora_rnak'; valid fields: embedder, head, lora, lora_rank"),
    ({"embedder": 3}, "embedder is a section"),
    ({"lora": {"betas": [0.9]}}, r"lora.betas: expected a list of 2 values"),
    ({"resolution": [["up", 2.5]]}, r"resolution\[0\]\[1\]: expected an integer"),
    ({"lora": {"bf16": 1}}, "lora.bf16: expected true or false"),
])
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(PresetError, match=message):
        preset_overrides("debug", overrides)


def test_overrides_are_converted_to_the_field_types():
    got = preset_overrides("debug", {"lora_targets": "blocks.0.ffn.0", "resolution": [["up", 3]],
                                     "embedder": {"steps": 1e3, "max_grad_norm": None}, "flow_shift": 5})
    assert got["lora_targets"] == ("blocks.0.ffn.0",) and got["resolution"] == (("up", 3),)
    assert got["embedder"].steps == 1000 and isinstance(got["embedder"].steps, int) and got["flow_shift"] == 5.0
    assert preset_overrides("debug", {"lora_targets": "q,k"})["lora_targets"] == ("q", "k")
    assert preset_overrides("debug", {"lora_targets": None})["lora_targets"] is None
    assert get_preset("debug", **got).lora_targets == ("blocks.0.ffn.0",)
