"""Preference data (prompt / chosen / rejected) -> token ids of a shared prompt and two completions.

Columns come from the column mapping, AutoTrain's way: `prompt_text_column` (optional), `text_column` (chosen)
and `rejected_text_column`; left at their defaults, columns named `prompt`, `chosen` and `rejected` are used.
Chosen and rejected are plain text or role/content message lists (or JSON strings of them). LLaMA-Factory's
pairwise rows read as its own: a `conversations` (or `messages`) prompt with chosen and rejected one message each,
or an Alpaca `instruction` (and `input`, joined by a new line, after the turns of its `history`), either with
an optional `system` column.

Without a prompt column (Anthropic-HH rows hold whole dialogues in chosen and rejected), the shared beginning
of the two is the prompt: the common leading messages, or for text the common prefix cut back to the last
whitespace, so that no word is split between prompt and answer.

Message rows are rendered with the chat template (the prompt with the generation prompt, each completion as
the rest of the rendered conversation); text rows are used as they are, each completion ending with EOS.
Prompts longer than max_prompt_length lose their beginning; completions are cut to max_completion_length and
to what block_size leaves after the prompt. Every count goes to the log; bad rows to one DataError naming them
(bad_rows=error) or, with bad_rows=skip, to a warning, dropped and counted in `skipped_rows`.

A vision-language model's pairs may show images in their prompt (data/images.py: the forms sft reads, and TRL's
vision preference rows, an `images` column filling the prompt's bare image parts): each image is checked and
written in as the model's processor writes it, as for sft, and the pair keeps where its images are (the collator
computes their pixels). A prompt that shows images is never cut (as TRL leaves them): a cut from its start would
take its turn's header and the image's own opening token with it; block_size still bounds prompt and answer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from tunelab.config.llm import LLMParams
from tunelab.data.formats import (
    RowProblem,
    cell_messages,
    cell_text,
    checked_images,
    describe_problem,
    describe_type,
    history_turns,
    holds_reasoning,
    image_column_of,
    is_messages,
    settle_bad_rows,
    with_row_images,
    with_system_column,
)
from tunelab.data.images import (
    ImageCodec,
    ImageProblem,
    ImageSpan,
    as_template_reads,
    check_unchanged,
    codec_or_reason,
    file_signatures,
    image_parts,
    stored_image,
)
from tunelab.data.sources import Split, json_or_none, locate_splits, read_location
from tunelab.data.templates import render_template, template_source, with_string_parts, writes_strings
from tunelab.data.tokenize import marked_from_offsets
from tunelab.errors import DataError

log = logging.getLogger("tunelab")
# A pair's prompt column left unset: TRL's name, then LLaMA-Factory's pairwise ShareGPT / OpenAI / Alpaca columns
PROMPT_COLUMNS = ("prompt", "conversations", "messages", "instruction")


@dataclass
class Pair:
    """One tokenized preference pair: the prompt's ids and each completion's ids (the model sees prompt +
    completion; only completion tokens are scored)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None  # reward: how much chosen should outscore rejected (margin_column), if given
    images: list[ImageSpan] | None = None  # the prompt's images and where their tokens are (a vision-language model's)

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class PairStats:
    pairs: int = 0
    prompts_truncated: int = 0
    completions_truncated: int = 0
    dropped_no_room: int = 0
    dropped_identical: list[str] = field(default_factory=list)
    long_image_prompts: int = 0  # prompts that show images, kept longer than max_prompt_length (never cut)


@dataclass
class PreferenceData:
    """Tokenized pairs per split, with what was decided on the way (for the log and the run folder)."""

    train: list[Pair]
    valid: list[Pair] | None
    columns: dict[str, str]
    template: str | None
    template_source: str | None
    origins: dict[str, str]
    stats: PairStats
    preview: str = ""
    kind: str = "preference"
    skipped_rows: dict[str, int] = field(default_factory=dict)  # split -> bad rows dropped (bad_rows=skip)
    reasoning: bool = False  # the train split's answers reason (formats.holds_reasoning)
    # the image files the pairs show, with their size and time when prepared: one changed since makes the prepared
    # data stale (unpickling it raises ValueError, and the data cache prepares it again)
    image_files: dict[str, tuple[int, int]] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind} (" + ", ".join(f"{k}={v!r}" for k, v in self.columns.items()) + ")"

    @property
    def shows_images(self) -> bool:
        return any(getattr(item, "images", None) for items in (self.train, self.valid or []) for item in items)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        check_unchanged(self.image_files)


