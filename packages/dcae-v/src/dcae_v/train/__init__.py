"""Training DC-AE-V: `dcae-v train --config FILE [section.field=value ...] [--resume]`.

    from dcae_v.train import load_config, train
    result = train(load_config("train.json", ["optim.lr=1e-4"]))

Pieces: config (nested frozen dataclasses), data (PyAV clips, deterministic per step),
losses + discriminator (pixel, LPIPS, 3D StyleGAN2-style GAN with R1), trainer (AdamW, EMA,
DDP/FSDP2 under torchrun, atomic checkpoints with exact resume).
"""

from dcae_v.train.config import ConfigError, TrainConfig, load_config
from dcae_v.train.trainer import (
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    TrainingOOM,
    TrainResult,
    train,
)

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "TrainingInterrupted",
           "TrainingOOM", "load_config", "train"]
