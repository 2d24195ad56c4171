"""Chat templates: turning a message list into text, with the character spans of the assistant answers.

The templates are Hugging Face-compatible Jinja (templates/*.jinja, or the tokenizer's own for `tokenizer`),
so the one used for training is saved with the tokenizer and chat/serve/generate format prompts the same way.
The renderer returns the text and the trainable spans together (formatting is data, masking goes with it).

An assistant turn's reasoning (its `reasoning_content`, data/formats.py) is handed to a template that writes it
(Qwen3's, DeepSeek's and gpt-oss's read it, under their own key); for any other template it is written into the
turn's content as those models write it, `<think>\n...\n</think>\n\n` before the answer, and trained on with it.
`tunelab serve` reads it back out of the answers in that form (inference/reasoning.py).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from tunelab.config.llm import custom_chat_template
from tunelab.errors import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN = ("none", "zephyr", "chatml", "alpaca")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # how reasoning models write their reasoning before the answer
# The message keys a chat template may read an assistant turn's reasoning from (Qwen3's and Gemma's, then gpt-oss's),
# in the order they are looked for; the data may hold reasoning under more names (formats.REASONING_KEYS).
_REASONING_KEYS = ("reasoning_content", "thinking")


class UnplacedToolCall(TemplateError):
    """A conversation whose tool call cannot be located in its rendered text: a bad row, as a template's own
    raise_exception makes one (data/pipeline.py renders row by row to name it)."""


@dataclass
class Rendered:
    """Formatted text and the [start, end) character spans the loss is computed on."""

    text: str
    spans: list[tuple[int, int]]
    images: list[Any] | None = None  # the images the text shows, in order (data/images.py)
    row: int = -1  # the row's index in its block, where a later step may still find it bad
    marks: list[tuple[int, int]] | None = None  # each image's characters, once written in (data/images.py)


@functools.cache
def builtin_template(name: str) -> str:
    """The Jinja source of one of tunelab's own templates."""
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def template_source(name: str, tokenizer: Any, variables: dict[str, Any] | None = None) -> str:
    """Jinja source for a template name (`tokenizer`: the model's own), or for the user's own template (a .jinja
    file or the Jinja itself, config.llm.custom_chat_template), checked to compile; with `variables`
    (chat_template_kwargs), set as its defaults (`with_defaults`). A variable the template never reads (a typo,
    or a switch another model's template has) is a ConfigError: it would change nothing."""
    source = _named_source(name, tokenizer)
    if not variables:
        return source
    compiled = _compiled(source)
    if compiled is not None:  # parsed as transformers parses templates ({% generation %}, {% break %})
        from jinja2 import meta

        read = meta.find_undeclared_variables(compiled.environment.parse(source))
        unread = [key for key in variables if key not in read]
        if unread:
            reads = ", ".join(sorted(read - {"messages", "tools", "add_generation_prompt", "documents"})) or "none"
            raise ConfigError(
                f"chat_template_kwargs: the chat template ({name}) never reads {unread[0]}, so it would change "
                f"nothing (the variables it reads: {reads})"
            )
    headed = with_defaults(source, variables)
    _check_compiles(headed, name)
    return headed


def with_defaults(source: str, variables: dict[str, Any] | None) -> str:
    """The template with `variables` set at its top unless the caller passes them: rendered so for training, and
    saved so with the run, chat, generate and serve write prompts as training did, while a served request's own
    chat_template_kwargs still win."""
    if not variables:
        return source
    header = "".join(
        f"{{%- if {name} is not defined %}}{{%- set {name} = {json.dumps(value, ensure_ascii=False)} %}}{{%- endif %}}"
        for name, value in variables.items()
    )
    # The header writes no text. It ends with a newline after its last block tag, which trim_blocks (transformers
    # renders with it) takes away: the template's own first line is then read as it would be alone.
    return f"{{#- tunelab: chat_template_kwargs, as the run's defaults #}}{header}\n{source}"


_PROBE = "\x00tunelab-probe\x00"  # a text no template adds


def writes_strings(source: str, tokenizer: Any) -> bool:
    """Whether the template writes a turn whose content is a plain string (LLaVA's and SmolVLM's own read lists of
    parts only, and write nothing for a string); a template that fails on the probe counts as writing them."""
    try:
        return _PROBE in render_template(source, [{"role": "user", "content": _PROBE}], tokenizer)
    except Exception:  # noqa: BLE001 - jinja2's errors and a template's own raise_exception: not this question's
        return True