def preference_columns(split: Split, params: LLMParams, margin: str | None = "") -> dict[str, str]:
    """Which columns hold the prompt (optional), the chosen and the rejected answer, and the reward's margin:
    `margin` names it (None: no margin read), else ("") margin_column, or a column named margin for reward."""
    columns = split.columns
    chosen = "chosen" if params.text_column == "text" and "chosen" in columns else params.text_column
    prompt = params.prompt_text_column or next((name for name in PROMPT_COLUMNS if name in columns), None)
    wanted = {"prompt": prompt} if prompt else {}
    wanted.update(chosen=chosen, rejected=params.rejected_text_column or "rejected")
    # reward's margins: margin_column, else a column named margin (TRL's), for the reward model only
    if margin == "":
        margin = getattr(params, "margin_column", None)
        if margin is None and params.trainer == "reward" and "margin" in columns:
            margin = "margin"
    if margin:
        wanted["margin"] = margin
    for role, column in wanted.items():
        if column not in columns:
            flag = {
                "prompt": "prompt_text_column",
                "chosen": "text_column",
                "rejected": "rejected_text_column",
                "margin": "margin_column",
            }[role]
            what = {"prompt": "prompt", "margin": "margin (a number)"}.get(role, f"{role} answer")
            raise DataError(
                f"{split.origin}: {role} column {column!r} not found (columns: {', '.join(columns[:20])}); "
                f"set {flag} (data.column_mapping.{flag}) to the column that holds the {what}"
            )
    return wanted


def load_preference_data(
    params: LLMParams,
    tokenizer: Any,
    margins: bool = True,
    processor: Any = None,
    images_problem: str | None = None,
    image_store: tuple[Path, Path] | None = None,
) -> PreferenceData:
    """Read, check, split, render and tokenize the preference splits named by params (`margins`: the reward's
    margin column too, when there is one: what the train split has, every split must). `processor`: a
    vision-language model's, which writes the images the prompts show; `images_problem`, without one: why rows that
    show images are bad rows (they are read as such, not taken for a text model's). `image_store`: (the folder the
    prepared data is written to, where that folder will be): image bytes (a Parquet or hub dataset's, data: URIs)
    are written there once and the pairs name their files, so neither memory nor the cached pairs hold them."""
    places = locate_splits(params.data_path, params.train_split, params.valid_split)
    splits: dict[str, Split] = {name: read_location(place, name) for name, place in places.items()}
    columns = preference_columns(splits["train"], params, "" if margins else None)
    conversational = _conversational(splits["train"], columns["chosen"])
    template = _pick_template(params.chat_template, conversational, columns.get("prompt"), tokenizer)
    source = template_source(template, tokenizer, params.chat_template_kwargs) if template else None
    if source is not None and processor is not None and not writes_strings(source, tokenizer):
        source = with_string_parts(source)  # (a custom template: the model's own was taught at prepare)
    add_special = source is None and not _starts_with_bos(tokenizer, splits["train"], columns)
    codec, why = codec_or_reason(processor, source, tokenizer)

    stats = PairStats()
    out: dict[str, list[Pair]] = {}
    skipped: dict[str, int] = {}
    preview = ""
    for name, split in splits.items():
        shape = RowShape(preference_columns(split, params, columns.get("margin")), conversational, source, tokenizer)
        if processor is not None or images_problem:
            shape.reads_images, shape.images, shape.images_problem = True, codec, why or images_problem
            shape.image_token = getattr(processor, "image_token", None)
            shape.image_column = params.image_column
            shape.folder = places[name].parent if isinstance(places[name], Path) else None
        texts, skipped[name] = _texts(split, shape, params.bad_rows, stats if name == "train" else None)
        if not preview and texts:
            preview = texts[0].preview
        pairs = [_tokenized(text, tokenizer, add_special) for text in texts]
        out[name] = _fit(pairs, params, stats if name == "train" else PairStats())
    stats.pairs = len(out["train"])
    image_files = _image_files([*out["train"], *out.get("valid", [])])  # (the user's files: before bytes get theirs)
    if image_store is not None:
        for pairs in out.values():
            for pair in pairs:
                pair.images = _bytes_stored(pair.images, *image_store)
    return PreferenceData(
        train=out["train"],
        valid=out.get("valid"),
        columns=columns,
        template=template,
        template_source=source,
        origins={name: split.origin for name, split in splits.items()},
        stats=stats,
        preview=preview,
        skipped_rows=skipped,
        reasoning=holds_reasoning(splits["train"], [columns["chosen"], columns["rejected"]]),
        image_files=image_files,
    )


