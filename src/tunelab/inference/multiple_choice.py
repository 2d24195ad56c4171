"""`tunelab evaluate` on multiple-choice questions: did the fine-tune keep what the model knew?

A file of questions in the shape of the benchmarks users check a model on (MMLU's `question`, `choices`, `answer`;
ARC's `question`, `choices` {text, label}, `answerKey`; HellaSwag's `ctx`, `endings`, `label`; or `question`,
`choices` and an `answer` that is an index, a letter or the right choice's text) is scored as
lm-evaluation-harness scores it: each choice is a continuation of the question, the model picks the one whose
tokens it finds likeliest (summed log-probabilities), and `accuracy_norm` divides each sum by the choice's length
in characters first (lm-evaluation-harness's `acc_norm`: long answers are not penalised for being long). MMLU-shaped
questions list their choices after the question and score the letters (` A`, ` B`, ...), as the harness's MMLU
task does; ARC and HellaSwag score each choice's own text.

A model with a chat template is asked as it is used: the question is a user turn and each choice the start of
its answer (lm-evaluation-harness's `--apply_chat_template`); a model without one reads plain text. The figures
are for comparing a run with its base on the same questions (`--compare-base`), not with published leaderboard
numbers (zero-shot, the run's own prompt form).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.formats import RowProblem, cell_text, convert_rows, describe_type
from tunelab.data.sources import json_or_none

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class ChoiceShape:
    """Which columns hold a question, its choices and the right one, and how the choices are scored."""

    name: str  # mmlu | arc | hellaswag
    question: str
    choices: str
    answer: str
    letters: bool  # the choices listed in the question and their letters scored (MMLU's form)


@dataclass(frozen=True)
class Question:
    text: str  # the question as the model reads it (MMLU's with its lettered choices)
    choices: list[str]  # each choice's text
    answer: int  # the right choice's index
    letters: bool

    def continuations(self) -> list[str]:
        """What is scored after the question: each choice's letter, or its own text."""
        return [LETTERS[i] for i in range(len(self.choices))] if self.letters else self.choices


def choice_shape(columns: list[str]) -> ChoiceShape | None:
    """The multiple-choice shape of a split's columns, None when it is not one."""
    if {"ctx", "endings", "label"} <= set(columns):
        return ChoiceShape("hellaswag", "ctx", "endings", "label", letters=False)
    if "question" in columns and "choices" in columns:
        if "answerKey" in columns:
            return ChoiceShape("arc", "question", "choices", "answerKey", letters=False)
        if "answer" in columns:
            return ChoiceShape("mmlu", "question", "choices", "answer", letters=True)
    return None


def shape_of(data_path: str, split: str) -> ChoiceShape | None:
    """The multiple-choice shape of `split` of `data_path` (its first rows' columns), None when it is not one."""
    from tunelab.data.sources import locate_splits, stream_split

    return choice_shape(stream_split(locate_splits(data_path, split, None)["train"], "train").head.columns)


def read_questions(data_path: str, split: str, shape: ChoiceShape) -> tuple[str, list[Question]]:
    """Every question of the split (its origin, and the questions); a bad row is a DataError naming its file,
    line and column, as training names bad rows."""
    from tunelab.data.sources import locate_splits, read_location

    source = read_location(locate_splits(data_path, split, None)["train"], "train")
    questions, _ = convert_rows(source, lambda row: _question(row, shape), bad_rows=None)
    return source.origin, questions


def _question(row: dict, shape: ChoiceShape) -> Question:
    text = cell_text(row, shape.question).strip()
    value = row.get(shape.choices)
    if isinstance(value, str):
        value = json_or_none(value)
    labels = None
    if isinstance(value, dict) and "text" in value:  # ARC's {"text": [...], "label": ["A", ...]}
        labels, value = value.get("label"), value["text"]
    choices = list(value) if isinstance(value, (list, tuple)) else None
    if not choices or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        got = describe_type(value) if choices is None else f"{len(choices)} choice(s) or an empty one"
        raise RowProblem(shape.choices, f"expected a list of two or more texts, got {got}")
    if len(choices) > len(LETTERS):
        raise RowProblem(shape.choices, f"{len(choices)} choices: at most {len(LETTERS)} are scored")
    choices = [choice.strip() for choice in choices]
    answer = _answer_index(row.get(shape.answer), choices, labels)
    if answer is None:
        shown = row.get(shape.answer)
        raise RowProblem(shape.answer, f"{shown!r} is not one of the {len(choices)} choices")
    if shape.letters:
        listed = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
        text = f"{text}\n{listed}\nAnswer:"
    elif shape.name == "arc":
        text = f"Question: {text}\nAnswer:"
    return Question(text, choices, answer, shape.letters)


