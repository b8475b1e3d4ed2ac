"""Training machinery: exact resume, refused resume, logs, warm-up, accumulation, checkpointing,
bf16, and FSDP2 over 2 gloo processes equal to 1 process."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ae_adapt import ResumeError, align_head
from ae_adapt.trainer import CHECKPOINT, TrainConfig, lr_at, read_log, sample_order

HERE = Path(__file__).parent


def _model(base_dit):
    model = copy.deepcopy(base_dit)
    torch.manual_seed(5)
    model.replace_patch_embedder(8, (1, 1, 1))
    return model


def _cfg(**kw):
    return TrainConfig(**{"lr": 3e-3, "steps": 6, "batch_size": 4, "ckpt_every": 2, "progress": False, **kw})


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(base_dit, pairs, ema_decay, tmp_path):
    """With EMA on, the EMA (what the model holds after fit) must be restored too: re-starting it
    from the raw weights at step 3 would give other final weights."""
    cfg = _cfg(ema_decay=ema_decay)
    full = _model(base_dit)
    ref = align_head(full, pairs, cfg, tmp_path / "a", out_channels=8, patch=(1, 1, 1))
    first = _model(base_dit)
    part = align_head(first, pairs, cfg, tmp_path / "b", out_channels=8, patch=(1, 1, 1), stop_at=3)
    assert part.step == 3 and not (tmp_path / "b" / f".{CHECKPOINT}.tmp").exists()
    resumed = _model(base_dit)  # a new process: fresh model, same command
    rest = align_head(resumed, pairs, cfg, tmp_path / "b", out_channels=8, patch=(1, 1, 1))
    assert rest.step == 6 and len(rest.losses) == 3
    assert part.losses + rest.losses == ref.losses
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    a, b = (torch.load(tmp_path / d / CHECKPOINT, weights_only=False) for d in "ab")
    assert ("ema" in a) == ("ema" in b) == bool(ema_decay)
    for part_name in ("weights", "ema") if ema_decay else ("weights",):
        assert a[part_name].keys() == b[part_name].keys()
        for k, v in a[part_name].items():
            assert torch.equal(v, b[part_name][k]), (part_name, k)
    if ema_decay:  # the model holds the EMA, not the raw weights of the checkpoint
        head = resumed.final_layer.linear.weight
        assert torch.equal(head, b["ema"]["model.final_layer.linear.weight"])
        assert not torch.equal(head, b["weights"]["model.final_layer.linear.weight"])
    assert [r["step"] for r in read_log(tmp_path / "a")] == [6]  # log_every 10: the last step only


def test_resuming_with_a_changed_config_is_refused(base_dit, pairs, tmp_path):
    align_head(_model(base_dit), pairs, _cfg(), tmp_path, out_channels=8, patch=(1, 1, 1), stop_at=2)
    with pytest.raises(ResumeError, match=r"batch_size: 4 -> 8") as err:
        align_head(_model(base_dit), pairs, _cfg(batch_size=8), tmp_path, out_channels=8, patch=(1, 1, 1))
    assert "unfinished at step 2" in str(err.value) and f"delete {tmp_path}" in str(err.value)
    with pytest.raises(ResumeError, match=r"shift: 1.0 -> 3.0") as err:  # the changed input is named ...
        align_head(_model(base_dit), pairs, _cfg(), tmp_path, out_channels=8, patch=(1, 1, 1), shift=3.0)
    assert "out_channels" not in str(err.value) and len(str(err.value).replace(str(tmp_path), "")) < 350
    with pytest.raises(ResumeError, match=r"ema_decay: 0.0 -> 0.99"):
        align_head(_model(base_dit), pairs, _cfg(ema_decay=0.99), tmp_path, out_channels=8, patch=(1, 1, 1))
    # the step size may change (going on after a divergence), with a note; more steps too
    with pytest.warns(UserWarning, match=r"lr: 0.003 -> 0.001"):
        part = align_head(_model(base_dit), pairs, _cfg(lr=1e-3), tmp_path, out_channels=8, patch=(1, 1, 1), stop_at=3)
    assert part.step == 3
    result = align_head(_model(base_dit), pairs, _cfg(lr=1e-3, steps=7), tmp_path, out_channels=8, patch=(1, 1, 1))
    assert result.step == 7


def test_jsonl_log_records_every_log_every_steps(base_dit, pairs, tmp_path):
    align_head(_model(base_dit), pairs, _cfg(log_every=2), tmp_path, out_channels=8, patch=(1, 1, 1))
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["stage"] == "align_head" and r["loss"] > 0 for r in records)
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["lr"] == 3e-3


def test_warmup_and_data_order():
    cfg = TrainConfig(lr=1.0, steps=10, batch_size=1, warmup_steps=4)
    assert [lr_at(cfg, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    order = sample_order(5, seed=0, start=0, count=10)
    assert sorted(order[:5]) == sorted(order[5:]) == list(range(5))  # each epoch is a permutation
    assert sample_order(5, seed=0, start=3, count=4) == order[3:7]


def test_grad_accumulation_matches_one_big_batch(base_dit, pairs, tmp_path):
    a, b = _model(base_dit), _model(base_dit)
    align_head(a, pairs, _cfg(steps=2, batch_size=8), tmp_path / "a", out_channels=8, patch=(1, 1, 1))
    align_head(b, pairs, _cfg(steps=2, batch_size=8, grad_accum=2), tmp_path / "b", out_channels=8, patch=(1, 1, 1))
    # same samples; the noise differs per micro-batch, so compare the embedder after 2 steps loosely
    wa, wb = a.get_patch_embedder().proj.weight, b.get_patch_embedder().proj.weight
    assert not torch.equal(wa, wb)
    assert (wa - wb).abs().max() < 3e-2


def test_gradient_checkpointing_gives_the_same_training(base_dit, pairs, tmp_path):
    a, b = _model(base_dit), _model(base_dit)
    align_head(a, pairs, _cfg(steps=2), tmp_path / "a", out_channels=8, patch=(1, 1, 1))
    align_head(b, pairs, _cfg(steps=2, gradient_checkpointing=True), tmp_path / "b", out_channels=8, patch=(1, 1, 1))
    assert b.gradient_checkpointing
    for (k, v), v2 in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, v2, rtol=0, atol=1e-6, msg=k)


def test_bf16_autocast_trains(base_dit, pairs, tmp_path):
    result = align_head(_model(base_dit), pairs, _cfg(steps=2, bf16=True), tmp_path, out_channels=8, patch=(1, 1, 1))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    """Stage 2 interrupted and resumed under FSDP2 on 2 gloo processes, then LoRA, next to one
    uninterrupted process; each in a fresh Python process (an in-process reference would depend on
    state left by earlier tests)."""
    tmp_path = tmp_path_factory.mktemp("fsdp2")
    worker = str(HERE / "dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    runs = [([str(tmp_path / "two.pt"), str(tmp_path / "run2"), "interrupt"], {"WORLD_SIZE": "2", "RANK": str(r),
                                                                               "LOCAL_RANK": str(r)}) for r in range(2)]
    runs.append(([str(tmp_path / "one.pt"), str(tmp_path / "run1")], {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}))
    procs = [subprocess.Popen([sys.executable, worker, *args], env={**env, **extra}, stderr=subprocess.PIPE, text=True)
             for args, extra in runs]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    return tmp_path, torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")


@pytest.mark.slow  # three fresh Python processes (~10 s on 2 busy cores)
def test_fsdp2_on_two_gloo_processes_equals_one_process(one_and_two_processes):
    """Stage 2 (head alignment) interrupted and resumed under FSDP2 equals one uninterrupted
    process: same samples and noise by construction, only the reduction order differs (atol 1e-6)."""
    tmp_path, one, two = one_and_two_processes
    assert len(one["losses"]) == len(two["losses"]) == 5
    torch.testing.assert_close(torch.tensor(two["losses"][:3]), torch.tensor(one["losses"][:3]), rtol=0, atol=1e-6)
    assert (tmp_path / "run2" / "head" / CHECKPOINT).is_file()
    assert (tmp_path / "run2" / "lora" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp2_ema_is_gathered_saved_and_restored_like_one_process(one_and_two_processes):
    """Stage 2 runs with ema_decay 0.9: the sharded EMA, gathered into the checkpoint at the
    interruption and re-sharded on resume, equals one process's; so do the raw weights."""
    _, one, two = one_and_two_processes
    for part in ("weights", "ema"):
        assert one["head"][part].keys() == two["head"][part].keys() == {
            n for n in one["head"]["weights"] if n.startswith(("model.x_embedder.", "model.final_layer."))
        }
        for k, v in one["head"][part].items():
            torch.testing.assert_close(two["head"][part][k], v, rtol=0, atol=1e-6, msg=f"{part} {k}")
    w, e = one["head"]["weights"], one["head"]["ema"]
    assert any(not torch.allclose(w[k], e[k], atol=1e-4) for k in w)  # the EMA is not the raw weights


