"""NVIDIA's DC-Gen `generate.py` arguments (`task=t2v prompt="..." steps=50`), read as our flags.

Users of NVIDIA's release know `python -m applications.dc_gen.inference_demo.generate task=t2v
prompt=... num_frames=81 steps=50 guidance=5.0 seed=42 save_path=out.mp4`. `dcvg-wan generate`
takes those key=value words too and says which flags it read them as. What NVIDIA's script does
and this one cannot do the same way is refused with the reason: it downloads its weights (here
--ckpt_dir names the folder), its image tasks are not DC-VideoGen, its prompt expander needs Qwen,
and it ignores width/height for video.
"""

from __future__ import annotations

import argparse

from dcvg_wan.errors import InputError

# key -> our flag (value passed through)
FLAGS = {
    "prompt": "--prompt",
    "save_path": "--save_file",
    "input_image_path": "--image",
    "num_frames": "--frame_num",
    "steps": "--sample_steps",
    "guidance": "--sample_guide_scale",
    "seed": "--base_seed",
}
TASKS = {"t2v": "t2v-14B", "i2v": "i2v-14B"}
REPOS = {"t2v": "dc-ai/DC-Gen-Wan2.1-T2V-14B", "i2v": "dc-ai/DC-Gen-Wan2.1-I2V-14B"}
KEYS = (*FLAGS, "task", "width", "height", "use_expander")


def _takes_value(parser: argparse.ArgumentParser, option: str) -> bool:
    action = parser._option_string_actions.get(option.split("=", 1)[0])
    return action is not None and action.nargs != 0 and "=" not in option


def translate(tokens: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], str | None]:
    """(tokens with NVIDIA's key=value words replaced by our flags, a note saying so or None)."""
    out, read, task, expects_value = [], [], None, False
    for token in tokens:
        key, eq, value = token.partition("=")
        if expects_value or token.startswith("-") or not eq:
            expects_value = not expects_value and token.startswith("-") and _takes_value(parser, token)
            out.append(token)
            continue
        if key not in KEYS:
            raise InputError(f"{token!r}: not a flag, and {key!r} is not one of NVIDIA's generate.py keys "
                             f"({', '.join(KEYS)}); see dcvg-wan generate --help")
        if key == "task":
            value = value.lower()  # as NVIDIA's generate.py
            if value not in TASKS:
                raise InputError(f"task={value}: NVIDIA's generate.py task is not DC-VideoGen here; this command runs "
                                 f"task=t2v and task=i2v (t2i_1k/t2i_4k/edit are DC-Gen image models)")
            task = value
            out += ["--task", TASKS[value]]
        elif key in ("width", "height"):
            raise InputError(f"{key}={value}: NVIDIA's generate.py ignores width/height for video (1280x720, I2V that "
                             "area at the image's aspect); to choose a size here pass --size W*H")
        elif key == "use_expander":
            if value.lower() in ("yes", "true", "1"):
                raise InputError("use_expander: prompt extension (Qwen) is not implemented; pass the extended prompt")
            read.append(f"{token} (off, as here)")
            continue
        else:
            out += [FLAGS[key], value]
        read.append(f"{token} -> {' '.join(out[-2:])}" + (
            " (random here, as the official flag; NVIDIA's script seeds a generator with -1)"
            if key == "seed" and value.strip() == "-1" else ""))
    if not read:
        return tokens, None
    given = [t.split("=", 1)[0] for t in out if t.startswith("--")]
    twice = sorted({f for f in given if given.count(f) > 1})
    if twice:
        raise InputError(f"{', '.join(twice)} given twice (as a key=value word and/or a flag): say each once")
    if task is not None and "--ckpt_dir" not in {t.split("=", 1)[0] for t in out}:
        raise InputError(f"task={task}: NVIDIA's generate.py downloads {REPOS[task]}; nothing is downloaded here: "
                         f"fetch it yourself and pass --ckpt_dir with that folder")
    return out, "note: read NVIDIA's generate.py arguments as " + "; ".join(read)
