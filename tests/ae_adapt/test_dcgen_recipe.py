"""What NVIDIA's DC-Gen training code fixes and the paper leaves open, each checked against a
closed form or a naive loop: the training noise-level grid and its loss weights, text dropout,
the embedder-alignment losses, AdamW without decay on norms/biases, the warm-up start, and the
null-prompt entry of the latent cache."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ae_adapt import PresetError, build_cache, get_preset, run_all
from ae_adapt.cache import LatentCache
from ae_adapt.flow import dcgen_grid, diffusion_loss, sample_dcgen
from ae_adapt.stages import PRESETS, EmbedderAlign, EmbedderAlignTask, align_loss
from ae_adapt.trainer import CHECKPOINT, TrainConfig, Trainer, lr_at


# ---- noise levels ------------------------------------------------------------------------------
def _grid_reference(shift: float, steps: int) -> tuple[list[float], list[float]]:
    """DC-Gen FlowMatchScheduler(sigma_min=0, extra_one_step=True), in plain Python."""
    raw = [1 - k / steps for k in range(steps)]  # linspace(1, 0, steps + 1)[:-1]
    sig = [shift * s / (1 + (shift - 1) * s) for s in raw]
    bump = [math.exp(-2 * ((1000 * s - 500) / 1000) ** 2) for s in sig]
    low = min(bump)
    total = sum(b - low for b in bump)
    return sig, [(b - low) * steps / total for b in bump]


@pytest.mark.parametrize("shift,steps", [(5.0, 50), (3.0, 8)])
def test_dcgen_grid_is_the_shifted_linspace_with_the_gaussian_weights(shift, steps):
    sigmas, weights = dcgen_grid(shift, steps)
    ref_s, ref_w = _grid_reference(shift, steps)
    torch.testing.assert_close(sigmas, torch.tensor(ref_s), rtol=0, atol=1e-6)
    torch.testing.assert_close(weights, torch.tensor(ref_w), rtol=1e-5, atol=1e-6)
    assert float(weights.mean()) == pytest.approx(1.0, abs=1e-6)
    assert float(weights[0]) == 0.0  # sigma = 1 (t = 1000) is the farthest from t = 500


def test_dcgen_sampling_takes_the_grid_point_nearest_an_integer_timestep():
    sigma, t, w = sample_dcgen(256, torch.Generator().manual_seed(7), shift=5.0, steps=50)
    draws = torch.randint(0, 1000, (256,), generator=torch.Generator().manual_seed(7)).tolist()
    ref_s, ref_w = _grid_reference(5.0, 50)
    for i, ti in enumerate(draws):
        k = min(range(50), key=lambda j: (abs(1000 * ref_s[j] - ti), j))
        assert float(t[i]) == ti
        assert float(sigma[i]) == pytest.approx(ref_s[k], abs=1e-6)
        assert float(w[i]) == pytest.approx(ref_w[k], rel=1e-5, abs=1e-6)
    # the noise level is t/1000 snapped to the grid: uniform in t, not shifted towards noise
    assert abs(float(sigma.mean()) - 0.5) < 0.06


class _Recorder:
    """A stand-in DiT: tokens are the input itself, the prediction is 0, t is recorded."""

    def __init__(self, timestep_scale: float = 1000.0):
        self.scale, self.seen = timestep_scale, {}

    def patch_embed(self, x):
        self.seen["x_t"] = x
        return x.flatten(1)[:, :, None], tuple(x.shape[2:])

    def forward_from_embeddings(self, tokens, grid, t, **cond):
        self.seen["t"], self.seen["cond"] = t, cond
        return torch.zeros(tokens.shape[0], 2, *grid)

    def flow_target(self, x0, noise):
        return noise - x0

    def flow_timestep(self, sigma):
        return sigma * self.scale


def test_dcgen_loss_feeds_the_raw_timestep_and_weights_each_sample():
    x0 = torch.randn(6, 2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    model = _Recorder()
    loss = diffusion_loss(model, x0, torch.Generator().manual_seed(3), timesteps="dcgen", shift=5.0, grid_steps=50)
    g = torch.Generator().manual_seed(3)  # the documented draw order: noise, then t
    noise = torch.randn(x0.shape, generator=g)
    draws = torch.randint(0, 1000, (6,), generator=g).tolist()
    ref_s, ref_w = _grid_reference(5.0, 50)
    expected, x_t = 0.0, []
    for i, ti in enumerate(draws):
        k = min(range(50), key=lambda j: (abs(1000 * ref_s[j] - ti), j))
        x_t.append((1 - ref_s[k]) * x0[i] + ref_s[k] * noise[i])
        expected += ref_w[k] * float(((noise[i] - x0[i]) ** 2).mean()) / 6  # prediction 0
    assert model.seen["t"].tolist() == [float(t) for t in draws]  # t itself, not 1000 * grid sigma
    torch.testing.assert_close(model.seen["x_t"], torch.stack(x_t), rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_uniform_sampling_is_unchanged_by_the_new_options():
    x0 = torch.randn(4, 2, 1, 2, 2)
    a = diffusion_loss(_Recorder(), x0, torch.Generator().manual_seed(5), shift=3.0)
    b = diffusion_loss(_Recorder(), x0, torch.Generator().manual_seed(5), shift=3.0, cond_dropout=0.0, grid_steps=9)
    assert float(a) == float(b)


def test_cond_dropout_replaces_whole_samples_by_the_null_conditioning():
    x0 = torch.zeros(200, 2, 1, 1, 1)
    ctx, clip = torch.randn(200, 3, 4), torch.randn(200, 5)
    null = {"context": torch.full((3, 4), 7.0)}
    model = _Recorder()
    diffusion_loss(
        model, x0, torch.Generator().manual_seed(0), cond_dropout=0.5, null_cond=null, context=ctx, clip_fea=clip
    )
    seen = model.seen["cond"]
    dropped = (seen["context"] == 7.0).all(dim=(1, 2))
    kept = (seen["context"] == ctx).all(dim=(1, 2))
    assert bool((dropped ^ kept).all())  # every sample is either fully dropped or untouched
    assert 60 < int(dropped.sum()) < 140
    assert torch.equal(seen["clip_fea"], clip)  # only the entries named in null_cond are dropped
    diffusion_loss(model, x0, torch.Generator().manual_seed(0), cond_dropout=0.9999, null_cond=null, context=ctx)
    assert bool((model.seen["cond"]["context"] == 7.0).all())
    with pytest.raises(ValueError, match="needs null_cond"):
        diffusion_loss(model, x0, torch.Generator().manual_seed(0), cond_dropout=0.1, context=ctx)


# ---- embedder alignment ------------------------------------------------------------------------
def _tokens(m: torch.Tensor) -> torch.Tensor:
    """[B, D, *grid] map -> [B, L, D] tokens in row-major order."""
    return m.flatten(2).transpose(1, 2)


def _interp_1d_x2(n: int) -> list[list[tuple[int, float]]]:
    """Linear upsampling by 2 (align_corners=False): output i reads input (i + 0.5)/2 - 0.5."""
    rows = []
    for i in range(2 * n):
        src = max((i + 0.5) / 2 - 0.5, 0.0)
        lo = min(math.floor(src), n - 1)
        hi = min(lo + 1, n - 1)
        frac = src - lo
        rows.append([(lo, 1 - frac), (hi, frac)])
    return rows


def test_alignment_losses_match_naive_loops():
    g = torch.Generator().manual_seed(0)
    eb, en = torch.randn(2, 3, 4, 4, 6, generator=g), torch.randn(2, 3, 2, 2, 3, generator=g)  # [B, D, f, h, w]
    tb, tn = _tokens(eb), _tokens(en)
    # frames 4 -> 2 by pairs, then 2x2 spatial blocks
    eb_t = (eb[:, :, 0::2] + eb[:, :, 1::2]) / 2
    down = torch.zeros_like(en)
    near = torch.zeros(2, 3, 2, 4, 6)
    lin = torch.zeros(2, 3, 2, 4, 6)
    rows_h, rows_w = _interp_1d_x2(2), _interp_1d_x2(3)
    for f in range(2):
        for i in range(2):
            for j in range(3):
                down[:, :, f, i, j] = eb_t[:, :, f, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(-2, -1))
        for i in range(4):
            for j in range(6):
                near[:, :, f, i, j] = en[:, :, f, i // 2, j // 2]
                lin[:, :, f, i, j] = sum(wh * ww * en[:, :, f, hi, wj] for hi, wh in rows_h[i] for wj, ww in rows_w[j])
    expect = {
        "downsample": ((en - down) ** 2).mean(),
        "upsample-nearest": ((eb_t - near) ** 2).mean(),
        "upsample-trilinear": ((eb_t - lin) ** 2).mean(),
        "avgpool": ((eb_t.mean(dim=(-2, -1)) - en.mean(dim=(-2, -1))) ** 2).mean(),
    }
    for name, value in expect.items():
        loss, _, mode = name.partition("-")
        align = EmbedderAlign(loss=loss, upsample_mode=mode or "trilinear")
        got = align_loss(tb, (4, 4, 6), tn, (2, 2, 3), align)
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=name)
    mixed = align_loss(tb, (4, 4, 6), tn, (2, 2, 3), EmbedderAlign(loss="mixed", upsample_mode="trilinear"))
    torch.testing.assert_close(mixed, expect["downsample"] + expect["upsample-trilinear"] + expect["avgpool"])
    # a new grid finer than the base one pools the new tokens instead (DC-Gen handles both ways)
    swapped = align_loss(tn, (2, 2, 3), tb, (4, 4, 6), EmbedderAlign())
    torch.testing.assert_close(swapped, expect["downsample"], rtol=1e-5, atol=1e-6)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])


class _Student(torch.nn.Module):
    def patch_embed(self, x):
        return _Identity()(x)


def test_base_frames_are_replicate_padded_and_trimmed_before_the_base_embedder():
    base = torch.randn(1, 2, 3, 2, 2)
    new = torch.randn(1, 2, 2, 2, 2)
    task = EmbedderAlignTask(_Student(), _Identity(), EmbedderAlign(base_left_pad=1))
    padded = torch.cat([base[:, :, :1], base], dim=2)  # f0 f0 f1 f2 -> pairs (f0, f0), (f1, f2)
    ref = (padded[:, :, 0::2] + padded[:, :, 1::2]) / 2
    torch.testing.assert_close(task({"base": base, "new": new}), ((new - ref) ** 2).mean())
    trim = EmbedderAlignTask(_Student(), _Identity(), EmbedderAlign(base_right_trim=1))
    torch.testing.assert_close(trim({"base": base, "new": new}), ((new - base[:, :, :2]) ** 2).mean())
    with pytest.raises(PresetError, match="one of"):
        EmbedderAlign(loss="cosine")


# ---- optimisation ------------------------------------------------------------------------------
def test_warmup_starts_at_warmup_start_lr():
    cfg = TrainConfig(lr=1.0, steps=10, batch_size=1, warmup_steps=4, warmup_start_lr=0.2)
    assert [round(lr_at(cfg, s), 12) for s in range(6)] == [0.4, 0.6, 0.8, 1.0, 1.0, 1.0]


class _ZeroGradTask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, batch, generator):
        params = torch.cat([p.flatten() for p in self.parameters()])
        return (params * 0).sum() + batch["x"].sum() * 0


def test_no_decay_keys_keep_norm_weights_and_biases_out_of_weight_decay(tmp_path):
    task = _ZeroGradTask()
    before = {k: v.detach().clone() for k, v in task.named_parameters()}
    cfg = TrainConfig(
        lr=0.1, steps=1, batch_size=1, weight_decay=0.5, no_decay_keys=("norm.weight", "bias"), progress=False
    )
    Trainer(task, [{"x": torch.ones(1)}], cfg, tmp_path, stage="t").fit()
    # zero gradients: AdamW's step is the decoupled decay alone, p <- p (1 - lr wd)
    after = dict(task.named_parameters())
    torch.testing.assert_close(after["proj.weight"], before["proj.weight"] * (1 - 0.1 * 0.5))
    for name in ("proj.bias", "norm.weight", "norm.bias"):
        assert torch.equal(after[name], before[name]), name


def test_checkpoints_written_before_the_new_fields_still_resume(tmp_path):
    cfg = TrainConfig(lr=0.1, steps=2, batch_size=1, progress=False)
    Trainer(_ZeroGradTask(), [{"x": torch.ones(1)}], cfg, tmp_path, stage="t").fit(stop_at=1)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    for key in ("warmup_start_lr", "no_decay_keys", "ema_decay"):
        del state["config"][key]
    torch.save(state, tmp_path / CHECKPOINT)
    assert Trainer(_ZeroGradTask(), [{"x": torch.ones(1)}], cfg, tmp_path, stage="t").fit().step == 2


# ---- presets, cache, run_all -------------------------------------------------------------------
def test_wan_presets_follow_the_dcgen_wan_trainer():
    for name in ("wan-1.3B", "wan-14B"):
        p = PRESETS[name]
        assert (p.timesteps, p.flow_shift, p.timestep_grid, p.cond_dropout) == ("dcgen", 5.0, 50, 0.1)
        assert p.embedder.no_decay_keys == p.head.no_decay_keys == p.lora.no_decay_keys == ("norm.weight", "bias")
        assert (p.lora.warmup_start_lr, p.lora.warmup_steps) == (6.4e-6, 1_000)
        assert p.embedder_align == EmbedderAlign(loss="downsample")  # the paper's eq. 2
    debug = get_preset("debug")
    assert (debug.timesteps, debug.cond_dropout) == ("uniform", 0.0)
    assert get_preset("wan-14B", embedder_align={"loss": "upsample"}).embedder_align.loss == "upsample"


def _text_cache(directory, prompts, enc) -> LatentCache:
    """A latent cache of empty clips whose prompts (and null prompt "null") embed as `enc` says."""
    clips = [{"video": torch.zeros(1), "prompt": p} for p in prompts]
    build_cache(
        clips,
        directory,
        base_encode=lambda v: torch.zeros(2, 1, 2, 2),
        new_encode=lambda v: torch.zeros(2, 1, 1, 1),
        text_encode=lambda p: enc[p],
        base_ae="x",
        new_ae="y",
        null_prompt="null",
    )
    return LatentCache(directory)


def test_cache_stores_the_null_prompt_padded_like_the_prompts(tmp_path):
    enc = {"a": torch.randn(2, 4), "b": torch.randn(3, 4), "null": torch.randn(5, 4)}
    cache = _text_cache(tmp_path, ("a", "b"), enc)
    null = cache.null_cond()["context"]
    assert null.shape == cache[0]["context"].shape == (5, 4)
    torch.testing.assert_close(null, enc["null"])
    torch.testing.assert_close(cache[1]["context"][:3], enc["b"])
    assert cache.index["null"]["prompt"] == "null"


def test_run_all_refuses_text_dropout_without_a_null_conditioning_before_training(base_dit, pairs, tmp_path):
    preset = get_preset("debug", cond_dropout=0.1)
    with pytest.raises(PresetError, match="null_cond"):
        run_all(copy.deepcopy(base_dit), pairs[:8], preset, tmp_path, in_channels=8, out_channels=8, patch=(1, 1, 1))
    assert not list(tmp_path.iterdir())


def test_dcgen_feeds_every_integer_timestep_exactly():
    """t / 1000 * 1000 in float32 misses 127, 251, 253, ... by an ulp: the model must still get
    the integer t that DC-Gen's FlowMatchScheduler feeds its Wan model."""
    x0 = torch.zeros(4000, 1, 1, 1, 1)
    model = _Recorder()
    diffusion_loss(model, x0, torch.Generator().manual_seed(11), timesteps="dcgen", shift=5.0, grid_steps=50)
    g = torch.Generator().manual_seed(11)
    torch.randn(x0.shape, generator=g)
    draws = torch.randint(0, 1000, (4000,), generator=g)
    misses = (draws.float() / 1000 * 1000 != draws.float()).sum()
    assert int(misses) > 0  # the draws include timesteps that float32 would round
    assert model.seen["t"].dtype == torch.float32
    assert torch.equal(model.seen["t"], draws.float())


