"""Trainer: exact resume, atomic checkpoints under failure and SIGKILL, NaN/OOM stops, EMA, exports."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dcae_v.checkpoint import load_dcaev
from dcae_v.train import Trainer, TrainingDiverged, TrainingOOM, train
from dcae_v.train import losses as loss_module
from dcae_v.train.checkpoints import list_checkpoints, load_latest

from .conftest import tiny_config

GAN = {"weight": 0.1, "r1_gamma": 0.5, "r1_every": 2, "channels": 4, "max_channels": 8, "mbstd_group": 2}


def _assert_states_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs (max abs diff {float((a.float() - b.float()).abs().max())})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_states_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_resume_is_bit_identical(tmp_path, media_dir):
    """Kill after step 2 (delete the later checkpoint), resume: steps 3-4 and every tensor of the
    final state equal the uninterrupted run exactly (GAN + R1 + EMA + perceptual substitute on)."""
    kw = {"optim": {"max_steps": 4, "batch_size": 2, "grad_accum": 2}, "gan": GAN | {"start_step": 1},
          "loss": {"lpips": 0.1, "mse": 0.5}, "ema": {"decay": 0.9}, "checkpoint": {"every": 2, "keep_last": 5}}
    with pytest.warns(UserWarning, match="substitute"):
        full = train(tiny_config(tmp_path / "a", media_dir, **kw))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "step_00000004.pt").unlink()
    with pytest.warns(UserWarning, match="substitute"):
        resumed = train(tiny_config(tmp_path / "b", media_dir, **kw), resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    assert resumed.history[-1]["d_loss"] == full.history[-1]["d_loss"] and full.history[-1]["d_loss"] > 0
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # rows after the resumed checkpoint were dropped, then logged again
    a = torch.load(full.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    for key in ("model", "optimizer", "ema", "disc", "disc_optimizer", "step"):
        _assert_states_equal(a[key], b[key], key)


def test_failure_during_write_keeps_last_good_checkpoint(tmp_path, media_dir, monkeypatch):
    cfg = tiny_config(tmp_path, media_dir, optim={"max_steps": 2}, checkpoint={"every": 1})
    train(cfg)
    good = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in good] == ["step_00000001.pt", "step_00000002.pt"]
    before = good[-1].read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as if interrupted mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, media_dir, optim={"max_steps": 3}, checkpoint={"every": 1}), resume=True)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001.pt", "step_00000002.pt"]
    assert good[-1].read_bytes() == before
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # temp file removed
    state, path = load_latest(tmp_path / "checkpoints")
    assert path == good[-1] and state["step"] == 2


def test_sigkill_mid_write_then_resume(tmp_path, media_dir):
    """A real SIGKILL inside torch.save: the half-written temp file stays, the final name never
    appears, and --resume continues from the last complete checkpoint."""
    cfg = tiny_config(tmp_path, media_dir, optim={"max_steps": 3}, checkpoint={"every": 1})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    script = textwrap.dedent(f"""
        import os, signal, torch
        from dcae_v.train.config import from_dict
        from dcae_v.train import train
        import json
        real_save, calls = torch.save, []
        def save(obj, f, *a, **k):
            calls.append(1)
            if len(calls) == 2:  # second checkpoint: write half of it, then die
                with open(f, "wb") as fh:
                    fh.write(b"PK\\x03\\x04partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)
        torch.save = save
        train(from_dict(json.load(open({str(tmp_path / "cfg.json")!r}))))
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000001.pt"]
    assert [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]  # the killed write left only a temp file
    result = train(cfg, resume=True)
    assert result.step == 3 and len(result.history) == 2
    assert [p.name for p in list_checkpoints(ckpts)][-1] == "step_00000003.pt"
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]  # the resumed run removed the leftover


