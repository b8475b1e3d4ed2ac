"""EMA of the trained weights (`TrainConfig.ema_decay`): the trainer's EMA equals a naive loop and
diffusers' EMAModel over the same parameter trajectory, and a stage's outputs (embedder, head,
peft adapter, merged weights) are the EMA when it is on and the raw weights when it is off."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ae_adapt import AdaptError, ResumeError, align_embedder, align_head, get_preset, lora_finetune, lora_io
from ae_adapt.cli import main
from ae_adapt.trainer import CHECKPOINT, TrainConfig, Trainer, ema_decay_at

# The warm-up (1 + k) / (10 + k) reaches 0.3 at k = 3: both regimes run. Few steps and a large lr
# (AdamW moves each weight by ~lr a step), so that an error in an early update is still visible.
STEPS, DECAY, LR = 8, 0.3, 0.5


class _RecordingTask(nn.Module):
    """Noisy linear regression that records its trainable parameters at every forward, i.e. after
    each optimizer step so far (grad_accum 1: one forward per step)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 2).requires_grad_(False)
        self.trajectory: list[dict[str, torch.Tensor]] = []

    def forward(self, batch, generator):
        self.trajectory.append({n: p.detach().clone() for n, p in self.lin.named_parameters()})
        noise = 0.3 * torch.randn(batch["y"].shape, generator=generator)
        return F.mse_loss(self.lin(batch["x"]) + 0 * self.frozen(batch["x"]), batch["y"] + noise)


def _data(n=8):
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(3, generator=g), "y": torch.randn(2, generator=g)} for _ in range(n)]


def _fit_recording(tmp_path, ema_decay=DECAY, schedule="diffusers", warmup=2000):
    task = _RecordingTask()
    frozen = copy.deepcopy(task.frozen.state_dict())
    cfg = TrainConfig(lr=LR, steps=STEPS, batch_size=2, ema_decay=ema_decay, progress=False, ema_schedule=schedule,
                      ema_warmup_steps=warmup)
    Trainer(task, _data(), cfg, tmp_path, stage="t").fit()
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    raw = {n.removeprefix("lin."): v for n, v in state["weights"].items()}
    return task, frozen, state, task.trajectory + [raw]  # p_0 .. p_STEPS


def test_decay_schedule_diffusers_is_emamodels_warmup_capped_at_ema_decay():
    from diffusers.training_utils import EMAModel

    ref = EMAModel([nn.Parameter(torch.zeros(1))], decay=DECAY)
    # diffusers' optimization_step counts updates from 1; ours counts optimizer steps from 0
    ours = [ema_decay_at(DECAY, k, "diffusers") for k in range(STEPS)]
    assert ours == [ref.get_decay(k + 1) for k in range(STEPS)]
    assert ours[0] == 0.0 and ours[1] == 2 / 11 and ours[3] == DECAY


def test_decay_schedule_dcgen_is_nvidias_exponential_warmup():
    """NVIDIA's EMA.step(model, global_step): decay * (1 - exp(-global_step / warmup_steps)), the
    global step counted from 1 after the first optimizer step; warm-up 0 is the constant decay."""
    import math

    for k in (0, 1, 5, 1999, 10_000):
        assert ema_decay_at(0.9999, k) == 0.9999 * (1 - math.exp(-(k + 1) / 2000))
    assert ema_decay_at(0.99, 7, warmup_steps=0) == 0.99
    default = TrainConfig(lr=1e-3, steps=1, batch_size=1)
    assert default.ema_schedule == "dcgen" and default.ema_warmup_steps == 2000


def test_dcgen_schedule_ema_equals_a_naive_loop(tmp_path):
    import math

    _task, _frozen, state, traj = _fit_recording(tmp_path, schedule="dcgen", warmup=3)
    naive = dict(traj[0])
    for k in range(STEPS):
        d = DECAY * (1 - math.exp(-(k + 1) / 3))
        naive = {n: d * naive[n] + (1 - d) * traj[k + 1][n] for n in naive}
    for n in naive:
        torch.testing.assert_close(state["ema"][f"lin.{n}"], naive[n], rtol=0, atol=1e-6)


