"""Training prompt sets disjoint from every evaluation set (`blip3o-rl prompts geneval|ocr`).

GenEval: Flow-GRPO's recipe. Flow-GRPO ran GenEval's own generator per tag
(djghosh13/geneval `prompts/create_prompts.py`), dropped every test prompt
(`dataset/geneval_filter_test.py`) and merged the tags by weight (`dataset/merge_genevaltask.py`).
The facts carried over from those scripts:
- objects: the 80 COCO names of GenEval's `object_names.txt` (`rewards.geneval_rules.COCO_CLASSES`);
  colours: red, orange, yellow, green, blue, purple, pink, brown, black, white; no coloured "person";
- per tag (metadata keys in the order tag, include, exclude, prompt):
  two_object  "a photo of {a X} and {a Y}", X != Y, one of each;
  counting    "a photo of {two|three|four} {Xs}", include N, exclude N + 1 (N in 2..4);
  colors      "a photo of {a C} {X}";
  position    "a photo of {a X} {left of|right of|above|below} {a Y}", include Y then X with
              position [relation, 0];
  color_attr  "a photo of {a C} {X} and {a D} {Y}", X != Y and C != D;
  "an" before a vowel, plural by "es" after a final "s" else "s" (so "skises", as GenEval writes);
- tag weights position 0.7, color_attr 0.3, colors 0.1, counting 0.5, two_object 0.1, normalised;
  lines per tag by largest remainder; a tag with enough distinct prompts is sampled without
  replacement. single_object has weight 0 there, and all 80 of its prompts are evaluation prompts.
  (The only merge script published reads a `geneval_ood_60_20` folder; Flow-GRPO's own
  `dataset/geneval/train_metadata.jsonl` could not be read here to confirm its mix.)
Deliberate differences: a tag with fewer distinct prompts than its share (counting: 240 possible,
80 of them evaluation prompts) repeats each prompt evenly (n // pool or one more times) where
Flow-GRPO draws with replacement; evaluation prompts are matched after `normalise` (lower case,
no spaces), a superset of Flow-GRPO's exact match; the random draws are ours, so a seed does not
give GenEval's or Flow-GRPO's files.

OCR: Flow-GRPO's ~20k model-written training prompts are not available; `rl.prompts.ocr_scenes` writes
ours. Prompts whose text (first quoted span) or whole prompt equals, normalised, one of the
Flow-GRPO OCR test targets / prompts are dropped; each training text is used once.

Both are pure functions of (n, seed): the same arguments write the same file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rewards.geneval_rules import COCO_CLASSES, COLORS, GenevalMetadata
from rewards.ocr import extract_target, normalise
from rl.prompts import ocr_scenes
from rl.prompts.sources import eval_index

Log = Callable[[str], None]

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
COUNTS = (2, 3, 4)
RELATIONS = ("left of", "right of", "above", "below")
COLOURABLE = tuple(name for name in COCO_CLASSES if name != "person")
TAG_WEIGHTS = {"position": 0.7, "color_attr": 0.3, "colors": 0.1, "counting": 0.5, "two_object": 0.1}
"""Flow-GRPO `dataset/merge_genevaltask.py`, in its order (the order decides ties)."""


class PromptSetError(ValueError):
    """Arguments a prompt set cannot be made from, or an output that cannot be written."""


def with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _distinct(rng: np.random.Generator, options: tuple[str, ...], k: int) -> list[str]:
    return [options[int(i)] for i in rng.choice(len(options), size=k, replace=False)]


def _two_object(rng: np.random.Generator) -> dict:
    a, b = _distinct(rng, COCO_CLASSES, 2)
    include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
    return {"tag": "two_object", "include": include, "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}


def _counting(rng: np.random.Generator) -> dict:
    (name,) = _distinct(rng, COCO_CLASSES, 1)
    count = COUNTS[int(rng.integers(len(COUNTS)))]
    return {
        "tag": "counting",
        "include": [{"class": name, "count": count}],
        "exclude": [{"class": name, "count": count + 1}],
        "prompt": f"a photo of {NUMBER_WORDS[count]} {plural(name)}",
    }


def _colors(rng: np.random.Generator) -> dict:
    (name,) = _distinct(rng, COLOURABLE, 1)
    (color,) = _distinct(rng, COLORS, 1)
    include = [{"class": name, "count": 1, "color": color}]
    return {"tag": "colors", "include": include, "prompt": f"a photo of {with_article(color)} {name}"}


def _position(rng: np.random.Generator) -> dict:
    a, b = _distinct(rng, COCO_CLASSES, 2)
    (relation,) = _distinct(rng, RELATIONS, 1)
    include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]
    return {"tag": "position", "include": include, "prompt": f"a photo of {with_article(a)} {relation} {with_article(b)}"}


def _color_attr(rng: np.random.Generator) -> dict:
    a, b = _distinct(rng, COLOURABLE, 2)
    c, d = _distinct(rng, COLORS, 2)
    include = [{"class": a, "count": 1, "color": c}, {"class": b, "count": 1, "color": d}]
    prompt = f"a photo of {with_article(c)} {a} and {with_article(d)} {b}"
    return {"tag": "color_attr", "include": include, "prompt": prompt}


TAG_DRAWS = {
    "two_object": _two_object, "counting": _counting, "colors": _colors, "position": _position, "color_attr": _color_attr,
}
_N, _C, _K = len(COCO_CLASSES), len(COLOURABLE), len(COLORS)
TAG_SPACE = {
    "two_object": _N * (_N - 1),
    "counting": _N * len(COUNTS),
    "colors": _C * _K,
    "position": _N * (_N - 1) * len(RELATIONS),
    "color_attr": _C * (_C - 1) * _K * (_K - 1),
}
"""How many distinct prompts each tag's draw can make."""


