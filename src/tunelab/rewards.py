"""Rewards for the sampling methods (grpo, rloo, online_dpo): the built-in checks, reward models and the user's own
Python functions, called safely.

`--reward-functions answer_tag,format_tag,FILE:short` (FILE: a Python file of yours; or package.module.short, TRL's
form; from Python, the function itself: user_code.py) names the rewards, `--reward-weights 1,0.5,0.2` weighs them
(default 1 each). A reward is called as TRL calls its reward functions, so TRL reward code works here unchanged:

    def short(prompts, completions, completion_ids, **columns) -> list[float | None]

with one entry per completion: the prompts (a prompt repeated for each of its completions), the completions
(strings; for chat prompts, a one-message list [{"role": "assistant", "content": ...}] as TRL passes them), their
token ids, and every other column of the rows as a keyword argument of lists (`answer=[...]`); with tools, each
completion's turns. As TRL, it also gets `trainer_state`, `log_metric(name, value)` and `log_extra(column,
values)`. A function may declare only the arguments it uses, and may be an `async def` (awaited on one event loop
kept for the process, user_code.awaited). It returns one float per completion, or None where it has no opinion
(the other rewards then decide; a completion no reward scores is left out of its group's baseline and gets no
advantage).

A folder instead of a function is a reward model (`--reward-functions my-rm,format_tag`): a `--trainer reward` run
of tunelab's (adapter or merged) or any sequence classifier with one output, as TRL takes a reward model. A
tunelab run's model scores each prompt and completion as its own training rows were written: through its chat
template when its run had one (a text prompt as a user message), else as the prompt's text, the completion's and
EOS. Another reward model scores them as TRL's GRPOTrainer gives them to it: chat prompts through its tokenizer's
chat template, text prompts as the prompt's text and the completion's. It is loaded when the trainer is built.

A reward that raises, returns the wrong number of values, or returns something that is not a finite number
stops the run with one line naming the function and the data row (RewardError, exit code 2). Reward files are
imported when the run is prepared, so one that does not import is reported by the dry run, before training.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.hub import hub_snapshot, is_hub_id
from tunelab.user_code import IN_PROCESS, awaited, is_dotted, user_function


class RewardError(TunelabError):
    """A reward function that cannot be loaded, or that misbehaved on a row."""


# ---- built-ins --------------------------------------------------------------------------------------------------


def _text(completion: Any) -> str:
    """A completion's text: the string itself, or the content of a chat completion's (last) message."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    # GSM8K's convention: the answer after "####".
    "hash": lambda text: m.group(1).strip() if (m := re.search(r"####\s*([^\n]+)", text)) else None,
    # LaTeX: the last \boxed{...} (one level of nested braces).
    "boxed": lambda text: m[-1].strip() if (m := re.findall(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}", text)) else None,
    # A tag: the last <answer>...</answer>.
    "tag": lambda text: m[-1].strip() if (m := re.findall(r"<answer>(.*?)</answer>", text, re.S)) else None,
    "last_number": lambda text: m[-1] if (m := re.findall(_NUMBER, text)) else None,
}


