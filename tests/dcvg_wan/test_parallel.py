"""Ulysses sequence parallelism: 2 gloo processes give the single-process output."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcvg_wan.errors import InputError
from dcvg_wan.parallel import dit_shard_units, sequence_parallel_forward, shard_for_inference
from tests.dcvg_wan.conftest import make_inputs, make_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, preset: str, latent, out_dir: str, fsdp: bool = False,
            ulysses: bool = True) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model(preset)
        inputs = make_inputs(model, latent=latent)
        full = {name: p.numel() for name, p in model.named_parameters()}
        if fsdp:
            shard_for_inference(dit_shard_units(model))
        with torch.no_grad():
            out = sequence_parallel_forward(model, **inputs) if ulysses else model(**inputs)
        local = {}
        if fsdp:  # after the forward every weight is a DTensor shard again (the reshard hook), none left gathered
            local = {name: p.to_local().numel() for name, p in model.named_parameters()}  # plain tensors: no to_local
        torch.save({"out": out, "full": full, "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: gloo can abort a process whose peer exits first
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "preset, latent",
    [
        ("debug-t2v", (2, 4, 4)),  # 8 tokens: splits evenly over 2 ranks
        ("debug-i2v", (1, 6, 2)),  # 3 tokens: rank 1 holds a padded token that must be masked
    ],
)
def test_two_process_gloo_equals_one_process(tmp_path, preset, latent):
    model = make_model(preset)
    with torch.no_grad():
        expected = model(**make_inputs(model, latent=latent))
    mp.start_processes(_worker, args=(2, _free_port(), preset, latent, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")["out"]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ulysses", [False, True], ids=["fsdp", "fsdp+ulysses"])
def test_fsdp_sharded_dit_two_processes_equals_one(tmp_path, ulysses):
    model = make_model("debug-i2v")
    latent = (1, 6, 2)
    with torch.no_grad():
        expected = model(**make_inputs(model, latent=latent))
    mp.start_processes(_worker, args=(2, _free_port(), "debug-i2v", latent, str(tmp_path), True, ulysses), nprocs=2,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for g in got:
        torch.testing.assert_close(g["out"], expected, atol=1e-5, rtol=1e-5)
        assert set(g["local"]) == set(g["full"])
    for name, n in got[0]["full"].items():  # the two ranks' pieces add up to the tensor: split, not copied
        assert got[0]["local"][name] + got[1]["local"][name] == n, name


def test_needs_initialised_process_group():
    model = make_model("debug-t2v")
    with pytest.raises(InputError, match="torchrun"):
        sequence_parallel_forward(model, **make_inputs(model))


def test_attention_backend_is_checked():
    model = make_model("debug-t2v")
    with pytest.raises(InputError, match="sdpa"):
        model.set_attention_backend("flash3")