def with_string_parts(source: str) -> str:
    """The template with every plain string content handed to it as one text part, as TRL hands a multimodal chat
    to it: trained so, and saved so, every later prompt (chat, generate, serve, a text-only one too) reaches it
    written, not dropped."""
    header = (
        "{#- tunelab: string contents as text parts #}"
        "{%- set tunelab_parts = namespace(messages=[]) %}"
        "{%- for message in messages %}"
        "{%- if message['content'] is string %}"
        "{%- set tunelab_parts.messages = tunelab_parts.messages"
        " + [dict(message, content=[{'type': 'text', 'text': message['content']}])] %}"
        "{%- else %}{%- set tunelab_parts.messages = tunelab_parts.messages + [message] %}{%- endif %}"
        "{%- endfor %}"
        "{%- set messages = tunelab_parts.messages %}\n"
    )
    return header + source


def teach_strings(tokenizer: Any) -> None:
    """The tokenizer's own template taught to take a plain string content (with_string_parts) where it writes nothing
    for one: a vision-language model's (LLaVA's, SmolVLM's), for every method and every prompt alike."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and not writes_strings(template, tokenizer):
        tokenizer.chat_template = with_string_parts(template)


def _named_source(name: str, tokenizer: Any) -> str:
    custom = custom_chat_template(name)
    if custom is not None:
        _check_compiles(custom, name)
        return custom
    if name == "tokenizer":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ConfigError(
                "chat_template=tokenizer, but this model's tokenizer has no chat template: "
                "use chatml or zephyr instead"
            )
        return source if isinstance(source, str) else source.get("default", next(iter(source.values())))
    if name not in BUILTIN:
        raise ConfigError(f"unknown chat template {name!r}: use one of none, zephyr, chatml, tokenizer, alpaca")
    return builtin_template(name)


def render_template(
    source: str,
    messages: list[dict],
    tokenizer: Any,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """Render messages with a Jinja chat template exactly as transformers does at inference time (reasoning where
    the template reads it, else in the content: `with_reasoning`); `tools`: definitions the template shows."""
    return tokenizer.apply_chat_template(
        with_reasoning([messages], source)[0],
        chat_template=source,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        tools=tools,
    )


def render_messages(messages: list[dict], source: str, tokenizer: Any, tools: list[dict] | None = None) -> Rendered:
    """Render a conversation and find each assistant answer's span (its content and closing tokens).

    A template is rendered up to each assistant turn with the generation prompt, and up to its end without;
    the difference is the answer. Templates that rewrite earlier turns (rare) fall back to locating the answer's
    content in the full text.
    """
    return render_conversations([messages], source, tokenizer, [tools])[0]


def render_conversations(
    conversations: list[list[dict]], source: str, tokenizer: Any, tools: list[list[dict] | None] | None = None
) -> list[Rendered]:
    """`render_messages` for many conversations at once: each template call renders a whole batch (transformers
    renders a list of conversations in one call, so its per-call work is paid once), and the last answer's end is
    the text's own (no third render). The spans are those `render_messages` finds; a template that raises for any
    conversation raises here too (the caller then renders row by row to name it). `tools`: each conversation's tool
    definitions (None: none), handed to the template as transformers' `tools`."""
    conversations = with_reasoning(with_inputs(conversations, source), source)
    tools = tools or [None] * len(conversations)
    texts = _render_batch(source, conversations, tokenizer, False, tools)
    wanted: list[tuple[int, int]] = []  # (conversation, message index) of every assistant answer after the first turn
    for c, messages in enumerate(conversations):
        wanted += [(c, i) for i, m in enumerate(messages) if m["role"] == "assistant" and i]
    befores = _render_batch(
        source, [conversations[c][:i] for c, i in wanted], tokenizer, True, [tools[c] for c, _ in wanted]
    )
    # An answer that opens the conversation is found by its content (templates need not render no messages at
    # all), which a tool call's turn does not have: the text before it is where a stand-in content lands.
    openers = [c for c, m in enumerate(conversations) if m and m[0]["role"] == "assistant" and m[0].get("tool_calls")]
    stand_ins = [[{"role": "assistant", "content": _STAND_IN}] for _ in openers]
    marked_texts = _render_batch(source, stand_ins, tokenizer, False, [tools[c] for c in openers])
    for c, marked in zip(openers, marked_texts, strict=True):
        if _STAND_IN in marked:
            wanted.append((c, 0))
            befores.append(marked[: marked.index(_STAND_IN)])
    inner = [(c, i) for c, i in wanted if i < len(conversations[c]) - 1]
    ends = _render_batch(
        source, [conversations[c][: i + 1] for c, i in inner], tokenizer, False, [tools[c] for c, _ in inner]
    )
    uptos = dict(zip(inner, ends, strict=True))
    prefixes = {key: (before, uptos.get(key, texts[key[0]])) for key, before in zip(wanted, befores, strict=True)}
    return [_spans(messages, texts[c], prefixes, c, tokenizer) for c, messages in enumerate(conversations)]


