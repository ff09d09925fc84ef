"""The demo text tower's spreading: distinct names become distinguishable, on names it never trained on."""
import torch

from ovsam.config import get_config
from ovsam.text import TextEncoder
from training.text_spread import mean_abs_cosine, spread_text_tower, tokenizer_words

UNSEEN = ["buoy", "tile", "pennant", "starfish", "donut", "plus", "traffic light", "Red Car"]


def test_spreading_pushes_unseen_names_apart():
    torch.manual_seed(0)
    encoder = TextEncoder.from_config(get_config("tiny"))
    before = mean_abs_cosine(encoder, UNSEEN)
    report = spread_text_tower(encoder, steps=60, batch_names=24, templates_per_step=2, lr=3e-3, progress=False)
    after = mean_abs_cosine(encoder, UNSEEN)
    assert before > 0.6, before  # a random tower maps names to nearly one direction
    assert after < 0.5 * before, (before, after)
    assert report["mean_abs_cosine_after"] < report["mean_abs_cosine_before"]
    assert not encoder.training


def test_tokenizer_words_are_whole_alphabetic_words():
    words = tokenizer_words(TextEncoder.from_config(get_config("tiny")))
    assert len(words) > 10_000
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 12 for w in words[:500])
