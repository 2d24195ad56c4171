"""Prompt data for the sampling methods (grpo, rloo, online_dpo): a prompt per row, the row's other columns for the
rewards.

The prompt column is `prompt_text_column` (default: a column named `prompt`). A prompt is text or a role/content
message list (or a JSON string of one). Message prompts are rendered with the chat template and its generation
prompt; text prompts too when a chat template is asked for (`--chat-template tokenizer|chatml|...`, as a user
turn), else they are used as they are. Prompts longer than max_prompt_length lose their beginning (counted in the
log). Every other column of the row (a reference answer, test cases) is kept as it is and handed to the reward
functions, under its own name. Bad rows are reported as for the other methods: file, line and column.

With `tools`, every prompt is a conversation (a text prompt becomes a user turn, and the rewards receive it so),
rendered with the tools' schemas: a chat template that does not show them is refused, and a prompt is never cut
(its beginning holds the schemas): one longer than max_prompt_length is a bad row, and tools whose schemas alone do
not fit are refused.

grpo on a vision-language model: a prompt may show images, in the forms sft reads them (data/images.py: image
parts, TRL's `images` column filling bare parts or opening the first user turn, LLaMA-Factory's `<image>`), each
checked before training and written in as the model's processor writes it; such a prompt is never cut, and the
rewards receive it with each image as a bare `{"type": "image"}` part (the row's `images` column as it is).
"""

from __future__ import annotations

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
    image_column_of,
    is_messages,
    refuse_image_columns,
    settle_bad_rows,
    with_row_images,
)
from tunelab.data.images import (
    ImageCodec,
    ImageProblem,
    as_template_reads,
    check_unchanged,
    codec_or_reason,
    file_signatures,
    stored_image,
)
from tunelab.data.sources import Split, locate_splits, read_location
from tunelab.data.templates import render_template, template_source, with_string_parts, writes_strings
from tunelab.errors import ConfigError, DataError
from tunelab.rewards import is_answer_reward, reward_names
from tunelab.tools import load_tools, tool_schemas


@dataclass
class PromptRow:
    """One prompt as the model sees it, what the rewards see, and where it came from."""

    prompt: Any  # the prompt as in the data: text, or a message list (what the rewards receive)
    input_ids: list[int]  # rendered (chat template with its generation prompt) and tokenized
    columns: dict[str, Any]  # the row's other columns, for the rewards
    where: str  # "train.jsonl line 12"
    images: list[str | bytes] | None = None  # the images it shows, in order (a vision-language model's run)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        """Its prompt's tokens (data/holdout.prompt_groups holds a prompt's rows out together)."""
        return self.input_ids


@dataclass
class PromptData:
    train: list[PromptRow]
    valid: list[PromptRow] | None
    column: str
    template: str | None
    template_source: str | None
    origins: dict[str, str]
    preview: str
    skipped_rows: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    reasoning: bool = False  # a reward asks for reasoning (format_think): the run learns to write <think> blocks
    # the image files the prompts show, with their size and time when prepared (data/images.check_unchanged)
    image_files: dict[str, tuple[int, int]] = field(default_factory=dict)

    def describe(self) -> str:
        return f"prompts ({'chat' if self.template else 'text'}) from column {self.column!r}"

    @property
    def shows_images(self) -> bool:
        return any(row.images for rows in (self.train, self.valid or []) for row in rows)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        check_unchanged(self.image_files)


@dataclass
class PromptImages:
    """How a vision-language model's run reads the images prompts show (None codec: such prompts are bad rows, for
    `problem`)."""

    codec: ImageCodec | None
    problem: str | None
    folder: Path | None = None  # where the data file is: image paths are relative to it
    column: str | None = None  # the column listing a row's images (image_column; None: `images` or `image`)


def prompt_column(split: Split, params: LLMParams) -> str:
    column = params.prompt_text_column or "prompt"
    if column not in split.columns:
        raise DataError(
            f"{split.origin}: prompt column {column!r} not found (columns: {', '.join(split.columns[:20])}); "
            "set prompt_text_column (data.column_mapping.prompt_text_column) to the column that holds the prompt"
        )
    return column