def _answer_index(value: Any, choices: list[str], labels: Any) -> int | None:
    """The right choice's index from an index (from 0, as MMLU's and HellaSwag's; a CSV's text of one too), a label
    ARC's choices carry, the choice's own text, or a letter; None when it names none of them. A text is read as a
    label, then a choice's text, then a letter, then an index."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < len(choices) else None
    if not isinstance(value, str) or not value.strip():
        return None
    given = value.strip()
    if isinstance(labels, list) and given in labels:
        index = labels.index(given)
        return index if index < len(choices) else None
    if given in choices:
        return choices.index(given)
    if len(given) == 1 and given.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(given.upper())
    if given.isdigit():
        return _answer_index(int(given), choices, None)
    return None


def choice_logprobs(model: Any, tokenizer: Any, question: Question) -> list[float]:
    """Each choice's summed log-probability as the continuation of the question (one padded batch), the question
    written through the model's chat template when it has one. The pair is encoded whole and split where the
    question's own tokens end, with the question's trailing spaces moved to the choice, as lm-evaluation-harness
    encodes a context and its continuation."""
    import torch

    context, templated = _context(question.text, tokenizer)
    add_special = not templated  # a chat template writes its own special tokens
    rows, starts = [], []
    for continuation in question.continuations():
        # plain text: a space between question and choice (the harness's target_delimiter); in a chat, the choice
        # opens the answer
        text = continuation if templated else f" {continuation}"
        spaces = len(context) - len(context.rstrip(" "))
        head, tail = context[: len(context) - spaces], context[len(context) - spaces :] + text
        head_ids = tokenizer(head, add_special_tokens=add_special)["input_ids"]
        whole = tokenizer(head + tail, add_special_tokens=add_special)["input_ids"]
        rows.append(whole)
        starts.append(min(len(head_ids), len(whole) - 1))
    width = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=model.device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=model.device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return [float(logps[i, starts[i] - 1 : len(row) - 1].sum()) for i, row in enumerate(rows)]


def _context(text: str, tokenizer: Any) -> tuple[str, bool]:
    """The question as the model reads it, and whether a chat template wrote it (as a user turn, with the
    generation prompt after it)."""
    from tunelab.inference.generate import format_prompt

    if getattr(tokenizer, "chat_template", None):
        return format_prompt(text, tokenizer), True
    return text, False


@dataclass(frozen=True)
class Picks:
    plain: list[int]  # each question's likeliest choice
    normalized: list[int]  # ... per character of the choice

    def accuracy(self, questions: list[Question]) -> tuple[float, float]:
        right = [q.answer for q in questions]
        plain = sum(p == a for p, a in zip(self.plain, right, strict=True)) / len(questions)
        return plain, sum(p == a for p, a in zip(self.normalized, right, strict=True)) / len(questions)


def pick(model: Any, tokenizer: Any, questions: list[Question]) -> Picks:
    plain, normalized = [], []
    for question in questions:
        scores = choice_logprobs(model, tokenizer, question)
        lengths = [max(len(c), 1) for c in question.continuations()]
        plain.append(max(range(len(scores)), key=scores.__getitem__))
        normalized.append(max(range(len(scores)), key=lambda i: scores[i] / lengths[i]))
    return Picks(plain, normalized)


def evaluate_choices(
    folder: Path,
    data_path: str,
    split: str,
    shape: ChoiceShape,
    compare_base: bool,
    max_rows: int,
    samples: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's (and with `compare_base` its base's) accuracy on the split's questions, and sample questions
    with the right choice and each model's pick."""
    from tunelab.inference.evaluate_preference import comparison_base
    from tunelab.inference.generate import load_run
    from tunelab.outputs import read_run

    origin, questions = read_questions(data_path, split, shape)
    questions = questions[:max_rows]
    model, tokenizer = load_run(folder)
    started = time.time()
    tuned = pick(model, tokenizer, questions)
    results: dict[str, Any] = {"data": origin, "rows": len(questions), "unit": "questions", "model": str(folder)}
    results["task"] = "multiple_choice"
    results["format"] = shape.name
    results["prompt"] = "chat template" if getattr(tokenizer, "chat_template", None) else "plain text"
    results["accuracy"], results["accuracy_norm"] = tuned.accuracy(questions)
    results["chance"] = sum(1 / len(q.choices) for q in questions) / len(questions)
    base = None
    if compare_base:
        base_model, base_context = comparison_base(model, folder)
        with base_context():
            base = pick(base_model, tokenizer, questions)
        results["base_accuracy"], results["base_accuracy_norm"] = base.accuracy(questions)
        results["base_model"] = read_run(folder).get("base_model")
    results["seconds"] = round(time.time() - started, 1)
    shown = [
        {
            "prompt": question.text,
            "reference": question.choices[question.answer],
            "tuned": question.choices[tuned.plain[i]],
            "base": None if base is None else question.choices[base.plain[i]],
        }
        for i, question in enumerate(questions[:samples])
    ]
    return results, shown


def choices_table(results: dict[str, Any]) -> list[str]:
    """The report's figures: accuracy and accuracy per character, beside chance."""
    lines = ["| model | accuracy | accuracy (norm) |", "| --- | --- | --- |"]
    lines.append(f"| fine-tuned | {results['accuracy']:.4f} | {results['accuracy_norm']:.4f} |")
    if "base_accuracy" in results:
        base = f"base ({results.get('base_model')})"
        lines.append(f"| {base} | {results['base_accuracy']:.4f} | {results['base_accuracy_norm']:.4f} |")
    lines.append(f"| chance | {results['chance']:.4f} | {results['chance']:.4f} |")
    return lines


def summary(results: dict[str, Any]) -> list[str]:
    """What `tunelab evaluate` prints."""
    lines = [
        f"accuracy {results['accuracy']:.4f} (norm {results['accuracy_norm']:.4f}) on {results['rows']} "
        f"{results['format']}-style questions, {results['prompt']} (chance {results['chance']:.4f})"
    ]
    if "base_accuracy" in results:
        lines.append(f"base: accuracy {results['base_accuracy']:.4f} (norm {results['base_accuracy_norm']:.4f})")
    return lines