def test_only_our_leftover_temp_files_are_removed_at_start(tmp_path, media_dir):
    ckpts, export = tmp_path / "checkpoints", tmp_path / "export" / "ema"
    ckpts.mkdir()
    export.mkdir(parents=True)
    ours = [ckpts / ".step_00000031.pt.h4wkyr3k.tmp", export / ".model.safetensors.a_b1.tmp",
            tmp_path / "export" / ".dcae-v-f32t4c8-step3.pt.x9.tmp"]
    theirs = [ckpts / ".notes.txt.abc.tmp", ckpts / "step_00000031.pt.tmp", tmp_path / ".step_00000001.pt.abc.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    train(tiny_config(tmp_path, media_dir, optim={"max_steps": 1}))
    assert [p for p in ours if p.exists()] == [] and all(p.exists() for p in theirs)


# ---- the NVIDIA-layout export keeps the trained architecture --------------------------------
def test_exported_pt_loads_with_the_trained_config(tmp_path, media_dir):
    """Trained with chunk_size 8 (the debug preset has 40): the .pt loads with chunk 8 and the
    measured scaling factor, equal to export/ema, and reconstructs identically; NVIDIA's own loader
    (torch.load weights_only + strict load of the first EMA entry) still reads the file."""
    from dcae_v import DCAEV
    from dcae_v.config import get_preset

    cfg = tiny_config(tmp_path, media_dir, optim={"max_steps": 1}, ema={"decay": 0.5}, checkpoint={"export": True})
    pt, directory = train(cfg).exports
    from_pt, from_dir = DCAEV.from_pretrained(pt), DCAEV.from_pretrained(directory)
    assert from_pt.config == from_dir.config
    assert from_pt.config.chunk_size == 8 and from_pt.config.scaling_factor not in (1.0, get_preset("debug").scaling_factor)
    x = torch.rand(1, 3, 16, 32, 32) * 2 - 1  # two 8-frame chunks: a 40-frame-chunk model would differ
    with torch.no_grad():
        assert torch.equal(from_pt.decode(from_pt.encode(x)), from_dir.decode(from_dir.encode(x)))
    obj = torch.load(pt, map_location="cpu", weights_only=True)  # NVIDIA's loader
    nvidia = DCAEV(get_preset("debug"))
    nvidia.load_state_dict(next(iter(obj["ema_model_state_dict"].values())), strict=True)
    assert all(torch.equal(v, from_dir.state_dict()[k]) for k, v in nvidia.state_dict().items())


# ---- metrics around restarts --------------------------------------------------------------------
def _steps(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    csv_steps = [int(line.split(",")[0]) for line in (out_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_steps == [r["step"] for r in rows]
    return rows


def test_a_restart_before_the_first_checkpoint_starts_a_fresh_log(tmp_path, media_dir):
    train(tiny_config(tmp_path, media_dir, optim={"max_steps": 3}))
    shutil.rmtree(tmp_path / "checkpoints")  # as if killed before its first checkpoint
    train(tiny_config(tmp_path, media_dir, optim={"max_steps": 2}))
    assert [r["step"] for r in _steps(tmp_path)] == [1, 2]
    shutil.rmtree(tmp_path / "checkpoints")
    train(tiny_config(tmp_path, media_dir, optim={"max_steps": 1}), resume=True)  # --resume, nothing to resume
    assert [r["step"] for r in _steps(tmp_path)] == [1]


def test_first_row_after_resume_averages_the_same_steps(tmp_path, media_dir):
    """log_every 3, checkpoint at step 2: the resumed run's row 3 is the mean of steps 1-3, as in
    the uninterrupted run (the unlogged steps are kept in the checkpoint)."""
    kw = {"optim": {"max_steps": 4}, "checkpoint": {"every": 2}, "run": {"log_every": 3}}
    train(tiny_config(tmp_path / "a", media_dir, **kw))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "step_00000004.pt").unlink()
    train(tiny_config(tmp_path / "b", media_dir, **kw), resume=True)
    a, b = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k != "sec_per_step"} == {k: v for k, v in rb.items() if k != "sec_per_step"}


# ---- SIGINT / SIGTERM ---------------------------------------------------------------------------
_SIGNAL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from dcae_v.train import trainer
    real = trainer.lr_factor
    def lr_factor(step, cfg):  # a real signal, delivered while step index 2 (the third) runs
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, cfg)
    trainer.lr_factor = lr_factor
    from dcae_v.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigint_saves_the_current_step_and_resume_equals_an_uninterrupted_run(tmp_path, media_dir):
    """Ctrl-C during step 3 of 5 with checkpoint.every=0 (no periodic checkpoint): the step
    finishes, step_3 is saved, exit 130 with how to resume; --resume then ends equal to an
    uninterrupted run (weights, EMA, optimizer and every metrics row but the timing)."""
    from dcae_v.cli import main

    # the subprocess computes with this process's thread count (another one reduces in another order)
    kw = {"optim": {"max_steps": 5}, "ema": {"decay": 0.9}, "run": {"log_every": 2, "threads": torch.get_num_threads()}}
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_config(tmp_path / "run", media_dir, **kw).to_dict()))
    cmd = ["train", "--config", str(tmp_path / "cfg.json")]
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_SCRIPT, *cmd], check=False, capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGINT at step 3 of 5; saved" in err and "step_00000003.pt" in err and "--resume" in err
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000003.pt"]
    assert not (tmp_path / "run" / "export").exists()
    assert main([*cmd, "--resume"]) == 0
    full = train(tiny_config(tmp_path / "full", media_dir, **kw))
    a = torch.load(full.checkpoint, weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / "step_00000005.pt", weights_only=True)
    for key in ("model", "optimizer", "ema", "step"):
        _assert_states_equal(a[key], b[key], key)
    rows_a, rows_b = _steps(tmp_path / "full"), _steps(tmp_path / "run")
    assert [r["step"] for r in rows_b] == [2, 4, 5]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert {k: v for k, v in ra.items() if k != "sec_per_step"} == {k: v for k, v in rb.items() if k != "sec_per_step"}


