"""The data step of a run: files -> rows -> formatted text -> token ids and labels, all checked up front.

`load_data` is called by the LLM spine (tasks/llm.py) before any model weights are loaded, so every data
problem surfaces as one DataError naming the file, row and column (or, with bad_rows=skip, the bad rows are
dropped and counted). The splits are read a block at a time (data/sources.py), prepared in worker processes
(data/pipeline.py) into token tables (data/store.py); the spine keeps the result in the prepared-data cache
(data/cache.py). A list of sources is a mixture (data/mixture.py); `stream_data` prepares only the first block
and leaves the rest to training (data/streaming.py). Preference pairs are read by data/preference.py, labelled
texts by data/classification.py, on the same readers and row checks (data/formats.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config.llm import LLMParams
from tunelab.data.formats import RowFormat, RowProblem, convert_row, detect_format, holds_reasoning, settle_bad_rows
from tunelab.data.holdout import apportion, hold_out
from tunelab.data.images import ImageCodec, codec_or_reason
from tunelab.data.mixture import draw, is_mixture, parse_sources
from tunelab.data.pipeline import Formatter, encode_split, worker_count
from tunelab.data.sources import IMAGE_BLOCK_BYTES, IMAGE_BLOCK_ROWS, Split, locate_splits, stream_split
from tunelab.data.store import TableWriter, TokenTable, copy_examples
from tunelab.data.templates import template_source, with_string_parts, writes_strings
from tunelab.errors import DataError

__all__ = ["EncodedData", "image_codec", "load_data", "pick_template"]

log = logging.getLogger("tunelab")


@dataclass
class EncodedData:
    """Tokenized splits plus what was decided on the way (format, template) for the log and the run folder."""

    train: TokenTable  # a sequence of data.tokenize.Encoded
    valid: TokenTable | None
    row_format: RowFormat
    template: str | None  # template name used for messages, None for plain text
    template_source: str | None
    origins: dict[str, str] = field(default_factory=dict)
    preview: str = ""
    skipped_rows: dict[str, int] = field(default_factory=dict)  # split -> bad rows dropped (bad_rows=skip)
    mixture: list[dict[str, Any]] | None = None  # per source of a mixture: what it is, examples, taken, tokens
    streamed: bool = False  # streaming: train and valid hold only the first block of each split
    reasoning: bool = False  # answers in the train split's first rows (HEAD_ROWS) reason: formats.holds_reasoning

    def describe(self) -> str:
        if self.mixture:
            return "; ".join(part["rows"] for part in self.mixture)
        return self.row_format.describe()


def pick_template(requested: str | None, row_format: RowFormat, tokenizer: Any) -> str | None:
    """The chat template a run uses: the one asked for, else alpaca for Alpaca rows, else the model's own."""
    if row_format.kind == "text":
        return None  # plain text is used as it is, whatever template is set
    if requested is not None:
        return requested
    if row_format.kind == "alpaca":
        return "alpaca"
    return "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"


def load_data(params: LLMParams, tokenizer: Any, folder: Path | None = None, processor: Any = None) -> EncodedData:
    """Read, check, format and tokenize the train (and valid) splits named by params, a block at a time, into token
    tables in `folder` (data/store.py; None: held in memory). Bad rows are settled per split as `bad_rows` says.
    A data_path listing several sources is a mixture (data/mixture.py): each is prepared so, then drawn from.
    `processor`: a vision-language model's, which writes the images of chats that show them (data/images.py)."""
    if is_mixture(params.data_path):
        return _load_mixture(params, tokenizer, folder, processor)
    return _load_source(params, tokenizer, folder, processor=processor)


