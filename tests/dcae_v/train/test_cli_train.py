"""`dcae-v train`: config file + overrides, --resume, exit codes for bad config / OOM / NaN."""

import json
import logging
import os

import pytest
import torch

from dcae_v.cli import main

from .conftest import tiny_config


def _cfg_file(tmp_path, media_dir, **kw):
    p = tmp_path / "train.json"
    p.write_text(json.dumps(tiny_config(tmp_path / "run", media_dir, **kw).to_dict()))
    return str(p)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "section.field=value" in capsys.readouterr().out


def test_train_then_resume(tmp_path, media_dir, capsys):
    cfg = _cfg_file(tmp_path, media_dir)
    assert main(["train", "--config", cfg, "optim.max_steps=1"]) == 0
    out = capsys.readouterr()
    assert "trained to step 1" in out.out and "max_steps: 1" in out.err  # the resolved config is printed
    assert main(["train", "--config", cfg, "optim.max_steps=2", "--resume"]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


def test_print_config_and_bad_values(tmp_path, media_dir, capsys):
    cfg = _cfg_file(tmp_path, media_dir)
    assert main(["train", "--config", cfg, "--print-config", "optim.lr=0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 0.5 and not (tmp_path / "run").exists()
    assert main(["train", "--config", cfg, "model.preset=nope"]) == 3
    assert "unknown model.preset 'nope'" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "optim.batch_size=64"]) == 3
    assert "larger than the data" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any compute


def test_oom_and_nan_exit_codes(tmp_path, media_dir, capsys, monkeypatch):
    from dcae_v.train import losses
    from dcae_v.train.trainer import Autoencode

    cfg = _cfg_file(tmp_path, media_dir)
    real = Autoencode.forward
    monkeypatch.setattr(Autoencode, "forward", lambda self, g: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    assert main(["train", "--config", cfg]) == 5
    assert "clip(s) x 8 frames x 32x32" in capsys.readouterr().err
    monkeypatch.setattr(Autoencode, "forward", real)
    monkeypatch.setattr(losses, "pixel_loss", lambda y, x, l1, mse: (y - x).flatten(1).mean(1) * float("inf"))
    assert main(["train", "--config", cfg]) == 6
    assert "non-finite loss at step 1" in capsys.readouterr().err


# ---- --print-config --------------------------------------------------------------------------
def test_print_config_works_with_the_defaults_and_round_trips(tmp_path, capsys):
    """The defaults alone are not a runnable run (no data.source); printing them must still work,
    as JSON that --config reads back to the same config."""
    from dcae_v.train import TrainConfig
    from dcae_v.train.config import from_dict

    assert main(["train", "--print-config"]) == 0
    text = capsys.readouterr().out
    data = json.loads(text)
    assert data["optim"]["betas"] == [0.9, 0.99] and data["model"]["temporal"] is None and data["data"]["source"] == ""
    assert from_dict(data) == TrainConfig()
    saved = tmp_path / "base.json"
    saved.write_text(text)
    assert main(["train", "--config", str(saved), "--print-config"]) == 0
    assert capsys.readouterr().out == text
    assert main(["train", "--config", str(saved)]) == 3  # a run still validates
    assert "data.source is empty" in capsys.readouterr().err


def test_print_config_still_rejects_unknown_fields(capsys):
    assert main(["train", "--print-config", "optim.nope=1"]) == 3
    assert "unknown field optim.nope" in capsys.readouterr().err


def test_config_that_is_a_directory(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 3
    assert "is a directory" in capsys.readouterr().err


# ---- out_dir -----------------------------------------------------------------------------------
def test_unwritable_out_dir_is_refused_before_training(tmp_path, media_dir, capsys):
    cfg = _cfg_file(tmp_path, media_dir)
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--config", cfg, f"run.out_dir={tmp_path / 'afile' / 'run'}"]) == 3
    err = capsys.readouterr().err
    assert "cannot create run.out_dir" in err and "is a file, not a directory" in err and "Traceback" not in err
    if os.path.isdir("/proc"):
        assert main(["train", "--config", cfg, "run.out_dir=/proc/dcae_v_run"]) == 3
        assert "cannot write run.out_dir '/proc/dcae_v_run'" in capsys.readouterr().err


def test_write_failure_during_training_is_an_input_error(tmp_path, media_dir, capsys, monkeypatch):
    from dcae_v.train import trainer

    def fail(directory, step, state, keep_last):
        raise PermissionError(13, "Permission denied", str(directory / "x.pt"))

    monkeypatch.setattr(trainer, "save_state", fail)
    assert main(["train", "--config", _cfg_file(tmp_path, media_dir), "optim.max_steps=1"]) == 3
    err = capsys.readouterr().err
    assert "cannot write" in err and "Permission denied" in err and "Traceback" not in err


def test_a_second_fresh_run_in_the_same_out_dir_is_refused(tmp_path, media_dir, capsys):
    cfg = _cfg_file(tmp_path, media_dir, checkpoint={"every": 1})
    assert main(["train", "--config", cfg, "optim.max_steps=2"]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(["train", "--config", cfg, "optim.max_steps=2"]) == 3
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "newest: step_00000002.pt" in err and "--resume" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before  # nothing touched
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_resume_names_the_changed_config_fields(tmp_path, media_dir, capsys, caplog):
    cfg = _cfg_file(tmp_path, media_dir)
    assert main(["train", "--config", cfg, "optim.max_steps=1"]) == 0
    with caplog.at_level(logging.WARNING, logger="dcae_v.train"):
        assert main(["train", "--config", cfg, "--resume", "optim.max_steps=2", "optim.lr=5e-4"]) == 0
    assert "trained to step 2" in capsys.readouterr().out  # extending a run keeps working
    changed = [r.getMessage() for r in caplog.records if "config differs" in r.getMessage()]
    expected = "resume: the config differs from the checkpoint's: optim.lr 0.001 -> 0.0005, optim.max_steps 1 -> 2"
    assert changed == [expected]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dcae_v.train"):  # same config: nothing to say
        assert main(["train", "--config", cfg, "--resume", "optim.max_steps=2", "optim.lr=5e-4"]) == 0
    assert not [r for r in caplog.records if "config differs" in r.getMessage()]


# ---- input errors and defaults (audit 6) ---------------------------------------------------------
def test_bad_device_and_run_values_exit_3(tmp_path, media_dir, capsys):
    cfg = _cfg_file(tmp_path, media_dir)
    for override, message in (("run.device=gpu", "unknown run.device 'gpu'"), ("run.max_minutes=0", "run.max_minutes must be > 0"),
                              ("run.out_dir=", "run.out_dir is empty")):
        assert main(["train", "--config", cfg, override]) == 3, override
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_one_video_file_as_the_source(tmp_path, media_dir, capsys):
    """`data.source=clip.mkv` trains on that one clip (batch 2 of 1 file: two windows of it)."""
    cfg = _cfg_file(tmp_path, media_dir)
    assert main(["train", "--config", cfg, f"data.source={media_dir / 'clip0.mkv'}", "optim.max_steps=1"]) == 0
    assert "trained to step 1" in capsys.readouterr().out


def test_the_defaults_run_with_only_a_source(tmp_path, monkeypatch, capsys):
    """`dcae-v train data.source=DIR` alone (here with fewer steps, in a temp folder) runs: the
    default data.frames is one chunk of the default preset, and the printed config says so."""
    from .conftest import moving_clip, write_media

    for i in range(4):
        write_media(tmp_path / f"c{i}.mkv", moving_clip(40, 32, 32, seed=i))
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"data.source={tmp_path}", "optim.max_steps=1", "run.progress=false",
                 "checkpoint.export=false", "run.tensorboard=false"]) == 0
    out = capsys.readouterr()
    assert "trained to step 1" in out.out and "  frames: 40" in out.err
    assert "(data.frames not set: one chunk of the model, 40 frames)" in out.err
    assert (tmp_path / "runs" / "dcae_v_train" / "checkpoints" / "step_00000001.pt").is_file()


def test_sigterm_saves_and_exits_143(tmp_path, media_dir, capsys, monkeypatch):
    import signal

    from dcae_v.train import trainer

    real = trainer.lr_factor

    def lr_factor(step, cfg):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return real(step, cfg)

    def not_handled(signum, frame):
        raise AssertionError("SIGTERM reached the previous handler: training did not catch it")

    monkeypatch.setattr(trainer, "lr_factor", lr_factor)
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        assert main(["train", "--config", _cfg_file(tmp_path, media_dir), "optim.max_steps=5"]) == 143
        assert signal.getsignal(signal.SIGTERM) is not_handled  # restored after training
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "stopped by SIGTERM at step 2 of 5" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "step_00000002.pt").is_file()