def test_null_conditioning_of_one_cache_fits_the_text_rows_of_another(tmp_path):
    """run_all drops the text of every stage to the main cache's null embedding; a resolution
    stage's cache pads its prompts to its own length. Both are zero-padded to the longer, as the
    cache pads prompts; anything but the row count must still match."""

    def cache(d, prompts, null_rows):
        enc = {p: torch.randn(n, 4, generator=torch.Generator().manual_seed(n)) for p, n in prompts.items()}
        enc["null"] = torch.full((null_rows, 4), 7.0)
        return _text_cache(tmp_path / d, prompts, enc)

    main, res = cache("main", {"a": 2, "b": 3}, 5), cache("res", {"c": 9, "d": 4}, 5)
    for null, ctx in (
        (main.null_cond(), torch.stack([res[i]["context"] for i in range(2)]).repeat(50, 1, 1)),
        (res.null_cond(), torch.stack([main[i]["context"] for i in range(2)]).repeat(50, 1, 1)),
    ):
        rows = max(null["context"].shape[0], ctx.shape[1])
        model = _Recorder()
        x0 = torch.zeros(100, 2, 1, 1, 1)
        diffusion_loss(model, x0, torch.Generator().manual_seed(0), cond_dropout=0.5, null_cond=null, context=ctx)
        seen = model.seen["cond"]["context"]
        assert seen.shape == (100, rows, 4)
        padded_null = torch.zeros(rows, 4)
        padded_null[: null["context"].shape[0]] = null["context"]
        padded_ctx = torch.zeros(100, rows, 4)
        padded_ctx[:, : ctx.shape[1]] = ctx
        dropped = (seen == padded_null).all(dim=(1, 2))
        kept = (seen == padded_ctx).all(dim=(1, 2))
        assert bool((dropped ^ kept).all()) and 20 < int(dropped.sum()) < 80
    with pytest.raises(ValueError, match="pad both"):
        diffusion_loss(
            _Recorder(),
            torch.zeros(2, 2, 1, 1, 1),
            torch.Generator().manual_seed(0),
            cond_dropout=0.5,
            null_cond={"context": torch.zeros(5, 3)},
            context=torch.zeros(2, 5, 4),
        )