def _load_source(
    params: LLMParams, tokenizer: Any, folder: Path | None, prefix: str = "", processor: Any = None
) -> EncodedData:
    places = locate_splits(params.data_path, params.train_split, params.valid_split)
    blocks = (IMAGE_BLOCK_ROWS, IMAGE_BLOCK_BYTES) if processor is not None else ()
    streams = {name: stream_split(place, name, *blocks) for name, place in places.items()}
    row_format, template, source = _decide_format(streams["train"].head, params, tokenizer, processor)
    images, images_problem = image_codec(processor, source, tokenizer)
    tables: dict[str, TokenTable] = {}
    skipped: dict[str, int] = {}
    preview = ""
    for name, stream in streams.items():
        formatter = _formatter(stream.head, stream.origin, row_format, source, tokenizer, params)
        formatter.images, formatter.images_problem = images, images_problem
        if processor is not None:  # a chat row's images column is its images (formats.with_row_images)
            formatter.fmt = dataclasses.replace(formatter.fmt, images=True)
            formatter.image_token = getattr(processor, "image_token", None)
        formatter.folder = places[name].parent if isinstance(places[name], Path) else None
        writer = TableWriter(folder, params.block_size, prefix + name)
        size = places[name].stat().st_size if isinstance(places[name], Path) else 0
        workers = worker_count(params.dataset_num_proc, size, images=processor is not None)
        result = encode_split(stream, formatter, writer, workers)
        settle_bad_rows(result.problems, stream.origin, params.bad_rows, kept=result.rows, count=result.bad)
        tables[name], skipped[name] = writer.finish(), result.bad
        preview = preview or result.preview
    return EncodedData(
        train=tables["train"],
        valid=tables.get("valid"),
        row_format=row_format,
        template=template,
        template_source=source,
        origins={name: stream.origin for name, stream in streams.items()},
        preview=preview,
        skipped_rows=skipped,
        reasoning=holds_reasoning(streams["train"].head, _conversation_columns(row_format)),
    )


def stream_data(
    params: LLMParams, tokenizer: Any, build_rows: Any, processor: Any = None, images_problem: str | None = None
) -> tuple[EncodedData, Any, Any]:
    """`streaming: true` (data/streaming.py): the first block of each split prepared, to check and show, and the
    rows of every split as iterables that prepare each block as training reads it. A vision-language model's
    `processor` writes the images rows show, block by block, as for prepared data; `images_problem` (the method takes
    no images), or packing, makes such rows bad rows instead, said as each block is read."""
    from tunelab.data.streaming import StreamedRows, first_block

    places = locate_splits(params.data_path, params.train_split, params.valid_split)
    takes_images = processor is not None and not images_problem and not params.packing
    blocks = (IMAGE_BLOCK_ROWS, IMAGE_BLOCK_BYTES) if takes_images else ()  # (text rows keep the larger blocks)
    heads = {name: stream_split(place, name, *blocks) for name, place in places.items()}
    row_format, template, source = _decide_format(heads["train"].head, params, tokenizer, processor)
    images, problem = image_codec(processor, source, tokenizer)
    if images_problem or (processor is not None and params.packing):
        images, problem = None, images_problem or "packing: rows with images are not packed yet (leave packing off)"
    firsts, rows = {}, {}
    for name, place in places.items():
        formatter = _formatter(heads[name].head, heads[name].origin, row_format, source, tokenizer, params)
        if processor is not None:  # a chat row's images column is its images (formats.with_row_images)
            formatter.images, formatter.images_problem = images, problem
            formatter.fmt = dataclasses.replace(formatter.fmt, images=True)
            formatter.image_token = getattr(processor, "image_token", None)
            formatter.folder = place.parent if isinstance(place, Path) else None
        firsts[name] = first_block(heads[name], formatter, params)
        rows[name] = StreamedRows(place, name, formatter, params, build_rows, blocks)
    shown = firsts["train"][0] if len(firsts["train"]) else None
    data = EncodedData(
        train=firsts["train"],
        valid=firsts.get("valid"),
        row_format=row_format,
        template=template,
        template_source=source,
        origins={name: stream.origin for name, stream in heads.items()},
        preview=tokenizer.decode(shown.input_ids) if shown else "",
        streamed=True,
        reasoning=holds_reasoning(heads["train"].head, _conversation_columns(row_format)),
    )
    return data, rows["train"], rows.get("valid")


def image_codec(processor: Any, template: str | None, tokenizer: Any) -> tuple[ImageCodec | None, str | None]:
    """How a vision-language model's images become tokens with this template (data/images.py), or why they cannot
    (a template that writes no image): said by the first row that shows one, not by a run with none."""
    if processor is None or template is None:
        return None, None
    return codec_or_reason(processor, template, tokenizer)


def _conversation_columns(row_format: RowFormat) -> list[str]:
    return [row_format.columns["messages"]] if row_format.kind == "messages" else []


