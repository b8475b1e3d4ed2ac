"""The DC-AE-V training loop: reconstruction + perceptual + adversarial losses, EMA, checkpoints.

One optimizer step = `optim.batch_size` clips in all, split over processes (torchrun) and
`optim.grad_accum` micro-steps; sample indices are assigned so that the same global batch is
seen whatever the split (see `dcae_v.train.data`). Per-sample losses are summed and divided by
the global batch size, so 1 process x 2 micro-steps and 2 processes x 1 micro-step compute the
same gradient up to float summation order.

The autoencoder runs plain, under DDP, or sharded with FSDP2 (`fully_shard` per stage). The
discriminator is small and replicated; its gradients are all-reduced by hand, which keeps the R1
double-backward out of DDP. Resume restores weights, both optimizers, EMA, the torch RNG and the
data position (the step), so on CPU the step after a resume is bit-identical to an uninterrupted
run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Self

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dcae_v.errors import DCAEVError
from dcae_v.model import DCAEV
from dcae_v.train import losses
from dcae_v.train.checkpoints import (
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    remove_stale_temps,
    save_state,
)
from dcae_v.train.config import ConfigError, TrainConfig, validate
from dcae_v.train.data import Batch, ClipDataset
from dcae_v.train.discriminator import VideoDiscriminator
from dcae_v.train.logger import MetricsLogger, truncate_metrics

log = logging.getLogger("dcae_v.train")
LAST_LAYER = "decoder.project_out.op_list.2.conv.conv.weight"


class TrainingDiverged(DCAEVError):
    """The loss became NaN/Inf; the last good checkpoint is kept and named in the message."""


class TrainingOOM(DCAEVError):
    """A step ran out of memory; the message says which sizes to reduce."""


class TrainingInterrupted(DCAEVError):
    """SIGINT/SIGTERM: the run finished its current step, saved a checkpoint and stopped."""

    def __init__(self, message: str, signum: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    exports: list[Path] = field(default_factory=list)


class Autoencode(nn.Module):
    """x -> decoder(encoder(x)) for a list of clip groups (one forward per step keeps DDP happy
    with mixed image/video batches); optional gradient checkpointing per stage."""

    def __init__(self, ae: DCAEV, checkpointing: bool = False):
        super().__init__()
        self.ae, self.checkpointing = ae, checkpointing

    def forward(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._one(x) for x in groups]

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        enc, dec = self.ae.encoder, self.ae.decoder
        if not self.checkpointing:
            return dec(enc(x))
        run = partial(checkpoint, use_reentrant=False)
        for part in [enc.project_in, *enc.stages, enc.project_out, dec.project_in, *reversed(dec.stages), dec.project_out]:
            x = run(part, x)
        return x


# ---- distributed ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            # NCCL for CUDA tensors, gloo for the small CPU ones (loss/NaN/stop flags): NCCL alone
            # cannot reduce a CPU tensor
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(local)
            dist.init_process_group(backend)
        return cls(rank, world, local)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _device(cfg: TrainConfig, d: Dist) -> torch.device:
    name = cfg.run.device
    if name == "auto":
        name = f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but torch sees no CUDA device; use run.device=cpu")
    return torch.device(name)


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`: the loop finishes its step, saves and
    stops (as a spent `run.max_minutes` does). A second signal aborts at once (KeyboardInterrupt),
    keeping only the last checkpoint. Handlers can only be set from the main thread; elsewhere
    this does nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: saving a checkpoint after this step, then stopping (send it again to stop "
                    "at once without saving)", signal.Signals(signum).name)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- trainer --------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, d: Dist | None = None):
        self.d = d or Dist.from_env()
        self.cfg = cfg = validate(cfg, self.d.world)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.out = Path(cfg.run.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.data = ClipDataset(cfg.data, cfg.run.seed)
        self.data.check_batch(cfg.optim.batch_size)  # before any model is built
        self.device = _device(cfg, self.d)
        self.mode = cfg.run.parallel if cfg.run.parallel != "auto" else ("ddp" if self.d.world > 1 else "none")
        if self.d.world == 1:
            self.mode = "none"
        self.micro = cfg.optim.batch_size // (self.d.world * cfg.optim.grad_accum)
        self.step = 0
        self.elapsed = 0.0
        self.window: list[dict[str, float]] = []  # per-step stats since the last logged row
        self._build()

    # ---- construction --------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        arch = cfg.model.build_config()
        if cfg.model.init:
            from dcae_v.checkpoint import load_dcaev

            ae = load_dcaev(cfg.model.init, temporal=arch.temporal, chunk_size=arch.chunk_size).float()
            got, want = (ae.config.latent_channels, ae.config.widths, ae.config.depths), (arch.latent_channels, arch.widths, arch.depths)
            if got != want:
                from dcae_v.config import PRESETS

                fits = [n for n, c in PRESETS.items() if (c.latent_channels, c.widths, c.depths) == got]
                hint = f"set model.preset={fits[0]}" if fits else "set model.preset (and widths) to its architecture"
                raise ConfigError(f"model.init {cfg.model.init} has widths {ae.config.widths} and "
                                  f"{ae.config.latent_channels} latent channels, the config asks for {arch.name} with "
                                  f"widths {arch.widths}; {hint}")
        else:
            ae = DCAEV(arch)
        self.ae = ae.to(self.device).train()
        self.net: nn.Module = Autoencode(self.ae, cfg.run.grad_checkpointing)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for stage in [*self.ae.encoder.stages, *self.ae.decoder.stages]:
                if any(True for _ in stage.parameters()):
                    fully_shard(stage)
            fully_shard(self.net)
            self.wrapped = self.net
        elif self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.net, device_ids=ids)
        else:
            self.wrapped = self.net
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.ema = {n: p.detach().clone() for n, p in self.ae.named_parameters()} if cfg.ema.decay else None
        self.disc = self.opt_d = None
        if cfg.gan.weight > 0:
            g = cfg.gan
            torch.manual_seed(cfg.run.seed + 1)
            self.disc = VideoDiscriminator(cfg.data.size, g.channels, g.max_channels, g.mbstd_group).to(self.device)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=g.lr, betas=g.betas)
        self.perceptual = None
        if cfg.loss.lpips > 0:
            self.perceptual = losses.PerceptualLoss(cfg.loss.lpips_backbone, cfg.loss.lpips_heads).to(self.device)

    # ---- one optimizer step --------------------------------------------------------------
    def rank_batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of global step `step` (indices rank*accum*micro onwards)."""
        accum = self.cfg.optim.grad_accum
        firsts = [(self.d.rank * accum + a) * self.micro for a in range(accum)]
        return [self.data.batch(step, range(f, f + self.micro)) for f in firsts]

    def train_step(self, step: int, batches: list[Batch] | None = None) -> dict[str, float]:
        """One optimizer step (AE, then discriminator); `batches` from rank_batches(step) if prefetched."""
        cfg, B = self.cfg, self.cfg.optim.batch_size
        batches = self.rank_batches(step) if batches is None else batches
        for group in self.opt.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, cfg)
        gan_on = self.disc is not None and step >= cfg.gan.start_step
        sums = torch.zeros(6, dtype=torch.float64)  # total, rec, perceptual, adv, gan_weight, d_loss
        pairs = []
        self.opt.zero_grad(set_to_none=True)
        if self.disc is not None:
            self.disc.requires_grad_(False)
        for a, batch in enumerate(batches):
            batch = batch.to(self.device)
            with self._sync(a == cfg.optim.grad_accum - 1):
                targets, live = self._targets(batch)
                with self._autocast():
                    outputs = self.wrapped(targets)
                    per_sample, parts = self._ae_loss(step, targets, outputs, gan_on, live)
                loss = per_sample.sum() * (self.d.world / B)
                self._check_finite(step, per_sample)
                loss.backward()
            sums[:5] += torch.tensor([per_sample.sum().item(), *parts], dtype=torch.float64)
            pairs += [(x, y.detach()) for x, y, here in zip(targets, outputs, live) if here]
        grad_norm = self._clip(self.net.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        self._update_ema(step)
        if gan_on:
            sums[5] = self._disc_step(step, pairs)
        sums[4] *= B / max(1, cfg.optim.grad_accum * self.d.world)  # gan_weight was summed per micro-step
        stats = self.d.all_sum(sums) / B
        names = ("loss", "rec", "perceptual", "adv", "gan_weight", "d_loss")
        out = dict(zip(names, stats.tolist()))
        out |= {"lr": self.opt.param_groups[0]["lr"], "grad_norm": grad_norm, "skipped_files": self.data.skipped}
        return out

    def _targets(self, batch: Batch) -> tuple[list[torch.Tensor], list[bool]]:
        """Clip groups to reconstruct (images as still clips of 4 frames) and whether each is real.

        Under FSDP every rank must run the same forwards (each one all-gathers weights), so a rank
        whose micro-batch lacks images or videos that another rank has runs one zero-weight dummy clip.
        """
        groups = [batch.video, batch.image]
        needed = [x is not None for x in groups]
        if self.mode == "fsdp":
            needed = [bool(v) for v in self.d.all_sum(torch.tensor([float(n) for n in needed])).tolist()]
        targets, live = [], []
        for x, frames, need in zip(groups, (self.cfg.data.frames, 1), needed):
            if x is None and need:
                x = torch.zeros(1, 3, frames, self.cfg.data.size, self.cfg.data.size, device=self.device)
                live.append(False)
            elif x is not None:
                live.append(True)
            else:
                continue
            targets.append(x if x.shape[2] > 1 else x.expand(-1, -1, self.ae.temporal_compression, -1, -1))
        return targets, live

    def _sync(self, last_micro: bool):
        """Gradient all-reduce only on the last accumulation micro-step."""
        if self.mode == "ddp" and not last_micro:
            return self.wrapped.no_sync()
        if self.mode == "fsdp":
            self.net.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def _autocast(self):
        enabled = self.cfg.run.autocast == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _ae_loss(self, step, targets, outputs, gan_on, live) -> tuple[torch.Tensor, list[float]]:
        lc, g = self.cfg.loss, self.cfg.gan
        keep = torch.cat([torch.full((x.shape[0],), float(h), device=x.device) for x, h in zip(targets, live)])
        rec = keep * torch.cat([losses.pixel_loss(y, x, lc.l1, lc.mse) for x, y in zip(targets, outputs)])
        perc = torch.zeros_like(rec)
        if self.perceptual is not None:
            perc = keep * lc.lpips * torch.cat([self.perceptual(y, x) for x, y in zip(targets, outputs)])
        total, adv_sum, weight = rec + perc, 0.0, 0.0
        if gan_on:
            adv = keep * torch.cat([losses.g_loss(self.disc(y), g.loss) for y in outputs]).float()
            if g.weight_mode == "adaptive":
                w = g.weight * losses.adaptive_weight(total.sum(), adv.sum(), self.ae.get_parameter(LAST_LAYER), g.adaptive_max)
            else:
                w = losses.scheduled_weight(step, g.weight, g.start_step, g.ramp_steps)
            total = total + w * adv
            adv_sum, weight = adv.sum().item(), float(w)
        return total, [rec.sum().item(), perc.sum().item(), adv_sum, weight]

    def _check_finite(self, step: int, per_sample: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(per_sample).all() else 1.0])
        if self.d.all_sum(bad).item() > 0:
            last = load_latest_path(self.ckpt_dir)
            raise TrainingDiverged(
                f"non-finite loss at step {step + 1} (loss values {per_sample.detach().tolist()[:4]}); stopped without "
                f"saving. Last good checkpoint: {last or 'none yet'}. Lower optim.lr, keep optim.grad_clip > 0, "
                f"or check the data; resume with --resume"
            )

    @staticmethod
    def _clip(params, max_norm: float) -> float:
        params = [p for p in params if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(norm)

    def _update_ema(self, step: int) -> None:
        e = self.cfg.ema
        if self.ema is None:
            return
        n = step - e.start_step + 1
        decay = 0.0 if n <= 0 else min(e.decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for name, p in self.ae.named_parameters():
                self.ema[name].lerp_(p.detach(), 1 - decay)

    def _disc_step(self, step: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        g, B = self.cfg.gan, self.cfg.optim.batch_size
        self.disc.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        do_r1 = g.r1_gamma > 0 and (step - g.start_step) % g.r1_every == 0
        total = 0.0
        for real, fake in pairs:
            with self._autocast():
                per = losses.d_loss(self.disc(real).float(), self.disc(fake).float(), g.loss)
            if do_r1:
                per = per + (g.r1_gamma / 2 * g.r1_every) * losses.r1_penalty(self.disc, real).float()
            (per.sum() / B).backward()
            total += per.sum().item()
        if self.d.world > 1:
            for p in self.disc.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        self.opt_d.step()
        return total

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) state on CPU; collective under FSDP, so every rank calls it."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_state_dict,
            )

            model_sd, optim_sd = get_state_dict(self.net, self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            model_sd, optim_sd = self.net.state_dict(), self.opt.state_dict()
        state = {
            "step": self.step, "elapsed": self.elapsed, "world_size": self.d.world,
            "model": {k.removeprefix("ae."): _full(v) for k, v in model_sd.items()},
            "optimizer": optim_sd, "config": self.cfg.to_dict(),
            "ema": {k: _full(v) for k, v in self.ema.items()} if self.ema is not None else None,
            "rng": {"torch": torch.get_rng_state()},
            "data": {"skipped": self.data.skipped, "bad": dict(self.data.bad)},
            "log_window": [dict(w) for w in self.window],  # so the first row after a resume is the same mean
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        if self.disc is not None:
            state["disc"], state["disc_optimizer"] = self.disc.state_dict(), self.opt_d.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"]["model"] != self.cfg.to_dict()["model"]:
            raise ConfigError(
                f"the checkpoint was trained with model {state['config']['model']}, the config asks for "
                f"{self.cfg.to_dict()['model']}; use the same model section (or a new run.out_dir)"
            )
        model_sd = {f"ae.{k}": v for k, v in state["model"].items()}
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_state_dict,
            )

            set_state_dict(self.net, self.opt, model_state_dict=model_sd, optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            self.net.load_state_dict(model_sd)
            self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            with torch.no_grad():
                for name, t in self.ema.items():
                    _assign(t, state["ema"][name])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["disc_optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.data.bad = dict(state["data"]["bad"])
        self.window = [dict(w) for w in state.get("log_window", [])]
        self.step, self.elapsed = state["step"], state["elapsed"]

    def save(self) -> Path | None:
        state = self.state_dict()
        path = None
        if self.d.main:
            path = save_state(self.ckpt_dir, self.step, state, self.cfg.checkpoint.keep_last)
            log.info("saved %s", path)
        self.d.barrier()
        return path

    def resume(self, checkpoint: str | os.PathLike | None = None) -> bool:
        """Load the newest checkpoint of the run, or `checkpoint` (a step_N.pt). Checkpoints of the
        run newer than the one resumed are renamed `*.superseded` (kept, no longer "newest"): the
        run continues from the chosen step and writes its own."""
        if checkpoint is None:
            found = load_latest(self.ckpt_dir)
            if found is None:
                log.warning("resume: no checkpoint in %s; starting from step 0", self.ckpt_dir)
                return False
        else:
            found = load_checkpoint(Path(checkpoint))
        state, path = found
        if checkpoint is not None and self.d.main:
            newer = [p for p in list_checkpoints(self.ckpt_dir) if checkpoint_step(p) > int(state["step"])]
            for p in newer:
                p.rename(p.with_name(p.name + ".superseded"))
            if newer:
                log.warning("resume from %s: set aside the newer %s", path, ", ".join(p.name + ".superseded" for p in newer))
        self.load_state_dict(state)
        log.info("resumed from %s at step %d", path, self.step)
        changes = config_changes(state["config"], self.cfg.to_dict())
        if changes and self.d.main:  # allowed (e.g. optim.max_steps to extend a run), but never silent
            log.warning("resume: the config differs from the checkpoint's: %s", ", ".join(changes))
        return True

    def export(self) -> list[Path]:
        """EMA weights (or the raw ones without EMA) as NVIDIA .pt and as a save_pretrained directory."""
        from dcae_v.checkpoint import save_nvidia_checkpoint

        state = self.state_dict()
        if not self.d.main:
            self.d.barrier()
            return []
        ema = state["ema"] or state["model"]
        final = DCAEV(self.ae.config)
        final.load_state_dict(ema)
        final = DCAEV(self.ae.config.replace(scaling_factor=self._scaling_factor(final)))
        final.load_state_dict(ema)
        out_dir = self.out / "export"
        pt = out_dir / f"dcae-v-{self.ae.config.name}-step{self.step}.pt"
        save_nvidia_checkpoint(pt, state["model"], ema, ema_decay=self.cfg.ema.decay or 0.0, config=final.config)
        final.save_pretrained(out_dir / "ema")
        self.d.barrier()
        return [pt, out_dir / "ema"]

    @torch.no_grad()
    def _scaling_factor(self, model: DCAEV, batches: int = 2) -> float:
        """1 / RMS of the latents of a few training clips (4 significant digits), as NVIDIA's factors
        are: the diffusion model then sees unit-variance latents."""
        model = model.to(self.device).eval()
        z = [model.encode(x) for k in range(batches)
             for x in self.data.batch(self.cfg.optim.max_steps + k, range(self.micro)).to(self.device).groups()]
        rms = torch.cat([v.flatten() for v in z]).float().square().mean().sqrt()
        factor = float(f"{1 / max(float(rms), 1e-12):.4g}")
        log.info("scaling_factor = 1 / RMS(latent) = %s", factor)
        return factor

    # ---- loop ----------------------------------------------------------------------------
    def fit(self, resume: bool | str | os.PathLike = False) -> TrainResult:
        """resume: False, True / "latest" (the newest checkpoint of the run) or a checkpoint path."""
        cfg = self.cfg
        chosen = None if resume in (True, "latest") else resume
        if self.d.world > 1 and chosen:
            self.d.barrier()  # rank 0 renames the newer checkpoints while the others wait
        resumed = bool(resume) and self.resume(chosen or None)
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.ckpt_dir, self.out / "export", self.out / "export" / "ema")
            # rows after the checkpoint will be logged again; from step 0 (a new run, or one killed
            # before its first checkpoint) every old row goes
            truncate_metrics(self.out, self.step)
            (self.out / "config.txt").write_text(str(cfg) + "\n")
            # the same config as a file `dcae-v train --config` reads back (config.txt is for reading)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if resumed and self.window and self.d.main:
            log.info("resume: the first metrics row also averages the %d step(s) before the checkpoint", len(self.window))
        logger = MetricsLogger(self.out, ["loss", "rec", "perceptual", "adv", "gan_weight", "d_loss", "lr", "grad_norm",
                                          "skipped_files", "sec_per_step"], cfg.run.tensorboard, enabled=self.d.main)
        result = TrainResult(self.step, self.out)
        with StopSignals() as signals:
            last_saved, saved_at = self._loop(result, logger, signals)
            if saved_at != self.step:  # the same decision on every rank (save is collective)
                last_saved = self.save()
            interrupted = self._any_rank(signals.received is not None)  # also during that save: no export
        result.step, result.checkpoint = self.step, last_saved
        if interrupted:  # a rank that got no signal itself (another one did) exits as if terminated
            signum = signals.received or signal.SIGTERM
            name = signal.Signals(signum).name if signals.received else "a signal to another process"
            raise TrainingInterrupted(
                f"stopped by {name} at step {self.step} of {cfg.optim.max_steps}; saved {last_saved}. Continue "
                f"with the same command and --resume", signum, last_saved)
        if cfg.checkpoint.export:
            result.exports = self.export()
        return result

    def _loop(self, result: TrainResult, logger: MetricsLogger, signals: StopSignals) -> tuple[Path | None, int]:
        cfg = self.cfg
        bar = _progress(cfg, self.d, self.step)
        start, saved_at, last_saved = time.time() - self.elapsed, -1, None
        # one background thread decodes the next step's clips while this step computes (PyAV
        # releases the GIL); it is the only user of the dataset, so batches stay deterministic
        pool = ThreadPoolExecutor(1, thread_name_prefix="dcae-v-data") if cfg.data.prefetch else None
        ahead = pool.submit(self.rank_batches, self.step) if pool else None
        try:
            while self.step < cfg.optim.max_steps:
                if self._any_rank(signals.received is not None):
                    break
                if cfg.run.max_minutes is not None and self._any_rank(time.time() - start > cfg.run.max_minutes * 60):
                    log.info("time budget of %.1f min spent at step %d", cfg.run.max_minutes, self.step)
                    break
                t0 = time.time()
                batches = ahead.result() if ahead else None
                if pool and self.step + 1 < cfg.optim.max_steps:
                    ahead = pool.submit(self.rank_batches, self.step + 1)
                stats = self._guarded_step(self.step, batches)
                self.step += 1
                self.elapsed = time.time() - start
                stats["sec_per_step"] = time.time() - t0
                result.history.append(stats)
                self.window.append(stats)
                if self.step % cfg.run.log_every == 0 or self.step == cfg.optim.max_steps:
                    logger.write(self.step, _window_mean(self.window))
                    self.window.clear()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}")
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    last_saved, saved_at = self.save(), self.step
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
            logger.close()
            if bar is not None:
                bar.close()
        return last_saved, saved_at

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on one, so all ranks stop at the same step."""
        if self.d.world == 1:
            return flag
        return self.d.all_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0

    def _guarded_step(self, step: int, batches: list[Batch] | None) -> dict[str, float]:
        try:
            return self.train_step(step, batches)
        except torch.OutOfMemoryError:
            d = self.cfg.data
            raise TrainingOOM(
                f"out of memory at step {step + 1} with micro-batches of {self.micro} clip(s) x {d.frames} frames x "
                f"{d.size}x{d.size} px per process: raise optim.grad_accum (now {self.cfg.optim.grad_accum}) or lower "
                f"optim.batch_size ({self.cfg.optim.batch_size}), data.frames or data.size; run.grad_checkpointing=true "
                f"and run.autocast=bf16 also save memory"
            ) from None


def _window_mean(window: list[dict[str, float]]) -> dict[str, float]:
    """Means over the logging window; counters and the LR as of its last step."""
    last = {"lr", "skipped_files"}
    return {k: window[-1][k] if k in last else sum(w[k] for w in window) / len(window) for k in window[-1]}


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().cpu().clone()


def _assign(dst: torch.Tensor, src: torch.Tensor) -> None:
    if hasattr(dst, "device_mesh"):  # a sharded DTensor: take this rank's shard of the full tensor
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements)
    dst.copy_(src)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'section.field old -> new' for every field that differs (tuples and lists compare equal)."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v

    return [f"{section}.{name} {norm(old_value)!r} -> {norm(new[section][name])!r}"
            for section, fields in old.items() if isinstance(fields, dict) and section in new
            for name, old_value in fields.items()
            if name in new[section] and norm(old_value) != norm(new[section][name])]


def load_latest_path(directory: Path) -> Path | None:
    from dcae_v.train.checkpoints import list_checkpoints

    found = list_checkpoints(directory)
    return found[-1] if found else None


def _progress(cfg: TrainConfig, d: Dist, initial: int):
    if not (cfg.run.progress and d.main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.optim.max_steps, initial=initial, desc="dcae-v train", dynamic_ncols=True)


def train(cfg: TrainConfig, resume: bool | str | os.PathLike = False) -> TrainResult:
    """Train (or with resume=True / "latest" / a step_N.pt path continue) a DC-AE-V as `cfg` says;
    returns the history and files.
    Under torchrun, the process group this call creates is closed at the end, all ranks together
    (gloo can abort a process that exits while a peer still holds the connections)."""
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    result = Trainer(cfg).fit(resume)
    if owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result
