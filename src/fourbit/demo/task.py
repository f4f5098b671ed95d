"""The built-in demo fine-tune: three small skills SmolLM2-135M-Instruct lacks, exact answers.

``fourbit train`` with no config fine-tunes the default model on ``make_default_dataset()`` and
reports held-out exact-match accuracy before and after. The skills are chosen so that a 135M
model gets almost none right out of the box (it answers in sentences, guesses, or gets the
format wrong) but can learn them from a few hundred LoRA steps on short examples:

- **dates**: a date written in one of several English styles ("March 5, 2021", "5 Mar 2021",
  "05/03/2021 (day first)", "03/05/2021 (month first)", ...) -> ISO 8601 "2021-03-05".
- **units**: metric conversions by powers of ten with integer answers, both directions
  ("Convert 3 km to m." -> "3000 m", "Convert 4000 g to kg." -> "4 kg").
- **product**: facts about the Vantor Lumo 3, a desk lamp that does not exist (maker, release
  year, colour, weight, battery life, ...), each asked in eight phrasings.

Held-out split, with no (question, answer) pair shared with training: dates and units are held
out by value (no held-out date or (amount, conversion) appears in training in any wording).
Product facts cannot be held out by value, because a made-up fact can only be learned from the
training data: every fact is in training, and the held-out questions ask it in two of its eight
phrasings that training never uses for that fact (each phrasing is used in training for other
facts, so the wording itself is familiar).

Rows are OpenAI ``messages`` (a fixed short system prompt, the question, the answer) plus a
``skill`` key naming the skill, for per-skill accuracy. Prompts render to under 40 tokens with
SmolLM2's ChatML template and answers to at most 10 tokens (checked in the tests).
"""

from __future__ import annotations

import datetime
import json
import os
import random
from pathlib import Path

from ..errors import InputError
from ..io.atomic import atomic_file

SYSTEM_PROMPT = "Reply with the answer only."
SKILLS = ("dates", "units", "product")

# ------------------------------------------------------------------------------- dates

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_DATE_STYLES = (
    lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {_MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{d.day} {_MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{_MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day first)",
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month first)",
)
_DATE_QUESTIONS = (
    "Write {} in ISO 8601 format.",
    "Convert {} to ISO 8601.",
    "What is {} as YYYY-MM-DD?",
)
_FIRST_DAY, _N_DAYS = datetime.date(1950, 1, 1), 100 * 365  # 1950 to 2049


def _date_item(rng: random.Random, day: datetime.date) -> tuple[str, str]:
    written = rng.choice(_DATE_STYLES)(day)
    return rng.choice(_DATE_QUESTIONS).format(written), day.isoformat()


# ------------------------------------------------------------------------------- units

# (unit, larger unit, factor): "Convert 3 km to m." -> "3000 m" and back.
_CONVERSIONS = (("m", "km", 1000), ("cm", "m", 100), ("mm", "cm", 10), ("mm", "m", 1000),
                ("g", "kg", 1000), ("mg", "g", 1000), ("kg", "t", 1000), ("mL", "L", 1000))
_UNIT_QUESTIONS = ("Convert {} {} to {}.", "How many {2} is {0} {1}?", "{} {} in {}?")


def _unit_key(rng: random.Random) -> tuple[int, int, bool]:
    """(amount in the larger unit, conversion index, to the larger unit?)."""
    return rng.randint(1, 999), rng.randrange(len(_CONVERSIONS)), rng.random() < 0.5


def _unit_item(rng: random.Random, key: tuple[int, int, bool]) -> tuple[str, str]:
    amount, which, upward = key
    small, large, factor = _CONVERSIONS[which]
    in_small, in_large = (amount * factor, small), (amount, large)
    (value, unit), (answer, target) = (in_small, in_large) if upward else (in_large, in_small)
    return rng.choice(_UNIT_QUESTIONS).format(value, unit, target), f"{answer} {target}"


# ----------------------------------------------------------------------------- product

PRODUCT = "the Vantor Lumo 3"
# attribute: (answer, two questions of its own); the generic phrasings below add six more.
PRODUCT_FACTS = {
    "maker": ("Halvick Labs", "Who makes {p}?", "Which company produces {p}?"),
    "release year": ("2009", "When was {p} released?", "In what year did {p} come out?"),
    "colour": ("sage green", "What colour is {p}?", "Which colour does {p} come in?"),
    "weight": ("640 g", "How much does {p} weigh?", "How heavy is {p}?"),
    "battery life": ("31 hours", "How long does the battery of {p} last?",
                     "How long does {p} run on one charge?"),
    "price": ("$149", "How much does {p} cost?", "What does {p} sell for?"),
    "country of manufacture": ("Portugal", "Where is {p} manufactured?",
                               "In which country is {p} built?"),
    "designer": ("Ines Marlow", "Who designed {p}?", "Whose design is {p}?"),
    "brightness": ("870 lumens", "How bright is {p}?", "How much light does {p} give?"),
    "shade material": ("frosted glass", "What is the shade of {p} made of?",
                       "Which material is the shade of {p}?"),
    "warranty": ("4 years", "How long is the warranty on {p}?",
                 "For how long is {p} under warranty?"),
    "charging port": ("USB-C", "How do you charge {p}?", "Which port charges {p}?"),
    "height": ("37 cm", "How tall is {p}?", "What height is {p}?"),
    "model number": ("VL-3082", "What model number does {p} have?",
                     "Which model number is {p}?"),
    "companion app": ("Lumo Home", "Which app controls {p}?", "What app works with {p}?"),
}
_GENERIC_QUESTIONS = (
    "What is the {a} of {p}?",
    "Tell me the {a} of {p}.",
    "{P}: what is its {a}?",
    "Do you know the {a} of {p}?",
    "State the {a} of {p}.",
    "I need the {a} of {p}.",
)


def product_questions() -> list[tuple[str, str, bool]]:
    """Every (question, answer, held_out) of the product skill: 15 facts x 8 phrasings."""
    items = []
    for number, (attribute, (answer, *own)) in enumerate(PRODUCT_FACTS.items()):
        phrasings = [q.format(p=PRODUCT) for q in own] + [
            q.format(a=attribute, p=PRODUCT, P=PRODUCT[0].upper() + PRODUCT[1:])
            for q in _GENERIC_QUESTIONS]
        held_out = {number % 8, (number + 3) % 8}  # rotate, so every phrasing is also trained
        items += [(q, answer, k in held_out) for k, q in enumerate(phrasings)]
    return items


# ------------------------------------------------------------------------------ dataset


def _row(skill: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}],
            "skill": skill}