def _decide_format(
    head: Split, params: LLMParams, tokenizer: Any, processor: Any = None
) -> tuple[RowFormat, str | None, str | None]:
    """The train split's row shape, the template it is rendered with (its name and Jinja source: a vision-language
    model's that writes nothing for a plain string content taught to, templates.with_string_parts)."""
    row_format = detect_format(head, params.text_column, params.prompt_text_column, params.image_column)
    template = pick_template(params.chat_template, row_format, tokenizer)
    source = template_source(template, tokenizer, params.chat_template_kwargs) if template else None
    if source is not None and processor is not None and not writes_strings(source, tokenizer):
        source = with_string_parts(source)
    return row_format, template, source


def _formatter(
    head: Split, origin: str, train_format: RowFormat, source: str | None, tokenizer: Any, params: LLMParams
) -> Formatter:
    """How a split's rows become text: the train split's shape (another split must have the same), its template."""
    columns = (params.text_column, params.prompt_text_column, params.image_column)
    fmt = detect_format(head, *columns) if head.name != "train" else train_format
    if fmt.kind != train_format.kind:
        raise DataError(f"{origin}: rows are {fmt.kind}, but the train split's are {train_format.kind}")
    eos = tokenizer.eos_token if params.add_eos_token else None
    special = source is None and _wants_special_tokens(head, fmt, tokenizer)
    return Formatter(fmt, source, tokenizer, eos, special, mask_history=params.mask_history)


def _load_mixture(params: LLMParams, tokenizer: Any, folder: Path | None, processor: Any = None) -> EncodedData:
    rng = np.random.default_rng(params.seed)
    sources = parse_sources(params.data_path)
    loaded = [
        _load_source(source.params(params), tokenizer, folder, prefix=f"source{number}-", processor=processor)
        for number, source in enumerate(sources, start=1)
    ]
    if params.valid_size is not None:  # per source, before it is drawn from: a weight repeats examples
        sizes = _valid_sizes(params.valid_size, [len(data.train) for data in loaded])
        pairs = zip(loaded, sizes, strict=True)
        loaded = [hold_out(data, size, params.seed) if size else data for data, size in pairs]
    parts = [(source, data, draw(len(data.train), source, rng)) for source, data in zip(sources, loaded, strict=True)]
    train = TableWriter(folder, params.block_size, "train")
    for _, data, taken in parts:
        copy_examples(data.train, taken, train)
    valids = [data.valid for _, data, _ in parts if data.valid is not None]
    valid = TableWriter(folder, params.block_size, "valid") if valids else None
    for table in valids:
        copy_examples(table, np.arange(len(table)), valid)
    tokens = [int(data.train.lengths[taken].sum()) for _, data, taken in parts]
    mixture = [
        {
            "source": source.describe(),
            "origin": data.origins["train"],
            "rows": data.describe(),
            "examples": len(data.train),
            "taken": len(taken),
            "tokens": count,
            "share": count / max(sum(tokens), 1),
        }
        for (source, data, taken), count in zip(parts, tokens, strict=True)
    ]
    first = parts[0][1]
    return EncodedData(
        train=train.finish(),
        valid=valid.finish() if valid else None,
        row_format=first.row_format,
        template=first.template,
        template_source=first.template_source,
        origins={
            split: " + ".join(data.origins[split] for _, data, _ in parts if split in data.origins)
            for split in ("train", "valid")
            if any(split in data.origins for _, data, _ in parts)
        },
        preview=first.preview,
        skipped_rows={
            split: sum(data.skipped_rows.get(split, 0) for _, data, _ in parts) for split in first.skipped_rows
        },
        mixture=mixture,
        reasoning=any(data.reasoning for _, data, taken in parts if len(taken)),
    )


def _valid_sizes(valid_size: float, examples: list[int]) -> list[float]:
    """valid_size for each source of a mixture: a share, the same share of each; a count, shared out in proportion
    to the sources' examples (holdout.apportion), so that the mixture holds out as many as asked."""
    if valid_size < 1:
        return [valid_size] * len(examples)
    return [float(count) for count in apportion(examples, int(valid_size))]


def _wants_special_tokens(head: Split, fmt: RowFormat, tokenizer: Any) -> bool:
    """Plain text gets the tokenizer's special tokens (e.g. BOS) unless it is pre-formatted and already starts with
    them (`<s>[INST] ...`), which would double the BOS (chat templates write their own: never asked here)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return True
    for row in head.rows[:100]:
        try:
            if convert_row(row, fmt)["text"].startswith(bos):
                return False
        except RowProblem:
            continue
    return True