def same_answer(got: str | None, expected: Any) -> bool:
    """Equal as numbers when both read as numbers ("1,000" == "1000.0"), else as trimmed, case-folded text."""
    if got is None or expected is None:
        return False
    got, expected = str(got).strip(), str(expected).strip()
    try:
        return math.isclose(float(got.replace(",", "")), float(expected.replace(",", "")), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return got.casefold() == expected.casefold()


def answer_reward(extractor: str, column: str) -> Callable[..., list[float | None]]:
    """1.0 when the answer extracted from the completion equals the row's `column`, else 0.0."""
    extract = EXTRACTORS[extractor]

    def reward(completions: list[Any], **columns: list[Any]) -> list[float | None]:
        if column not in columns:
            raise RewardError(f"needs a column {column!r} in the data (--reward-answer-column names another)")
        return [
            float(same_answer(extract(_text(c)), want)) for c, want in zip(completions, columns[column], strict=True)
        ]

    reward.__name__ = f"answer_{extractor}"
    return reward


def regex_reward(pattern: str, name: str) -> Callable[..., list[float | None]]:
    """1.0 when the completion matches `pattern` (re.search, DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.S)

    def reward(completions: list[Any], **_: Any) -> list[float | None]:
        return [float(bool(compiled.search(_text(c)))) for c in completions]

    reward.__name__ = name
    return reward


def think_reward(completions: list[Any], **_: Any) -> list[float | None]:
    """1.0 for DeepSeek-R1's form, reasoning inside <think>...</think> and then an answer (both not empty, one
    block), else 0.0. The opening <think> may be the chat template's (R1's generation prompt ends with it), so a
    completion need not write it; one that does not is read from its start up to </think>."""
    scores = []
    for completion in completions:
        body = _text(completion).lstrip().removeprefix("<think>")
        reasoning, closed, answer = body.partition("</think>")
        one_block = "<think>" not in body and "</think>" not in answer
        scores.append(float(bool(closed and one_block and reasoning.strip() and answer.strip())))
    return scores


def json_reward(schema_path: str | None) -> Callable[..., list[float | None]]:
    """1.0 when the completion is (or holds, in a ```json fence) a JSON value, valid against the schema if given."""
    validator = None
    if schema_path:
        try:
            import jsonschema
        except ImportError:
            raise RewardError(
                "valid_json with --reward-json-schema needs jsonschema: pip install jsonschema"
            ) from None
        try:
            schema = json.loads(Path(schema_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RewardError(f"--reward-json-schema {schema_path}: {error}") from None
        validator = jsonschema.Draft202012Validator(schema)

    def parse(text: str) -> Any:
        fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
        return json.loads(fenced.group(1) if fenced else text.strip())

    def reward(completions: list[Any], **_: Any) -> list[float | None]:
        scores = []
        for completion in completions:
            try:
                value = parse(_text(completion))
            except ValueError:
                scores.append(0.0)
                continue
            scores.append(float(validator is None or validator.is_valid(value)))
        return scores

    reward.__name__ = "valid_json"
    return reward


def length_penalty(max_tokens: int) -> Callable[..., list[float | None]]:
    """-(completion tokens / max_completion_length): 0 for an empty answer, -1 for one cut at the limit."""

    def reward(completion_ids: list[list[int]], **_: Any) -> list[float | None]:
        return [-len(ids) / max_tokens for ids in completion_ids]

    reward.__name__ = "length_penalty"
    return reward


# name -> (what it checks, for --help and the docs)
BUILTINS = {
    "answer_tag": "1 if the last <answer>...</answer> equals the answer column, else 0",
    "answer_hash": "1 if the text after '####' (GSM8K) equals the answer column, else 0",
    "answer_boxed": "1 if the last \\boxed{...} equals the answer column, else 0",
    "answer_last_number": "1 if the completion's last number equals the answer column, else 0",
    "format_tag": "1 if the completion holds an <answer>...</answer>, else 0",
    "format_think": "1 if the completion reasons inside <think>...</think> and then answers, else 0",
    "format_regex": "1 if the completion matches --reward-regex, else 0",
    "valid_json": "1 if the completion is valid JSON (against --reward-json-schema when given), else 0",
    "length_penalty": "-(completion tokens / max_completion_length)",
}


# ---- loading and calling -------------------------------------------------------------------------------------------


@dataclass
class Reward:
    """One reward function, its name as the user wrote it (its errors say it), its weight, and the label its figures
    are logged under (rewards/LABEL/mean, completions.jsonl): reward_labels'."""

    name: str
    function: Callable[..., Any]
    weight: float = 1.0
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name


def reward_labels(names: list[str]) -> list[str]:
    """What each reward is logged under, as TRL logs them: a function by its name (my_rewards.py:correct and
    my_lib.rewards.correct as `correct`), a reward model by its folder's or hub id's last part, a built-in as it is;
    where two would share one, their names as written."""
    short = []
    for name in names:
        if name in BUILTINS:
            short.append(name)
        elif is_reward_model(name):  # (a folder's own name, ./ too; a hub id's last part)
            folder = Path(name).expanduser()
            short.append(folder.resolve().name if folder.is_dir() else name.rpartition("/")[2])
        elif ":" in name:  # FILE.py:function, <python>:function
            short.append(name.rpartition(":")[2])
        else:  # package.module.function
            short.append(name.rpartition(".")[2])
    labels = [label if short.count(label) == 1 else _longer(name) for name, label in zip(names, short, strict=True)]
    # (still two of one label: the same reward twice, a function named as a built-in): numbered, never merged
    given = list(labels)
    for index, label in enumerate(given):
        count = given[:index].count(label)
        labels[index] = f"{label}#{count + 1}" if count else label
    return labels


def _longer(name: str) -> str:
    """A label for a reward whose short one another shares: file name and function (x.py:correct), the module's
    path (my_lib.rewards.correct), a hub id or folder without its slashes; never a '/', which nests the charts."""
    if ":" in name and not name.startswith(IN_PROCESS):
        file, _, function = name.rpartition(":")
        return f"{Path(file).name}:{function}"
    return name.removeprefix(IN_PROCESS).strip("/").replace("/", "__") or name


def reward_names(spec: str | None) -> list[str]:
    """The reward names of a --reward-functions value: built-ins, file.py:function and reward models' folders,
    comma-separated."""
    return [name.strip() for name in (spec or "").split(",") if name.strip()]


def is_reward_model(name: str) -> bool:
    """Whether a reward_functions entry names a reward model (ModelReward): a folder or a hub id, not a built-in
    nor a file.py:function."""
    return ":" not in name and name not in BUILTINS and (Path(name).expanduser().is_dir() or is_hub_id(name))


def is_answer_reward(name: str) -> bool:
    """A built-in that compares completions with the data's answer column (reward_answer_column)."""
    return name.startswith("answer_") and name in BUILTINS


def load_rewards(params: Any, max_completion_length: int) -> list[Reward]:
    """The run's rewards from --reward-functions and --reward-weights; RewardError names the first bad one."""
    names = reward_names(params.reward_functions)
    if not names:
        raise RewardError(
            f"{params.trainer} needs --reward-functions: built-ins (" + ", ".join(BUILTINS) + ") or file.py:function"
        )
    weights = [1.0] * len(names)
    if params.reward_weights:
        try:
            weights = [float(w) for w in str(params.reward_weights).split(",")]
        except ValueError:
            raise RewardError(
                f"--reward-weights {params.reward_weights!r}: expected numbers separated by commas"
            ) from None
        if len(weights) != len(names):
            raise RewardError(f"--reward-weights has {len(weights)} values for {len(names)} reward functions")
    labels = reward_labels(names)
    return [
        Reward(name.removeprefix(IN_PROCESS), _function(name, params, max_completion_length), w, label)
        for name, w, label in zip(names, weights, labels, strict=True)
    ]


def _function(name: str, params: Any, max_tokens: int) -> Callable[..., Any]:
    column = params.reward_answer_column
    if is_answer_reward(name):
        return answer_reward(name.removeprefix("answer_"), column)
    if name == "format_tag":
        return regex_reward(r"<answer>.*?</answer>", name)
    if name == "format_think":
        return think_reward
    if name == "format_regex":
        if not params.reward_regex:
            raise RewardError("format_regex needs --reward-regex PATTERN")
        try:
            return regex_reward(params.reward_regex, name)
        except re.error as error:
            raise RewardError(f"--reward-regex {params.reward_regex!r}: {error}") from None
    if name == "valid_json":
        return json_reward(params.reward_json_schema)
    if name == "length_penalty":
        return length_penalty(max_tokens)
    if is_reward_model(name):
        return ModelReward(name)
    if ":" not in name and not is_dotted(name):
        raise RewardError(
            f"reward {name!r} is not a built-in ({', '.join(BUILTINS)}), a file.py:function, a "
            "package.module.function, nor a reward model (a folder or a hub id)"
        )
    return user_function(name, "reward", RewardError)


class ModelReward:
    """A reward model as a reward function: checked when the run is prepared (the folder, or the hub model's
    describing files, hold a reward run or a sequence classifier), loaded by `load` (the trainer's, on its device;
    a hub model's weights are downloaded then), else on its first call."""

    def __init__(self, folder: str) -> None:
        from tunelab.outputs import read_run

        self.name = folder
        local = Path(folder).expanduser()
        # a hub id: its config, tokenizer and run record now, its weights when it loads (the same commit)
        self.hub = not local.is_dir()
        try:
            self.folder = Path(hub_snapshot(folder, weights=False)) if self.hub else local
        except TunelabError as error:
            raise RewardError(f"reward {folder}: no such folder; as a hub id, {error}") from None
        self._loaded: tuple[Any, Any, bool] | None = None
        self.run = run = read_run(self.folder)
        if run and run.get("trainer") != "reward":
            raise RewardError(
                f"reward {folder}: that run was trained with --trainer {run.get('trainer')}, not reward: it gives no "
                "score"
            )
        config = _read_json(self.folder / "config.json")
        adapter = (self.folder / "adapter_config.json").is_file()
        if adapter and self.hub:  # its base is named by the repo's files: only another hub model, never a path here
            from tunelab.outputs import base_model_of

            base = base_model_of(self.folder)
            if not is_hub_id(base):
                raise RewardError(
                    f"reward {folder}: an adapter whose base model is a path on the machine it was trained on "
                    f"({base}), not a hub id: push the merged model (tunelab merge) or train it on a hub model"
                )
        classifier = any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])
        if not (adapter and run) and not classifier:
            raise RewardError(
                f"reward {folder}: not a reward model's folder (a tunelab --trainer reward run, or a sequence "
                "classifier with one output)"
            )
        # (transformers writes no num_labels, nor id2label for its default of 2 labels)
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        if classifier and labels != 1:
            raise RewardError(f"reward {folder}: a classifier of {labels} labels, not one score")

    def load(self, device: Any = None) -> None:
        """The model and tokenizer, on `device`; what goes wrong is one line naming the folder."""
        from tunelab.inference.score import load_reward_model

        try:
            if self.hub:  # the weights of the version checked when the run was prepared (its commit)
                self.folder = Path(hub_snapshot(self.name, revision=self.folder.name))
            model, tokenizer, plain_text = load_reward_model(self.folder)
            self._loaded = (model.to(device) if device is not None else model), tokenizer, plain_text
        except Exception as error:
            if type(error).__name__ == "OutOfMemoryError":  # the run's own advice says what to lower
                raise
            why = f"{type(error).__name__}: {error}"
            raise RewardError(f"reward {self.name}: the reward model does not load: {why}") from None

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        from tunelab.inference.score import score

        if self._loaded is None:
            self.load()
        model, tokenizer, plain_text = self._loaded
        pairs = list(zip(prompts, completions, strict=True))
        if not self.run:  # another reward model: as TRL's GRPOTrainer gives it prompts and completions
            chat = isinstance(prompts[0], list) and getattr(tokenizer, "chat_template", None)
            texts = [self._chat(tokenizer, p, c) if chat else _prompt_text(p) + _whole(c) for p, c in pairs]
            return score(model, tokenizer, texts, append_eos=False, add_special_tokens=False)
        if plain_text:  # a tunelab run trained on text rows: BOS (unless the text has it) + text + EOS
            texts = [_prompt_text(p) + _whole(c) for p, c in pairs]
            bos = getattr(tokenizer, "bos_token", None)
            written = bool(bos) and texts[0].startswith(bos)  # (as the training rows' data had it, or not)
            return score(model, tokenizer, texts, append_eos=True, add_special_tokens=not written)
        texts = [self._chat(tokenizer, p, c) for p, c in pairs]  # the template wrote the special tokens
        return score(model, tokenizer, texts, append_eos=False, add_special_tokens=False)

    @staticmethod
    def _chat(tokenizer: Any, prompt: Any, completion: Any) -> str:
        # a completion of turns (tools: calls, their results, the answer) is scored whole, as TRL does
        turns = completion if _in_turns(completion) else [{"role": "assistant", "content": _text(completion)}]
        messages = _messages(prompt) + turns
        return tokenizer.apply_chat_template(messages, tokenize=False)


def _in_turns(completion: Any) -> bool:
    """Whether a completion is turns to score whole (tools: several turns, or a lone one with its calls)."""
    return isinstance(completion, list) and (len(completion) > 1 or any("tool_calls" in m for m in completion))


def _whole(completion: Any) -> str:
    """A completion as text to score: the text itself, a message's content, or (tools) its turns and calls in line."""
    if _in_turns(completion):
        from tunelab.tools import transcript

        return transcript(completion)
    return _text(completion)


def _prompt_text(prompt: Any) -> str:
    """A prompt as text: the text itself, or a message list's contents one after the other (a content of parts:
    its text, each image as [image])."""
    from tunelab.data.images import content_text

    return "".join(content_text(m.get("content", "")) for m in prompt) if isinstance(prompt, list) else str(prompt)


def _messages(prompt: Any) -> list[dict[str, Any]]:
    """A prompt as messages: the list itself (a content of parts as its text, for a text model's template), or a
    text as one user message."""
    from tunelab.data.images import content_text

    if isinstance(prompt, list):
        return [{**m, "content": content_text(m.get("content", ""))} for m in prompt]
    return [{"role": "user", "content": str(prompt)}]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def call_reward(
    reward: Reward,
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
    where: Sequence[str],
    extras: dict[str, Any] | None = None,
) -> list[float | None]:
    """The reward's scores for a batch, checked: one finite float (or None) per completion. An `async def` reward
    is run to its end (TRL takes those too).

    `where` names each completion's data row ("train.jsonl line 12"), for the error line. `extras`: what TRL hands
    a reward beside the batch (trainer_state, log_metric, log_extra), given to those that take them.
    """
    arguments = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
    extras = extras or {}
    accepted = _accepted(reward.function, {**arguments, **extras})
    try:
        scores = awaited(reward.function(**accepted))
    except RewardError as error:
        raise RewardError(f"reward {reward.name}: {error} ({where[0]})") from None
    except Exception as error:  # noqa: BLE001 - the user's code: find the row that breaks it, report one line
        if type(error).__name__ == "OutOfMemoryError":  # (a reward model's) not a row's fault: the run's advice
            raise
        row = _failing_row(reward, arguments, extras, len(completions), where)
        raise RewardError(f"reward {reward.name} raised {type(error).__name__}: {error} ({row})") from None
    if hasattr(scores, "tolist"):  # a numpy array or a tensor
        scores = scores.tolist()
    if not isinstance(scores, list | tuple):
        raise RewardError(f"reward {reward.name} returned {type(scores).__name__}, not a list of floats ({where[0]})")
    if len(scores) != len(completions):
        raise RewardError(
            f"reward {reward.name} returned {len(scores)} values for {len(completions)} completions ({where[0]})"
        )
    checked: list[float | None] = []
    for index, score in enumerate(scores):
        if score is None:
            checked.append(None)
            continue
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise RewardError(f"reward {reward.name} returned {score!r}, not a number ({where[index]})") from None
        if not math.isfinite(value):
            raise RewardError(f"reward {reward.name} returned {value} ({where[index]})")
        checked.append(value)
    return checked


def _accepted(function: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments the function declares (all of them when it takes **kwargs)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return arguments
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return arguments
    return {name: value for name, value in arguments.items() if name in signature.parameters}


def _failing_row(
    reward: Reward, arguments: dict[str, Any], extras: dict[str, Any], n: int, where: Sequence[str]
) -> str:
    """Call the reward on one completion at a time to name the first row it fails on (what it logs then is dropped)."""
    quiet = {**extras, **{name: lambda *_: None for name in ("log_metric", "log_extra") if name in extras}}
    for index in range(n):
        one = {name: [values[index]] for name, values in arguments.items()}
        try:
            awaited(reward.function(**_accepted(reward.function, {**one, **quiet})))
        except Exception:  # noqa: BLE001
            return where[index]
    return where[0]  # it fails only on the batch as a whole
