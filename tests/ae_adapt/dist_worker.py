"""Run stage 2 (with an EMA of the weights) + LoRA (without) on the tiny ExampleDiT as one process
(grad_accum 2) or as rank RANK of WORLD_SIZE=2 under gloo (FSDP2, grad_accum 1; with a 3rd
argument, interrupted and resumed); rank 0 saves the trained weights, the losses and the stage-2
checkpoint's raw and EMA weights to argv[1]."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

import ae_adapt_world as world

from ae_adapt.example_dit import ExampleDiT
from ae_adapt.stages import _full_state, align_head, lora_finetune, restore_new_ends
from ae_adapt.trainer import TrainConfig, init_distributed


def _fresh():
    torch.manual_seed(0)
    model = ExampleDiT(world.BASE_CONFIG)
    model.replace_patch_embedder(8, (1, 1, 1))
    return model


def main(out: str, run_dir: str, interrupt: bool = False) -> None:
    """Stage 2 (3 steps; with `interrupt`: 2 steps, then a fresh model resumes the third) and a
    2-step LoRA stage on top."""
    rank, size = init_distributed("gloo")
    cfg = TrainConfig(lr=3e-3, steps=3, batch_size=8, grad_accum=2 // size, progress=False)
    data = world.samples(16)
    model = _fresh()
    # the EMA is sharded like the weights and gathered into the checkpoint (short warm-up: it differs)
    head_cfg = cfg.replace(ema_decay=0.9, ema_warmup_steps=2)
    result = align_head(
        model, data, head_cfg, f"{run_dir}/head", out_channels=8, patch=(1, 1, 1), stop_at=2 if interrupt else None
    )
    if interrupt:
        model = _fresh()
        rest = align_head(model, data, head_cfg, f"{run_dir}/head", out_channels=8, patch=(1, 1, 1))
        result.losses += rest.losses
    head_state = torch.load(f"{run_dir}/head/checkpoint.pt", weights_only=False)
    model = _fresh()  # as a new launch would: LoRA on an unsharded model with the stage-2 (EMA) ends
    restore_new_ends(model, f"{run_dir}/head", in_channels=8, out_channels=8, patch=(1, 1, 1))
    lora = lora_finetune(
        model, data, cfg.replace(steps=2), f"{run_dir}/lora", rank=4, alpha=8, target_modules=("qkv", "fc1")
    )
    state = {k: v.detach().clone() for k, v in _full_state(model).items()}
    if rank == 0:
        head = {"weights": head_state["weights"], "ema": head_state["ema"]}
        torch.save({"state": state, "losses": result.losses + lora.losses, "head": head}, out)
    if size > 1:  # leave together: gloo can abort a process whose peer exits first
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], interrupt=len(sys.argv) > 3)
    # Results are on disk and the group is destroyed: skip the interpreter's teardown, where gloo's
    # threads were seen (rarely, under load) to abort a finished worker with "terminate called
    # without an active exception" (exit -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
