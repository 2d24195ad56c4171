"""`tunelab export --format ollama`: the GGUF file plus a Modelfile, for `ollama create NAME -f Modelfile`.

Ollama formats chats with its own TEMPLATE, in Go's text/template syntax, not the Jinja chat template a run trains
with. The Jinja template is not translated by parsing it (templates are programs); it is measured: rendered for a
few chats with marker contents, the text around the markers gives each role's prefix and suffix, the text
before the first message, and the generation prompt. From those the TEMPLATE is written, and then checked: what it
renders (computed here with the same rules) must equal the Jinja template's text for chats with and without a
system message, one and two turns. A template that does not decompose that way (one that folds the system prompt
into the first user turn, say) gets no system turn, or is refused, with one line saying so.

A default system prompt the template adds when a chat has none (SmolLM2's "You are a helpful AI assistant...")
becomes the Modelfile's SYSTEM, as Ollama expects; `--system` sets another. PARAMETER stop lists the special
tokens that end an assistant turn. https://github.com/ollama/ollama/blob/main/docs/modelfile.md

A run trained on reasoning (tunelab_run.json's `reasoning`: its answers came with reasoning_content) writes
`<think>...</think>` before its answers. Its TEMPLATE then writes an assistant message's `.Thinking` in that block,
as training did (templates.with_reasoning folds it into the turn), in plain text around `{{ .Thinking }}`: that is
what Ollama reads a model's thinking tags from, and a model whose template has them is one Ollama lists as
"thinking" and whose answers it returns with the reasoning apart (`message.thinking`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunelab.data.templates import THINK_CLOSE, THINK_OPEN, reasoning_key, template_text, with_reasoning
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

_MARK = {role: f"TUNELAB{role.upper()}{n}MARK" for role, n in (("system", 0), ("user", 1), ("assistant", 1))}
_USER2 = "TUNELABUSER2MARK"


@dataclass(frozen=True)
class ChatShape:
    """A chat template as the text around each message: what Ollama's TEMPLATE is written from."""

    preamble: str  # before the first message when it is not a system message (a default system turn, or "")
    system_prefix: str | None  # None: the template has no system turn of its own
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str  # between turns
    assistant_last_suffix: str  # after the chat's last message
    generation_prompt: str
    thinking: bool = False  # an assistant message's .Thinking is written before its content, in a think block

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the TEMPLATE below renders for `messages`, by the same rules, for checking it against Jinja."""
        out = []
        for i, message in enumerate(messages):
            role, content, last = message["role"], message["content"], i == len(messages) - 1
            if i == 0 and role != "system":
                out.append(self.preamble)
            if role == "system" and self.system_prefix is not None:
                out.append(self.system_prefix + content + self.system_suffix)
            elif role == "user":
                out.append(self.user_prefix + content + self.user_suffix)
            elif role == "assistant":
                suffix = self.assistant_last_suffix if last else self.assistant_suffix
                if self.thinking and message.get("thinking"):
                    content = f"{THINK_OPEN}\n{message['thinking']}{THINK_CLOSE}\n\n{content}"
                out.append(self.assistant_prefix + content + suffix)
            if last and role != "assistant":
                out.append(self.generation_prompt)
        return "".join(out)

    def go_template(self) -> str:
        """Ollama's TEMPLATE: literal text as Go string constants, so trim markers never touch it (but for the
        think block's, which Ollama reads its thinking tags from)."""

        def text(value: str) -> str:
            return "{{ " + json.dumps(value, ensure_ascii=False) + " }}" if value else ""

        assistant_end = text(self.assistant_suffix)
        if self.assistant_last_suffix != self.assistant_suffix:  # Alpaca: a separator between turns only
            assistant_end = (
                f"{{{{ if $last }}}}{text(self.assistant_last_suffix)}{{{{ else }}}}{assistant_end}{{{{ end }}}}"
            )
        # Plain text around .Thinking, not Go string constants: Ollama finds the tags in the text nodes beside it.
        # No line break before the close tag: Ollama's parser keeps the one the model wrote in .Thinking.
        thinking = f"{{{{ if .Thinking }}}}{THINK_OPEN}\n{{{{ .Thinking }}}}{THINK_CLOSE}\n\n{{{{ end }}}}"
        system = (
            f'{{{{- if eq .Role "system" }}}}{text(self.system_prefix)}{{{{ .Content }}}}{text(self.system_suffix)}\n'
            if self.system_prefix is not None
            else '{{- if eq .Role "system" }}\n'
        )
        return (
            "{{- range $i, $_ := .Messages }}\n"
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            f'{{{{- if and (eq $i 0) (ne .Role "system") }}}}{text(self.preamble)}{{{{ end }}}}\n'
            f"{system}"
            f'{{{{- else if eq .Role "user" }}}}{text(self.user_prefix)}{{{{ .Content }}}}{text(self.user_suffix)}\n'
            f'{{{{- else if eq .Role "assistant" }}}}{text(self.assistant_prefix)}'
            f"{thinking if self.thinking else ''}{{{{ .Content }}}}{assistant_end}\n"
            "{{- end }}\n"
            f'{{{{- if and $last (ne .Role "assistant") }}}}{text(self.generation_prompt)}{{{{ end }}}}\n'
            "{{- end }}"
        )