def test_resume_from_a_chosen_checkpoint_sets_newer_ones_aside(tmp_path, media_dir):
    """`--resume step_2.pt` in a run that reached step 4 (diffusers' --resume_from_checkpoint PATH):
    the newer checkpoints are kept as *.superseded, the run continues from step 2 and ends equal
    to the uninterrupted run; a file that is not a checkpoint is refused (exit 4)."""
    from dcae_v.cli import main

    kw = {"optim": {"max_steps": 4}, "ema": {"decay": 0.9}, "checkpoint": {"every": 1, "keep_last": 10},
          "run": {"threads": torch.get_num_threads()}}
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_config(tmp_path / "run", media_dir, **kw).to_dict()))
    cmd = ["train", "--config", str(tmp_path / "cfg.json")]
    assert main(cmd) == 0
    first = torch.load(tmp_path / "run" / "checkpoints" / "step_00000004.pt", weights_only=True)
    chosen = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    assert main([*cmd, "--resume", str(chosen)]) == 0
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000001.pt", "step_00000002.pt", "step_00000003.pt", "step_00000003.pt.superseded",
                     "step_00000004.pt", "step_00000004.pt.superseded"]
    again = torch.load(tmp_path / "run" / "checkpoints" / "step_00000004.pt", weights_only=True)
    for key in ("model", "optimizer", "ema", "step"):
        _assert_states_equal(first[key], again[key], key)
    assert [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    assert main([*cmd, "--resume", str(tmp_path / "other.pt")]) == 4


def test_unreadable_newest_checkpoint_falls_back(tmp_path, media_dir, caplog):
    train(tiny_config(tmp_path, media_dir, optim={"max_steps": 1}))
    (tmp_path / "checkpoints" / "step_00000009.pt").write_bytes(b"damaged")
    _, path = load_latest(tmp_path / "checkpoints")
    assert path.name == "step_00000001.pt" and "unreadable" in caplog.text


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, media_dir, monkeypatch):
    from dcae_v.train import trainer as trainer_module

    real_loss, real_lr, steps = loss_module.pixel_loss, trainer_module.lr_factor, []

    def record_step(step, cfg):
        steps.append(step)
        return real_lr(step, cfg)

    def nan_at_step_3(y, x, l1, mse):
        out = real_loss(y, x, l1, mse)
        return out * float("nan") if steps[-1] == 2 else out  # 0-based step 2 = the third step

    monkeypatch.setattr(trainer_module, "lr_factor", record_step)
    monkeypatch.setattr(loss_module, "pixel_loss", nan_at_step_3)
    cfg = tiny_config(tmp_path, media_dir, optim={"max_steps": 5}, checkpoint={"every": 1})
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 3 .*Last good checkpoint: .*step_00000002.pt"):
        train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001.pt", "step_00000002.pt"]
    assert torch.load(tmp_path / "checkpoints" / "step_00000002.pt", weights_only=True)["step"] == 2


