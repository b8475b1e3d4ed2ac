"""Put a free-form prompt into the words and word order of the demo model's captions.

The embedded demo model (t2v-tiny) was trained on captions of one template over ~20 words,
"a {colour} {shape} moving {direction} on a {background} background" (tools/world/captioned.py).
A word outside that vocabulary would reach it as <unk>, which it never saw, and a known word in
another order is a caption it never saw either. So a prompt is read slot by slot: common synonyms
map to the caption's word ("grey" -> gray, "ball" -> circle, "drifts" -> moving, "backdrop" ->
background, "from left to right" -> right), the colour next to "background" is the background,
and the caption is rebuilt in the template's order. The CLI prints every substitution, every
dropped word and the prompt actually used: nothing is changed silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# The demo captions' grammar (tools/world/captioned.py; a test keeps the two in step).
COLORS = ("red", "green", "blue", "yellow", "white", "orange", "purple", "cyan")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS = ("black", "gray", "navy")

SYNONYMS = {
    # colours
    "grey": "gray", "teal": "cyan", "aqua": "cyan", "turquoise": "cyan", "violet": "purple",
    "lilac": "purple", "golden": "yellow", "gold": "yellow", "crimson": "red", "scarlet": "red",
    # shapes
    "ball": "circle", "disc": "circle", "disk": "circle", "dot": "circle", "sphere": "circle",
    "round": "circle", "orb": "circle", "box": "square", "cube": "square", "block": "square",
    "pyramid": "triangle",
    # motion
    **dict.fromkeys(("moves", "move", "going", "goes", "travels", "travelling", "traveling", "drifts",
                     "drifting", "slides", "sliding", "glides", "gliding", "heads", "heading", "rolls",
                     "rolling", "floats", "floating", "flies", "flying", "shifts", "shifting", "runs",
                     "running", "sweeps", "sweeping", "passes", "passing"), "moving"),
    "leftward": "left", "leftwards": "left", "rightward": "right", "rightwards": "right",
    "upward": "up", "upwards": "up", "downward": "down", "downwards": "down", "top": "up",
    "bottom": "down", "west": "left", "east": "right", "north": "up", "south": "down",
    # scene
    "backdrop": "background", "backgound": "background", "bg": "background", "canvas": "background",
}
# two-word colours, read as one caption word
PHRASES = {
    ("dark", "blue"): "navy", ("navy", "blue"): "navy", ("midnight", "blue"): "navy",
    ("dark", "gray"): "gray", ("dark", "grey"): "gray", ("light", "gray"): "gray", ("light", "grey"): "gray",
    ("light", "blue"): "cyan", ("sky", "blue"): "cyan",
}
_BACKGROUND_WORDS = ("background", "backdrop", "bg", "canvas")
_ORIGINS = {"left": "right", "right": "left", "up": "down", "down": "up"}  # "from the left": moving right
# Grammar words that carry nothing the demo could draw: read (for "from"), never reported as dropped.
FILLERS = frozenset(("the", "an", "to", "toward", "towards", "from", "of", "and", "is", "are", "it", "its",
                     "with", "in", "into", "at", "side", "screen", "frame", "over", "against", "along", "across"))


@dataclass
class DemoPrompt:
    """What the demo model is given, and what became of the user's words."""

    text: str
    typed: str  # the user's words, lower case, punctuation gone
    substituted: list[tuple[str, str]] = field(default_factory=list)  # (the user's word, the caption's word)
    dropped: list[str] = field(default_factory=list)  # words outside the vocabulary
    unused: list[tuple[str, str]] = field(default_factory=list)  # (known word, why the caption has no place for it)
    readings: list[str] = field(default_factory=list)  # phrases read as something else ("from the top" -> down)
    vocabulary: list[str] = field(default_factory=list)

    def note(self) -> str | None:
        """One line for the CLI, or None when nothing was read differently from what was typed."""
        parts = []
        if self.substituted:
            parts.append("read " + ", ".join(f"{a!r} as {b!r}" for a, b in dict.fromkeys(self.substituted)))
        parts += self.readings
        for reason in dict.fromkeys(r for _, r in self.unused):
            words = dict.fromkeys(w for w, r in self.unused if r == reason)
            parts.append(f"ignored {', '.join(words)} ({reason})")
        if self.dropped:
            parts.append(f"dropped {', '.join(dict.fromkeys(self.dropped))} (the demo model knows only the words "
                         f"{', '.join(self.vocabulary)})")
        if not self.text:
            parts.append("no word the demo knows is left: it runs with an empty prompt (unconditioned)")
        if not parts and self.text != self.typed:
            parts.append("put in the order of its captions")
        if not parts:
            return None
        return f"note: demo model: {'; '.join(parts)}; prompt used: {self.text!r}"


@dataclass
class _Reading:
    text: str
    unused: list[tuple[str, str]]
    readings: list[str]


def _skip_the(words: list[str], i: int, step: int) -> int:
    """Index of the next word from i in direction step that is not "the"/"a" (or -1 / len)."""
    while 0 <= i < len(words) and words[i] in ("the", "a"):
        i += step
    return i


