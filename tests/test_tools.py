"""`tools`: the model calls Python functions while it writes a completion (grpo, rloo, online_dpo), as TRL's
GRPOTrainer runs them: the calls read in the chat template's form, run, their results rendered as the template's
tool turns, the model writing on; the tool turns read but not trained on; the rewards given the turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import read_metrics
from tunelab.cli import main

TOOLS = '''
from pathlib import Path


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: the first number
        b: the second number
    """
    with open(Path(__file__).with_suffix(".calls"), "a") as out:
        out.write(f"{a} {b}\\n")
    return a + b


def undocumented(a: int) -> int:
    return a


async def later(a: int, b: int) -> int:
    """Add two whole numbers, later.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def odd(a: int) -> dict:
    """A result JSON cannot write.

    Args:
        a: a number
    """
    return {(a, a): a}


def seen(completions, **kwargs):
    """A reward that writes down the roles of each completion's turns it is given."""
    with open(Path(__file__).with_suffix(".seen"), "a") as out:
        for completion in completions:
            out.write(json.dumps([message["role"] for message in completion]) + "\\n")
    return [float(len(completion)) for completion in completions]


import json
'''
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>'
ANSWER = "The sum is 3.<|im_end|>"
RESULT_TURN = "\n<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def _tools(tmp_path: Path) -> Path:
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS)
    return path


def _chatml_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    from tunelab.data.templates import builtin_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = builtin_template("chatml")  # (tunelab's ChatML writes Hermes tool calls)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _forcing(tokenizer, text: str) -> list[list]:
    """sequence_bias that makes even a random model write `text` (each token favoured after the ones before it,
    more than any earlier one): a real setting of generate, where a trained model would write the call itself."""
    ids = _ids(tokenizer, text)
    return [[ids[: k + 1], 40.0 + 10.0 * (k + 1)] for k in range(len(ids))]


def _end_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_a_call_is_read_run_and_answered_as_the_template_writes_tool_turns(tiny_llama, tmp_path):
    from tunelab.tools import ToolRunner, load_tools, tool_schemas, transcript

    tokenizer = _chatml_tokenizer(tiny_llama)
    tools = load_tools(f"{_tools(tmp_path)}:add")
    schema = tool_schemas(tools)[0]["function"]
    assert schema["name"] == "add" and schema["parameters"]["required"] == ["a", "b"]
    runner = ToolRunner(tools, tokenizer, _end_ids(tokenizer))
    message = runner.read(_ids(tokenizer, CALL))
    call_id = message["tool_calls"][0].pop("id")
    assert message == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
    }
    message["tool_calls"][0]["id"] = call_id
    turns = runner.run(message)
    assert turns == [{"role": "tool", "name": "add", "content": "3", "tool_call_id": call_id}]
    assert (tmp_path / "my_tools.calls").read_text() == "1 2\n"
    # the tokens after the call's end token: the template's tool turn, then the generation prompt
    assert tokenizer.decode(runner.suffix_ids(turns)) == RESULT_TURN
    # a call of no tool, or with wrong arguments: the model is told the error, the run goes on
    wrong = {
        "tool_calls": [
            {"function": {"name": "mul", "arguments": {}}},
            {"function": {"name": "add", "arguments": {"a": 1}}},
        ]
    }
    errors = [json.loads(turn["content"])["error"] for turn in runner.run(wrong)]
    assert errors[0].startswith("ValueError: no tool named 'mul'") and errors[1].startswith("TypeError: add()")
    assert (runner.calls, runner.failures) == (3, 2)
    later = ToolRunner(load_tools(f"{_tools(tmp_path)}:later"), tokenizer, _end_ids(tokenizer))
    assert (
        later.run({"tool_calls": [{"function": {"name": "later", "arguments": {"a": 2, "b": 2}}}]})[0]["content"]
        == "4"
    )
    odd = ToolRunner(load_tools(f"{_tools(tmp_path)}:odd"), tokenizer, _end_ids(tokenizer))
    turn = odd.run({"tool_calls": [{"function": {"name": "odd", "arguments": {"a": 1}}}]})[0]
    assert json.loads(turn["content"])["error"].startswith("TypeError: keys must be") and odd.failures == 1
    assert runner.read(_ids(tokenizer, ANSWER)) == {"role": "assistant", "content": "The sum is 3."}
    assert transcript([message, *turns]) == '[calls add({"a": 1, "b": 2})]\n[add returned] 3'
    from tunelab.rewards import ModelReward, _whole  # what a reward model scores, without a chat template and with

    scored = ModelReward._chat(tokenizer, [{"role": "user", "content": "1 + 2?"}], [message])
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in scored  # its calls too

    assert _whole([message]) == '[calls add({"a": 1, "b": 2})]' and _whole([{"content": "it is 3"}]) == "it is 3"


def test_completions_carry_on_through_their_calls_within_the_budget_and_the_rounds(tiny_llama, tmp_path):
    """call_tools with a stand-in sampler (what the model writes next, scripted): the tool turns are masked, the
    last stretch's start is kept, max_tool_calling_iterations stops the rounds, and a round whose results leave no
    room to answer is not run."""
    from tunelab.tools import ToolRunner, call_tools, load_tools

    tokenizer = _chatml_tokenizer(tiny_llama)
    runner = ToolRunner(load_tools(f"{_tools(tmp_path)}:add"), tokenizer, _end_ids(tokenizer))
    call, answer, suffix = _ids(tokenizer, CALL), _ids(tokenizer, ANSWER), _ids(tokenizer, RESULT_TURN)
    prompt = _ids(tokenizer, "<|im_start|>user\nadd<|im_end|>\n<|im_start|>assistant\n")
    asked: list[tuple[list[int], int]] = []

    def writes(script):
        def generate_more(inputs, budgets):
            asked.extend(zip(inputs, budgets, strict=True))
            return [script.pop(0) for _ in inputs]

        return generate_more

    # one completion calls, then answers; the other answers at once
    done = call_tools(runner, [prompt, prompt], [call, answer], 200, None, writes([answer]))
    completions, masks, starts, messages = done
    assert completions[0] == call + suffix + answer and masks[0] == [1] * len(call) + [0] * len(suffix) + [1] * len(
        answer
    )
    assert starts == [len(call) + len(suffix), 0] and completions[1] == answer and masks[1] == [1] * len(answer)
    assert [m["role"] for m in messages[0]] == ["assistant", "tool", "assistant"] and messages[0][2][
        "content"
    ] == "The sum is 3."
    assert asked == [(prompt + call + suffix, 200 - len(call) - len(suffix))]
    # it calls again and again: one round only
    asked.clear()
    completions, _, starts, messages = call_tools(runner, [prompt], [call], 200, 1, writes([call]))
    assert completions[0] == call + suffix + call and starts == [len(call) + len(suffix)] and len(asked) == 1
    # no room for the result's turn and a token of answer: the completion ends with its call
    completions, masks, starts, messages = call_tools(
        runner, [prompt], [call], len(call) + len(suffix), None, writes([])
    )
    assert completions == [call] and starts == [0] and [m["role"] for m in messages[0]] == ["assistant"]
    # another process still calls tools: this one, with none left, samples a token beside it (a sharded model's
    # generate needs every process), and keeps nothing of it
    asked.clear()
    others = [True, True, False]
    completions, masks, _, _ = call_tools(
        runner, [prompt], [answer], 200, None, writes([[7], [7]]), lambda calling: calling or others.pop(0)
    )
    assert asked == [(prompt, 1), (prompt, 1)] and completions == [answer] and masks == [[1] * len(answer)]
    # a call cut at the length (no end token) is not run
    calls = runner.calls
    call_tools(runner, [prompt], [call[:-1]], 200, None, writes([]))
    assert runner.calls == calls


GROWING = """
CALLS = []


def add(a: int, b: int) -> str:
    \"\"\"Add two whole numbers.

    Args:
        a: the first number
        b: the second number
    \"\"\"
    CALLS.append((a, b))
    return str(a + b) + " x" * 12 * (len(CALLS) - 1)  # each call's result longer than the last


def seen(completions, **kwargs):
    return [float(len(completion)) for completion in completions]
"""


def test_sampled_calls_are_read_but_not_trained_on(tiny_llama, tmp_path):
    """A grpo trainer with tools, two prompts sampled in two generate calls, their completions forced to call `add`,
    whose results grow call after call: each completion holds the call, its own tool turn and what the model wrote
    next, cut where the length runs out; the loss mask is 0 on the tool turn alone, which the model still reads
    (attention); each micro-batch is trimmed to its own; the tools' figures are logged."""
    from transformers import AutoModelForCausalLM

    from tunelab.config.llm import LLMParams
    from tunelab.data.prompts import PromptRow
    from tunelab.data.templates import render_template
    from tunelab.methods.grpo import GRPOTrainer
    from tunelab.tools import load_tools, tool_schemas
    from tunelab.training.trainer import training_arguments

    tools = tmp_path / "growing.py"
    tools.write_text(GROWING)
    tokenizer = _chatml_tokenizer(tiny_llama)
    budget = 130
    params = LLMParams(
        model=str(tiny_llama), project_name=str(tmp_path / "run"), trainer="grpo", num_generations=2, batch_size=1,
        gradient_accumulation=2, peft=False, reward_functions=f"{tools}:seen", tools=f"{tools}:add",
        max_tool_calling_iterations=1, max_completion_length=budget, beta=0.04, prompts_per_generation=1,
        generation_kwargs={"sequence_bias": _forcing(tokenizer, CALL)},
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    args = training_arguments(params, str(tmp_path / "run"), 1, False)
    trainer = GRPOTrainer(params=params, model=model, args=args, processing_class=tokenizer, train_dataset=[1])
    trainer.current_gradient_accumulation_steps = 2
    shown = tool_schemas(load_tools(params.tools))
    rows = []
    for text in ("What is 1 + 2?", "Add one and two, please."):
        messages = [{"role": "user", "content": text}]
        prompt = _ids(tokenizer, render_template(tokenizer.chat_template, messages, tokenizer, True, tools=shown))
        rows.append(PromptRow(messages, prompt, {}, "prompts.jsonl"))
    sampled = trainer.sample([rows[:1], rows[1:]])
    assert trainer._metrics["tools/call_frequency"] == [1.0] and trainer._metrics["tools/failure_frequency"] == [0.0]
    batches = [trainer._rollout([row], samples) for row, samples in zip(rows, sampled, strict=True)]

    call = _ids(tokenizer, CALL)
    results = ["3" + " x" * 12 * k for k in range(4)]  # the four completions' calls, in the order sampled
    cut = 0
    for batch, mine in zip(batches, (results[:2], results[2:]), strict=True):
        suffixes = [trainer.tool_runner.suffix_ids([{"role": "tool", "name": "add", "content": r}]) for r in mine]
        expected = [call + suffix + call if len(call) + len(suffix) < budget else call for suffix in suffixes]
        lengths = [min(budget, len(tokens)) for tokens in expected]
        assert batch["completion_ids"].size(1) == max(lengths)  # trimmed to this micro-batch's longest
        rows_of = zip(batch["completion_ids"], batch["completion_mask"], batch["completion_attention"], strict=True)
        for (ids, trained, read), tokens, suffix, truncated in zip(
            rows_of, expected, suffixes, batch["truncated"].tolist(), strict=True
        ):
            length = min(budget, len(tokens))
            assert ids[:length].tolist() == tokens[:length] and read.sum() == length and read[:length].all()
            if len(tokens) == len(call):  # no room for its result and a token of answer: it ends with its call
                assert trained.tolist()[:length] == [1] * length and not truncated
                continue
            tool_turn = [1] * len(call) + [0] * len(suffix)
            assert trained.tolist()[:length] == tool_turn + [1] * (length - len(tool_turn))
            assert truncated == (length < len(tokens))  # its last stretch cut at the length
            cut += truncated
    assert cut  # (the results grow: later completions have no room left to end)
    # the model reads the tool turn: what follows it is scored after it, not as if it were not there
    batch = batches[0]
    after = len(call) + len(trainer.tool_runner.suffix_ids([{"role": "tool", "name": "add", "content": "3"}]))
    read = trainer.completion_logps(model, batch)
    blind = trainer.completion_logps(model, {k: v for k, v in batch.items() if k != "completion_attention"})
    torch.testing.assert_close(read[0, : len(call)], blind[0, : len(call)])
    assert not torch.allclose(read[0, after : after + 8], blind[0, after : after + 8])
    # the loss trains on the model's own tokens: their gradient reaches the weights, the tool turn has no label
    batch["advantages"] = torch.tensor([1.0, -1.0])
    trainer.compute_loss(model, batch).backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert (read[:, len(call) : after] == 0).all() and (read[:, : len(call)] != 0).all()


def test_tools_and_rewards_of_one_file_share_its_module(tmp_path):
    """Two tools of one file, and the rewards in it, share its module (a tool's state): it is imported once while
    the file is unchanged, and anew once edited."""
    from tunelab.tools import load_tools
    from tunelab.user_code import user_function

    path = tmp_path / "two.py"
    path.write_text(
        "STATE = []\n\ndef push(x: int) -> int:\n    STATE.append(x)\n    return len(STATE)\n\n\n"
        "def size() -> int:\n    return len(STATE)\n"
    )
    push, size = load_tools(f"{path}:push,{path}:size")
    push(1)
    assert size() == 1 and user_function(f"{path}:size", "reward")() == 1
    path.write_text(path.read_text() + "\n# edited\n")  # an edited file is imported anew
    assert user_function(f"{path}:size", "reward")() == 0


@pytest.mark.parametrize("trainer", ["grpo", "rloo", "online_dpo"])
def test_a_tiny_run_with_tools_trains_and_writes_the_turns(tiny_llama, tmp_path, capsys, trainer):
    tools = _tools(tmp_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    bias = json.dumps({"sequence_bias": _forcing(tokenizer, CALL)})
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 2?"}) + "\n" for i in range(4)))
    (data / "test.jsonl").write_text(json.dumps({"prompt": "What is 9 + 2?"}) + "\n")
    args = [
        "llm", "--train", "--trainer", trainer, "--model", str(tiny_llama), "--data-path", str(data),
        "--project-name", str(tmp_path / "run"), "--reward-functions", f"{tools}:seen", "--tools", f"{tools}:add",
        "--max-tool-calling-iterations", "1", "--chat-template", "chatml", "--generation-kwargs", bias,
        "--num-generations", "2", "--batch-size", "2", "--gradient-accumulation", "1", "--max-prompt-length", "640",
        "--max-completion-length", "160",
        "--max-steps", "2", "--lr", "1e-3", "--peft", "--logging-steps", "1", "--completions-every", "1",
    ]  # fmt: skip
    if trainer == "online_dpo":  # (two completions a prompt, always)
        del args[args.index("--num-generations") : args.index("--num-generations") + 2]
    if trainer == "grpo":  # evaluation samples with the tools too
        args += ["--valid-split", "test", "--eval-strategy", "steps"]
    dry = [*args, "--dry-run"]
    dry.remove("--train")
    assert main(dry) == 0
    said = capsys.readouterr()
    assert f"tools: {tools}:add: the model may call them while it writes (at most 1 round(s)" in said.out
    assert '{"type": "function", "function": {"name": "add"' in said.out  # the prompt shows it
    assert main(args) == 0
    run = tmp_path / "run"
    records = [r for r in read_metrics(run) if "loss" in r]
    assert len(records) == 2 and all(r["tools/call_frequency"] == 1.0 for r in records)
    sample = json.loads((run / "completions.jsonl").read_text().splitlines()[0])
    asked = [{"role": "user", "content": f"What is {i} + 2?"} for i in range(4)]
    assert len(sample["prompt"]) == 1 and sample["prompt"][0] in asked  # a text prompt is a user turn
    assert [m["role"] for m in sample["messages"]] == ["assistant", "tool", "assistant"]
    assert {key: sample["messages"][1][key] for key in ("role", "name", "content")} == {
        "role": "tool",
        "name": "add",
        "content": "3",
    }
    assert "[add returned] 3" in sample["completion"]
    evals = [r for r in read_metrics(run) if "eval_loss" in r]
    assert all(r["eval_tools/call_frequency"] == 1.0 for r in evals) and (trainer == "grpo") == bool(evals)
    calls = (tmp_path / "my_tools.calls").read_text().splitlines()
    assert len(calls) == 2 * 2 * 2 + len(evals) * 2  # steps x prompts x completions, and each evaluation's


def _template(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """tunelab's ChatML with some of its lines changed, as a template file."""
    from tunelab.data.templates import builtin_template

    source = builtin_template("chatml")
    for old, new in edits:
        assert source.count(old) == 1
        source = source.replace(old, new)
    path = tmp_path / "template.jinja"
    path.write_text(source)
    return path


# calls written as `CALL name`: no form tunelab reads
UNREAD = (
    """'<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' + (call.function.arguments | tojson)""",
    "'CALL ' + call.function.name + (call.function.arguments | tojson)",
)
# Qwen3's: an empty think block before the last assistant turn only
THINKING_LAST = (
    "{{- '<|im_start|>assistant\\n' + message['content'] -}}",
    "{{- '<|im_start|>assistant\\n' + ('<think>\\n\\n</think>\\n\\n' if loop.last else '') + message['content'] -}}",
)


# QwQ's and Qwen3-Thinking's: the generation prompt opens the think block
THINKING_PROMPT = ("{{ '<|im_start|>assistant\\n' }}", "{{ '<|im_start|>assistant\\n<think>\\n' }}")


@pytest.mark.parametrize(
    "edits", [[THINKING_LAST], [THINKING_LAST, THINKING_PROMPT], [THINKING_PROMPT]], ids=["last", "both", "prompt"]
)
def test_thinking_templates_get_their_calls_read_and_their_tool_turns(tiny_llama, tmp_path, edits):
    """Qwen3's template writes an empty think block in the last assistant turn only (the turn reads otherwise once
    tools answer); Qwen3-Thinking's opens it in the generation prompt too, QwQ's there alone (an answered turn
    writes none): the call is read, the tool turn follows it."""
    from tunelab.tools import ToolRunner, load_tools

    tokenizer = _chatml_tokenizer(tiny_llama)
    tokenizer.chat_template = _template(tmp_path, *edits).read_text()
    runner = ToolRunner(load_tools(f"{_tools(tmp_path)}:add"), tokenizer, _end_ids(tokenizer))
    opened = "<think>\n" if THINKING_PROMPT in edits else ""  # (the generation prompt after the tool turn)
    assert (
        tokenizer.decode(runner.suffix_ids([{"role": "tool", "name": "add", "content": "3"}])) == RESULT_TURN + opened
    )
    assert runner.read(_ids(tokenizer, "<think>\nadd them\n</think>\n\n" + CALL))["tool_calls"]


def test_mistral_s_form_calls_and_tool_turns(tiny_llama, tmp_path):
    """Mistral's template: calls as [TOOL_CALLS]name[ARGS]{...}, ids of 9 characters, a tool turn with no end token
    after it and no generation prompt."""
    from transformers import AutoTokenizer

    from tests.test_serve import MISTRAL_TEMPLATE
    from tunelab.tools import ToolRunner, load_tools

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_tokens(["[TOOL_CALLS]", "[ARGS]"], special_tokens=True)
    tokenizer.chat_template = MISTRAL_TEMPLATE
    runner = ToolRunner(load_tools(f"{_tools(tmp_path)}:add"), tokenizer, [tokenizer.eos_token_id])
    written = _ids(tokenizer, '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}') + [tokenizer.eos_token_id]
    message = runner.read(written)
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "add", "arguments": {"a": 1, "b": 2}}]
    assert len(message["tool_calls"][0]["id"]) == 9 and message["tool_calls"][0]["id"].isalnum()
    assert message["tool_calls"][0]["id"] == runner.read(written)["tool_calls"][0]["id"]  # (from the text)
    turns = runner.run(message)
    assert tokenizer.decode(runner.suffix_ids(turns)) == "[TOOL_RESULTS]3[/TOOL_RESULTS]"


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--tools", "{tools}:undocumented"], "tools: undocumented: "),
        (["--tools", "{tools}:nothing"], "has no function 'nothing'"),
        (["--tools", "{tools}"], "tools: expected file.py:function"),
        (["--tools", "{tools}:add", "--chat-template", "tokenizer"], "does not show the model its tools"),
        (["--max-tool-calling-iterations", "2"], "max_tool_calling_iterations is read with tools only"),
        (["--tools", "{tools}:add", "--max-prompt-length", "128"], "before any question, max_prompt_length is 128"),
        (["--tools", "{tools}:add", "--generation-kwargs", '{{"min_new_tokens": 2}}'], "min_new_tokens with tools"),
        (["--tools", "{tools}:add", "--chat-template", "{unread}"], "writes tool calls in a form tunelab does not"),
        (
            ["--tools", "{tools}:add", "--trainer", "dpo"],
            "tools is read by trainers grpo, rloo and online_dpo, not dpo",
        ),
    ],
    ids=[
        "no-schema",
        "no-function",
        "no-function-named",
        "template-without-tools",
        "rounds-alone",
        "schemas-too-long",
        "min-new-tokens",
        "calls-unread",
        "not-dpo",
    ],  # fmt: skip
)
def test_tools_that_cannot_work_are_refused_before_training(tiny_llama, tmp_path, capsys, extra, said):
    tools = _tools(tmp_path)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 2?"}) + "\n")
    args = [
        "llm", "--dry-run", "--trainer", "grpo", "--model", str(tiny_llama), "--data-path", str(data),
        "--project-name", str(tmp_path / "run"), "--reward-functions", "format_tag", "--num-generations", "2",
        "--chat-template", "chatml", "--max-prompt-length", "640",
        *[value.format(tools=tools, unread=_template(tmp_path, UNREAD)) for value in extra],
    ]  # fmt: skip
    if "dpo" in extra:  # (reward_functions would be refused first)
        at = args.index("--reward-functions")
        del args[at : at + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    assert len(errors) == 1 and said in errors[0] and "Traceback" not in err, err