def split_by_weights(weights: dict[str, float], n: int) -> dict[str, int]:
    """n lines over the tags: floor of each share, the remainder to the largest fractions."""
    total = sum(weights.values())
    shares = {tag: weight / total * n for tag, weight in weights.items()}
    counts = {tag: int(share) for tag, share in shares.items()}
    by_fraction = sorted(weights, key=lambda tag: counts[tag] - shares[tag])  # stable: ties keep order
    for tag in by_fraction[: n - sum(counts.values())]:
        counts[tag] += 1
    return counts


def _check_n(n: int) -> None:
    if n < 1:
        raise PromptSetError(f"--n must be at least 1, got {n}")


def _tag_pool(tag: str, need: int, rng: np.random.Generator) -> tuple[list[dict], int]:
    """Up to `need` distinct records of `tag` outside the evaluation sets, and how many were removed."""
    evaluation = eval_index().prompts
    pool, seen, removed = [], set(), 0
    while len(pool) < need and len(seen) < TAG_SPACE[tag]:
        record = TAG_DRAWS[tag](rng)
        if record["prompt"] in seen:
            continue
        seen.add(record["prompt"])
        if normalise(record["prompt"]) in evaluation:
            removed += 1
        else:
            GenevalMetadata.model_validate(record)  # the reward's own parser accepts the line
            pool.append(record)
    return pool, removed


def geneval_lines(n: int, seed: int, log: Log = print) -> list[str]:
    """n GenEval metadata lines (JSON), Flow-GRPO's recipe, none of them an evaluation prompt."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    for tag, need in split_by_weights(TAG_WEIGHTS, n).items():
        if need == 0:
            continue
        pool, removed = _tag_pool(tag, need, rng)
        if not pool:
            raise PromptSetError(f"every '{tag}' prompt is an evaluation prompt: nothing to train on")
        repeats, rest = divmod(need, len(pool))
        once_more = np.sort(rng.choice(len(pool), size=rest, replace=False))  # pool < need: every prompt
        records += pool * repeats + [pool[int(i)] for i in once_more]      # `repeats` or one more times
        note = f"; all used, each {repeats} or {repeats + 1} times" if len(pool) < need else ""
        log(f"  {tag:<11} {need:>6} lines from {len(pool):>6} distinct prompts ({removed} evaluation prompts removed{note})")
    return [json.dumps(records[int(i)]) for i in rng.permutation(len(records))]


def ocr_lines(n: int, seed: int, log: Log = print) -> list[str]:
    """n text-rendering prompts with distinct targets, none an evaluation prompt or target."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    evaluation = eval_index()
    prompts, texts, dropped, draws = [], set(), Counter(), 0
    while len(prompts) < n:
        draws += 1
        if draws > 50 * n + 10_000:
            raise PromptSetError(f"only {len(prompts)} distinct texts after {draws - 1} draws: lower --n")
        text = ocr_scenes.draw_text(rng)
        prompt = ocr_scenes.draw_prompt(rng, text)
        if normalise(text) in texts:
            dropped["text already used"] += 1
        elif normalise(text) in evaluation.targets:
            dropped["text is an OCR test target"] += 1
        elif normalise(prompt) in evaluation.prompts:
            dropped["prompt is an evaluation prompt"] += 1
        else:
            texts.add(normalise(text))
            prompts.append(prompt)
    words = Counter(len(extract_target(p).split()) for p in prompts)
    with_digits = sum(any(c.isdigit() for c in extract_target(p)) for p in prompts)
    log(f"  {draws} drawn; dropped: {dict(dropped) or 'none'}")
    log(f"  words per text: {dict(sorted(words.items()))}; texts with digits: {with_digits}")
    return prompts


def write_lines(path: Path, lines: list[str]) -> None:
    """Write one item a line, via a temporary file so a failure leaves no half-written set."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text("".join(line + "\n" for line in lines))
        temporary.replace(path)
    except OSError as error:
        raise PromptSetError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if temporary.exists():
            temporary.unlink()


def write_prompt_set(kind: str, out: Path, n: int, seed: int, log: Log = print) -> list[str]:
    """Make the `kind` ("geneval" or "ocr") set of n lines with `seed` and write it to `out`."""
    make = {"geneval": geneval_lines, "ocr": ocr_lines}[kind]
    if out.is_dir():
        raise PromptSetError(f"cannot write {out}: it is a directory")
    log(f"{kind}: generating {n} training prompts (seed {seed})")
    lines = make(n, seed, log)
    write_lines(out, lines)
    log(f"wrote {len(lines)} lines ({len(set(lines))} distinct) to {out}")
    return lines