def _direction(words: list[str], typed: list[str]) -> tuple[int, str, list[int], str | None] | None:
    """(index, direction, indices of the direction words it consumed, a reading note) or None.
    Priority: "X to Y" -> Y; the word right after "moving"; "from X" -> the opposite of X;
    "to(wards) X" -> X; else the first direction word."""
    idx = [i for i, w in enumerate(words) if w in DIRECTIONS]
    if not idx:
        return None
    for i in idx:  # "left to right", "from the top to the bottom"
        j = _skip_the(words, i + 2, 1) if words[i + 1 : i + 2] == ["to"] else -1
        if 0 <= j < len(words) and words[j] in DIRECTIONS:
            return j, words[j], [i, j], f"read '{typed[i]} to {typed[j]}' as moving {words[j]}"
    before = {i: words[k] if (k := _skip_the(words, i - 1, -1)) >= 0 else None for i in idx}  # skipping "the"
    for i in idx:
        if before[i] == "moving":
            return i, words[i], [i], None
    for i in idx:
        if before[i] == "from":
            return i, _ORIGINS[words[i]], [i], f"read 'from the {typed[i]}' (where it starts) as moving {_ORIGINS[words[i]]}"
    for i in idx:
        if before[i] in ("to", "toward", "towards"):
            return i, words[i], [i], None
    return idx[0], words[idx[0]], [idx[0]], None


def canonical_caption(words: list[str], typed: list[str] | None = None) -> _Reading | None:
    """The template caption for the slots these words fill (caption words and fillers), with the slot
    words it has no place for and why, or None if they name no colour, shape or direction.
    The background is the colour right before "background", else right after it ("background is
    navy"), else the first colour after "on"; only the demo's backgrounds can be one."""
    colors = [(i, w) for i, w in enumerate(words) if w in COLORS or w in BACKGROUNDS]
    said = next(((i, w) for i, w in colors if words[i + 1 : i + 2] == ["background"]), None)
    if said is None and "background" in words:
        k = _skip_the(words, words.index("background") + 1, 1)
        k = k + 1 if words[k : k + 1] in (["is"], ["are"]) else k
        said = next(((i, w) for i, w in colors if i == k), None)
    if said is None and "on" in words:
        on = words.index("on")
        said = next(((i, w) for i, w in colors if i > on), None)
    unused = []
    background = said
    if said is not None and said[1] not in BACKGROUNDS:
        unused.append((said[1], f"as a background: the demo's backgrounds are {', '.join(BACKGROUNDS)}"))
        background = None
    color = next(((i, w) for i, w in colors if (i, w) != said and w in COLORS), None)
    shape = next(((i, w) for i, w in enumerate(words) if w in SHAPES), None)
    found = _direction(words, typed or words)
    if not (color or shape or found):
        return None
    text = " ".join(["a"] + [slot[1] for slot in (color, shape) if slot is not None])
    if found or "moving" in words:
        text += " moving" + (f" {found[1]}" if found else "")
    if background:
        text += f" on a {background[1]} background"
    used = {slot[0] for slot in (color, shape, said) if slot is not None} | set(found[2] if found else ())
    for i, w in enumerate(words):
        if i in used:
            continue
        if w in BACKGROUNDS and w not in COLORS:
            unused.append((w, f"as a shape colour: the demo's shapes are {', '.join(COLORS)}"))
        elif w in COLORS or w in SHAPES:
            unused.append((w, "the demo draws one shape in one colour"))
        elif w in DIRECTIONS:
            unused.append((w, "the demo moves the shape one way"))
    return _Reading(text, unused, [found[3]] if found and found[3] else [])


def _phrases(typed: list[str]) -> list[tuple[str, str | None]]:
    """(word or two-word phrase, the caption word it stands for or None): "dark blue" -> navy, and
    "dark" right before a background word -> black."""
    out, i = [], 0
    while i < len(typed):
        pair = tuple(typed[i : i + 2])
        if pair in PHRASES:
            out.append((" ".join(pair), PHRASES[pair]))
            i += 2
            continue
        if typed[i] == "dark" and typed[i + 1 : i + 2] and typed[i + 1] in _BACKGROUND_WORDS:
            out.append(("dark", "black"))
        else:
            out.append((typed[i], None))
        i += 1
    return out


def demo_prompt(prompt: str, tokenizer_dir: Path) -> DemoPrompt:
    """The prompt in the demo model's words and caption order (see the module docstring)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    vocab = {w for w in tokenizer.get_vocab() if not w.startswith("<")}
    kept, substituted, dropped, origins = [], [], [], []  # origins: the user's word behind each kept one
    typed = re.findall(r"[a-z0-9]+", prompt.lower())
    for word, meant in _phrases(typed):
        singular = word[:-1] if word.endswith("s") else None  # "circles", "squares"
        if meant is not None and meant in vocab:
            kept.append(meant)
            substituted.append((word, meant))
        elif word in vocab or word in FILLERS:
            kept.append(word)
        elif SYNONYMS.get(word) in vocab or (singular in vocab and singular in SHAPES):
            kept.append(SYNONYMS.get(word) or singular)
            substituted.append((word, kept[-1]))
        else:
            dropped.append(word)
            continue
        origins.append(word)
    grammar = set(COLORS + SHAPES + DIRECTIONS + BACKGROUNDS) | {"a", "moving", "on", "background"}
    read = canonical_caption(kept, origins) if grammar <= vocab else None
    if read is None:  # not the demo's captions: keep the known words in the user's order
        read = _Reading(" ".join(w for w in kept if w in vocab), [], [])
    return DemoPrompt(read.text, " ".join(typed), substituted, dropped, read.unused, read.readings, sorted(vocab))
