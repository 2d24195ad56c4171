"""KTO data: a prompt, one answer and whether that answer is desirable -> the token ids of both and the label.

Rows come in either shape:
- unpaired, the usual thumbs-up/down export: a prompt (`prompt_text_column`, default `prompt`), an answer
  (`text_column`, default `completion`) and a label (`label_column`, default `label`): true/false, 1/0, or the
  words true/false, yes/no; prompt and answer are text or message lists (or JSON strings of them); LLaMA-Factory's
  rows too: a `conversations` column whose last answer is labeled by `kto_tag`, or Alpaca's `instruction` (with
  its `input`, `history` and `system`) and `output`, rendered with the alpaca template unless chat_template says;
- preference pairs, as `dpo` reads them (prompt/chosen/rejected, or whole dialogues): each pair gives a desirable
  and an undesirable answer to the same prompt (TRL's unpair_preference_dataset).

Message rows are rendered with the chat template (the prompt with the generation prompt, the answer as the rest of
the conversation); text rows are used as they are, the answer ending with EOS. The length rules are the pairs'
(data/preference.py): prompts lose their beginning past max_prompt_length, answers are cut to
max_completion_length and to what block_size leaves. A split with answers of one kind only is an error: KTO
learns from the contrast of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from tunelab.config.llm import LLMParams
from tunelab.data.formats import (
    RowProblem,
    cell_messages,
    cell_text,
    describe_problem,
    holds_reasoning,
    is_messages,
    refuse_image_columns,
    settle_bad_rows,
)
from tunelab.data.preference import (
    PairStats,
    PreferenceData,
    RowShape,
    _conversational,
    _pick_template,
    _prompt_messages,
    _starts_with_bos,
    _texts,
    _with_eos,
    _with_system,
    fit_prompt,
    preference_columns,
)
from tunelab.data.sources import Split, read_splits
from tunelab.data.templates import render_template, template_source
from tunelab.errors import DataError

TRUE_WORDS = ("true", "yes", "1")
# Columns holding a whole conversation whose last answer is the labeled one (LLaMA-Factory's KTO rows, `kto_tag`)
WHOLE_CHAT_COLUMNS = ("conversations", "messages")
FALSE_WORDS = ("false", "no", "0")


@dataclass
class Labeled:
    """One tokenized KTO example: the prompt's ids, the answer's ids (the only tokens scored) and its label."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def kto_columns(split: Split, params: LLMParams) -> dict[str, str] | None:
    """The unpaired columns (prompt, completion, label), or None when the rows are preference pairs instead."""
    columns = split.columns
    label = params.label_column
    if label == "label" and label not in columns and "kto_tag" in columns:  # LLaMA-Factory's KTO datasets
        label = "kto_tag"
    whole = next((name for name in WHOLE_CHAT_COLUMNS if name in columns), None)
    unmapped = params.text_column == "text" and not params.prompt_text_column and "completion" not in columns
    if whole and unmapped and label in columns:
        return {"prompt": whole, "completion": whole, "label": label}
    if unmapped and label in columns and "instruction" in columns and "output" in columns:  # its Alpaca rows
        return {"prompt": "instruction", "completion": "output", "label": label}
    if label not in columns:
        if params.rejected_text_column in columns or "rejected" in columns:
            return None
        raise DataError(
            f"{split.origin}: no label column {params.label_column!r} (columns: {', '.join(columns[:20])}): kto reads "
            "a prompt, an answer and a label (true: desirable, false: not) per row, or prompt/chosen/rejected pairs; "
            "set label_column to the column that holds the label"
        )
    completion = "completion" if params.text_column == "text" else params.text_column
    prompt = params.prompt_text_column or "prompt"
    wanted = {"prompt": prompt, "completion": completion, "label": label}
    for role, column in wanted.items():
        if column not in columns:
            flag = {"prompt": "prompt_text_column", "completion": "text_column"}[role]
            raise DataError(
                f"{split.origin}: {role} column {column!r} not found (columns: {', '.join(columns[:20])}); set {flag} "
                f"to the column that holds the {role}"
            )
    return wanted


def load_kto_data(params: LLMParams, tokenizer: Any, images_problem: str | None = None) -> PreferenceData:
    """Read, check, render and tokenize the KTO splits named by params (PreferenceData of Labeled items).
    `images_problem`: a vision-language model's run, and why its rows' images cannot be trained: a split whose rows
    list images is refused (their image parts are bad rows as for a text model)."""
    splits: dict[str, Split] = read_splits(params.data_path, params.train_split, params.valid_split)
    for split in splits.values() if images_problem else ():
        refuse_image_columns(split, params.image_column, images_problem)
    columns = kto_columns(splits["train"], params)
    paired = columns is None
    columns = preference_columns(splits["train"], params) if paired else columns
    answer_column = columns["chosen"] if paired else columns["completion"]
    conversational = _conversational(splits["train"], answer_column)
    template = _pick_template(params.chat_template, conversational, columns.get("prompt"), tokenizer)
    source = template_source(template, tokenizer, params.chat_template_kwargs) if template else None
    add_special = source is None and not _starts_with_bos(tokenizer, splits["train"], {"chosen": answer_column})

    stats, out, skipped, preview = PairStats(), {}, {}, ""
    for name, split in splits.items():
        train = name == "train"
        if not train:
            _check_same_shape(split, params, paired, splits["train"].origin)
        if paired:
            shape = RowShape(preference_columns(split, params), conversational, source, tokenizer)
            pairs, skipped[name] = _texts(split, shape, params.bad_rows, stats if train else None)
            texts = [
                (pair.prompt, answer, good)
                for pair in pairs
                for answer, good in ((pair.chosen, 1), (pair.rejected, 0))
            ]
        else:
            texts, skipped[name] = _labeled_texts(split, kto_columns(split, params), source, tokenizer, params)
        if not preview and texts:
            prompt, answer, good = texts[0]
            preview = f"{prompt}[{'desirable' if good else 'undesirable'}>]{answer}"
        items = [_tokenize(prompt, answer, bool(good), tokenizer, add_special) for prompt, answer, good in texts]
        out[name] = _fit(items, params, stats if train else PairStats())
        if train:
            check_both_kinds(out[name], split.origin)
    stats.pairs = len(out["train"])
    described = {"pairs": "prompt/chosen/rejected, unpaired"} if paired else {}
    return PreferenceData(
        train=out["train"],
        valid=out.get("valid"),
        columns={**columns, **described},
        template=template,
        template_source=source,
        origins={name: split.origin for name, split in splits.items()},
        stats=stats,
        preview=preview,
        kind="kto",
        skipped_rows=skipped,
        reasoning=holds_reasoning(splits["train"], [answer_column, columns.get("rejected", answer_column)]),
    )


def _check_same_shape(split: Split, params: LLMParams, paired: bool, train_origin: str) -> None:
    """A valid split must hold rows of the train split's shape (both are read with the train split's columns)."""
    if (kto_columns(split, params) is None) != paired:
        shapes = ("preference pairs (prompt/chosen/rejected)", "unpaired rows (prompt, answer and label)")
        mine, train = (shapes[1], shapes[0]) if paired else (shapes[0], shapes[1])
        raise DataError(
            f"{split.origin}: holds {mine}, but the train split {train_origin} holds {train}: give both splits "
            "the same shape"
        )


def label_value(row: dict, column: str) -> bool:
    """A row's label as a bool; RowProblem when it is missing or not one."""
    value = row.get(column)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    if value is None:
        raise RowProblem(column, "missing label (true for a desirable answer, false for an undesirable one)")
    raise RowProblem(column, f"the label {value!r} is not a boolean (true/false, 1/0, yes/no)")


def _labeled_texts(
    split: Split, columns: dict[str, str], source: str | None, tokenizer: Any, params: LLMParams
) -> tuple[list[tuple[str, str, bool]], int]:
    """(prompt text, answer text, desirable) for every usable row of an unpaired split, and the bad rows skipped."""
    texts, problems = [], []
    for index, row in enumerate(split.rows):
        try:
            desirable = label_value(row, columns["label"])
            prompt, answer = _row_texts(row, columns, source, tokenizer)
        except RowProblem as problem:
            problems.append(describe_problem(split, index, problem))
            continue
        texts.append((prompt, answer, desirable))
    settle_bad_rows(problems, split.origin, params.bad_rows, kept=len(texts))
    return texts, len(problems)


def _row_texts(row: dict, columns: dict[str, str], source: str | None, tokenizer: Any) -> tuple[str, str]:
    prompt_col, answer_col = columns["prompt"], columns["completion"]
    if prompt_col == answer_col:  # one conversation (LLaMA-Factory's): its last answer is the one labeled
        if source is None:  # (a conversation always has a template: _pick_template)
            raise RowProblem(answer_col, "a conversation read without a chat template")
        messages = _with_system(cell_messages(row, answer_col), row, answer_col)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last != len(messages) - 1:
            raise RowProblem(answer_col, "the conversation goes on after its last answer: it must end with the answer")
        return _rendered(messages[:last], messages[last:], source, tokenizer, answer_col)
    if source is None:
        if is_messages(row.get(answer_col)):
            raise RowProblem(answer_col, "a list of messages, where the other rows hold text")
        return cell_text(row, prompt_col), _with_eos(cell_text(row, answer_col), tokenizer.eos_token or "")
    prompt = _prompt_messages(row, prompt_col)
    if is_messages(row.get(answer_col)):
        answer = cell_messages(row, answer_col, need_assistant=False)
    else:
        answer = [{"role": "assistant", "content": cell_text(row, answer_col)}]
    return _rendered(prompt, answer, source, tokenizer, answer_col)


def _rendered(prompt: list[dict], answer: list[dict], source: str, tokenizer: Any, column: str) -> tuple[str, str]:
    """The prompt rendered with the generation prompt, and the rest of the whole conversation (the answer)."""
    if not any(m["role"] == "assistant" and m["content"].strip() for m in answer):
        raise RowProblem(column, "no assistant answer")
    try:
        prompt_text = render_template(source, prompt, tokenizer, add_generation_prompt=True)
        full = render_template(source, prompt + answer, tokenizer)
    except TemplateError as err:
        raise RowProblem(None, f"the chat template cannot render it ({err})") from None
    if not full.startswith(prompt_text):
        raise RowProblem(None, "the chat template renders the prompt differently inside the conversation")
    return prompt_text, full[len(prompt_text) :]


def _tokenize(prompt: str, answer: str, desirable: bool, tokenizer: Any, add_special_tokens: bool) -> Labeled:
    """prompt + answer tokenized whole (as the model sees them); the prompt is the leading tokens that lie inside
    the prompt's characters."""
    enc = tokenizer(prompt + answer, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n = 0
    while n < len(ids) and offsets[n][1] <= len(prompt):
        n += 1
    return Labeled(list(ids[:n]), list(ids[n:]), desirable)


def _fit(items: list[Labeled], params: LLMParams, stats: PairStats) -> list[Labeled]:
    """The pairs' length rules, per answer."""
    kept = []
    for item in items:
        prompt, room = fit_prompt(item.prompt_ids, params, stats)
        if room <= 0 or not item.completion_ids:
            stats.dropped_no_room += 1
            continue
        if len(item.completion_ids) > room:
            stats.completions_truncated += 1
        kept.append(Labeled(prompt, item.completion_ids[:room], item.desirable))
    return kept


def check_both_kinds(items: list[Labeled], origin: str) -> None:
    """A DataError when every answer is of one kind (also checked on what valid_size leaves to train on)."""
    desirable = sum(item.desirable for item in items)
    if items and desirable in (0, len(items)):
        kind, label = ("desirable", "true") if desirable else ("undesirable", "false")
        raise DataError(
            f"{origin}: every answer is {kind} (label {label}, {len(items)} rows): kto learns from the contrast "
            "of desirable and undesirable answers; add answers of the other kind, or train with sft"
        )