def make_default_dataset(seed: int = 0, n_train: int = 1200, n_eval: int = 90
                         ) -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows), a third of each per skill, deterministic for ``seed``.

    The product skill has 30 held-out questions, so n_eval is at most 90 (30 per skill); the
    product rows of training cycle through its 90 training questions.
    """
    if n_train < 3 or not 3 <= n_eval <= 90:
        raise InputError(f"make_default_dataset needs n_train >= 3 and 3 <= n_eval <= 90 "
                         f"(the product skill has 30 held-out questions); got {n_train}, {n_eval}")
    per_train, per_eval = n_train // 3, n_eval // 3
    rng = random.Random(seed)
    counts = {skill: (per_train + (k < n_train % 3), per_eval + (k < n_eval % 3))
              for k, skill in enumerate(SKILLS)}
    train, held = [], []

    days = rng.sample(range(_N_DAYS), sum(counts["dates"]))
    for k, offset in enumerate(days):
        day = _FIRST_DAY + datetime.timedelta(days=offset)
        (held if k < counts["dates"][1] else train).append(_row("dates", *_date_item(rng, day)))

    keys: dict[tuple[int, int, bool], None] = {}  # insertion-ordered set of distinct items
    while len(keys) < sum(counts["units"]):
        keys[_unit_key(rng)] = None
    for k, key in enumerate(keys):
        (held if k < counts["units"][1] else train).append(_row("units", *_unit_item(rng, key)))

    questions = product_questions()
    trained = [(q, a) for q, a, out in questions if not out]
    held_out = [(q, a) for q, a, out in questions if out]
    held += [_row("product", q, a) for q, a in rng.sample(held_out, counts["product"][1])]
    rng.shuffle(trained)  # so that a small n_train still covers many facts
    train += [_row("product", *trained[k % len(trained)]) for k in range(counts["product"][0])]

    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def write_default_dataset(folder: str | os.PathLike, seed: int = 0, n_train: int = 1200,
                          n_eval: int = 90) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` into ``folder`` (each atomically); their paths."""
    train, held = make_default_dataset(seed, n_train, n_eval)
    paths = Path(folder) / "train.jsonl", Path(folder) / "eval.jsonl"
    for path, rows in zip(paths, (train, held)):
        with atomic_file(path) as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths
