"""`tunelab evaluate` on multiple-choice questions: did the fine-tune keep what the model knew?

A file of questions in the shape of the benchmarks users check a model on (MMLU's `question`, `choices`, `answer`;
ARC's `question`, `choices` {text, label}, `answerKey`; HellaSwag's `ctx`, `endings`, `label`; or `question`,
`choices` and an `answer` that is an index, a letter or the right choice's text) is scored as
lm-evaluation-harness scores it: each choice is a continuation of the question, the model picks the one whose
tokens it finds likeliest (summed log-probabilities), and `accuracy_norm` divides each sum by the choice's length
in characters first (lm-evaluation-harness's `acc_norm`: long answers are not penalised for being long). MMLU-shaped
questions list their choices after the question (after the harness's line naming the `subject`, where there is
one) and score the letters (` A`, ` B`, ...), as the harness's MMLU task does; ARC and HellaSwag score each
choice's own text (HellaSwag's query and endings built and cleaned of their WikiHow tags as the harness does).

A model with a chat template is asked as it is used, as the harness's `--apply_chat_template` asks it: the
subject's line a system turn, each few-shot example (`--fewshot`) a user turn and its answer, the question a user
turn and each choice the start of the answer; a model without one reads plain text. Few-shot examples are the
first of a split (of the question's subject), as the harness's MMLU tasks take them (bench/compare_lm_eval.py
finds its log-likelihoods); its ARC and HellaSwag tasks draw theirs at random from the train split instead.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from tunelab.data.formats import RowProblem, cell_text, convert_rows, describe_type
from tunelab.data.sources import hub_subset, json_or_none, locate_splits, read_location, stream_split
from tunelab.errors import DataError, TunelabError

log = logging.getLogger("tunelab")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
HELLASWAG_PARTS = ("activity_label", "ctx_a", "ctx_b")  # what its query is built from (`ctx` joins the last two)


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
    """One question as it is asked and scored."""

    text: str  # the question as the model reads it (MMLU's with its lettered choices)
    choices: list[str]  # each choice's text
    answer: int  # the right choice's index
    letters: bool
    description: str = ""  # what the harness puts before every question of a task (MMLU's subject line)
    subject: str | None = None  # MMLU's subject: the few-shot examples come from the same one
    shots: tuple[tuple[str, str], ...] = ()  # answered examples before the question: (question, answer)

    def continuations(self) -> list[str]:
        """What is scored after the question: each choice's letter, or its own text."""
        return [LETTERS[i] for i in range(len(self.choices))] if self.letters else self.choices

    def as_shot(self) -> tuple[str, str]:
        """The question answered, as a few-shot example shows it."""
        return self.text, self.continuations()[self.answer]


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
    """The multiple-choice shape of `split` of `data_path`, None when it is not one: its columns name one, and its
    first row's choices are a list of them (or ARC's {text, label}, or a JSON string of either), so that a file
    that only names its columns so (`choices` written as one text) is measured as any other (its loss)."""
    head = stream_split(locate_splits(data_path, split, None)["train"], "train").head
    shape = choice_shape(head.columns)
    if shape is None or not head.rows:
        return shape
    value = head.rows[0].get(shape.choices)
    value = json_or_none(value) if isinstance(value, str) else value
    return shape if isinstance(value, (list, tuple)) or (isinstance(value, dict) and "text" in value) else None


def read_questions(data_path: str, split: str, shape: ChoiceShape) -> tuple[str, list[Question]]:
    """Every question of `split` of `data_path` (its origin, and the questions); a bad row is a DataError naming its
    file, line and column, as training names bad rows."""
    return questions_at(locate_splits(data_path, split, None)["train"], shape)


def questions_at(place: Path | tuple[str, str], shape: ChoiceShape) -> tuple[str, list[Question]]:
    """Every question of the split at `place` (a file, or a hub dataset and split: data/sources.locate_splits)."""
    source = read_location(place, "train")
    ambiguous: list[str] = []
    questions, _ = convert_rows(source, lambda row: _question(row, shape, ambiguous), bad_rows=None)
    if ambiguous:
        log.warning(
            "evaluate: %s: %d answer(s) of digits read as a choice's index from 0 (as the harness reads digits), "
            "though they are also another choice's text (the first: %s): give answers as numbers or letters where "
            "the choices are digits",
            source.origin, len(ambiguous), ambiguous[0],
        )  # fmt: skip
    return source.origin, questions


def _question(row: dict, shape: ChoiceShape, ambiguous: list[str]) -> Question:
    """One row as a question (RowProblem when it is not one); `ambiguous` collects answers of digits that are also
    another choice's text."""
    text = cell_text(row, shape.question).strip()
    choices, labels = _choices(row, shape.choices)
    given = row.get(shape.answer)
    answer = _answer_index(given, choices, labels)
    if answer is None:
        raise RowProblem(shape.answer, f"{given!r} is not one of the {len(choices)} choices")
    if isinstance(given, str) and given.strip().isdecimal() and given.strip() in choices:
        if choices.index(given.strip()) != answer:
            ambiguous.append(f"{given!r} read as choice {LETTERS[answer]} ({choices[answer]!r})")
    description, subject = "", None
    if shape.letters:
        listed = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
        text = f"{text}\n{listed}\nAnswer:"
        named = row.get("subject")
        if isinstance(named, str) and named.strip():  # the harness's description of each MMLU subject's task
            subject = named.strip()
            description = (
                f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            )
    elif shape.name == "arc":
        text = f"Question: {text}\nAnswer:"
    elif shape.name == "hellaswag":  # the harness's query (activity, context, its second part capitalised), cleaned
        if all(isinstance(row.get(key), str) for key in HELLASWAG_PARTS):
            activity, first, second = (row[key] for key in HELLASWAG_PARTS)
            text = f"{activity}: {first} {second.capitalize()}"
        text, choices = _cleaned(text), [_cleaned(choice) for choice in choices]
    return Question(text, choices, answer, shape.letters, description, subject)


def _choices(row: dict, column: str) -> tuple[list[str], Any]:
    """A row's choices (a list of texts, ARC's {text, label}, or a JSON string of either) and ARC's labels."""
    value = given = row.get(column)
    if isinstance(value, str):
        value = json_or_none(value)
    labels = None
    if isinstance(value, dict) and "text" in value:  # ARC's {"text": [...], "label": ["A", ...]}
        labels, value = value.get("label"), value["text"]
    if not isinstance(value, (list, tuple)):
        got = "a text that is not a JSON list" if isinstance(given, str) and value is None else describe_type(value)
        raise RowProblem(column, f"expected a list of two or more texts, got {got}")
    if len(value) < 2:
        raise RowProblem(column, f"expected a list of two or more texts, got {len(value)} choice(s)")
    for number, choice in enumerate(value, start=1):
        if not isinstance(choice, str) or not choice.strip():
            got = "empty text" if isinstance(choice, str) else describe_type(choice)
            raise RowProblem(column, f"choice {number} is not text (got {got})")
    if len(value) > len(LETTERS):
        raise RowProblem(column, f"{len(value)} choices: at most {len(LETTERS)} are scored")
    return [choice.strip() for choice in value], labels


def _cleaned(text: str) -> str:
    """HellaSwag's WikiHow text as the harness reads it: its [title] a sentence break, other [tags] gone."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def _answer_index(value: Any, choices: list[str], labels: Any) -> int | None:
    """The right choice's index, None when the answer names none. A label ARC's choices carry (compared as text: a
    JSON writer may have made "1" a number); an index from 0 (MMLU's, HellaSwag's; a CSV's digits, as the harness
    reads them); a letter; the choice's own text."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    given = str(value).strip()
    if isinstance(labels, list) and given in [str(label) for label in labels]:
        index = [str(label) for label in labels].index(given)
        return index if index < len(choices) else None
    if isinstance(value, int) or (given.isdecimal() and given.isascii()):
        return int(given) if 0 <= int(given) < len(choices) else None
    if len(given) == 1 and given.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(given.upper())
    return choices.index(given) if given in choices else None


def choice_logprobs(model: Any, tokenizer: Any, question: Question) -> list[float]:
    """Each choice's summed log-probability as the continuation of the question (one padded batch), the question
    written through the model's chat template when it has one. The pair is encoded whole and split where the
    question's own tokens end, with the question's trailing whitespace moved to the choice, as lm-evaluation-harness
    encodes a context and its continuation (bench/compare_lm_eval.py checks that the log-likelihoods equal its own);
    never with an end-of-text token (a tokenizer that appends one would have it scored in place of the choice).
    Plain text starts with the tokenizer's BOS where it writes one; templated text has only what the template
    writes, as tunelab trains and generates it (the harness adds the tokenizer's BOS there too, so a template that
    writes none scores differently: docs/benchmarks.md). A question longer than the model's positions loses its
    beginning (GPT-2's learned positions end at 1024)."""
    import torch

    context, templated = _context(question, tokenizer)
    opening = [] if templated else _bos(tokenizer)  # templated text: the template's own BOS, if it writes one
    room = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    head = context.rstrip()  # its trailing whitespace (a template's closing newline) is scored with the choice
    head_ids = opening + tokenizer(head, add_special_tokens=False)["input_ids"]
    rows, starts = [], []
    for continuation in question.continuations():
        # plain text: a space between question and choice (the harness's target_delimiter); in a chat, the choice
        # opens the answer
        tail = context[len(head) :] + (continuation if templated else f" {continuation}")
        whole = opening + tokenizer(head + tail, add_special_tokens=False)["input_ids"]
        start = max(1, min(len(head_ids), len(whole) - 1))
        # The last token is only predicted, never read: a row may hold one more than the model's positions.
        if room and len(whole) > room + 1:  # too long: its beginning goes, as the harness cuts it
            cut = min(len(whole) - room - 1, start - 1)
            whole, start = whole[cut:], start - cut
        rows.append(whole)
        starts.append(start)
    width = max(len(ids) for ids in rows) - 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([row[:-1] + [pad] * (width - len(row) + 1) for row in rows], device=model.device)
    mask = torch.tensor([[1] * (len(row) - 1) + [0] * (width - len(row) + 1) for row in rows], device=model.device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    scores = []
    for i, row in enumerate(rows):  # each row's choice positions alone in float32: not the whole vocabulary's
        logps = torch.log_softmax(logits[i, starts[i] - 1 : len(row) - 1].float(), dim=-1)
        targets = torch.tensor(row[starts[i] :], device=model.device)[:, None]
        scores.append(float(logps.gather(-1, targets).sum()))
    return scores


def _bos(tokenizer: Any) -> list[int]:
    """The BOS a tokenizer writes before a text (Llama's, Gemma's), [] for those that write none (GPT-2's, Qwen's)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    written = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and written[:1] == [bos] else []


def _context(question: Question, tokenizer: Any) -> tuple[str, bool]:
    """The question as the model reads it, and whether a chat template wrote it, as the harness builds it: in
    plain text, the description, each answered example ("question answer" and a blank line) and the question; in a
    chat, the description as the system turn, each example a user turn and its answer (the harness's
    fewshot_as_multiturn, its default with a chat template), the question a user turn and the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        shown = "".join(f"{asked} {answered}\n\n" for asked, answered in question.shots)
        return question.description + shown + question.text, False
    turns = []
    for asked, answered in question.shots:
        turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    turns.append({"role": "user", "content": question.text})
    if question.description:
        try:
            described = [{"role": "system", "content": question.description}, *turns]
            return tokenizer.apply_chat_template(described, tokenize=False, add_generation_prompt=True), True
        except TemplateError:  # Gemma 2's template takes no system turn: the harness then leaves it out too
            pass
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), True


def takes_system_turn(tokenizer: Any) -> bool:
    """Whether the model's chat template writes a system turn (Gemma 2's raises on one)."""
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    try:
        tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    return True


def _unsliced(place: Any) -> Any:
    """A split's place with any slice of a hub split taken off (cais/mmlu all:test[:500] is all:test)."""
    if isinstance(place, Path):
        return place
    dataset, split = place
    subset, part = hub_subset(split)
    return dataset, subset, re.sub(r"\[[^\]]*\]$", "", part).strip()


def with_shots(
    questions: list[Question], pool: list[Question], count: int, same_split: bool, pool_name: str = "the split"
) -> list[Question]:
    """Each question with `count` answered examples before it: the first of `pool` (of its subject, where the
    questions name one: the harness's MMLU tasks are one per subject), as the harness's first_n sampler takes its
    few-shot split's; from the evaluated split itself (`same_split`), never the question being asked."""
    by_subject: dict[str | None, list[Question]] = {}
    for candidate in pool:
        by_subject.setdefault(candidate.subject, []).append(candidate)
    shown = []
    for question in questions:
        subject = by_subject.get(question.subject, [])
        candidates = list(islice((q for q in subject if not (same_split and q == question)), count))
        if len(candidates) < count:
            held = len(candidates)
            raise TunelabError(
                f"evaluate: --fewshot {count}: {pool_name} holds {held} {'other ' if same_split else ''}question(s)"
                + (f" of the subject {question.subject!r}" if question.subject else "")
                + ": lower --fewshot or name another --fewshot-split"
            )
        shown.append(replace(question, shots=tuple(q.as_shot() for q in candidates)))
    return shown


