"""The built-in demo task: deterministic, no train/eval overlap, answers re-derived here."""

import datetime
import re
from collections import Counter, defaultdict
from fractions import Fraction

import pytest

from fourbit.demo.task import PRODUCT_FACTS, make_default_dataset, write_default_dataset
from fourbit.io.datasets import detect_format, load_rows, resolve_dataset
from fourbit.train.evaluate import exact_match


@pytest.fixture(scope="module")
def split():
    return make_default_dataset(seed=0)


def _qa(row):
    return row["messages"][1]["content"], row["messages"][2]["content"]


def test_deterministic_for_a_seed_and_different_across_seeds(split):
    assert make_default_dataset(seed=0) == split
    assert make_default_dataset(seed=1)[0] != split[0]


def test_sizes_skills_and_openai_format(split):
    train, held = split
    assert len(train) == 1200 and len(held) == 90
    assert Counter(r["skill"] for r in train) == {"dates": 400, "units": 400, "product": 400}
    assert Counter(r["skill"] for r in held) == {"dates": 30, "units": 30, "product": 30}
    assert detect_format(train) == detect_format(held) == "openai"
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
               for r in train + held)
    assert Counter(r["skill"] for r in make_default_dataset(0, n_train=10, n_eval=5)[1]) == {
        "dates": 2, "units": 2, "product": 1}
    with pytest.raises(ValueError, match="n_eval <= 90"):
        make_default_dataset(n_eval=120)


def test_no_question_answer_pair_is_shared(split):
    train, held = split
    assert not {_qa(r) for r in train} & {_qa(r) for r in held}


# ------------------------------------------------------------------------------ dates

_DATE_QUESTION = re.compile(
    r"^(?:Write |Convert |What is )(.+?)(?: in ISO 8601 format\.| to ISO 8601\.| as YYYY-MM-DD\?)$")
_DATE_FORMATS = {"": ("%B %d, %Y", "%d %B %Y", "%d %b %Y", "%b %d, %Y"),
                 " (day first)": ("%d/%m/%Y",), " (month first)": ("%m/%d/%Y",)}


def _parse_written_date(question):
    written = _DATE_QUESTION.match(question).group(1)
    for suffix, formats in _DATE_FORMATS.items():
        if suffix and not written.endswith(suffix):
            continue
        for fmt in formats:
            try:
                return datetime.datetime.strptime(written.removesuffix(suffix), fmt).date()
            except ValueError:
                pass
    raise AssertionError(f"unparsed date question {question!r}")


def test_date_answers_are_the_iso_form_of_the_written_date(split):
    train, held = split
    rows = [r for r in train + held if r["skill"] == "dates"]
    for row in rows:
        question, answer = _qa(row)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer)
        assert _parse_written_date(question) == datetime.date.fromisoformat(answer), question
    held_days = {_qa(r)[1] for r in held if r["skill"] == "dates"}
    assert not held_days & {_qa(r)[1] for r in train if r["skill"] == "dates"}
    # several written styles really occur (day-first and month-first numeric included)
    questions = " ".join(_qa(r)[0] for r in rows)
    assert "(day first)" in questions and "(month first)" in questions and "Jan " in questions


# ------------------------------------------------------------------------------ units

_IN_BASE = {"mm": Fraction(1, 1000), "cm": Fraction(1, 100), "m": 1, "km": 1000,
            "mg": Fraction(1, 1000), "g": 1, "kg": 1000, "t": 1_000_000,
            "mL": Fraction(1, 1000), "L": 1}
_UNIT_QUESTION = re.compile(
    r"^(?:Convert (\d+) (\w+) to (\w+)\.|How many (\w+) is (\d+) (\w+)\?|(\d+) (\w+) in (\w+)\?)$")


def _unit_parts(question):
    groups = _UNIT_QUESTION.match(question).groups()
    if groups[0]:
        return int(groups[0]), groups[1], groups[2]
    if groups[3]:
        return int(groups[4]), groups[5], groups[3]
    return int(groups[6]), groups[7], groups[8]


def test_unit_answers_recomputed(split):
    train, held = split
    for row in train + held:
        if row["skill"] != "units":
            continue
        question, answer = _qa(row)
        value, source, target = _unit_parts(question)
        converted = Fraction(value) * _IN_BASE[source] / _IN_BASE[target]
        assert converted.denominator == 1 and answer == f"{converted} {target}", question
    held_items = {_unit_parts(_qa(r)[0]) for r in held if r["skill"] == "units"}
    assert not held_items & {_unit_parts(_qa(r)[0]) for r in train if r["skill"] == "units"}


# ---------------------------------------------------------------------------- product


def test_product_facts_are_trained_and_asked_in_new_phrasings(split):
    train, held = split
    answers = {answer for answer, *_ in PRODUCT_FACTS.values()}
    phrasings = defaultdict(set)
    for row in train:
        if row["skill"] == "product":
            question, answer = _qa(row)
            phrasings[answer].add(question)
    assert set(phrasings) == answers  # every fact is in training ...
    assert all(len(questions) == 6 for questions in phrasings.values())  # ... in 6 phrasings
    held_product = [_qa(r) for r in held if r["skill"] == "product"]
    assert len(set(held_product)) == 30
    for question, answer in held_product:
        assert answer in answers and question not in phrasings[answer]
        assert "Vantor Lumo 3" in question


def test_prompts_and_answers_are_short(split, chat_tokenizer):
    train, held = split
    for row in train + held:
        prompt = chat_tokenizer.apply_chat_template(row["messages"][:2], tokenize=False,
                                                    add_generation_prompt=True)
        assert len(chat_tokenizer(prompt)["input_ids"]) <= 48, prompt
        assert len(chat_tokenizer(row["messages"][2]["content"])["input_ids"]) <= 10


# -------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("prediction, reference, equal", [
    ("2021-03-05", "2021-03-05", True),
    ("  2021-03-05.\n", "2021-03-05", True),
    ("3000  M!", "3000 m", True),
    ("Sage Green", "sage green", True),
    ("sage  green ?", "sage green", True),
    ("sagegreen", "sage green", False),
    ("2021-03-5", "2021-03-05", False),
    ("$149", "149", False),  # only trailing punctuation is ignored
    ("It is 3000 m.", "3000 m", False),
    ("", "3000 m", False),
])
def test_exact_match(prediction, reference, equal):
    assert exact_match(prediction, reference) is equal


# ---------------------------------------------------------------------------- writing


def test_write_default_dataset_round_trips(tmp_path):
    train_path, eval_path = write_default_dataset(tmp_path / "task", seed=3, n_train=30, n_eval=9)
    train, held = make_default_dataset(seed=3, n_train=30, n_eval=9)
    assert load_rows(train_path) == train and load_rows(eval_path) == held
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == ["eval.jsonl", "train.jsonl"]
    assert resolve_dataset(str(train_path)) == [r["messages"] for r in train]
