#!/usr/bin/env python
"""Train the tiny text-to-video model that `dcvg-wan generate` uses when no --ckpt_dir is given.

Same code as Wan-2.1 at toy size, in DC-VideoGen's setting: a Wan DiT with a patch (1,1,1)
embedder on the latents of the DC-AE-V that ships with dcae-v (tiny-f32t4c64), conditioned on a
umT5 encoder. Data: `tools/world/captioned.py` scenes ("a red circle moving left on a black
background"), 32 frames at 128x128, encoded once; the DiT trains on windows of 16 frames
(4 latent frames). The umT5 encoder is a frozen, seeded random init with a
word-level tokenizer over the scene vocabulary (a real umT5 needs gigabytes); the DiT learns to
read its features. 10% of captions are dropped to "" so that classifier-free guidance works.

    python tools/train_wan_default.py encode --clips 1200          # cache DC-AE-V latents
    python tools/train_wan_default.py train --minutes 40           # train, then export the asset
    python tools/train_wan_default.py train --minutes 40 --resume  # continue (fresh optimizer, warm-up)

Everything goes to runs/wan_default/; `export` writes packages/dcvg-wan/src/dcvg_wan/assets/t2v-tiny/.

The image-to-video demo (`i2v-tiny`, what `dcvg-wan generate --image` runs without --ckpt_dir) is
the same DiT made I2V as Wan-2.1 I2V is built: an embedder over noise + mask (4) + the DC-AE-V
latent of the image chunk (the first frame 4 times, then zero frames: NVIDIA's DC-VideoGen
conditioning), and CLIP features through `img_emb` into each block's image cross-attention. It
starts from the T2V demo (the new embedder inputs and the image cross-attention values at zero,
so step 0 is the T2V model) and learns to continue the given first frame of a scene. The CLIP
tower is a frozen, seeded random init, as the umT5 (a real CLIP ViT-H is 0.6 B parameters).

    python tools/train_wan_default.py encode-i2v                  # first frames -> y and CLIP features
    python tools/train_wan_default.py train --task i2v --minutes 30   # then exports assets/i2v-tiny/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "world"))
import captioned

RUN = ROOT / "runs" / "wan_default"
ASSET = ROOT / "packages" / "dcvg-wan" / "src" / "dcvg_wan" / "assets" / "t2v-tiny"
FRAMES, SIZE = 32, 128
TEXT_LEN = 16
DIT = {"dim": 128, "ffn_dim": 512, "num_heads": 2, "num_layers": 4, "patch": (1, 1, 1), "text_dim": 64, "text_len": TEXT_LEN}
TRAIN_FRAMES = 16  # the DiT trains on 4-latent-frame windows (either half of a 32-frame clip)
TEXT = {"dim": 64, "ffn_dim": 128, "num_heads": 4, "head_dim": 16, "num_layers": 2, "num_buckets": 8, "max_distance": 16}
SAMPLING = {"size": f"{SIZE}*{SIZE}", "frame_num": TRAIN_FRAMES, "steps": 30, "shift": 3.0, "guide_scale": 5.0,
            "negative_prompt": "", "example_prompt": "a red circle moving right on a black background"}
I2V_ASSET = ASSET.parent / "i2v-tiny"
CLIP = {"image_size": 56, "patch_size": 14, "width": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 128,
        "projection_dim": 32}
EXAMPLE_SEED = 7  # held-out scene whose first frame ships as assets/i2v-tiny/example.png
I2V_WINDOWS = (0, TRAIN_FRAMES)  # pixel frame where a training window starts; its first frame is the image


def build_tokenizer(directory: Path):
    """A word-level tokenizer over the scene vocabulary, saved like a transformers tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in captioned.vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # captions are lower case; "A red ..." must read the same
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def build_text_encoder(directory: Path, vocab_size: int):
    from dcvg_wan.text_encoder import TextEncoderConfig, build_text_model

    torch.manual_seed(0)
    model = build_text_model(TextEncoderConfig(vocab_size=vocab_size, **TEXT))
    model.save_pretrained(directory)
    return model