@dataclass(frozen=True)
class Picks:
    """Each question's pick by a model."""

    plain: list[int]  # each question's likeliest choice
    normalized: list[int]  # ... per character of the choice

    def accuracy(self, questions: list[Question]) -> tuple[float, float]:
        """The share of right picks: by summed log-probability, and per character."""
        right = [q.answer for q in questions]
        plain = sum(p == a for p, a in zip(self.plain, right, strict=True)) / len(questions)
        return plain, sum(p == a for p, a in zip(self.normalized, right, strict=True)) / len(questions)


def pick(model: Any, tokenizer: Any, questions: list[Question]) -> Picks:
    """The choice the model finds likeliest for each question, summed and per character."""
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
    *,
    compare_base: bool,
    max_rows: int,
    samples: int,
    fewshot: int,
    fewshot_split: str | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's (and with `compare_base` its base's) accuracy on the split's questions, and sample questions
    with the right choice and each model's pick. `fewshot`: answered examples before each question
    (examples_of says which)."""
    from tunelab.inference.evaluate_preference import comparison_base
    from tunelab.inference.generate import load_run
    from tunelab.outputs import read_run

    place = locate_splits(data_path, split, None)["train"]
    origin, every = questions_at(place, shape)
    questions = every[:max_rows]
    if fewshot:
        questions = examples_of(questions, every, place, shape, data_path, split, fewshot, fewshot_split)
    model, tokenizer = load_run(folder)
    # the base found before any scoring: a folder that does not say which it is fails at once
    base_model, base_context = comparison_base(model, folder) if compare_base else (None, None)
    templated = bool(getattr(tokenizer, "chat_template", None))
    if templated and any(q.description for q in questions) and not takes_system_turn(tokenizer):
        log.warning(
            "evaluate: the chat template takes no system turn: the questions are asked without the subject's line, "
            "as the harness asks them"
        )
    started = time.time()
    tuned = pick(model, tokenizer, questions)
    accuracy, accuracy_norm = tuned.accuracy(questions)
    results: dict[str, Any] = {
        "data": origin,
        "rows": len(questions),
        "unit": "questions",
        "model": str(folder),
        "task": "multiple_choice",
        "format": shape.name,
        "fewshot": fewshot,
        "prompt": "chat template" if templated else "plain text",
        "accuracy": accuracy,
        "accuracy_norm": accuracy_norm,
        "chance": sum(1 / len(q.choices) for q in questions) / len(questions),
    }
    base = None
    if base_context is not None:
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


def examples_of(
    questions: list[Question],
    every: list[Question],
    place: Path | tuple[str, str],
    shape: ChoiceShape,
    data_path: str,
    split: str,
    count: int,
    named: str | None,
) -> list[Question]:
    """The questions with `count` answered examples each, from the few-shot split `named`: beside a file, a path or
    a file name in its folder (None: the file's own other questions); in a folder or hub dataset, a split (None:
    dev, MMLU's), a hub subset carried over (college_biology:test takes college_biology:dev). A slice of the
    evaluated split is that split: its questions are never their own examples."""
    single_file = isinstance(place, Path) and Path(data_path).is_file()
    if named is None and single_file:
        return with_shots(questions, every, count, True, place.name)
    named = named or "dev"
    subset, _ = hub_subset(split)
    if subset and hub_subset(named)[0] is None:
        named = f"{subset}:{named}"
    try:
        examples_place = locate_splits(data_path, split, named)["valid"] if single_file else None
        examples_place = examples_place or locate_splits(data_path, named, None)["train"]
        pool = every if examples_place == place else questions_at(examples_place, shape)[1]
    except DataError as err:
        raise DataError(f"evaluate: --fewshot-split {named}: {err}") from None
    return with_shots(
        questions, pool, count, _unsliced(examples_place) == _unsliced(place), f"--fewshot-split {named}"
    )


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
        f"{results['format']}-style questions, {results.get('fewshot', 0)}-shot, {results['prompt']} (chance "
        f"{results['chance']:.4f})"
    ]
    if "base_accuracy" in results:
        lines.append(f"base: accuracy {results['base_accuracy']:.4f} (norm {results['base_accuracy_norm']:.4f})")
    return lines