def _bytes_stored(images: list[ImageSpan] | None, folder: Path, final: Path) -> list[ImageSpan] | None:
    """A pair's images with each one given as bytes written beside the prepared data (images.stored_image)."""
    if not images or not any(isinstance(span.ref, bytes) for span in images):
        return images
    return [
        dataclasses.replace(span, ref=stored_image(span.ref, folder, final)) if isinstance(span.ref, bytes) else span
        for span in images
    ]


def _image_files(pairs: list[Pair]) -> dict[str, tuple[int, int]]:
    return file_signatures(span.ref for pair in pairs for span in pair.images or ())


def _pick_template(requested: str | None, conversational: bool, prompt: str | None, tokenizer: Any) -> str | None:
    """Messages need a template; text with a separate `prompt` column may use one (LLaMA-Factory's Alpaca rows,
    an `instruction` prompt, get the alpaca template unless told otherwise: it always templates them, as sft's
    Alpaca rows are); whole dialogues in text are as is."""
    if conversational:
        if requested and requested != "none":
            return requested
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    if prompt and requested and requested != "none":
        return requested
    return "alpaca" if prompt == "instruction" and requested is None else None


def _conversational(split: Split, chosen_column: str) -> bool:
    """Whether the pairs are message lists, judged by the first row that has a chosen answer at all (a bad first
    row must not decide it for the whole file)."""
    sample = next((row[chosen_column] for row in split.rows if row.get(chosen_column) not in (None, "")), None)
    return is_messages(_as_messages(sample))


def _as_messages(value: Any) -> Any:
    """An answer given as one message object (LLaMA-Factory's pairwise rows: {"from": "gpt", "value": ...}), or a JSON
    string of one, as a one-message list; any other value as it is."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        parsed = json_or_none(value.strip())
        value = parsed if isinstance(parsed, dict) else value
    if isinstance(value, dict) and ("from" in value or "role" in value):
        return [value]
    return value


@dataclass
class RowShape:
    """What every row of a split must look like, and how its texts are rendered."""

    columns: dict[str, str]
    conversational: bool  # message lists (else plain text)
    source: str | None  # the chat template's source, None when texts are used as they are
    tokenizer: Any
    reads_images: bool = False  # image parts are read (a vision-language model's run), not taken for bad text
    images: ImageCodec | None = None  # how they become tokens; None: rows that show images are bad rows, for...
    images_problem: str | None = None  # ...this reason
    image_token: str | None = None  # the model's image token: no text may write it itself
    folder: Path | None = None  # where the data file is: image paths are relative to it
    image_column: str | None = None  # the column that lists a row's images (None: `images` or `image`)


@dataclass
class PairTexts:
    """One row rendered: the prompt (its images written in as the processor writes them) and each completion."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    images: list[str | bytes] = field(default_factory=list)  # the prompt's images, in order
    marks: list[tuple[int, int]] = field(default_factory=list)  # the characters of each image in `prompt`
    preview: str = ""  # as the log shows it (each image's tokens written once, as the template writes it)


def _starts_with_bos(tokenizer: Any, split: Split, columns: dict[str, str]) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    first = columns.get("prompt", columns["chosen"])
    return bool(bos) and any(str(row.get(first, "")).startswith(bos) for row in split.rows[:100])


def _texts(split: Split, shape: RowShape, bad_rows: str, stats: PairStats | None) -> tuple[list[PairTexts], int]:
    """Every usable row's texts (and margin), and how many bad rows were skipped; bad rows are handled as bad_rows
    says, rows whose chosen equals rejected are dropped with a warning."""
    texts, problems, identical = [], [], []
    for index, row in enumerate(split.rows):
        try:
            parts = _row_texts(row, shape)
            if parts is not None and "margin" in shape.columns:
                parts.margin = _margin(row, shape.columns["margin"])
        except RowProblem as problem:
            problems.append(describe_problem(split, index, problem))
            continue
        if parts is None:
            identical.append(split.where(index))
        else:
            texts.append(parts)
    settle_bad_rows(problems, split.origin, bad_rows, kept=len(texts) + len(identical))
    if identical and not texts:
        raise DataError(
            f"{split.origin}: chosen and rejected are identical in every row ({len(identical)} rows): "
            "there is no preference to learn; check the column mapping"
        )
    if identical:
        log.warning(
            "%s: %d row(s) with chosen identical to rejected skipped (first: %s)",
            split.origin,
            len(identical),
            identical[0],
        )
        if stats is not None:
            stats.dropped_identical = identical
    return texts, len(problems)