def test_oom_reports_sizes_to_reduce(tmp_path, media_dir, monkeypatch):
    from dcae_v.train.trainer import Autoencode

    def oom(self, groups):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Autoencode, "forward", oom)
    with pytest.raises(TrainingOOM, match=r"step 1 with micro-batches of 1 clip\(s\) x 8 frames x 32x32 px.*grad_accum"):
        train(tiny_config(tmp_path, media_dir, optim={"grad_accum": 2}))


def test_ema_exports_and_logs(tmp_path, media_dir):
    cfg = tiny_config(tmp_path, media_dir, optim={"max_steps": 2}, ema={"decay": 0.5},
                      checkpoint={"export": True})
    trainer = Trainer(cfg)
    init = {k: v.clone() for k, v in trainer.ae.state_dict().items()}
    trainer.train_step(0)
    d = min(0.5, 2 / 11)  # (1 + n) / (10 + n) warm-up with n = 1
    for name, p in trainer.ae.named_parameters():
        torch.testing.assert_close(trainer.ema[name], init[name] + (1 - d) * (p.detach() - init[name]))
    result = Trainer(cfg).fit()
    pt, directory = result.exports
    from_pt, from_dir = load_dcaev(pt), load_dcaev(directory)
    state = torch.load(result.checkpoint, weights_only=True)
    for k, v in from_dir.state_dict().items():
        assert torch.equal(v, state["ema"][k]) and torch.equal(from_pt.state_dict()[k], v)
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    # the step checkpoint itself loads too (eval/reconstruct --checkpoint runs/.../step_N.pt): EMA
    # weights, and the run's architecture, chunk size included (weights alone cannot tell it)
    from_step = load_dcaev(result.checkpoint)
    assert from_step.config.chunk_size == cfg.model.build_config().chunk_size
    assert all(torch.equal(v, state["ema"][k]) for k, v in from_step.state_dict().items())
    # scaling factor ~ 1 / RMS of the latents (computed here on other clips of the same data)
    clips = torch.stack([trainer.data.sample(100, i) for i in range(8) if trainer.data.sample(100, i).shape[1] > 1])
    with torch.no_grad():
        rms = float(from_dir.encode(clips).square().mean().sqrt())
    assert from_dir.config.scaling_factor != 1.0 and 0.6 < from_dir.config.scaling_factor * rms < 1.6
    raw = torch.load(pt, weights_only=True)
    assert set(raw) == {"model_state_dict", "ema_model_state_dict", "dcae_v_config"}
    assert list(raw["ema_model_state_dict"]) == [0.5]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("step,loss,rec")
    assert "optim:" in (tmp_path / "config.txt").read_text()
    # the run's config.json is what `dcae-v train --config` reads back: the same config
    from dcae_v.train.config import load_config

    again = json.loads(json.dumps(load_config(tmp_path / "config.json").to_dict()))  # tuples as JSON lists
    assert again == json.loads((tmp_path / "config.json").read_text())
    assert (again["optim"]["max_steps"], again["ema"]["decay"], again["run"]["out_dir"]) == (2, 0.5, str(tmp_path))