def test_ema_equals_a_naive_loop_and_diffusers_emamodel_over_the_same_trajectory(tmp_path):
    from diffusers.training_utils import EMAModel

    task, frozen, state, traj = _fit_recording(tmp_path)
    assert len(traj) == STEPS + 1
    naive = dict(traj[0])
    shadow = [nn.Parameter(v.clone()) for v in traj[0].values()]
    diffusers_ema = EMAModel(shadow, decay=DECAY)
    for k in range(STEPS):
        d = 0.0 if k == 0 else min(DECAY, (1 + k) / (10 + k))
        naive = {n: d * naive[n] + (1 - d) * traj[k + 1][n] for n in naive}
        diffusers_ema.step([nn.Parameter(v.clone()) for v in traj[k + 1].values()])
    from_diffusers = dict(zip(traj[0], diffusers_ema.shadow_params))
    assert sorted(state["ema"]) == ["lin.bias", "lin.weight"]  # trainable parameters only
    for n in naive:
        torch.testing.assert_close(state["ema"][f"lin.{n}"], naive[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(state["ema"][f"lin.{n}"], from_diffusers[n], rtol=0, atol=1e-6)
        # after fit the module holds the EMA; the raw weights are elsewhere (the test would be empty otherwise)
        assert torch.equal(getattr(task.lin, n), state["ema"][f"lin.{n}"])
        assert (traj[-1][n] - naive[n]).abs().max() > 1e-2
    assert all(torch.equal(v, task.frozen.state_dict()[k]) for k, v in frozen.items())


def test_ema_off_keeps_the_raw_weights_and_writes_no_ema(tmp_path):
    task, _, state, traj = _fit_recording(tmp_path, ema_decay=0.0)
    assert "ema" not in state
    for n, v in task.lin.named_parameters():
        assert torch.equal(v, traj[-1][n])


def test_ema_decay_is_validated_refused_on_resume_change_and_exposed_in_presets(tmp_path, capsys):
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(lr=1.0, steps=1, batch_size=1, ema_decay=1.0)
    cfg = TrainConfig(lr=0.05, steps=4, batch_size=2, progress=False)
    Trainer(_RecordingTask(), _data(), cfg, tmp_path, stage="t").fit(stop_at=2)
    with pytest.raises(ResumeError, match=r"ema_decay: 0.0 -> 0.9"):
        Trainer(_RecordingTask(), _data(), cfg.replace(ema_decay=0.9), tmp_path, stage="t").fit()
    preset = get_preset("debug")
    assert preset.lora.ema_decay == 0.0  # off by default
    assert get_preset("debug", lora=preset.lora.replace(ema_decay=0.999)).resolution_config(5).ema_decay == 0.999
    assert main(["presets", "wan-14B"]) == 0
    assert '"ema_decay": 0.0' in capsys.readouterr().out


def test_a_trainer_holding_the_ema_refuses_to_save_it_as_raw_weights(tmp_path):
    cfg = TrainConfig(lr=0.05, steps=2, batch_size=2, ema_decay=0.5, progress=False)
    trainer = Trainer(_RecordingTask(), _data(), cfg, tmp_path, stage="t")
    trainer.fit()
    with pytest.raises(AdaptError, match="hold the EMA"):
        trainer.save()
    assert trainer.fit().step == 2  # fit resumes (raw weights back) first
    fresh = Trainer(_RecordingTask(), _data(), cfg, tmp_path / "fresh", stage="t")
    assert fresh.fit(stop_at=0).step == 0 and not fresh.holds_ema  # nothing trained, nothing swapped
    assert fresh.fit().step == 2


# ---- stage outputs ----------------------------------------------------------------------------
def _ends(run_dir, state, key, prefix):
    """(saved file, EMA entries, raw entries) of one new end, keyed like the module's state dict."""
    saved = load_file(str(run_dir / key))

    def pick(d):
        return {k.removeprefix(prefix): v for k, v in d.items() if k.startswith(prefix)}

    return saved, pick(state.get("ema", {})), pick(state["weights"])


@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_stage_1_and_2_outputs_are_the_ema_when_on_and_the_raw_weights_when_off(base_dit, pairs, ema_decay, tmp_path):
    cfg = TrainConfig(lr=1e-2, steps=5, batch_size=4, progress=False, ema_decay=ema_decay)
    model = copy.deepcopy(base_dit)
    align_embedder(model, pairs, cfg, tmp_path / "1", in_channels=8, patch=(1, 1, 1))
    align_head(model, pairs, cfg, tmp_path / "2", out_channels=8, patch=(1, 1, 1))
    checks = [
        (tmp_path / "1", "embedder.safetensors", "model.x_embedder."),
        (tmp_path / "2", "embedder.safetensors", "model.x_embedder."),
        (tmp_path / "2", "head.safetensors", "model.final_layer."),
    ]
    for run_dir, name, prefix in checks:
        state = torch.load(run_dir / CHECKPOINT, weights_only=False)
        saved, ema, raw = _ends(run_dir, state, name, prefix)
        assert saved.keys() == raw.keys()
        expected = ema if ema_decay else raw
        assert expected.keys() == saved.keys(), (run_dir, name)
        for k, v in saved.items():
            assert torch.equal(v, expected[k]), (run_dir, name, k)
        if ema_decay:
            assert any(not torch.equal(v, raw[k]) for k, v in saved.items()), (run_dir, name)


@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_lora_outputs_adapter_ends_and_merged_weights_are_the_ema_when_on(base_dit, pairs, ema_decay, tmp_path):
    model = copy.deepcopy(base_dit)
    model.replace_patch_embedder(8, (1, 1, 1))
    model.replace_output_head(8, (1, 1, 1))
    base_qkv = model.blocks[0].qkv.weight.detach().clone()
    cfg = TrainConfig(lr=1e-2, steps=5, batch_size=4, progress=False, ema_decay=ema_decay)
    lora_finetune(model, pairs[:8], cfg, tmp_path, rank=4, alpha=8, target_modules=("qkv", "fc1"))
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    source = state["ema"] if ema_decay else state["weights"]
    adapter = lora_io._adapter_weights(tmp_path / "adapter")
    lora_keys = [k for k in state["weights"] if "lora_" in k]
    assert lora_keys and len(adapter) == len(lora_keys)
    for k in lora_keys:  # "model.blocks.0.qkv.lora_A.default.weight" -> "blocks.0.qkv.lora_A.weight"
        assert torch.equal(adapter[k.removeprefix("model.").replace(".default", "")], source[k]), k
    for name, prefix in (("embedder.safetensors", "model.x_embedder."), ("head.safetensors", "model.final_layer.")):
        saved, ema, raw = _ends(tmp_path, state, f"adapter/{name}", prefix)
        for k, v in saved.items():
            assert torch.equal(v, (ema if ema_decay else raw)[k]), (name, k)
    if ema_decay:
        assert any(not torch.equal(state["ema"][k], state["weights"][k]) for k in lora_keys)
    # merged weights: W + alpha / r * B A of the same source
    a, b = (source[f"model.blocks.0.qkv.lora_{x}.default.weight"] for x in "AB")
    lora_io.merge_lora(model)
    torch.testing.assert_close(model.blocks[0].qkv.weight, base_qkv + 2.0 * b @ a, rtol=0, atol=1e-6)