def _margin(row: dict, column: str) -> float:
    """A pair's margin: a finite number (a number written as text is read)."""
    value = row.get(column)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RowProblem(column, f"expected a number (the margin), got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(
            column, "missing value" if value is None else f"expected a number, got {describe_type(value)}"
        )
    if not math.isfinite(value):
        raise RowProblem(
            column, "missing value (NaN)" if math.isnan(value) else f"expected a finite number, got {value}"
        )
    return float(value)


def _row_texts(row: dict, shape: RowShape) -> PairTexts | None:
    """One row's texts, None when chosen equals rejected; RowProblem when it is bad."""
    images = shape.reads_images
    parts = _row_parts(row, shape.columns, shape.source is not None, shape.conversational, images, shape.image_column)
    if parts is None:
        return None
    prompt, chosen, rejected = parts
    if shape.source is None:
        eos = shape.tokenizer.eos_token or ""
        return _unimaged(PairTexts(prompt, _with_eos(chosen, eos), _with_eos(rejected, eos)), shape)
    refs = _prompt_images(prompt, shape, image_column_of(row, shape.image_column))
    texts = PairTexts(*_render(as_template_reads(prompt), chosen, rejected, shape.source, shape.tokenizer))
    if shape.images is None:
        return _unimaged(texts, shape)
    for column, answer in ((shape.columns["chosen"], texts.chosen), (shape.columns["rejected"], texts.rejected)):
        if shape.image_token in answer:
            raise RowProblem(column, f"its answer writes the image token {shape.image_token!r} itself")
    texts.preview = _preview(texts)
    try:
        texts.prompt, _, texts.marks = shape.images.expand(texts.prompt, [], refs)
    except ImageProblem as err:
        raise RowProblem(shape.columns.get("prompt") or shape.columns["chosen"], str(err)) from None
    texts.images = refs
    return texts


def _unimaged(texts: PairTexts, shape: RowShape) -> PairTexts:
    """Texts of a run whose rows show no images: none may write the model's image token either."""
    token = shape.image_token
    for column, text in (
        (shape.columns.get("prompt") or shape.columns["chosen"], texts.prompt),
        (shape.columns["chosen"], texts.chosen),
        (shape.columns["rejected"], texts.rejected),
    ):
        if token and token in text:
            raise RowProblem(column, f"its text holds {text.count(token)} image place(s) ({token!r}) for 0 image(s)")
    texts.preview = _preview(texts)
    return texts


def _preview(texts: PairTexts) -> str:
    return f"{texts.prompt}[chosen>]{texts.chosen}\n---\n{texts.prompt}[rejected>]{texts.rejected}"


def _prompt_images(prompt: list[dict[str, Any]], shape: RowShape, listed_in: str | None) -> list[str | bytes]:
    """The prompt's images, each found and opened (data/images.checked_ref); RowProblem when one cannot be, or when
    the run takes none (a text model's, or another method's: `images_problem` says why), naming the column that
    lists the row's images (`listed_in`), else the one that holds the prompt."""
    column = listed_in or shape.columns.get("prompt") or shape.columns["chosen"]
    refused = None if shape.images is not None else shape.images_problem or "the model reads text only"
    return checked_images(prompt, column, shape.folder, refused)