def _check_answer_column(split: Split, params: LLMParams) -> None:
    """The answer_* rewards compare completions with a column of the data: a file without it is found now, before
    the model loads, not at the first reward call once training has started."""
    wanted = [name for name in reward_names(params.reward_functions) if is_answer_reward(name)]
    column = params.reward_answer_column
    if wanted and column not in split.columns:
        raise DataError(
            f"{split.origin}: reward {wanted[0]} compares with column {column!r}, which the data does not have "
            f"(columns: {', '.join(split.columns[:20])}); set reward_answer_column (--reward-answer-column) to the "
            "column that holds the answer"
        )


def load_prompt_data(
    params: LLMParams,
    tokenizer: Any,
    images_problem: str | None = None,
    processor: Any = None,
    image_store: tuple[Path, Path] | None = None,
) -> PromptData:
    """Read, check, render and tokenize the prompt splits named by params. `images_problem`: a vision-language
    model's run, and why its rows' images cannot be trained: a split whose rows list images is refused. `processor`:
    a vision-language model's, which writes the images prompts show (grpo); `image_store`: where image bytes are
    written once (as data/preference.load_preference_data's)."""
    places = locate_splits(params.data_path, params.train_split, params.valid_split)
    splits = {name: read_location(place, name) for name, place in places.items()}
    for split in splits.values() if images_problem else ():
        refuse_image_columns(split, params.image_column, images_problem)
    column = prompt_column(splits["train"], params)
    for split in splits.values():
        _check_answer_column(split, params)
    conversational = is_messages(next((r[column] for r in splits["train"].rows if r.get(column)), None))
    requested = params.chat_template
    template = None
    tools = tool_schemas(load_tools(params.tools)) if params.tools else None
    if conversational or tools:
        template = (
            requested if requested and requested != "none" else ("tokenizer" if tokenizer.chat_template else "chatml")
        )
    elif requested and requested != "none":
        template = requested
    source = template_source(template, tokenizer, params.chat_template_kwargs) if template else None
    if source is not None and processor is not None and not writes_strings(source, tokenizer):
        source = with_string_parts(source)  # (a custom template: the model's own was taught at prepare)
    if tools:
        _check_tools_template(source, tokenizer, tools, params.max_prompt_length)
    shown = None
    if processor is not None:
        shown = PromptImages(*codec_or_reason(processor, source, tokenizer), column=params.image_column)

    out: dict[str, list[PromptRow]] = {}
    skipped: dict[str, int] = {}
    truncated = 0
    for name, split in splits.items():
        rows, problems = [], []
        split_column = prompt_column(split, params)
        if shown is not None:
            shown.folder = places[name].parent if isinstance(places[name], Path) else None
        for index, row in enumerate(split.rows):
            try:
                prompt, text, images = _prompt(row, split_column, source, tokenizer, conversational, tools, shown)
            except RowProblem as problem:
                problems.append(describe_problem(split, index, problem))
                continue
            ids = tokenizer(text, add_special_tokens=source is None)["input_ids"]
            others = {key: value for key, value in row.items() if key != column}
            if images:  # never cut (a cut from its start would take the turn's header and an image's tokens)
                if image_store is not None:  # bytes written once beside the prepared data, named by their file
                    images = [stored_image(r, *image_store) if isinstance(r, bytes) else r for r in images]
                listed = image_column_of(row, shown.column if shown else None)
                if listed:  # the rewards get the images found (paths), not the cell (a dataset's bytes)
                    others[listed] = images
                rows.append(PromptRow(prompt, list(ids), others, split.where(index), images))
                continue
            longest = params.max_prompt_length
            if len(ids) > longest and tools:  # (its beginning holds the tools' schemas)
                why = f"{len(ids)} tokens with the tools' schemas, more than max_prompt_length {longest}"
                problems.append(describe_problem(split, index, RowProblem(split_column, why)))
                continue
            if len(ids) > params.max_prompt_length:
                ids = ids[-params.max_prompt_length :]  # the end holds the question and the generation prompt
                truncated += name == "train"
            rows.append(PromptRow(prompt, list(ids), others, split.where(index)))
        settle_bad_rows(problems, split.origin, params.bad_rows, kept=len(rows))
        skipped[name] = len(problems)
        out[name] = rows
    if not out["train"]:
        raise DataError(f"{splits['train'].origin}: no usable prompts")
    image_files = file_signatures(ref for rows in out.values() for row in rows for ref in row.images or ())
    first = out["train"][0]
    return PromptData(
        train=out["train"],
        valid=out.get("valid"),
        column=column,
        template=template,
        template_source=source,
        origins={name: split.origin for name, split in splits.items()},
        preview=tokenizer.decode(first.input_ids),
        skipped_rows=skipped,
        truncated=truncated,
        reasoning="format_think" in reward_names(params.reward_functions),
        image_files=image_files,
    )


