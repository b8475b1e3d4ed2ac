"""DC-AE-V hyper-parameters: one frozen dataclass and a registry of named presets.

The widths/depths lists follow NVIDIA's reference, stage 0 included: the released presets give
stage 0 depth 0, so it has no modules, but keeping it keeps the checkpoint key indices
(`encoder.stages.1...`) identical to the released weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from dcae_v.errors import InputError

TEMPORAL_MODES = ("chunk_causal", "causal", "non_causal")


@dataclass(frozen=True, kw_only=True)
class DCAEVConfig:
    """Architecture of a DC-AE-V (fXtYcZ): 3 x T x H x W  ->  c x T/4 x H/f x W/f.

    Every stage with depth > 0 except the last ends (encoder) / starts (decoder) with a
    resampling block towards the next stage's width; the last of these is the 4x temporal
    one, the others are 2x spatial. `project_in` adds one more 2x spatial step.
    """

    latent_channels: int
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    in_channels: int = 3
    temporal_compression: int = 4
    temporal: str = "chunk_causal"
    chunk_size: int = 40  # frames per chunk at the input frame rate (chunk_causal only)
    scaling_factor: float = 1.0  # z_diffusion = scaling_factor * encode(x)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if self.temporal not in TEMPORAL_MODES:
            raise ValueError(f"temporal must be one of {TEMPORAL_MODES}, got {self.temporal!r}")
        if len(self.widths) != len(self.depths):
            raise ValueError(
                f"widths and depths need one entry per stage, got {len(self.widths)} widths and {len(self.depths)} depths"
            )
        active = self.active_stages
        if len(active) < 2:
            raise ValueError(f"need at least two stages with depth > 0 (one temporal resampling), got depths {self.depths}")
        if active != list(range(active[0], len(self.depths))):
            raise ValueError(f"only leading stages may have depth 0 (as stage 0 in the presets), got depths {self.depths}")
        if self.temporal_compression < 1:
            raise ValueError(f"temporal_compression must be >= 1, got {self.temporal_compression}")
        if self.chunk_size < 1 or self.chunk_size % self.temporal_compression:
            raise ValueError(
                f"chunk_size must be a positive multiple of temporal_compression={self.temporal_compression}, "
                f"got {self.chunk_size}"
            )
        self._check_channels()

    def _check_channels(self) -> None:
        first = self.widths[self.active_stages[0]]
        if first % 4:
            raise ValueError(f"the first active width must be divisible by 4 (2x2 space-to-channel), got {first}")
        for stage in self.active_stages[:-1]:
            cin, cout = self.widths[stage], self.widths[stage + 1]
            factor = self.resample_factors(stage)
            ratio = factor[0] ** 2 * factor[1]
            if cout % ratio or (cin * ratio) % cout:
                raise ValueError(
                    f"stage {stage}: widths {cin} -> {cout} do not fit a x{ratio} resampling with a residual "
                    f"shortcut (need {cout} % {ratio} == 0 and {cin * ratio} % {cout} == 0)"
                )

    # ---- derived facts -------------------------------------------------------------------
    @property
    def active_stages(self) -> list[int]:
        return [i for i, d in enumerate(self.depths) if d > 0]

    @property
    def temporal_stage(self) -> int:
        """Stage whose resampling block is the 4x temporal one (the last resampling)."""
        return self.active_stages[-2]

    def resample_factors(self, stage: int) -> tuple[int, int]:
        """(spatial, temporal) factor of the resampling block attached to `stage`."""
        return (1, self.temporal_compression) if stage == self.temporal_stage else (2, 1)

    @property
    def spatial_compression(self) -> int:
        return 2 ** len(self.active_stages[:-1])  # project_in x2, then x2 per spatial resampling

    @property
    def latent_chunk_size(self) -> int:
        return self.chunk_size // self.temporal_compression

    @property
    def name(self) -> str:
        return f"f{self.spatial_compression}t{self.temporal_compression}c{self.latent_channels}"

    # ---- (de)serialisation -----------------------------------------------------------------
    def replace(self, **overrides: Any) -> DCAEVConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown DCAEVConfig field(s) {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"], d["depths"] = list(self.widths), list(self.depths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DCAEVConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"_class_name", "_library_version", "preset"}
        if unknown:
            raise ValueError(f"config.json has unknown field(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


_F32_WIDTHS = (128, 256, 512, 512, 1024, 1024, 1024)
_F32_DEPTHS = (0, 5, 10, 4, 4, 4, 4)

# Scaling factors: 0.7241 is the one NVIDIA's pipeline uses for f32t4c32. The others come from
# NVIDIA's demo commands; f32t4c256 and f64t4c128 both read 0.4752 there (unverified).
PRESETS: dict[str, DCAEVConfig] = {
    "f32t4c32": DCAEVConfig(latent_channels=32, widths=_F32_WIDTHS, depths=_F32_DEPTHS, scaling_factor=0.7241),
    "f32t4c64": DCAEVConfig(latent_channels=64, widths=_F32_WIDTHS, depths=_F32_DEPTHS, scaling_factor=0.7614),
    "f32t4c128": DCAEVConfig(latent_channels=128, widths=_F32_WIDTHS, depths=_F32_DEPTHS, scaling_factor=0.4457),
    "f32t4c256": DCAEVConfig(latent_channels=256, widths=_F32_WIDTHS, depths=_F32_DEPTHS, scaling_factor=0.4752),
    "f64t4c128": DCAEVConfig(
        latent_channels=128, widths=_F32_WIDTHS + (1024,), depths=_F32_DEPTHS + (4,), scaling_factor=0.4752
    ),
    # Same code at toy size, for tests and for the embedded default's architecture.
    "debug": DCAEVConfig(latent_channels=8, widths=(16, 16, 16, 32, 32, 64, 64), depths=(0, 1, 1, 1, 1, 1, 1)),
    # with the shipped default's runtime fields (chunks of 8 frames, its measured scaling factor),
    # so that a weights-only copy of it loads as it was saved
    "tiny-f32t4c64": DCAEVConfig(
        latent_channels=64, widths=(16, 16, 32, 64, 64, 128, 128), depths=(0, 1, 1, 1, 1, 1, 1), chunk_size=8,
        scaling_factor=0.001269,
    ),
}

# Names under which NVIDIA publishes the same architectures.
ALIASES = {
    f"dc-ae-v-{p}-1.0{s}": p for p in ("f32t4c32", "f32t4c64", "f32t4c128", "f32t4c256", "f64t4c128") for s in ("", "-bf16")
} | {f"dc-ae-v-1.0-{p}{s}": p for p in ("f32t4c32", "f32t4c64", "f32t4c128", "f32t4c256", "f64t4c128") for s in ("", "-bf16")}


def get_preset(name: str, **overrides: Any) -> DCAEVConfig:
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise InputError(f"unknown DC-AE-V preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