def test_a_bad_noise_level_setting_fails_when_the_preset_is_made():
    with pytest.raises(PresetError, match="timestep_grid=1"):
        get_preset("wan-14B", timestep_grid=1)
    with pytest.raises(PresetError, match="flow_shift"):
        get_preset("wan-14B", flow_shift=0.0)
    assert get_preset("debug", timestep_grid=1).timestep_grid == 1  # unused by uniform sampling


def test_a_run_with_text_dropout_does_not_resume_with_another_null_conditioning(base_dit, pairs, tmp_path):
    """A cache rebuilt with another negative prompt changes what dropped samples see: refused on resume."""
    from ae_adapt import ResumeError, TrainConfig, align_head

    cfg = TrainConfig(lr=1e-3, steps=4, batch_size=4, ckpt_every=2, progress=False)
    rows = pairs[0]["context"].shape
    null_a, null_b = {"context": torch.zeros(rows)}, {"context": torch.ones(rows)}

    def run(null, **kw):
        model = copy.deepcopy(base_dit)
        model.replace_patch_embedder(8, (1, 1, 1))  # stage 1's new embedder (untrained here)
        return align_head(model, pairs[:8], cfg, tmp_path, out_channels=8, patch=(1, 1, 1), cond_dropout=0.5,
                          null_cond=null, **kw)

    run(null_a, stop_at=2)
    with pytest.raises(ResumeError, match="null_cond"):
        run(null_b)
    assert run(null_a).step == 4  # the same one resumes