def _row_parts(
    row: dict,
    columns: dict[str, str],
    templated: bool,
    conversational: bool,
    images: bool = False,
    image_column: str | None = None,
) -> tuple[Any, Any, Any] | None:
    """The row's prompt and answers: strings, or message lists when the rows are conversations; None when chosen
    equals rejected (compared whole, before a shared prompt is split off: identical conversations share every
    message and would otherwise read as a pair with no answer). With `images` (a vision-language model's run), the
    prompt's turns may show images, its bare image parts (or `<image>` marks) filled from the row's `images`
    column, or `image_column` (formats.with_row_images); the answers show none."""
    chosen_col, rejected_col = columns["chosen"], columns["rejected"]
    if not conversational and is_messages(_as_messages(row.get(chosen_col))):
        raise RowProblem(chosen_col, "a list of messages, where the other rows hold text")
    if conversational:
        row = {**row, chosen_col: _as_messages(row.get(chosen_col)), rejected_col: _as_messages(row.get(rejected_col))}
        chosen = cell_messages(row, chosen_col, need_assistant=False, images=images)
        rejected = cell_messages(row, rejected_col, need_assistant=False, images=images)
        if chosen == rejected:
            return None
        shared = _common_messages(chosen, rejected)
        if shared:
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        elif "prompt" in columns:
            prompt = _prompt_messages(row, columns["prompt"], images)
        else:
            raise RowProblem(chosen_col, "no prompt: chosen and rejected share no leading messages")
        for column, answer in ((chosen_col, chosen), (rejected_col, rejected)):
            if image_parts(answer):
                raise RowProblem(column, "an image after the prompt: only the prompt (the turns both share) shows one")
            if not any(m["role"] == "assistant" and m["content"].strip() for m in answer):
                raise RowProblem(column, "no assistant answer after the prompt")
        if images:
            prompt = with_row_images(prompt, row, columns.get("prompt", chosen_col), image_column)
        return prompt, chosen, rejected
    chosen, rejected = cell_text(row, chosen_col), cell_text(row, rejected_col)
    if chosen == rejected:
        return None
    shown = image_column_of(row, image_column)
    if images and shown and not ("prompt" in columns and templated):
        wanted = "a chat template (chat_template)" if "prompt" in columns else "prompt_text_column and a chat template"
        raise RowProblem(shown, f"images for text rendered without a chat template: set {wanted}")
    if "prompt" in columns:
        prompt = _prompt_text(row, columns["prompt"])
        if templated:
            asked = _with_system(
                [*_history(row, columns["prompt"]), {"role": "user", "content": prompt}], row, columns["prompt"]
            )
            return (
                with_row_images(asked, row, columns["prompt"], image_column) if images else asked,
                [{"role": "assistant", "content": chosen}],
                [{"role": "assistant", "content": rejected}],
            )
        return prompt, chosen, rejected
    cut = split_common_prefix(chosen, rejected)
    if cut == 0:
        raise RowProblem(chosen_col, "no prompt: chosen and rejected share no beginning (set prompt_text_column)")
    prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    for column, answer in ((chosen_col, chosen), (rejected_col, rejected)):
        if not answer.strip():
            raise RowProblem(column, "empty answer after the shared prompt")
    return prompt, chosen, rejected


def _prompt_messages(row: dict, column: str, images: bool = False) -> list[dict[str, Any]]:
    if is_messages(row.get(column)):
        messages = cell_messages(row, column, need_assistant=False, images=images)
        # (LLaMA-Factory's columns: an export that kept the chosen chat whole would have its answer twice)
        if column in PROMPT_COLUMNS[1:] and messages[-1]["role"] == "assistant":
            raise RowProblem(column, "the prompt's conversation ends with an answer: it must end where one is asked")
    else:
        messages = [*_history(row, column), {"role": "user", "content": _prompt_text(row, column)}]
    return _with_system(messages, row, column)


def _prompt_text(row: dict, column: str) -> str:
    """A text prompt; an Alpaca `instruction`'s `input` after it on a new line, as LLaMA-Factory joins them."""
    text = cell_text(row, column)
    more = row.get("input") if column == "instruction" else None
    return f"{text}\n{more}" if isinstance(more, str) and more.strip() else text


def _history(row: dict, column: str) -> list[dict[str, str]]:
    """LLaMA-Factory's Alpaca pairs: the turns of their `history` before the instruction (formats.history_turns)."""
    return history_turns(row) if column == "instruction" else []


def _with_system(messages: list[dict[str, Any]], row: dict, column: str) -> list[dict[str, Any]]:
    """LLaMA-Factory's `system` column as the prompt's system turn (a prompt read from one of its columns)."""
    return with_system_column(messages, row) if column in PROMPT_COLUMNS[1:] else messages