def with_inputs(conversations: list[list[dict]], source: str) -> list[list[dict]]:
    """Alpaca rows keep their context in the user turn's `input` key, which only the alpaca template lays out (its
    `### Input:` section). Every other template (chatml, zephyr, none, a model's own) reads role and content alone
    and would silently train on the instruction without its context, so there the input joins the instruction
    after a blank line, as tools that turn Alpaca rows into chats do."""
    if source.endswith(builtin_template("alpaca")) or not any("input" in m for c in conversations for m in c):
        return conversations
    return [[_input_in_content(m) for m in c] for c in conversations]


def template_text(tokenizer: Any, tools: bool = False) -> str:
    """The chat template source transformers renders a chat with ("" if none). Of named templates (a dict of them,
    as Hermes 2 Pro and Command R have), as transformers chooses: `tool_use` for a chat given tools, where there is
    one, else `default` (all of them joined when neither is named: transformers then asks for a name)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, dict):
        return template
    chosen = template.get("tool_use") if tools else None
    return chosen or template.get("default") or " ".join(template.values())


def with_reasoning(conversations: list[list[dict]], source: str) -> list[list[dict]]:
    """Assistant turns' reasoning (`reasoning_content`) under the key the template reads it from; a template that
    reads none gets it in the turn's content, `<think>\\n{reasoning}\\n</think>\\n\\n{content}` (Qwen3's and
    DeepSeek-R1's layout), so that no template silently drops it."""
    if not any("reasoning_content" in m for c in conversations for m in c):
        return conversations
    key = reasoning_key(source)
    return [[_reasoning_placed(m, key) for m in c] for c in conversations]


def reasoning_key(source: str) -> str | None:
    """The message key the template reads an assistant turn's reasoning from, or None when it reads none.

    A read is the key taken from something in the template's syntax tree: `message.reasoning_content`,
    `m['thinking']`, `message.get('reasoning_content')` (Gemma's). The name in a text (an error the template
    raises) or a comment is no read, nor is `thinking` taken from a part of a message's content (Mistral's
    `block['thinking']`, in a loop over `message.content`): that is a content block's, not the message's."""
    from jinja2 import TemplateError, nodes

    try:
        compiled = _compiled(source)
        tree = compiled.environment.parse(source) if compiled is not None else None
    except TemplateError:  # a template that does not parse: training's own check says so, with the template named
        tree = None
    if tree is None:  # no syntax tree to read: the key written as a read anywhere in the source
        read_as = r"\.{0}\b|\[\s*['\"]{0}['\"]|get\(\s*['\"]{0}['\"]"
        return next((key for key in _REASONING_KEYS if re.search(read_as.format(key), source)), None)
    blocks = {
        loop.target.name
        for loop in tree.find_all(nodes.For)
        if isinstance(loop.target, nodes.Name) and _reads_content(loop.iter)
    }
    read = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Call)):
        key, owner = _key_read(node)
        in_block = _reads_content(owner) or (isinstance(owner, nodes.Name) and owner.name in blocks)
        if key in _REASONING_KEYS and not (key == "thinking" and in_block):
            read.add(key)
    return next((key for key in _REASONING_KEYS if key in read), None)