def rendered(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    """The Jinja template's text for a chat, less a leading BOS the tokenizer adds itself: llama.cpp (under
    Ollama) adds it when tokenizing, as the file says, so a TEMPLATE holding it too would start with two."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        ids = tokenizer("a")["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id and ids != tokenizer("a", add_special_tokens=False)["input_ids"]:
            return text[len(bos) :]
    return text


def chat_shape(tokenizer: Any) -> tuple[ChatShape, str | None]:
    """The template's shape and its default system prompt (None when it adds none); TunelabError when the
    template is not a sequence of wrapped messages."""

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return rendered(tokenizer, messages, generation)

    user, assistant, user2 = (
        {"role": "user", "content": _MARK["user"]},
        {"role": "assistant", "content": _MARK["assistant"]},
        {"role": "user", "content": _USER2},
    )
    try:
        a0, a1, a2, a3 = _split(render([user, assistant, user2], True), _MARK["user"], _MARK["assistant"], _USER2)
        _, user_suffix = _split(render([user], False), _MARK["user"])
        _, _, last_suffix = _split(render([user, assistant], False), _MARK["user"], _MARK["assistant"])
    except Exception as error:  # noqa: BLE001 - _split's ValueError, or jinja2's own from a template that raises
        raise TunelabError(f"export: the chat template cannot be written as an Ollama TEMPLATE: {error}") from None
    if not (a1.startswith(user_suffix) and a3.startswith(user_suffix)):
        raise TunelabError(
            "export: the chat template closes user turns differently in different places; Ollama's TEMPLATE cannot"
        )
    # a2 is (assistant suffix, not last) + user prefix, a0 is preamble + user prefix. Most templates end an
    # assistant turn the same way wherever it is; some (Alpaca) add a separator only between turns.
    if a2.startswith(last_suffix) and a0.endswith(a2[len(last_suffix) :]):
        user_prefix = a2[len(last_suffix) :]
    else:
        user_prefix = os.path.commonprefix([a0[::-1], a2[::-1]])[::-1]
    shape = dict(
        preamble=a0[: len(a0) - len(user_prefix)], user_prefix=user_prefix, user_suffix=user_suffix,
        assistant_prefix=a1[len(user_suffix) :], assistant_suffix=a2[: len(a2) - len(user_prefix)],
        assistant_last_suffix=last_suffix, generation_prompt=a3[len(user_suffix) :],
    )  # fmt: skip
    system_prefix, system_suffix, default_system = _system_turn(render, user_prefix, shape["preamble"])
    return ChatShape(**shape, system_prefix=system_prefix, system_suffix=system_suffix), default_system


def _system_turn(render: Any, user_prefix: str, preamble: str) -> tuple[str | None, str, str | None]:
    """(prefix, suffix) of the system turn, and the default system prompt the preamble holds."""
    system, user = {"role": "system", "content": _MARK["system"]}, {"role": "user", "content": _MARK["user"]}
    try:
        d0, d1, _ = _split(render([system, user], False), _MARK["system"], _MARK["user"])
    except Exception:  # noqa: BLE001 - a template that rejects system messages (Gemma's)
        return None, "", None
    if not d1.endswith(user_prefix):
        return None, "", None  # the system prompt is folded into the user turn: no turn of its own
    suffix = d1[: len(d1) - len(user_prefix)]
    default = None
    if preamble.startswith(d0) and preamble.endswith(suffix) and len(preamble) > len(d0) + len(suffix):
        default = preamble[len(d0) : len(preamble) - len(suffix)]
    return d0, suffix, default


def _split(text: str, *marks: str) -> list[str]:
    pieces = []
    for mark in marks:
        if text.count(mark) != 1:
            raise ValueError(f"it does not show each message's content once ({mark!r})")
        before, text = text.split(mark)
        pieces.append(before)
    return [*pieces, text]


def check_shape(shape: ChatShape, tokenizer: Any) -> None:
    """The TEMPLATE's text equals the Jinja template's for the chats a user sends (TunelabError if not)."""
    chats = [
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"},
        ],
    ]
    if shape.system_prefix is not None:
        chats += [[{"role": "system", "content": "Be brief."}, *chat] for chat in chats]
    if shape.thinking:  # an earlier answer's reasoning, written back as the run was trained to read it
        # as Ollama's parser hands the thinking back: from its first character to the close tag, line break kept
        answered = {"role": "assistant", "content": "4", "thinking": "Two and two.\nSo four.\n"}
        chats.append([chats[1][0], answered, chats[1][2]])
    for chat in chats:
        as_trained = [{"reasoning_content" if k == "thinking" else k: v for k, v in m.items()} for m in chat]
        jinja = rendered(tokenizer, with_reasoning([as_trained], template_text(tokenizer))[0], generation=True)
        if shape.render(chat) != jinja:
            raise TunelabError(
                "export: the chat template does not reduce to per-message wrappers (it renders "
                f"{jinja[:80]!r}...), so Ollama's TEMPLATE cannot reproduce it"
            )


def stop_tokens(shape: ChatShape, tokenizer: Any) -> list[str]:
    """What ends an assistant turn in the template (its special tokens, else its text), and the end-of-sequence
    token: Ollama stops generating at any of them."""
    specials = sorted({str(t) for t in tokenizer.all_special_tokens} | set(tokenizer.get_added_vocab()), key=len)
    found = [token for token in specials[::-1] if token and token in shape.assistant_last_suffix]
    if not found and shape.assistant_last_suffix.strip():
        found = [shape.assistant_last_suffix.strip()]
    if tokenizer.eos_token and tokenizer.eos_token not in found:
        found.append(tokenizer.eos_token)
    return found


def modelfile(gguf_name: str, tokenizer: Any, system: str | None = None, thinking: bool = False) -> str:
    """The Modelfile for a GGUF file beside it, from the run's tokenizer and its chat template; `thinking`: the
    model writes its reasoning in a think block before its answers (a run trained on reasoning)."""
    if not tokenizer.chat_template:
        raise TunelabError(
            "export: the model has no chat template, so Ollama would not know how to format a chat: train with "
            "--chat-template (chatml, zephyr, ...) or export --format gguf"
        )
    shape, default_system = chat_shape(tokenizer)
    if thinking and (key := reasoning_key(template_text(tokenizer))) is not None:
        log.warning(
            "export: the chat template writes reasoning its own way (it reads %s); the Modelfile gives Ollama no "
            "thinking tags, so Ollama returns the reasoning inside the answer",
            key,
        )
    elif thinking:
        shape = replace(shape, thinking=True)
    check_shape(shape, tokenizer)
    if shape.system_prefix is None:
        log.warning("export: the chat template has no system turn; Ollama's system messages will not reach the model")
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{shape.go_template()}"""', ""]
    lines += [f"PARAMETER stop {_modelfile_string(token)}" for token in stop_tokens(shape, tokenizer)]
    system = system if system is not None else default_system
    if system and shape.system_prefix is not None:
        lines += ["", f'SYSTEM """{system}"""']
    if any('"""' in part for part in (shape.go_template(), system or "")):
        raise TunelabError('export: the chat template or system prompt holds """, which ends a Modelfile value')
    return "\n".join(lines) + "\n"


def _modelfile_string(text: str) -> str:
    """`text` as a quoted Modelfile value that Ollama reads back as `text`.

    Ollama's parser (parser/parser.go: ParseFile, unquote) knows no escapes: a quoted value is the text between its
    quotes as it stands (JSON's `\\"` or `\\n` would reach the stop list as a backslash and a letter). A value
    may span lines: it ends at the first line end where the text so far, trailing spaces trimmed, closes its quote;
    one starting with three quotes must end with three; characters not printable (other than spaces, tabs and line
    ends) are dropped. A text that cannot come back whole is refused.
    """
    line_ends = [i for i, char in enumerate(text) if char in "\r\n"]
    ends_early = any(text[:i].rstrip().endswith('"') for i in line_ends)
    dropped = any(not char.isprintable() and char not in " \t\r\n" for char in text)
    if text.startswith('""') or ends_early or dropped:
        raise TunelabError(f"export: the stop string {text!r} cannot be written in a Modelfile (it reads no escapes)")
    return f'"{text}"'


def export_ollama(
    model: str | Path, output: str | Path, dtype: str = "f16", system: str | None = None, thinking: bool | None = None
) -> Path:
    """Write `output/` holding `model.gguf` and a `Modelfile`; returns the Modelfile's path. `thinking` None: as the
    run's tunelab_run.json says (a merged model's folder says nothing: give it).

    The Modelfile is built (and its template checked) before the GGUF file is written, so a template Ollama
    cannot take stops the export before minutes of merging and quantizing.
    """
    from tunelab.inference.export import export_run
    from tunelab.outputs import check_run_folder, read_run

    folder = check_run_folder(model, "export")
    target = Path(os.path.expanduser(str(output))).absolute()
    if target.suffix.lower() == ".gguf" or target.is_file():
        raise TunelabError(
            f"export: --format ollama writes a folder (the GGUF file and its Modelfile); {target} is a file name"
        )
    if thinking is None:  # trained on reasoning: it writes <think> blocks
        thinking = bool(read_run(folder).get("reasoning"))
    text = modelfile("model.gguf", _tokenizer(folder), system, thinking)
    export_run(folder, target / "model.gguf", dtype)
    path = target / "Modelfile"
    partial = path.with_name(".Modelfile.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError as error:  # a full disk: the path, not a traceback
        raise TunelabError(f"export: cannot write {path}: {error.strerror or error}") from error
    finally:
        with contextlib.suppress(OSError):  # gone after the rename; left only by a failure
            partial.unlink(missing_ok=True)
    return path


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    source = folder if any(folder.glob("tokenizer*")) else folder / "merged"
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise TunelabError(f"export: {folder} has no usable tokenizer: {error}") from error
