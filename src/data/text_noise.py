"""Character- and word-level noise for text evaluation sets (`data.eval_sets.<name>: {text_noise: char, severity:
3}`): the test texts as typed in a hurry or cut and shuffled, at severities 1-5.

- `char`: each letter is, with probability `CHAR_RATES[severity - 1]`, deleted, duplicated, replaced by a random
  lowercase letter or swapped with the next character (keyboard typos, as in Belinkov & Bisk 2018);
- `word`: each word is, with probability `WORD_RATES[severity - 1]`, deleted or swapped with the next word (EDA's
  random deletion and swap, Wei & Zou 2019); a text always keeps at least one word.

The rates are this project's choice (no standard table exists for text as ImageNet-C's is for images). Randomness
comes from the `rng` the caller seeds per row, so a noisy set is the same texts in every run. Torch-free: the config
schema reads `TEXT_NOISES` from here.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import numpy as np

TEXT_NOISE_VERSION = 1  # in the cache keys of noisy tables and their features: bump when the noise changes
CHAR_RATES = (0.02, 0.05, 0.1, 0.15, 0.25)
WORD_RATES = (0.05, 0.1, 0.2, 0.3, 0.4)


def _char_noise(text: str, severity: int, rng: np.random.Generator) -> str:
    chars, out, i = list(text), [], 0
    while i < len(chars):
        ch = chars[i]
        if not ch.isalpha() or rng.random() >= CHAR_RATES[severity - 1]:
            out.append(ch)
            i += 1
            continue
        edit = rng.integers(4)
        if edit == 1:  # duplicate
            out += [ch, ch]
        elif edit == 2:  # substitute
            out.append(string.ascii_lowercase[rng.integers(26)])
        elif edit == 3 and i + 1 < len(chars):  # swap with the next character
            out += [chars[i + 1], ch]
            i += 1
        i += 1  # edit 0 (or a swap at the end): deleted
    noisy = "".join(out)
    return noisy if noisy.strip() else text  # a row's text never becomes empty (it would be dropped)


def _word_noise(text: str, severity: int, rng: np.random.Generator) -> str:
    words = text.split()
    out: list[str] = []
    i = 0
    while i < len(words):
        if rng.random() >= WORD_RATES[severity - 1]:
            out.append(words[i])
        elif rng.random() < 0.5 and i + 1 < len(words):  # swap with the next word
            out += [words[i + 1], words[i]]
            i += 1
        i += 1  # otherwise deleted
    return " ".join(out) if out else words[rng.integers(len(words))] if words else text


TEXT_NOISE: dict[str, Callable[[str, int, np.random.Generator], str]] = {"char": _char_noise, "word": _word_noise}
TEXT_NOISES = tuple(TEXT_NOISE)


def noisy(text: str, kind: str, severity: int, rng: np.random.Generator) -> str:
    """`text` with `kind` noise at `severity` (1-5); never empty when `text` has a word."""
    return TEXT_NOISE[kind](text, severity, rng)