def _check_tools_template(source: str, tokenizer: Any, tools: list[dict[str, Any]], longest: int) -> None:
    """The chat template tried with the tools before any prompt is read: it must show them (a template that renders
    a chat the same with them as without never does), and their schemas must leave room for a question within
    max_prompt_length. (How it writes a call and a tool turn: tools.check_template, when the run is prepared.)"""
    probe = [{"role": "user", "content": "x"}]
    try:
        shown = render_template(source, probe, tokenizer, add_generation_prompt=True, tools=tools)
    except TemplateError as err:
        raise ConfigError(f"tools: the chat template cannot render the tools ({err})") from None
    bare = render_template(source, probe, tokenizer, add_generation_prompt=True)
    if shown == bare:
        raise ConfigError(
            "tools: the chat template does not show the model its tools (it renders a chat the same with them as "
            "without); use one that does: the model's own, or --chat-template chatml (Hermes tool calls)"
        )
    schemas = len(tokenizer(shown, add_special_tokens=False)["input_ids"])
    if schemas >= longest:
        raise ConfigError(
            f"tools: a prompt with the tools' schemas takes {schemas} tokens before any question, max_prompt_length "
            f"is {longest}: raise it (prompts with tools are never cut: their beginning holds the schemas)"
        )


def _prompt(
    row: dict,
    column: str,
    source: str | None,
    tokenizer: Any,
    conversational: bool,
    tools: list[dict[str, Any]] | None = None,
    shown: PromptImages | None = None,
) -> tuple[Any, str, list[str | bytes]]:
    """(the prompt as the rewards see it, the text the model is given, the images it shows). A row whose prompt is
    of the other kind than the file's (`conversational`, judged by its first prompt) is a bad row: a message list
    with no template cannot be rendered, and rewards are handed prompts and completions of one kind (text, or message
    lists) per run. With `tools` a text prompt is a user turn, for the rewards too (their completions are turns).
    With `shown` (a vision-language model's run), its images are read, checked and written in."""
    if is_messages(row.get(column)):
        if not conversational:
            raise RowProblem(column, "a list of messages, where the other rows hold text")
        messages = cell_messages(row, column, need_assistant=False, images=shown is not None)
        if messages and messages[-1]["role"] == "assistant":
            raise RowProblem(column, "the prompt ends with an assistant message; the model is to write that turn")
        prompt: Any = messages
    else:
        prompt = cell_text(row, column)
        if not prompt.strip():
            raise RowProblem(column, "an empty prompt")
        if conversational:
            raise RowProblem(column, "text, where the other rows hold lists of messages")
        if source is None:
            if shown is not None and image_column_of(row, shown.column):
                raise RowProblem(image_column_of(row, shown.column), "images for a prompt with no chat template")
            return prompt, prompt, []
        messages = [{"role": "user", "content": prompt}]
        prompt = messages if tools else prompt
    images: list[str | bytes] = []
    if shown is not None:
        messages = with_row_images(messages, row, column, shown.column)
        images = _checked_images(messages, row, column, shown)
        if images and isinstance(prompt, list):
            prompt = as_template_reads(messages)  # (the rewards see where each image is, not its bytes)
    try:
        text = render_template(source, as_template_reads(messages), tokenizer, add_generation_prompt=True, tools=tools)
    except TemplateError as err:
        raise RowProblem(column, f"the chat template cannot render it ({err})") from None
    if shown is not None and shown.codec is not None:
        try:
            text = shown.codec.expand(text, [], images)[0]
        except ImageProblem as err:
            raise RowProblem(column, str(err)) from None
    return prompt, text, images


def _checked_images(messages: list[dict[str, Any]], row: dict, column: str, shown: PromptImages) -> list[str | bytes]:
    """A prompt's images, each found and opened (data/images.checked_ref); RowProblem naming the column that lists
    them (else the prompt's) when one cannot be, or when the run cannot take them (`shown.problem`)."""
    where = image_column_of(row, shown.column) or column
    return checked_images(messages, where, shown.folder, None if shown.codec is not None else shown.problem)
