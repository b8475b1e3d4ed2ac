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
    unused: list[str] = field(default_factory=list)  # known words the one-shape caption has no slot for
    vocabulary: list[str] = field(default_factory=list)

    def note(self) -> str | None:
        """One line for the CLI, or None when nothing was read differently from what was typed."""
        parts = []
        if self.substituted:
            parts.append("read " + ", ".join(f"{a!r} as {b!r}" for a, b in self.substituted))
        if self.unused:
            parts.append(f"ignored {', '.join(self.unused)} (the demo draws one shape, one direction, one background)")
        if self.dropped:
            parts.append(f"dropped {', '.join(self.dropped)} (the demo model knows only the words "
                         f"{', '.join(self.vocabulary)})")
        if not parts and self.text != self.typed:
            parts.append("put in the order of its captions")
        if not parts:
            return None
        return f"note: demo model: {'; '.join(parts)}; prompt used: {self.text!r}"


def canonical_caption(words: list[str]) -> tuple[str, list[str]] | None:
    """(the template caption for the slots these words fill, the slot words it has no place for, e.g. a
    second shape), or None if they name no colour, shape or direction. `words` are caption words
    and fillers. The background is the colour right before "background", else the first colour after
    "on"; a direction after "from" (and "the") is where the shape starts, so it moves the other way."""
    colors = [(i, w) for i, w in enumerate(words) if w in COLORS or w in BACKGROUNDS]
    background = next(((i, w) for i, w in colors if words[i + 1 : i + 2] == ["background"]), None)
    if background is None and "on" in words:
        on = words.index("on")
        background = next(((i, w) for i, w in colors if i > on), None)
    color = next(((i, w) for i, w in colors if (i, w) != background and w in COLORS), None)
    shape = next(((i, w) for i, w in enumerate(words) if w in SHAPES), None)
    direction, origins = None, []
    for i, w in enumerate(words):
        if w not in DIRECTIONS:
            continue
        before = [x for x in words[max(0, i - 2) : i] if x != "the"]
        if before[-1:] == ["from"]:
            origins.append(i)
            direction = direction or (i, _ORIGINS[w])
        else:
            direction = (i, w)
            break
    if not (color or shape or direction):
        return None
    text = " ".join(["a"] + [slot[1] for slot in (color, shape) if slot is not None])
    if direction or "moving" in words:
        text += " moving" + (f" {direction[1]}" if direction else "")
    if background:
        text += f" on a {background[1]} background"
    used = {slot[0] for slot in (color, shape, background, direction) if slot is not None} | set(origins)
    slots = set(COLORS + BACKGROUNDS + SHAPES + DIRECTIONS)
    return text, [w for i, w in enumerate(words) if w in slots and i not in used]


def demo_prompt(prompt: str, tokenizer_dir: Path) -> DemoPrompt:
    """The prompt in the demo model's words and caption order (see the module docstring)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    vocab = {w for w in tokenizer.get_vocab() if not w.startswith("<")}
    kept, substituted, dropped = [], [], []
    typed = re.findall(r"[a-z0-9]+", prompt.lower())
    for word in typed:
        singular = word[:-1] if word.endswith("s") else None  # "circles", "squares"
        if word in vocab:
            kept.append(word)
        elif SYNONYMS.get(word) in vocab or (singular in vocab and singular in SHAPES):
            kept.append(SYNONYMS.get(word) or singular)
            substituted.append((word, kept[-1]))
        elif word in FILLERS:
            kept.append(word)
        else:
            dropped.append(word)
    grammar = set(COLORS + SHAPES + DIRECTIONS + BACKGROUNDS) | {"a", "moving", "on", "background"}
    read = canonical_caption(kept) if grammar <= vocab else None
    if read is None:  # not the demo's captions: keep the known words in the user's order
        text, unused = " ".join(w for w in kept if w in vocab), []
    else:
        text, unused = read
    return DemoPrompt(text, " ".join(typed), substituted, dropped, unused, sorted(vocab))