@pytest.mark.slow
def test_fsdp2_lora_stage_equals_one_process(one_and_two_processes):
    """The LoRA stage that follows (a new launch restoring the stage-2 ends from disk) too. This
    caught a race: without a barrier after rank 0 wrote the ends, rank 1 could read stale ones."""
    _, one, two = one_and_two_processes
    torch.testing.assert_close(torch.tensor(two["losses"][3:]), torch.tensor(one["losses"][3:]), rtol=0, atol=1e-6)
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, rtol=0, atol=1e-6, msg=k)


def test_a_resumed_run_logs_each_step_once(base_dit, pairs, tmp_path):
    """A run killed after logging steps past its last checkpoint logs them again when resumed: the
    log then holds each step once, as an uninterrupted run's."""
    cfg = _cfg(log_every=1, ckpt_every=2)
    align_head(_model(base_dit), pairs, cfg, tmp_path / "a", out_channels=8, patch=(1, 1, 1))
    align_head(_model(base_dit), pairs, cfg, tmp_path / "b", out_channels=8, patch=(1, 1, 1), stop_at=2)
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # what a kill at step 3 leaves behind
        f.write('{"stage": "x", "step": 3, "loss": 0}\n')
    align_head(_model(base_dit), pairs, cfg, tmp_path / "b", out_channels=8, patch=(1, 1, 1))
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]


def test_resuming_with_fewer_steps_than_done_finishes_the_stage(base_dit, pairs, tmp_path):
    """`steps` may change on resume; lowered to at most the checkpoint's step, the stage is done
    (done.json, finished checkpoint) instead of returning unfinished at every launch."""
    from ae_adapt.stages import is_done

    part = align_head(_model(base_dit), pairs, _cfg(), tmp_path, out_channels=8, patch=(1, 1, 1), stop_at=4)
    assert part.step == 4 and not is_done(tmp_path)
    result = align_head(_model(base_dit), pairs, _cfg(steps=3), tmp_path, out_channels=8, patch=(1, 1, 1))
    assert result.step == 4 and result.losses == []
    assert is_done(tmp_path)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["finished"]
