"""The data step of a run: files -> rows -> formatted text -> token ids and labels, all checked up front.

`load_data` is called by the LLM spine (tasks/llm.py) before any model weights are loaded or any file is
written, so every data problem surfaces in seconds as one DataError naming the file, row and column (or, with
bad_rows=skip, the bad rows are dropped and counted). Preference pairs are read by data/preference.py, labelled
texts by data/classification.py, on the same readers (data/sources.py) and row checks (data/formats.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from tunelab.config.llm import LLMParams
from tunelab.data.formats import RowFormat, RowProblem, convert_row, convert_rows, detect_format
from tunelab.data.sources import Split, read_splits
from tunelab.data.templates import Rendered, render_messages, render_text, template_source
from tunelab.data.tokenize import Encoded, encode
from tunelab.errors import ConfigError, DataError

__all__ = ["EncodedData", "load_data", "pick_template"]

log = logging.getLogger("tunelab")


@dataclass
class EncodedData:
    """Tokenized splits plus what was decided on the way (format, template) for the log and the run folder."""

    train: list[Encoded]
    valid: list[Encoded] | None
    row_format: RowFormat
    template: str | None  # template name used for messages, None for plain text
    template_source: str | None
    origins: dict[str, str] = field(default_factory=dict)
    preview: str = ""
    skipped_rows: dict[str, int] = field(default_factory=dict)  # split -> bad rows dropped (bad_rows=skip)

    def describe(self) -> str:
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


def load_data(params: LLMParams, tokenizer: Any) -> EncodedData:
    """Read, check, format and tokenize the train (and valid) splits named by params."""
    splits: dict[str, Split] = read_splits(params.data_path, params.train_split, params.valid_split)
    train_split = splits["train"]
    row_format = detect_format(train_split, params.text_column, params.prompt_text_column)
    template = pick_template(params.chat_template, row_format, tokenizer)
    source = template_source(template, tokenizer) if template else None
    eos = tokenizer.eos_token if params.add_eos_token else None

    encoded: dict[str, list[Encoded]] = {}
    skipped: dict[str, int] = {}
    preview = ""
    for name, split in splits.items():
        fmt = row_format if name == "train" else detect_format(split, params.text_column, params.prompt_text_column)
        if fmt.kind != row_format.kind:
            raise DataError(f"{split.origin}: rows are {fmt.kind}, but the train split's are {row_format.kind}")
        render_row = functools.partial(_render_row, fmt=fmt, source=source, tokenizer=tokenizer, eos=eos)
        rendered, skipped[name] = convert_rows(split, render_row, params.bad_rows)
        if not preview:
            preview = rendered[0].text
        encoded[name] = encode(
            rendered, tokenizer, add_special_tokens=_wants_special_tokens(rendered, source, tokenizer)
        )
    return EncodedData(
        train=encoded["train"],
        valid=encoded.get("valid"),
        row_format=row_format,
        template=template,
        template_source=source,
        origins={name: split.origin for name, split in splits.items()},
        preview=preview,
        skipped_rows=skipped,
    )


def _wants_special_tokens(rendered: list[Rendered], source: str | None, tokenizer: Any) -> bool:
    """Chat templates write their own special tokens; plain text gets the tokenizer's (e.g. BOS) unless it is
    pre-formatted and already starts with them (`<s>[INST] ...`), which would double the BOS."""
    if source is not None:
        return False
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and any(r.text.startswith(bos) for r in rendered[:100]))


def _render_row(row: dict, fmt: RowFormat, source: str | None, tokenizer: Any, eos: str | None) -> Rendered:
    """One row formatted for training; raises RowProblem for a bad row, including one the chat template refuses
    (templates may `raise_exception(...)`, e.g. on roles that do not alternate)."""
    example = convert_row(row, fmt)
    if "text" in example:
        return render_text(example["text"], eos)
    if source is None:  # a messages row with no template cannot happen: pick_template always chooses one
        raise ConfigError("internal: messages without a template")
    try:
        return render_messages(example["messages"], source, tokenizer)
    except TemplateError as err:
        raise RowProblem(fmt.columns.get("messages"), f"the chat template cannot render it ({err})") from None