def encode(args) -> None:
    from dcae_v import DCAEV
    from dcae_v.checkpoint import DEFAULT_CHECKPOINT
    from dcae_v.io import to_model_range

    torch.set_num_threads(args.threads)
    RUN.mkdir(parents=True, exist_ok=True)
    ae = DCAEV.from_pretrained().eval().float()
    # the DiT will only understand this autoencoder's latents: keep its exact files with the run
    if (RUN / "autoencoder").exists():
        shutil.rmtree(RUN / "autoencoder")
    shutil.copytree(DEFAULT_CHECKPOINT, RUN / "autoencoder")
    latents, captions = [], []
    start = time.time()
    for i in range(0, args.clips, 8):
        batch = [captioned.captioned_clip(s, FRAMES, SIZE, SIZE) for s in range(i, min(i + 8, args.clips))]
        x = torch.cat([to_model_range(clip) for clip, _ in batch])
        with torch.no_grad():
            latents.append((ae.encode(x) * ae.scaling_factor).half())
        captions += [text for _, text in batch]
        if i % 80 == 0:
            print(f"encoded {i + len(batch)}/{args.clips} clips in {time.time() - start:.0f} s", flush=True)
    save_file({"latents": torch.cat(latents).contiguous()}, RUN / "latents.safetensors",
              metadata={"captions": json.dumps(captions), "scaling_factor": str(ae.scaling_factor)})
    print(f"wrote {RUN / 'latents.safetensors'} ({len(captions)} clips) in {time.time() - start:.0f} s")


def encode_i2v(args) -> None:
    """For each clip and window of I2V_WINDOWS: y = mask + DC-AE-V latent of the image chunk, and
    the CLIP features, computed by the same code the I2V pipeline runs on DC-AE-V."""
    from dcae_v import DCAEV
    from dcae_v.io import to_model_range
    from dcvg_wan.image_encoder import ImageEncoder, ImageEncoderConfig, build_image_model
    from dcvg_wan.latent_spaces import DCAEVSpace

    torch.set_num_threads(args.threads)
    clips = len(latent_captions())
    ae = DCAEV.from_pretrained(ASSET / "autoencoder", dtype=torch.float32).eval()  # the T2V demo's latents
    space = DCAEVSpace(ae, (1, 1, 1))
    torch.manual_seed(0)
    clip_model = build_image_model(ImageEncoderConfig(**CLIP)).eval()
    if (RUN / "image_encoder").exists():
        shutil.rmtree(RUN / "image_encoder")
    clip_model.save_pretrained(RUN / "image_encoder")
    clip = ImageEncoder(clip_model, preprocessing="center-crop")  # as the pipeline on DC-AE-V
    ys, feats, start = [], [], time.time()
    for i in range(0, clips, 8):
        video = torch.cat([to_model_range(captioned.captioned_clip(s, FRAMES, SIZE, SIZE)[0])
                           for s in range(i, min(i + 8, clips))])
        with torch.no_grad():
            ys.append(torch.stack([space.image_condition(video[:, :, w], TRAIN_FRAMES) for w in I2V_WINDOWS], 1).half())
            feats.append(torch.stack([clip.encode(video[:, :, w]) for w in I2V_WINDOWS], 1).half())
        if i % 80 == 0:
            print(f"conditioned {i + video.shape[0]}/{clips} clips in {time.time() - start:.0f} s", flush=True)
    save_file({"y": torch.cat(ys).contiguous(), "clip": torch.cat(feats).contiguous()}, RUN / "i2v_condition.safetensors",
              metadata={"windows": json.dumps(I2V_WINDOWS)})
    print(f"wrote {RUN / 'i2v_condition.safetensors'} in {time.time() - start:.0f} s")