def _final(tmp_path, media_dir, name, **kw):
    r = train(tiny_config(tmp_path / name, media_dir, **kw))
    return r, torch.load(r.checkpoint, weights_only=True)["model"]


def test_accumulation_and_checkpointing_match_plain_step(tmp_path, media_dir):
    """Same global batch: 1 x 4 clips == 2 micro-steps x 2 clips (up to float summation order);
    gradient checkpointing recomputes the same activations and prefetching decodes the same clips
    (both bit-identical on CPU)."""
    base = {"batch_size": 4, "max_steps": 2}
    r1, w1 = _final(tmp_path, media_dir, "plain", optim=base)
    r2, w2 = _final(tmp_path, media_dir, "accum", optim=base | {"grad_accum": 2})
    _, w3 = _final(tmp_path, media_dir, "ckpt", optim=base, run={"grad_checkpointing": True})
    _, w4 = _final(tmp_path, media_dir, "sync", optim=base, data={"prefetch": False})  # no background decoding
    for a, b in zip(r1.history, r2.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)
        assert torch.equal(w1[k], w3[k]) and torch.equal(w1[k], w4[k]), k


def test_bf16_autocast_runs_close_to_fp32(tmp_path, media_dir):
    r32, _ = _final(tmp_path, media_dir, "fp32", optim={"max_steps": 1})
    r16, _ = _final(tmp_path, media_dir, "bf16", optim={"max_steps": 1}, run={"autocast": "bf16"})
    assert r16.history[0]["loss"] == pytest.approx(r32.history[0]["loss"], rel=0.05)
    assert r16.history[0]["loss"] != r32.history[0]["loss"]  # autocast really ran in bf16


def test_resume_with_another_model_is_refused(tmp_path, media_dir):
    train(tiny_config(tmp_path, media_dir, optim={"max_steps": 1}))
    from dcae_v.train import ConfigError

    with pytest.raises(ConfigError, match="the checkpoint was trained with model"):
        train(tiny_config(tmp_path, media_dir, model={"latent_channels": 4}), resume=True)


def test_init_from_pretrained_weights(tmp_path, media_dir):
    from dcae_v import DCAEV
    from dcae_v.train import ConfigError

    torch.manual_seed(5)
    start = DCAEV.from_preset("debug", chunk_size=8)
    start.save_pretrained(tmp_path / "start")
    trainer = Trainer(tiny_config(tmp_path / "run", media_dir, model={"init": str(tmp_path / "start")}))
    for k, v in start.state_dict().items():
        assert torch.equal(trainer.ae.state_dict()[k], v) and torch.equal(trainer.ema[k], v)
    with pytest.raises(ConfigError, match=r"model.init .* has widths \(16, 16, 16, 32, 32, 64, 64\) .* asks for f32t4c64 .*; set model.preset=debug"):
        Trainer(tiny_config(tmp_path / "run", media_dir, model={"init": str(tmp_path / "start"), "preset": "tiny-f32t4c64"}))


def test_gan_warmup_and_scheduled_weight(tmp_path, media_dir):
    gan = GAN | {"weight": 0.2, "weight_mode": "scheduled", "start_step": 1, "ramp_steps": 2, "loss": "non_saturating"}
    trainer = Trainer(tiny_config(tmp_path, media_dir, optim={"max_steps": 3}, gan=gan))
    d0 = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    first = trainer.train_step(0)
    assert first["gan_weight"] == 0 and first["adv"] == 0 and first["d_loss"] == 0  # warm-up: no GAN at all
    assert all(torch.equal(v, trainer.disc.state_dict()[k]) for k, v in d0.items())
    second, third = trainer.train_step(1), trainer.train_step(2)
    assert second["gan_weight"] == pytest.approx(0.1) and third["gan_weight"] == pytest.approx(0.2)
    assert second["d_loss"] > 0 and second["adv"] > 0
    assert any(not torch.equal(v, trainer.disc.state_dict()[k]) for k, v in d0.items())