def _key_read(node: Any) -> tuple[str | None, Any]:
    """(the key a Jinja node reads, what it reads it from): `x.key`, `x['key']`, `x.get('key', ...)`."""
    from jinja2 import nodes

    if isinstance(node, nodes.Getattr):
        return node.attr, node.node
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value, node.node
    if (
        isinstance(node, nodes.Call)
        and isinstance(node.node, nodes.Getattr)
        and node.node.attr == "get"
        and node.args
        and isinstance(node.args[0], nodes.Const)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value, node.node.node
    return None, None


def _reads_content(node: Any) -> bool:
    """Whether a Jinja expression is (a part of) some message's content: `message.content`, `m['content'][0]`."""
    while node is not None:
        key, owner = _key_read(node)
        if key == "content":
            return True
        node = owner if key is not None else getattr(node, "node", None)
    return False


def answer_as_written(message: dict) -> str:
    """An assistant turn's answer as the model writes it: its reasoning first, in a think block, where it has any."""
    return _reasoning_placed(message, None)["content"]


def _reasoning_placed(message: dict, key: str | None) -> dict:
    if "reasoning_content" not in message or key == "reasoning_content":
        return message
    placed = {k: v for k, v in message.items() if k != "reasoning_content"}
    reasoning = message["reasoning_content"].strip("\n")
    if key is not None:
        placed[key] = reasoning
    else:
        answer = message["content"].lstrip("\n")
        placed["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"
    return placed


_STAND_IN = "\x00tunelab-answer\x00"  # a content no conversation holds


def _input_in_content(message: dict) -> dict:
    if "input" not in message:
        return message
    folded = {key: value for key, value in message.items() if key != "input"}
    folded["content"] = f"{message['content']}\n\n{message['input']}"
    return folded


def _render_batch(
    source: str, conversations: list[list[dict]], tokenizer: Any, generation: bool, tools: list[Any]
) -> list[str]:
    if not conversations:
        return []
    direct = _compiled(source) if hasattr(tokenizer, "special_tokens_map") else None
    if direct is not None:
        # What apply_chat_template renders, less its per-conversation copying and normalizing (a third of the
        # time), which changes nothing for the plain dicts the data step builds. The first conversation is
        # rendered both ways to make sure; any difference and the batch goes through transformers.
        special = dict(tokenizer.special_tokens_map)
        texts = [
            direct.render(messages=c, tools=t, documents=None, add_generation_prompt=generation, **special)
            for c, t in zip(conversations, tools, strict=True)
        ]
        if texts[0] == _render_batch_hf(source, conversations[:1], tokenizer, generation, tools[:1])[0]:
            return texts
    return _render_batch_hf(source, conversations, tokenizer, generation, tools)


def _render_batch_hf(
    source: str, conversations: list[list[dict]], tokenizer: Any, generation: bool, tools: list[Any]
) -> list[str]:
    if not any(tools):  # one call for the batch
        return tokenizer.apply_chat_template(
            conversations, chat_template=source, tokenize=False, add_generation_prompt=generation
        )
    # apply_chat_template takes one set of tools per call
    return [
        tokenizer.apply_chat_template(
            c, tools=t, chat_template=source, tokenize=False, add_generation_prompt=generation
        )
        for c, t in zip(conversations, tools, strict=True)
    ]


def _check_compiles(source: str, name: str) -> None:
    """A template with a Jinja syntax error is one line naming where, before any row is rendered."""
    try:
        _compiled(source)
    except TemplateError as err:
        where = "the chat_template given" if source == name else f"chat_template {name}"
        line = f", line {err.lineno}" if getattr(err, "lineno", None) else ""
        raise ConfigError(f"{where}{line}: {err.message or err}") from None


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> Any:
    """transformers' own compiled template (its sandboxed environment, filters and globals), or None."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # moved in another transformers version: render through apply_chat_template
        return None
    return _compile_jinja_template(source)


def _spans(messages: list[dict], text: str, prefixes: dict, c: int, tokenizer: Any) -> Rendered:
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = prefixes.get((c, i), ("", ""))
        if (c, i) in prefixes and text.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            if message.get("tool_calls"):
                # found by its content, as below, a call's turn ("" content) would carry no loss at all
                raise UnplacedToolCall(
                    "the chat template writes this conversation's earlier turns otherwise than its last one, and a "
                    "tool call's place in the text cannot be found (train tool calls with a template that keeps "
                    "earlier turns as written, tunelab's chatml say)"
                )
            start = text.find(message["content"], cursor)
            if start < 0:
                continue
            end = start + len(message["content"])
            eos = getattr(tokenizer, "eos_token", None)
            if eos and text.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return Rendered(text, spans)


def render_text(text: str, eos_token: str | None) -> Rendered:
    """Plain text rows are trained on whole; the end-of-sequence token is appended when asked for."""
    if eos_token and not text.endswith(eos_token):
        text = text + eos_token
    return Rendered(text, [(0, len(text))])