def latent_captions() -> list[str]:
    """The captions of the cached clips (runs/wan_default/latents.safetensors' metadata)."""
    from safetensors import safe_open

    with safe_open(RUN / "latents.safetensors", "pt") as f:
        return json.loads(f.metadata()["captions"])


def i2v_from_t2v(t2v, image_dim: int):
    """The T2V demo as a Wan I2V DiT that still computes the T2V model: the embedder's new inputs
    (mask + image-chunk latent) and the image cross-attention's values start at zero."""
    from dcvg_wan import WanModel

    c = t2v.config
    torch.manual_seed(2)
    model = WanModel(dataclasses.replace(c, in_dim=2 * c.in_dim + 4, image_dim=image_dim))
    state = model.state_dict()
    for k, v in t2v.state_dict().items():
        if k == "patch_embedding.weight":
            state[k].zero_()[:, : v.shape[1]] = v
        else:
            state[k].copy_(v)
    for k in state:
        if ".v_img." in k:
            state[k].zero_()
    model.load_state_dict(state)
    return model


def train(args) -> None:
    from dcvg_wan import WanModel
    from dcvg_wan.config import WanConfig
    from dcvg_wan.text_encoder import TextEncoder

    torch.set_num_threads(args.threads)
    i2v = args.task == "i2v"
    out = RUN / ("i2v_transformer" if i2v else "transformer")
    summary_file = RUN / ("i2v_train_summary.json" if i2v else "train_summary.json")
    data = load_file(RUN / "latents.safetensors")
    captions = latent_captions()
    z = data["latents"].float()
    print(f"{len(captions)} clips, latent {tuple(z.shape[1:])}, std {z.std():.3f}")

    tok_dir, text_dir = RUN / "tokenizer", RUN / "text_encoder"
    if i2v:  # the I2V demo reads the shipped T2V demo's text encoder
        tok_dir, text_dir = ASSET / "tokenizer", ASSET / "text_encoder"
    else:
        tokenizer = build_tokenizer(tok_dir)
        build_text_encoder(text_dir, len(tokenizer))
    text = TextEncoder.from_pretrained(text_dir, tokenizer_dir=tok_dir, text_len=TEXT_LEN)
    with torch.no_grad():
        table = {c: text.encode_padded([c])[0] for c in sorted(set(captions)) + [""]}

    torch.manual_seed(0)
    cfg = WanConfig(in_dim=z.shape[1], out_dim=z.shape[1], **DIT)
    model = WanModel(cfg).train()
    if i2v:
        cond = load_file(RUN / "i2v_condition.safetensors")
        y_all, clip_all = cond["y"].float(), cond["clip"].float()
        t2v = WanModel.from_pretrained(ASSET / "transformer", dtype=torch.float32)  # the shipped T2V demo
        model = i2v_from_t2v(t2v, CLIP["width"]).train()
    earlier = []  # previous runs continued from (warm restart: weights kept, fresh optimizer and warm-up)
    if args.resume:
        model = WanModel.from_pretrained(out, dtype=torch.float32).train()
        summary = json.loads(summary_file.read_text())
        earlier = summary.get("runs", [summary])
    print(f"DiT {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1)
    deadline = time.time() + 60 * args.minutes
    step, ema = 0, None
    while time.time() < deadline and (args.steps is None or step < args.steps):
        idx = torch.randint(len(captions), (args.batch,), generator=gen)
        window = TRAIN_FRAMES // 4
        w = torch.randint(0, z.shape[2] // window, (1,), generator=gen).item()
        start = w * window
        x0 = z[idx, :, start : start + window]
        keep = torch.rand(args.batch, generator=gen) > 0.1
        ctx = torch.stack([table[captions[i] if k else ""] for i, k in zip(idx.tolist(), keep.tolist())])
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal noise levels
        s = sigma.view(-1, 1, 1, 1, 1)
        image = {"clip_fea": clip_all[idx, w], "y": y_all[idx, w]} if i2v else {}
        pred = model((1 - s) * x0 + s * noise, sigma * 1000, ctx, **image)
        loss = F.mse_loss(pred, noise - x0)
        lr = args.lr * min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {ema:.4f}", flush=True)
            with open(RUN / ("i2v_train_log.jsonl" if i2v else "train_log.jsonl"), "a") as log:
                log.write(json.dumps({"step": step, "loss": ema, "time": time.time()}) + "\n")
    model.eval()
    model.save_pretrained(out)
    runs = [*earlier, {"steps": step, "loss": ema, "minutes": args.minutes, "batch": args.batch, "lr": args.lr}]
    summary_file.write_text(json.dumps({"steps": sum(r["steps"] for r in runs), "loss": ema,
                                        "minutes": sum(r["minutes"] for r in runs), "runs": runs}, indent=2))
    print(f"trained {step} steps, loss {ema:.4f}")
    export_i2v() if i2v else export()


def export() -> None:
    """Copy the trained parts into the dcvg-wan package (fp16 DiT to keep the wheel small)."""
    from dcvg_wan import WanModel

    if ASSET.exists():
        shutil.rmtree(ASSET)
    ASSET.mkdir(parents=True)
    model = WanModel.from_pretrained(RUN / "transformer")
    model.save_pretrained(ASSET / "transformer", dtype=torch.float16)
    shutil.copytree(RUN / "text_encoder", ASSET / "text_encoder")
    shutil.copytree(RUN / "tokenizer", ASSET / "tokenizer")
    shutil.copytree(RUN / "autoencoder", ASSET / "autoencoder")  # the DC-AE-V whose latents it was trained on
    summary = json.loads((RUN / "train_summary.json").read_text())
    (ASSET / "defaults.json").write_text(json.dumps({**SAMPLING, "trained": summary}, indent=2) + "\n")
    print(f"exported to {ASSET}")


def export_i2v() -> None:
    """assets/i2v-tiny/: the I2V DiT (fp16), the CLIP tower and defaults; the text encoder,
    tokenizer and autoencoder are the T2V demo's (`dcvg_wan.generate.embedded_default`)."""
    from dcvg_wan import WanModel

    if I2V_ASSET.exists():
        shutil.rmtree(I2V_ASSET)
    I2V_ASSET.mkdir(parents=True)
    WanModel.from_pretrained(RUN / "i2v_transformer").save_pretrained(I2V_ASSET / "transformer", dtype=torch.float16)
    shutil.copytree(RUN / "image_encoder", I2V_ASSET / "image_encoder")
    frame, caption = captioned.captioned_clip(EXAMPLE_SEED, 1, SIZE, SIZE, split="heldout")
    write_png(I2V_ASSET / "example.png", frame[0])
    summary = json.loads((RUN / "i2v_train_summary.json").read_text())
    defaults = {**SAMPLING, "example_prompt": caption, "trained": summary,
                "example_image": f"example.png: first frame of held-out scene {EXAMPLE_SEED} ({caption})",
                "shares": "text_encoder, tokenizer and autoencoder of t2v-tiny"}
    (I2V_ASSET / "defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
    print(f"exported to {I2V_ASSET}")


def write_png(path: Path, rgb) -> None:
    import av

    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode")
    e.add_argument("--clips", type=int, default=1200)
    e.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("train")
    t.add_argument("--minutes", type=float, default=40)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--resume", action="store_true", help="continue from runs/wan_default/transformer")
    t.add_argument("--task", choices=("t2v", "i2v"), default="t2v", help="i2v: needs encode-i2v, starts from the T2V demo")
    sub.add_parser("export")
    ei = sub.add_parser("encode-i2v")
    ei.add_argument("--threads", type=int, default=1)
    sub.add_parser("export-i2v")
    args = p.parse_args(argv)
    {"encode": encode, "train": train, "export": lambda _a: export(), "encode-i2v": encode_i2v,
     "export-i2v": lambda _a: export_i2v()}[args.cmd](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
