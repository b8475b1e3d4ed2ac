"""One training loop for every stage: AdamW with linear warm-up, gradient accumulation, bf16
autocast, gradient checkpointing, FSDP2 under torchrun, atomic checkpoints with exact resume,
JSONL logs and a tqdm bar.

The loop trains a *task*: an nn.Module whose `forward(batch, generator)` returns the loss (the
stages build one around the DiT). Wrapping the loss in a forward is what lets FSDP2 gather the
parameters of the DiT's non-block parts, which the protocol calls outside `DiT.forward`.

Exact resume: data order and noise are functions of (seed, step, micro-batch), not of a running
RNG, so a checkpoint needs only the trainable weights, the AdamW state, the step, the plateau
tracker and (with `ema_decay`) the EMA of the weights. The same rule makes N processes see the
same samples and noise as one process with N times the accumulation.

EMA (`ema_decay` > 0; NVIDIA's DC-Gen assembles its models from EMA weights): an fp32 moving
average of the trainable parameters, updated after every optimizer step. When `fit` returns, the
trainable parameters hold the EMA (so whatever a stage saves or merges next is the EMA) and the
checkpoint keeps the raw weights beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ae_adapt.errors import AdaptError, DivergedError, ProtocolError, ResumeError
from ae_adapt.files import write_text

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
EMA_SCHEDULES = ("dcgen", "diffusers")
DONE = "done.json"  # written last, once a stage has finished and written its outputs
# Fields that change nothing a finished stage has produced (a rerun may change them).
FREE_CHANGES = ("ckpt_every", "log_every", "progress")
# Fields that may change between an interrupted run and its resumption: the step count, and the
# step size (to go on from the last good checkpoint of a diverged run with a lower lr or clipping;
# a note says that the run is then no exact continuation).
RESUMABLE_CHANGES = ("steps", *FREE_CHANGES)
TUNABLE_ON_RESUME = ("lr", "warmup_steps", "warmup_start_lr", "max_grad_norm")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One stage's optimisation. `batch_size` is global (all processes, all accumulation steps)."""

    lr: float
    steps: int  # optimizer steps
    batch_size: int
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0  # warm-up starts here (DC-Gen's ConstantLRwithWarmup `warmup_lr`)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    # parameters whose name contains one of these get no weight decay (DC-Gen: "norm.weight", "bias")
    no_decay_keys: tuple[str, ...] = ()
    grad_accum: int = 1
    max_grad_norm: float | None = None  # not given by the paper: no clipping by default
    bf16: bool = False  # autocast matmuls to bfloat16 (weights and AdamW state stay fp32)
    gradient_checkpointing: bool = False
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 10
    progress: bool = True
    # Plateau stop (stage 2 "until the diffusion loss converges"): stop when the EMA of the loss
    # has not improved by a relative `plateau_min_delta` for `plateau_patience` steps.
    plateau_patience: int | None = None
    plateau_min_delta: float = 0.0
    plateau_ema: float = 0.9
    # EMA of the trainable weights (0: off). Decay after optimizer step k (0-based), `ema_schedule`:
    # "dcgen" (NVIDIA's DC-Gen EMA.step, dc_ai/apps/utils/ema.py): ema_decay * (1 - exp(-(k + 1) /
    # ema_warmup_steps)), warm-up 2000 (0: the constant decay); "diffusers" (EMAModel,
    # update_after_step 0): 0 at k = 0, then min(ema_decay, (1 + k) / (10 + k)). NVIDIA publishes
    # no decay value; 0.9999 is diffusers' usual.
    ema_decay: float = 0.0
    ema_schedule: str = "dcgen"
    ema_warmup_steps: int = 2000

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "no_decay_keys", tuple(str(k) for k in self.no_decay_keys))
        for name in ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.warmup_start_lr < 0:
            raise ValueError(
                f"lr must be > 0, warmup_steps and weight_decay >= 0; got {self.lr}, "
                f"{self.warmup_steps}, {self.weight_decay}"
            )
        if self.plateau_patience is not None and self.plateau_patience < 1:
            raise ValueError(f"plateau_patience must be positive or None, got {self.plateau_patience}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.ema_schedule not in EMA_SCHEDULES:
            raise ValueError(f"ema_schedule must be one of {EMA_SCHEDULES}, got {self.ema_schedule!r}")
        if self.ema_warmup_steps < 0:
            raise ValueError(f"ema_warmup_steps must be >= 0, got {self.ema_warmup_steps}")

    def replace(self, **overrides: Any) -> TrainConfig:
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["no_decay_keys"] = list(self.no_decay_keys)
        return d


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this session only
    stopped_on_plateau: bool = False


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps` (step k: start + (lr - start)(k + 1)/warmup, start =
    `warmup_start_lr`, DC-Gen's ConstantLRwithWarmup), then constant (Table 8)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        start = cfg.warmup_start_lr
        return start + (cfg.lr - start) * (step + 1) / cfg.warmup_steps
    return cfg.lr


def ema_decay_at(decay: float, step: int, schedule: str = "dcgen", warmup_steps: int = 2000) -> float:
    """The EMA decay applied after optimizer step `step` (0-based): see `TrainConfig.ema_decay`."""
    if schedule == "diffusers":
        return 0.0 if step <= 0 else min(decay, (1 + step) / (10 + step))
    return decay if warmup_steps == 0 else decay * (1 - math.exp(-(step + 1) / warmup_steps))


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The RNG of one micro-batch (global index `micro`), independent of history and world size."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + micro)


def sample_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Sample indices start..start+count of an endless stream of seeded permutations of range(n)."""
    out, epoch, perm = [], None, None
    for k in range(start, start + count):
        if k // n != epoch:
            epoch = k // n
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.append(perm[k % n])
    return out


def fully_shard_task(task: nn.Module, units: Sequence[nn.Module]) -> nn.Module:
    """FSDP2: shard each unit (e.g. each block), then the task as the root."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if any(isinstance(m, FSDPModule) for m in task.modules()):
        raise AdaptError(
            "this model was already sharded by an earlier stage in this process: under torchrun run one "
            "stage per launch (run_all does: launch the same command again to go on with the next stage)"
        )
    for unit in units:
        fully_shard(unit)
    fully_shard(task)
    return task


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """["key.sub: old -> new", ...] for the leaves that differ between two JSON-like values (a key
    only one side has reads as None), so that a refusal names the changed setting."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += describe_changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old == new:
        return []
    return [f"{prefix.rstrip('.') or 'value'}: {_short(old)} -> {_short(new)}"]


def _config_with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored TrainConfig dict; a field added after it was written reads as its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    defaults["no_decay_keys"] = []
    return {**defaults, **stored}


def finished_changes(run_dir: str | os.PathLike, stage: str, cfg: TrainConfig, fingerprint: dict[str, Any] | None) -> list[str]:
    """What differs between a finished stage's `done.json` and the settings it would be trained
    with now (the fields of FREE_CHANGES aside). Empty for a `done.json` written before the settings
    were recorded in it."""
    done = json.loads((Path(run_dir) / DONE).read_text())
    if "config" not in done:
        return []
    new = cfg.to_dict()
    old = _config_with_defaults(done["config"])
    changed = [c for k in new if k not in FREE_CHANGES for c in describe_changes(old.get(k), new[k], f"{k}.")]
    if done.get("stage") != stage:
        changed.insert(0, f"stage: {done.get('stage')!r} -> {stage!r}")
    changed += describe_changes(done.get("fingerprint", {}), json.loads(json.dumps(fingerprint or {})))
    return changed


class Trainer:
    """Trains the parameters of `task` that require grad on `dataset`.

    `dataset[i]` returns a dict of tensors; `collate(list_of_dicts)` makes a batch (default:
    stack). `fingerprint` is any JSON-able description of what else the run depends on (stage,
    latent shapes, cache identity): a resume with a different one is refused."""

    def __init__(
        self,
        task: nn.Module,
        dataset: Any,
        cfg: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        stage: str,
        fingerprint: dict[str, Any] | None = None,
        collate: Callable[[list[dict]], dict] | None = None,
        fsdp_units: Sequence[nn.Module] = (),
        device: torch.device | str | None = None,
    ):
        self.cfg, self.stage, self.dataset = cfg, stage, dataset
        self.run_dir = Path(run_dir)
        self.fingerprint = json.loads(json.dumps(fingerprint or {}))
        self.collate = collate or stack_batch
        self.rank, self.world_size = world()
        per_micro, rest = divmod(cfg.batch_size, self.world_size * cfg.grad_accum)
        if rest or per_micro < 1:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be a multiple of world size {self.world_size} x "
                f"grad_accum {cfg.grad_accum}"
            )
        self.micro_batch = per_micro
        if cfg.gradient_checkpointing:
            hook = getattr(getattr(task, "model", task), "enable_gradient_checkpointing", None)
            if not callable(hook):
                raise ProtocolError(
                    f"gradient_checkpointing needs {type(getattr(task, 'model', task)).__name__}."
                    "enable_gradient_checkpointing(); the model does not offer it"
                )
            hook()
        self.names = [n for n, p in task.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError(f"stage {stage!r}: nothing to train (no parameter requires grad)")
        self.device = torch.device(device) if device is not None else next(task.parameters()).device
        self.sharded = self.world_size > 1
        if self.sharded:
            fully_shard_task(task, fsdp_units)
        self.task = task
        self.opt = torch.optim.AdamW(param_groups(task, cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.step = 0
        self.finished = False
        self.plateau = {"ema": None, "best": None, "bad": 0}
        # fp32 EMA of the trainable parameters (sharded like them under FSDP2), None when off
        self.ema: dict[str, torch.Tensor] | None = None
        if cfg.ema_decay > 0:
            params = dict(task.named_parameters())
            self.ema = {n: params[n].detach().clone().float() for n in self.names}
        self.holds_ema = False  # True once fit() has copied the EMA into the parameters
        self.saved_step: int | None = None  # step of the checkpoint on disk (None: none yet)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            weights = get_model_state_dict(self.task, options=opts)
            optim = get_optimizer_state_dict(self.task, self.opt, options=opts)
        else:
            params = dict(self.task.named_parameters())
            weights = {n: params[n].detach().cpu().clone() for n in self.names}
            optim = self.opt.state_dict()
        state = {
            "format": 1,
            "stage": self.stage,
            "config": self.cfg.to_dict(),
            "fingerprint": self.fingerprint,
            "trainable": self.names,
            "world_size": self.world_size,
            "step": self.step,
            "finished": self.finished,
            "plateau": dict(self.plateau),
            "weights": weights,
            "optimizer": optim,
        }
        if self.ema is not None:  # full tensors (gathered under FSDP2: a collective, every rank calls it)
            state["ema"] = {n: _full_tensor(e).detach().cpu().clone() for n, e in self.ema.items()}
        return state

    def save(self) -> None:
        """Write the checkpoint atomically (temp file, then os.replace) from rank 0."""
        if self.holds_ema:
            raise AdaptError(
                "the trainable parameters hold the EMA now (fit() has returned): saving them as the raw "
                "weights would break the resume; call fit() again (it resumes first) instead"
            )
        state = self._state()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / f".{CHECKPOINT}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, self.run_dir / CHECKPOINT)
        self.saved_step = self.step
        if self.sharded:
            dist.barrier()

    def resume(self) -> bool:
        """Load `run_dir/checkpoint.pt` if there is one; refuse one made by another run."""
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self._check_compatible(state, path)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.task, state["weights"], options=opts)
            set_optimizer_state_dict(self.task, self.opt, state["optimizer"], options=opts)
        else:
            params = dict(self.task.named_parameters())
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(state["weights"][n])
            self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if "ema" not in state:
                raise ResumeError(f"{path} holds no EMA weights but ema_decay={self.cfg.ema_decay}")
            params = dict(self.task.named_parameters())
            self.ema = {n: _like_param(state["ema"][n], params[n]) for n in self.names}
        self.step, self.finished, self.plateau = state["step"], state["finished"], state["plateau"]
        self.saved_step = self.step
        self.holds_ema = False
        self._truncate_log()
        return True

    def _truncate_log(self) -> None:
        """Drop log records of steps after the checkpoint (a killed run logged them; the resumed run
        logs them again), so that the log of a resumed run equals an uninterrupted one's. A run
        that starts from step 0 (killed before its first checkpoint) starts the log afresh."""
        path = self.run_dir / LOG
        if self.rank != 0 or not path.exists():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= self.step]
        if len(keep) != len(lines):
            tmp = path.with_name(f".{LOG}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)

    def _check_compatible(self, state: dict[str, Any], path: Path) -> None:
        old, new = _config_with_defaults(state["config"]), self.cfg.to_dict()
        free = RESUMABLE_CHANGES + TUNABLE_ON_RESUME
        changed = [c for k in new if k not in free for c in describe_changes(old.get(k), new[k], f"{k}.")]
        if state["stage"] != self.stage:
            changed.insert(0, f"stage: {state['stage']!r} -> {self.stage!r}")
        changed += describe_changes(state["fingerprint"], self.fingerprint)
        if state["trainable"] != self.names:
            changed.append("trainable parameters differ")
        if state["world_size"] != self.world_size:
            changed.append(f"world size: {state['world_size']} -> {self.world_size}")
        if changed:
            raise ResumeError(
                f"{path} (stage {state['stage']}, unfinished at step {state['step']}) was written with other "
                f"settings: {'; '.join(changed)}. Rerun with the old settings to resume it (only "
                f"{', '.join(RESUMABLE_CHANGES + TUNABLE_ON_RESUME)} may change), or start over: use a new "
                f"output directory, or delete {self.run_dir}."
            )
        tuned = [c for k in TUNABLE_ON_RESUME for c in describe_changes(old.get(k), new[k], f"{k}.")]
        if tuned and self.rank == 0:
            warnings.warn(
                f"resuming {path} at step {state['step']} with {'; '.join(tuned)}: the run goes on from there "
                "with the new values (no exact continuation of the old run)",
                stacklevel=2,
            )

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None, *, mark_done: bool = True) -> TrainResult:
        """Train up to `cfg.steps` (or `stop_at`, to simulate an interruption), resuming first. With
        EMA on, the trainable parameters hold the EMA on return (the checkpoint the raw weights).
        A finished stage gets its `done.json` here, or, with `mark_done=False`, from `mark_done()`
        once the caller has written the stage's outputs (so that a marked stage always has them).
        A NaN/Inf loss or gradient raises DivergedError before the optimizer step, so neither the
        weights nor the last checkpoint take the bad step."""
        if not self.resume():
            self._truncate_log()  # step 0: rows of an earlier run killed before its first checkpoint
        result = TrainResult(step=self.step)
        end = min(self.cfg.steps, stop_at) if stop_at is not None else self.cfg.steps
        if not self.finished and self.step >= self.cfg.steps:
            # `steps` lowered on resume to at most the checkpoint's step: the stage is finished (else
            # it would never write done.json and run_all would train it again at every launch)
            self.finished = True
            self.save()
        if self.finished:
            if mark_done:
                self.mark_done()
            self._apply_ema()
            return result
        if self.cfg.progress and self.rank == 0 and self.step > 0:
            print(f"{self.stage}: resuming from its checkpoint at step {self.step} of {self.cfg.steps}", flush=True)
        bar = _progress(self.cfg.progress and self.rank == 0, self.step, self.cfg.steps, self.stage)
        t0 = time.time()
        while self.step < end:
            loss = self._one_step()
            self.step += 1
            result.losses.append(loss)
            stop = self._plateau_reached(loss)
            self.finished = stop or self.step >= self.cfg.steps
            if self.step % self.cfg.log_every == 0 or self.finished:
                self._log(
                    {
                        "stage": self.stage,
                        "step": self.step,
                        "loss": loss,
                        "lr": lr_at(self.cfg, self.step - 1),
                        "ema": self.plateau["ema"],
                        "seconds": round(time.time() - t0, 3),
                    }
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
            if self.step % self.cfg.ckpt_every == 0 or self.finished:
                self.save()
            if stop:
                result.stopped_on_plateau = True
                break
        if bar is not None:
            bar.close()
        if not self.finished and self.step % self.cfg.ckpt_every:
            self.save()
        if self.finished and mark_done:
            self.mark_done()
        self._apply_ema()
        result.step = self.step
        return result

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA step after the optimizer step `self.step` (0-based): ema = d ema + (1 - d) param."""
        if self.ema is None:
            return
        d = ema_decay_at(self.cfg.ema_decay, self.step, self.cfg.ema_schedule, self.cfg.ema_warmup_steps)
        params = dict(self.task.named_parameters())  # looked up anew: FSDP2 re-registers parameters
        for n, e in self.ema.items():
            e.mul_(d).add_(params[n].detach().float(), alpha=1 - d)

    @torch.no_grad()
    def _apply_ema(self) -> None:
        """Copy the EMA into the trainable parameters (after the last checkpoint has been written).
        Before the first step the EMA is the weights: nothing to copy (and no checkpoint to protect)."""
        if self.ema is None or self.step == 0:
            return
        params = dict(self.task.named_parameters())
        for n, e in self.ema.items():
            params[n].copy_(e)
        self.holds_ema = True

    def mark_done(self) -> None:
        """Write `done.json` (atomically) with the settings the stage was trained with: a rerun with
        other ones is refused (`finished_changes`) instead of restoring these results."""
        if not self.finished:
            raise AdaptError(f"stage {self.stage!r} has not finished (step {self.step} of {self.cfg.steps})")
        if self.rank == 0:
            record = {
                "stage": self.stage,
                "step": self.step,
                "config": self.cfg.to_dict(),
                "fingerprint": self.fingerprint,
            }
            write_text(self.run_dir / DONE, json.dumps(record))
        if self.sharded:
            dist.barrier()

    def _diverged(self, what: str, value: float) -> DivergedError:
        saved = self.run_dir / CHECKPOINT
        last = (
            f"{saved} (step {self.saved_step}) is kept as the last good state and a rerun resumes from it"
            if self.saved_step is not None
            else f"no checkpoint was written yet ({saved}): a rerun starts the stage over"
        )
        err = DivergedError(
            f"stage {self.stage} diverged: the {what} is {value} at step {self.step + 1}; stopped before that "
            f"step and without saving, so {last}. Lower the stage's lr (now {lr_at(self.cfg, self.step):g}), "
            f"lengthen its warm-up or set max_grad_norm (e.g. 1.0), or check the data; these may change "
            f"on resume"
        )
        err.stage, err.step, err.checkpoint = self.stage, self.step + 1, saved if self.saved_step is not None else None
        return err

    def _one_step(self) -> float:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        self.task.train()
        global_idx = sample_order(len(self.dataset), cfg.seed, self.step * cfg.batch_size, cfg.batch_size)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
        total = torch.zeros((), device=self.device)
        for m in range(cfg.grad_accum):
            micro = self.rank * cfg.grad_accum + m
            idx = global_idx[micro * self.micro_batch : (micro + 1) * self.micro_batch]
            batch = _to(self.collate([self.dataset[i] for i in idx]), self.device)
            with autocast:
                loss = self.task(batch, step_generator(cfg.seed, self.step, micro))
            (loss / cfg.grad_accum).backward()
            total += loss.detach().float() / cfg.grad_accum
        if self.sharded:  # gloo has no AVG
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            total /= self.world_size
        if not torch.isfinite(total):  # the same on every rank (all-reduced)
            self.opt.zero_grad(set_to_none=True)
            raise self._diverged("loss", float(total))
        grads = [p for p in self.task.parameters() if p.requires_grad and p.grad is not None]
        if cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(grads, cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
        norm = _full_tensor(norm)
        if not torch.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            raise self._diverged("gradient norm", float(norm))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._update_ema()
        return float(total)

    def _plateau_reached(self, loss: float) -> bool:
        cfg, p = self.cfg, self.plateau
        p["ema"] = loss if p["ema"] is None else cfg.plateau_ema * p["ema"] + (1 - cfg.plateau_ema) * loss
        if p["best"] is None or p["ema"] < p["best"] * (1 - cfg.plateau_min_delta):
            p["best"], p["bad"] = p["ema"], 0
        else:
            p["bad"] += 1
        return cfg.plateau_patience is not None and p["bad"] >= cfg.plateau_patience

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / LOG, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON


def param_groups(task: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: with weight decay, and without it for names
    containing one of `cfg.no_decay_keys` (an empty group is left out)."""
    decay, no_decay = [], []
    for name, p in task.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in cfg.no_decay_keys) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) gathered to the full tensor; a plain tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of the full tensor `full`, placed (and sharded, for a DTensor) like `param`."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is not None:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.float().to(param.device), mesh, param.placements)
    return full.to(param.device, torch.float32).clone()


def stack_batch(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample tensors; a key missing from one sample is missing from the batch."""
    keys = [k for k in samples[0] if all(k in s for s in samples)]
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _progress(enabled: bool, start: int, total: int, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with peft; without it, no bar
        return None
    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)  # left on screen with its last loss


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "describe_changes",
    "ema_decay_at",
    "finished_changes",
    "init_distributed",
    "lr_at",
    "param_groups",
    "read_log",
    "world",
]