def _common_messages(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_common_prefix(chosen: str, rejected: str) -> int:
    """Where the shared prompt of two texts ends: their common prefix, cut back to just after the last
    whitespace in it so that a word both answers begin with stays with the answers."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if n == limit:  # one is a prefix of the other: keep at least the last word in the answers
        n = max(0, n - 1)
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    if n > 0 and chosen[n - 1] == " ":
        n -= 1  # " Can you ..." keeps its leading space, as a tokenizer expects words to begin
    return n


def _with_eos(text: str, eos: str) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def _render(prompt: Any, chosen: Any, rejected: Any, source: str, tokenizer: Any) -> tuple[str, str, str]:
    """Prompt rendered with the generation prompt; each completion is the rest of its rendered conversation.
    A conversation the template refuses (templates may `raise_exception(...)`) is a bad row."""
    try:
        prompt_text = render_template(source, prompt, tokenizer, add_generation_prompt=True)
        fulls = [render_template(source, prompt + answer, tokenizer) for answer in (chosen, rejected)]
    except TemplateError as err:
        raise RowProblem(None, f"the chat template cannot render it ({err})") from None
    if not all(full.startswith(prompt_text) for full in fulls):
        raise RowProblem(None, "the chat template renders the prompt differently inside the conversation")
    return prompt_text, fulls[0][len(prompt_text) :], fulls[1][len(prompt_text) :]


def _tokenized(texts: PairTexts, tokenizer: Any, add_special_tokens: bool) -> Pair:
    pair = tokenize_pair(texts.prompt, texts.chosen, texts.rejected, tokenizer, add_special_tokens, texts.marks)
    images = [ImageSpan(ref, *span) for ref, span in zip(texts.images, pair.images or [], strict=True)] or None
    return dataclasses.replace(pair, margin=texts.margin, images=images)


def tokenize_pair(
    prompt: str,
    chosen: str,
    rejected: str,
    tokenizer: Any,
    add_special_tokens: bool,
    marks: list[tuple[int, int]] | None = None,
) -> Pair:
    """Token ids of prompt + each completion, tokenized whole (as the model will see them); the prompt is the
    longest run of leading tokens that both share and that lies inside the prompt's characters. `marks`: the
    characters of the prompt's images, whose (first token, token count) become the pair's `images`."""
    enc = tokenizer(
        [prompt + chosen, prompt + rejected],
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    (ids_c, ids_r), (off_c, _) = enc["input_ids"], enc["offset_mapping"]
    n = 0
    while n < min(len(ids_c), len(ids_r)) and ids_c[n] == ids_r[n] and off_c[n][1] <= len(prompt):
        n += 1
    spans = [(first, stop - first) for first, stop in marked_from_offsets(off_c, marks)] if marks else None
    return Pair(list(ids_c[:n]), list(ids_c[n:]), list(ids_r[n:]), images=spans)


def _fit(pairs: list[Pair], params: LLMParams, stats: PairStats) -> list[Pair]:
    """Apply the length rules: prompt to max_prompt_length (keeping its end; one that shows images is kept whole),
    completions to max_completion_length and to the room block_size leaves. Pairs with no room for an answer are
    dropped."""
    kept = []
    for pair in pairs:
        prompt, images = pair.prompt_ids, pair.images
        if images:  # never cut (the module's docstring says why): block_size alone bounds it
            stats.long_image_prompts += len(prompt) > params.max_prompt_length
            room = answer_room(len(prompt), params)
        else:
            prompt, room = fit_prompt(prompt, params, stats)
        if room <= 0:
            stats.dropped_no_room += 1
            continue
        if len(pair.chosen_ids) > room or len(pair.rejected_ids) > room:
            stats.completions_truncated += 1
        kept.append(Pair(prompt, pair.chosen_ids[:room], pair.rejected_ids[:room], pair.margin, images))
    return kept


def fit_prompt(prompt: list[int], params: LLMParams, stats: PairStats) -> tuple[list[int], int]:
    """A prompt cut to max_prompt_length (keeping its end, counted in stats) and the room left for an answer: the
    smaller of max_completion_length and what block_size leaves after the prompt."""
    if len(prompt) > params.max_prompt_length:
        prompt = prompt[-params.max_prompt_length :]
        stats.prompts_truncated += 1
    return prompt, answer_room(len(prompt), params)


def answer_room(prompt_length: int, params: LLMParams) -> int:
    """The most tokens an answer after a prompt of this length keeps."""
    return min(params.max_completion_length or params.block_size, params.block_size - prompt_length)
