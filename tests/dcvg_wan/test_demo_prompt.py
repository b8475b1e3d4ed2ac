"""The demo model's prompt reader: captions pass unchanged, other wordings of a scene come out as
that scene's caption (the captioned world's own caption function is the reference), and every
change is reported."""

import itertools
import random
import sys
from pathlib import Path

import pytest

from dcvg_wan.demo_prompt import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, demo_prompt
from dcvg_wan.generate import embedded_default

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "world"))
sys.path.insert(0, str(ROOT / "tools"))
import captioned
import eval_wan_default

SCENES = list(itertools.product(captioned.COLORS, captioned.SHAPES, captioned.MOTIONS, captioned.BACKGROUNDS))


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_default()[0].tokenizer


def test_the_reader_knows_the_captioned_worlds_grammar(tokenizer):
    assert (COLORS, SHAPES, DIRECTIONS, BACKGROUNDS) == (
        tuple(captioned.COLORS), captioned.SHAPES, tuple(captioned.MOTIONS), tuple(captioned.BACKGROUNDS))
    assert set(captioned.vocabulary()) == set(demo_prompt("", tokenizer).vocabulary)


def test_every_training_caption_passes_unchanged_and_without_a_note(tokenizer):
    for scene in SCENES:
        read = demo_prompt(captioned.caption(*scene), tokenizer)
        assert (read.text, read.note()) == (captioned.caption(*scene), None)


def test_other_wordings_of_a_scene_read_as_its_caption(tokenizer):
    for i, scene in enumerate(SCENES):
        typed = eval_wan_default.paraphrase(*scene, random.Random(i))
        read = demo_prompt(typed, tokenizer)
        assert read.text == captioned.caption(*scene), typed
        assert read.text != typed and read.note() is not None and read.text in read.note()


@pytest.mark.parametrize("typed, caption", [
    ("A small blue square drifts to the left over a grey backdrop", "a blue square moving left on a gray background"),
    ("On a navy background, a yellow ball rolls from left to right", "a yellow circle moving right on a navy background"),
    ("a purple cube moving from the top", "a purple square moving down"),
    ("Cyan disc, downward, black bg", "a cyan circle moving down on a black background"),
    ("a white circle moving left on gray", "a white circle moving left on a gray background"),
    ("a red circle moving left to right", "a red circle moving right"),
    ("a red circle moving left-to-right on a navy background", "a red circle moving right on a navy background"),
    ("From top to bottom, a blue dot slides", "a blue circle moving down"),
    ("a red circle starting on the left, moving right", "a red circle moving right"),
    ("a red circle on the left moving right on a navy background", "a red circle moving right on a navy background"),
    ("The background is black and a red circle moves right", "a red circle moving right on a black background"),
    ("a red circle moves right, background: navy", "a red circle moving right on a navy background"),
])
def test_hand_written_wordings(tokenizer, typed, caption):
    assert demo_prompt(typed, tokenizer).text == caption


def test_what_cannot_be_drawn_is_reported_not_lost(tokenizer):
    read = demo_prompt("a red circle and a blue square chasing a cat leftwards", tokenizer)
    assert read.text == "a red circle moving left"
    assert [w for w, _ in read.unused] == ["blue", "square"] and read.dropped == ["chasing", "cat"]
    assert read.substituted == [("leftwards", "left")]
    note = read.note()
    assert all(w in note for w in ("blue", "square", "chasing", "cat", "'leftwards' as 'left'", repr(read.text)))
    # nothing the demo knows: its known words are kept in the user's order, the rest named
    read = demo_prompt("a dog in a park", tokenizer)
    assert read.text == "a a" and read.dropped == ["dog", "park"]


@pytest.mark.parametrize("typed, caption, reason", [
    ("a red circle moving right on a white background", "a red circle moving right", "the demo's backgrounds are"),
    ("a circle moving right on a red background", "a circle moving right", "the demo's backgrounds are"),
    ("a black circle moving up", "a circle moving up", "the demo's shapes are"),
    ("a red circle moving right, then up", "a red circle moving right", "moves the shape one way"),
])
def test_words_outside_what_the_demo_learnt_are_named_with_the_reason(tokenizer, typed, caption, reason):
    read = demo_prompt(typed, tokenizer)
    assert read.text == caption and reason in read.note()


@pytest.mark.parametrize("typed", ["", "赤い円が右に動く", "!!!"])
def test_a_prompt_with_no_known_word_says_it_runs_unconditioned(tokenizer, typed):
    read = demo_prompt(typed, tokenizer)
    assert read.text == "" and "empty prompt" in read.note()


def test_reversed_directions_are_named(tokenizer):
    note = demo_prompt("a red ball drifts from the left", tokenizer).note()
    assert "read 'from the left' (where it starts) as moving right" in note


@pytest.mark.parametrize(("typed", "scene"), [
    ("a green cube that moves from right to left on a dark blue background", ("green", "square", "left", "navy")),
    ("a light blue disc drifting up on a dark grey backdrop", ("cyan", "circle", "up", "gray")),
    ("a crimson ball rolling to the right across a dark background", ("red", "circle", "right", "black")),
])
def test_two_word_colours_and_a_dark_background_are_read(tokenizer, typed, scene):
    """"dark blue" is the demo's navy, "light blue" its cyan, and a "dark" background its black."""
    read = demo_prompt(typed, tokenizer)
    assert read.text == captioned.caption(*scene)
    assert any(word.startswith(("dark", "light")) for word, _ in read.substituted)
