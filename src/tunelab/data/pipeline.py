"""A split's blocks of rows -> checked, formatted, tokenized arrays, in worker processes, into a TableWriter.

The work of one block (parse its lines, check and convert each row, render it with the chat template, tokenize it
and mark the trained tokens) needs nothing from any other block, so `encode_split` hands blocks to `workers`
forked processes and writes their results in file order as they come back. At most two blocks per worker are in
flight, so memory holds a few blocks, not the file. With one worker (small files) the same function runs here.

Bad rows are named as they are everywhere else (file, line, column, reason); the first few are kept with a
count of the rest, and `settle_bad_rows` decides, once the whole split is read, whether they stop the run.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from tunelab.data.formats import (
    MAX_LISTED,
    SYSTEM_COLUMN,
    TOOLS_COLUMN,
    RowFormat,
    RowProblem,
    checked_images,
    convert_row,
    describe_problem,
    system_from_column,
)
from tunelab.data.images import ImageCodec, ImageProblem, ImageSpan, as_template_reads
from tunelab.data.sources import Split, SplitStream, block_rows
from tunelab.data.store import TableWriter
from tunelab.data.templates import Rendered, render_conversations, render_messages, render_text
from tunelab.data.tokenize import encode_arrays
from tunelab.errors import ConfigError, TunelabError


@dataclass
class Formatter:
    """How every row of a split becomes trainable text: its shape, the template, the EOS to append."""

    fmt: RowFormat
    source: str | None  # the chat template's Jinja source (None: plain text)
    tokenizer: Any
    eos: str | None
    add_special_tokens: bool
    mask_history: bool = False  # chats: the loss on the last answer only, the earlier turns as context
    images: ImageCodec | None = None  # a vision-language model's: how its images become tokens (data/images.py)
    folder: Path | None = None  # where the data file is: image paths are relative to it
    images_problem: str | None = None  # why a model that reads images cannot take them with this template
    image_token: str | None = None  # the image token of a model that reads images: no row may write it as text
    # Whether the template writes tool calls, tool definitions and reasoning, found on the first conversation with
    # them
    writes: dict[str, bool] = field(default_factory=dict)

    def _unwritten(self, example: dict[str, Any], text: str) -> str | None:
        """What of a conversation the template leaves out ("tool calls", "tools", "reasoning"), or None. A template
        that ignores tool calls would teach the model to answer with nothing where it should call a tool; one
        that ignores the definitions, to call tools it was never shown; one that cuts the reasoning out of answers
        (DeepSeek-R1's and QwQ's cut every answer at </think>), to answer without it, and its answers are then
        found nowhere in the text. Found once per template, by rendering the first conversation that has them
        without them and comparing with its `text`, as rendered with them."""
        messages, tools = as_template_reads(example["messages"]), example.get("tools")
        uses = {
            "tool calls": any(m.get("tool_calls") for m in messages),
            "tools": bool(tools),
            "reasoning": any(m.get("reasoning_content") for m in messages),
        }
        keys = {"tool calls": "tool_calls", "reasoning": "reasoning_content"}
        for what in (name for name, used in uses.items() if used and name not in self.writes):
            if what in keys:
                without = [{k: v for k, v in m.items() if k != keys[what]} for m in messages], tools
            else:
                without = messages, None
            try:
                self.writes[what] = text != render_messages(without[0], self.source, self.tokenizer, without[1]).text
            except TemplateError:  # it refuses the conversation without them: it reads them
                self.writes[what] = True
        return next((what for what, used in uses.items() if used and not self.writes[what]), None)

    def render(self, split: Split) -> tuple[list[Rendered], list[str], int]:
        """The rows of a block rendered, the bad rows described (at most MAX_LISTED) and how many there were."""
        examples, problems, bad = [], [], 0
        for index, row in enumerate(split.rows):
            try:
                examples.append((index, self._images_checked(convert_row(row, self.fmt))))
            except RowProblem as problem:
                bad += 1
                if len(problems) < MAX_LISTED:
                    problems.append(describe_problem(split, index, problem))
        if not examples or "text" in examples[0][1]:
            texts = [replace(render_text(example["text"], self.eos), row=index) for index, example in examples]
            return texts, problems, bad
        if self.source is None:  # a messages row with no template cannot happen: pick_template always chooses one
            raise ConfigError("internal: messages without a template")
        conversations = [as_template_reads(example["messages"]) for _, example in examples]
        tools = [example.get("tools") for _, example in examples]
        column = self.fmt.columns.get("messages")
        try:
            texts = render_conversations(conversations, self.source, self.tokenizer, tools)
            rendered = list(zip(examples, texts, strict=True))
        except TemplateError:  # some row the template refuses (raise_exception): find which, row by row
            rendered = []
            for index, example in examples:
                try:
                    shown = as_template_reads(example["messages"])
                    text = render_messages(shown, self.source, self.tokenizer, example.get("tools"))
                    rendered.append(((index, example), text))
                except TemplateError as err:
                    bad += 1
                    if len(problems) < MAX_LISTED:
                        if not system_from_column(split.rows[index], example["messages"]):
                            reason = RowProblem(column, f"the chat template cannot render it ({err})")
                        else:  # a system turn from the `system` column (Gemma's templates take none)
                            reason = RowProblem(
                                SYSTEM_COLUMN, f"the chat template cannot render it as the system turn ({err})"
                            )
                        problems.append(describe_problem(split, index, reason))
        kept = []
        for (index, example), text in rendered:
            unshown = self._unwritten(example, text.text)
            if unshown is None:
                spans = text.spans[-1:] if self.mask_history else text.spans
                kept.append(Rendered(text.text, spans, example.get("images"), index))
                continue
            bad += 1
            if len(problems) < MAX_LISTED:
                reason = RowProblem(
                    column if unshown != "tools" else TOOLS_COLUMN,
                    f"the chat template does not write its {unshown}: use a template that does ({_WRITERS[unshown]})",
                )
                problems.append(describe_problem(split, index, reason))
        return kept, problems, bad

    def _images_checked(self, example: dict[str, Any]) -> dict[str, Any]:
        """A conversation's images found and opened (data/images.checked_ref), kept in order as its `images`; a row
        with images for a model that reads none is a bad row."""
        column = self.fmt.columns.get("messages") or self.fmt.columns.get("image")
        refused = None
        if self.images is None:
            refused = self.images_problem or (
                "the model reads text only: train a vision-language model on it, or drop the image parts"
            )
        refs = checked_images(example.get("messages", []), column, self.folder, refused)
        return {**example, "images": refs} if refs else example


# Templates that write what another leaves out (Formatter._unwritten)
_TOOL_WRITERS = "the model's own, chat_template: tokenizer, where it takes tools, or your own .jinja"
_WRITERS = {"tool calls": _TOOL_WRITERS, "tools": _TOOL_WRITERS, "reasoning": "chatml, or your own .jinja"}


@dataclass
class SplitResult:
    rows: int  # usable rows
    bad: int
    problems: list[str]  # the first MAX_LISTED bad rows, described
    preview: str  # the first row as rendered


def encode_split(stream: SplitStream, formatter: Formatter, writer: TableWriter, workers: int) -> SplitResult:
    """Every block of a split through `formatter` and the tokenizer into `writer`, in file order."""
    result = SplitResult(0, 0, [], "")
    jobs = ((block, stream.origin, stream.name) for block in stream.blocks())
    for done in _mapped(jobs, formatter, workers):
        writer.add(*done.arrays, images=done.images)
        result.rows += len(done.arrays[2])
        result.bad += done.bad
        result.problems += done.problems[: MAX_LISTED - len(result.problems)]
        result.preview = result.preview or done.first_text
    return result


_FORMATTER: Formatter | None = None  # a worker's own, set once when it starts


def _start_worker(formatter: Formatter) -> None:
    global _FORMATTER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _FORMATTER = formatter


@dataclass
class EncodedBlock:
    """One block of rows prepared: its arrays (data/tokenize.encode_arrays), its bad rows, its first text."""

    split: Split | None  # None once it has come back from a worker (the rows are not sent back)
    arrays: tuple[Any, Any, Any]  # token ids, trained flags, lengths
    problems: list[str]
    bad: int
    first_text: str
    images: list[Any] | None = None  # each example's images (data/images.ImageSpan list, or None), where any has


def encode_block(block: Any, origin: str, name: str, formatter: Formatter) -> EncodedBlock:
    """A block of a SplitStream parsed, checked, rendered and tokenized (file problems raise DataError)."""
    split = block_rows(block, origin, name)
    rendered, problems, bad = formatter.render(split)
    first_text = rendered[0].text if rendered else ""  # (as the template wrote it: an image as its one token)
    images = None
    if formatter.images is not None or formatter.image_token:  # each image written in as the processor writes it
        rendered, failed = _with_images(rendered, formatter.images, formatter.image_token)
        columns = formatter.fmt.columns
        column = columns.get("messages") or columns.get("image") or columns.get("text")
        for index, reason in failed:
            bad += 1
            if len(problems) < MAX_LISTED:
                problems.append(describe_problem(split, index, RowProblem(column, reason)))
    marked: list[list[tuple[int, int]]] | None = [] if any(r.marks for r in rendered) else None
    arrays = encode_arrays(rendered, formatter.tokenizer, formatter.add_special_tokens, marked)
    if marked is not None:
        images = [
            [ImageSpan(ref, first, stop - first) for ref, (first, stop) in zip(r.images, tokens, strict=True)]
            if r.images
            else None
            for r, tokens in zip(rendered, marked, strict=True)
        ]
    return EncodedBlock(split, arrays, problems, bad, first_text, images)


def _with_images(
    rendered: list[Rendered], codec: ImageCodec | None, image_token: str | None = None
) -> tuple[list[Rendered], list[tuple[int, str]]]:
    """A block's texts with their images written in (ImageCodec.expand: the answers' spans moved along, each image's
    characters kept as `marks`), and the rows whose text and images disagree, with why (left out): a row without
    images must not hold the image token either (plain text rows, which have no codec, are checked for it)."""
    kept, failed = [], []
    for text in rendered:
        if codec is None:
            count = text.text.count(image_token) if image_token else 0
            if count:
                failed.append((text.row, f"its text holds {count} image place(s) ({image_token!r}) for 0 image(s)"))
            else:
                kept.append(text)
            continue
        try:
            expanded, spans, marks = codec.expand(text.text, text.spans, text.images or [])
        except ImageProblem as err:
            failed.append((text.row, str(err)))
            continue
        kept.append(Rendered(expanded, spans, text.images, text.row, marks or None) if marks else text)
    return kept, failed


def _encode_block(job: tuple[Any, str, str], formatter: Formatter | None = None) -> Any:
    try:
        done = encode_block(*job, formatter or _FORMATTER)
    except TunelabError as err:  # a file problem (bad JSON, not UTF-8): raised again where the results are read
        return err
    done.split = None  # the rows need not travel back from a worker
    return done


def _mapped(jobs: Any, formatter: Formatter, workers: int) -> Any:
    """_encode_block over jobs, in order, in `workers` processes (here, when 1)."""
    if workers <= 1 or not _can_fork():
        for job in jobs:
            yield _checked(_encode_block(job, formatter))
        return
    context = multiprocessing.get_context("fork")  # the parent's imports and tokenizer, without pickling them
    with context.Pool(workers, initializer=_start_worker, initargs=(formatter,)) as pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(_encode_block, (job,)))
            if len(pending) >= 2 * workers:
                yield _checked(pending.popleft().get())
        while pending:
            yield _checked(pending.popleft().get())


def _can_fork() -> bool:
    """Worker processes need fork (Linux), and a process that may have children (not a daemon)."""
    return "fork" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon


def _checked(result: Any) -> Any:
    if isinstance(result, TunelabError):
        raise result
    return result


def worker_count(requested: int | None, size_bytes: int, images: bool = False) -> int:
    """How many processes prepare a split: as asked, else one per core (up to 8) for files over 8 MB, one below
    (starting workers costs more than it saves on a small file); a vision-language model's rows (`images`: each
    image decoded) from 64 KB on."""
    if requested:
        return max(1, requested)
    if size_bytes < (64 << 10 if images else 8 << 20):
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
