"""`dcae-v train`: config file + overrides, --resume, exit codes for bad config / OOM / NaN."""

import json

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
    assert "lr: 0.5" in capsys.readouterr().err and not (tmp_path / "run").exists()
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
