"""Reconstruction metrics as video-autoencoder papers report them: PSNR, SSIM, LPIPS, FVD.

Convention: frames are RGB [T, H, W, 3], uint8 (compared on 0..255) or float (on 0..data_range),
scored per frame and averaged over frames. To follow NVIDIA's protocol, quantise a reconstruction
with `dcae_v.io.to_uint8` first and compare it with the source uint8 frames.

LPIPS and FVD need pretrained weights that this package never downloads: pass local files.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcae_v.errors import InputError

PSNR_CAP_DB = 100.0  # psnr() caps identical frames (inf dB) here so a mean over frames stays finite
_CHUNK_PIXELS = 1 << 22  # pixels per batch of frames: bounds float64 temporaries (~100 MB each) on long videos


# ---- PSNR / SSIM -----------------------------------------------------------------------------
def psnr_per_frame(a, b, data_range: float | None = None) -> torch.Tensor:
    """PSNR in dB of each frame, float64 [T]; inf where the frames are identical."""
    peak, chunks = _pairs(a, b, data_range)
    mse = torch.cat([(x - y).square().mean(dim=(1, 2, 3)) for x, y in chunks])
    return 10 * torch.log10(peak**2 / mse)  # mse == 0 -> inf


def psnr(a, b, data_range: float | None = None) -> float:
    """Mean over frames of the per-frame PSNR, each capped at PSNR_CAP_DB (so identical -> 100 dB)."""
    return float(psnr_per_frame(a, b, data_range).clamp(max=PSNR_CAP_DB).mean())


def ssim_per_frame(a, b, data_range: float | None = None) -> torch.Tensor:
    """SSIM of each frame, float64 [T]: 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03,
    population statistics, valid region only, mean over pixels and channels.

    Equals skimage's structural_similarity(..., channel_axis=-1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False); note skimage's defaults (7x7 uniform window) give other numbers.
    """
    peak, chunks = _pairs(a, b, data_range, min_size=11)
    return torch.cat([_ssim(x, y, peak) for x, y in chunks])


def ssim(a, b, data_range: float | None = None) -> float:
    """Mean over frames of ssim_per_frame."""
    return float(ssim_per_frame(a, b, data_range).mean())


def _ssim(x: torch.Tensor, y: torch.Tensor, peak: float) -> torch.Tensor:
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    n = x.shape[0]
    x, y = x.permute(0, 3, 1, 2).contiguous(), y.permute(0, 3, 1, 2).contiguous()  # [N, C, H, W]
    mx, my = _blur(x), _blur(y)
    vx, vy, cov = _blur(x * x) - mx * mx, _blur(y * y) - my * my, _blur(x * y) - mx * my
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(dim=1)


_GAUSS = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
_GAUSS = _GAUSS / _GAUSS.sum()


def _blur(v: torch.Tensor) -> torch.Tensor:
    """Separable 11-tap Gaussian on [N, C, H, W], 'valid' region only, as 11 shifted multiply-adds
    per axis (float64 conv2d is very slow on CPU)."""
    h, w = v.shape[2] - 10, v.shape[3] - 10
    rows = v[:, :, :h] * _GAUSS[0]
    for k in range(1, 11):
        rows.add_(v[:, :, k : k + h], alpha=float(_GAUSS[k]))
    out = rows[..., :w] * _GAUSS[0]
    for k in range(1, 11):
        out.add_(rows[..., k : k + w], alpha=float(_GAUSS[k]))
    return out


def _frames(v, name: str) -> torch.Tensor:
    x = v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
    if x.ndim != 4 or x.shape[-1] != 3 or 0 in x.shape:
        raise InputError(f"{name}: expected RGB frames [T, H, W, 3] (one image: image[None]), got {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise InputError(f"{name}: expected uint8 or float frames, got {x.dtype}")
    return x


def _pairs(a, b, data_range: float | None, min_size: int = 1) -> tuple[float, Iterator[tuple[Tensor, Tensor]]]:
    """The peak value (255 for uint8, else data_range or 1.0) and float64 chunks of frames of both videos."""
    x, y = _frames(a, "a"), _frames(b, "b")
    if x.shape != y.shape:
        raise InputError(f"videos differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}; crop or resize one first")
    if x.dtype != y.dtype:
        raise InputError(f"videos differ in dtype ({x.dtype} vs {y.dtype}); quantise both with dcae_v.io.to_uint8")
    if x.dtype == torch.uint8:
        if data_range not in (None, 255):
            raise InputError(f"uint8 frames have data_range 255, got data_range={data_range}")
        peak = 255.0
    else:
        peak = 1.0 if data_range is None else float(data_range)
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise InputError("frames contain NaN/Inf values")
    if min(x.shape[1:3]) < min_size:
        raise InputError(f"SSIM needs frames of at least {min_size}x{min_size} pixels, got {tuple(x.shape[1:3])}")
    step = max(1, _CHUNK_PIXELS // (x.shape[1] * x.shape[2]))
    return peak, ((p.double(), q.double()) for p, q in zip(x.split(step), y.split(step)))


# ---- LPIPS -----------------------------------------------------------------------------------
_ALEX = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
_ALEX_INDEX = [0, 3, 6, 8, 10]  # positions of the convs in torchvision's alexnet().features
_LPIPS_FILES = (
    "LPIPS-alex needs two local files: the AlexNet backbone `alexnet-owt-7be5be79.pth` (torchvision's "
    "ImageNet weights, cached by torchvision in $TORCH_HOME/hub/checkpoints/) and the linear heads "
    "`alex.pth` (shipped in the lpips package as lpips/weights/v0.1/alex.pth)"
)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk, in plain torch (no torchvision/lpips dependency).

    Matches `lpips.LPIPS(net="alex")`: scale the [-1, 1] input, take the five ReLU outputs of
    AlexNet's conv stack, unit-normalise each over channels, square the difference, weight the
    channels with the 1x1 heads, average over space and sum the layers.
    """

    def __init__(self):
        super().__init__()
        convs = {str(i): nn.Conv2d(cin, cout, k, s, p) for i, (cin, cout, k, s, p) in zip(_ALEX_INDEX, _ALEX)}
        self.features = nn.ModuleDict(convs)  # keys "0", "3", ... as in torchvision's alexnet().features
        self.heads = nn.ModuleList(nn.Conv2d(c[1], 1, 1, bias=False) for c in _ALEX)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_weights(cls, backbone_path: str | os.PathLike, heads_path: str | os.PathLike) -> LPIPS:
        """Load torchvision's AlexNet state dict (`features.N.*` keys) and lpips' heads (`linK.model.1.weight`)."""
        backbone, heads = _load_state(backbone_path, _LPIPS_FILES), _load_state(heads_path, _LPIPS_FILES)
        # (our key, source dict, source key); the classifier.* keys of the AlexNet file are unused
        plan = [(f"features.{i}.{p}", backbone, f"features.{i}.{p}") for i in _ALEX_INDEX for p in ("weight", "bias")]
        plan += [(f"heads.{k}.weight", heads, f"lin{k}.model.1.weight") for k in range(5)]
        model = cls()
        own = model.state_dict()
        bad = [src for dst, sd, src in plan if not isinstance(sd.get(src), Tensor) or sd[src].shape != own[dst].shape]
        if bad:
            raise InputError(f"LPIPS weights missing or mis-shaped: {bad}. {_LPIPS_FILES}")
        model.load_state_dict({dst: sd[src] for dst, sd, src in plan})
        return model

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] (H, W >= 31) -> distances [N]."""
        if min(x0.shape[-2:]) < 31:
            raise InputError(f"LPIPS-alex needs images of at least 31x31 pixels, got {tuple(x0.shape[-2:])}")
        total = 0
        for f0, f1, head in zip(self._layers(x0), self._layers(x1), self.heads):
            total = total + head((_unit(f0) - _unit(f1)).square()).mean(dim=(1, 2, 3))
        return total

    def per_frame(self, a, b) -> torch.Tensor:
        """LPIPS of each frame pair, float32 [T]; frames as for psnr (uint8, or float in [0, 1])."""
        peak, chunks = _pairs(a, b, None)
        p = next(self.parameters())
        return torch.cat([self(_to_model(x, peak, p), _to_model(y, peak, p)).cpu() for x, y in chunks])

    def mean(self, a, b) -> float:
        return float(self.per_frame(a, b).mean())

    def _layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = (x - self.shift) / self.scale, []
        for i, conv in enumerate(self.features.values()):
            if i in (1, 2):
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(conv(h))
            out.append(h)
        return out


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)


def _to_model(x: torch.Tensor, peak: float, like: torch.Tensor) -> torch.Tensor:
    return (x / peak * 2 - 1).permute(0, 3, 1, 2).to(like)


# ---- FVD -------------------------------------------------------------------------------------
_I3D_FILE = (
    "FVD needs the TorchScript I3D detector `i3d_torchscript.pt` used by StyleGAN-V "
    "(https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt); download it yourself and pass its path"
)


class FVD:
    """Frechet Video Distance with StyleGAN-V's TorchScript I3D (Kinetics-400 logits, 400 per clip).

    Clips go in as StyleGAN-V's metric_utils feeds them: uint8 [B, 3, T, H, W] with rescale=True,
    resize=True, return_features=True, so the detector itself maps to [-1, 1] and resizes to 224.
    (Taken from StyleGAN-V's calling code; the TorchScript internals were not inspected.) Statistics
    use the population covariance, as StyleGAN-V's FeatureStats does. FVD depends on the number,
    length and resolution of the clips: report those with the score.
    """

    def __init__(self, detector: torch.jit.ScriptModule, device: str | torch.device = "cpu"):
        self.detector, self.device = detector, torch.device(device)

    @classmethod
    def from_weights(cls, i3d_torchscript_path: str | os.PathLike, device: str | torch.device = "cpu") -> FVD:
        path = os.fspath(i3d_torchscript_path)
        if not os.path.isfile(path):
            raise InputError(f"I3D detector not found at {path!r}. {_I3D_FILE}")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format this detector ships in
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
                detector = torch.jit.load(path, map_location=device).eval()
        except Exception as e:  # RuntimeError for most non-TorchScript files, others for odd ones
            raise InputError(f"{path!r} is not a TorchScript file ({e}). {_I3D_FILE}") from e
        return cls(detector, device)

    @torch.no_grad()
    def features(self, clips, batch_size: int = 8) -> torch.Tensor:
        """uint8 clips [N, T, H, W, 3] -> float64 features [N, D]."""
        x = clips.detach().cpu() if isinstance(clips, torch.Tensor) else torch.from_numpy(np.asarray(clips))
        if x.ndim != 5 or x.shape[-1] != 3 or x.dtype != torch.uint8 or 0 in x.shape:
            raise InputError(f"expected uint8 clips [N, T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
        out = []
        for batch in x.split(batch_size):
            batch = batch.permute(0, 4, 1, 2, 3).contiguous().to(self.device)
            out.append(self.detector(batch, rescale=True, resize=True, return_features=True).double().cpu())
        return torch.cat(out)

    def distance(self, real_clips, fake_clips) -> float:
        """FVD between two sets of uint8 clips [N, T, H, W, 3] (N >= 2 each; hundreds for a stable score)."""
        return frechet_distance(*feature_stats(self.features(real_clips)), *feature_stats(self.features(fake_clips)))


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population covariance (divide by N) of features [N, D], in float64."""
    f = torch.as_tensor(features).double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise InputError(f"need features [N >= 2, D], got shape {tuple(f.shape)}")
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / f.shape[0]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, without scipy.

    tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is
    symmetric PSD, so two symmetric eigendecompositions suffice (tiny negative eigenvalues from
    rounding are clamped to 0).
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(v).double() for v in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        shapes = [tuple(v.shape) for v in (mu1, mu2, s1, s2)]
        raise InputError(f"shapes do not match: mu1, mu2, sigma1, sigma2 are {shapes}; need [D], [D], [D, D], [D, D]")
    if not all(torch.isfinite(v).all() for v in (mu1, mu2, s1, s2)):
        raise InputError("feature statistics contain NaN/Inf")
    evals, evecs = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    middle = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def _load_state(path: str | os.PathLike, needed: str) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"weights file not found: {path!r}. {needed}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError)
        raise InputError(f"cannot read weights from {path!r} ({type(e).__name__}: {e}). {needed}") from e
    if not isinstance(state, dict):
        raise InputError(f"{path!r} holds a {type(state).__name__}, not a state dict. {needed}")
    return state

