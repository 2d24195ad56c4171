"""Loading a run folder (adapter or full model) and generating from it.

Called by `tunelab generate`, `tunelab chat`, `tunelab serve` and the web app. A run folder is self-describing
(outputs.read_run): tunelab_run.json names the base model, and the saved tokenizer carries the chat template
used in training, so a prompt is formatted the same way the training data was.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError
from tunelab.inference.device import to_inference_device
from tunelab.outputs import beside_data, load_base, read_run, written_whole

if TYPE_CHECKING:
    from tunelab.inference.reasoning import Thinking

log = logging.getLogger("tunelab")


@dataclass
class GenerationParams:
    """Decoding options (greedy unless do_sample)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = None  # where sampling starts from (None: wherever the random state is)

    def check(self) -> None:
        """TunelabError naming the first option transformers would refuse (before a model is loaded)."""
        if self.max_new_tokens < 1:
            raise TunelabError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise TunelabError(f"--temperature must be above 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TunelabError(f"--top-p must be above 0 and at most 1, got {self.top_p}")
        if self.top_k < 0:
            raise TunelabError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if self.num_return_sequences < 1:
            raise TunelabError(f"--num-return-sequences must be at least 1, got {self.num_return_sequences}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise TunelabError(f"--seed must be 0 or more (and below 2**63), got {self.seed}")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise TunelabError("--num-return-sequences above 1 needs --do-sample (greedy decoding gives one answer)")


def load_run(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a run folder holding an adapter or a full model, or from any model folder/GGUF."""
    from tunelab.models import load_tokenizer, resolve_model
    from tunelab.models.load import ModelSource, load_causal_lm

    folder = Path(path)
    if folder.is_dir() and read_run(folder).get("trainer") == "reward":
        raise TunelabError(f"{folder} is a reward model: it scores texts (tunelab score), it does not generate")
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        from tunelab.models.peft import load_adapter

        model = load_adapter(load_base(folder), folder)
        tokenizer = load_tokenizer(ModelSource(str(folder), str(folder)))
    else:
        if folder.is_dir() and not (folder / "config.json").is_file() and not list(folder.glob("*.gguf")):
            raise TunelabError(f"{folder} holds no model: expected a tunelab run folder or a model folder")
        source = resolve_model(str(path))
        model = load_causal_lm(source)
        tokenizer = load_tokenizer(source, getattr(model.config, "max_position_embeddings", None))
    _string_turns(model, tokenizer)
    return to_inference_device(model), tokenizer


def _string_turns(model: Any, tokenizer: Any) -> None:
    """A vision-language model's template that writes nothing for a plain string content (LLaVA's and SmolVLM's own;
    a run tunelab trained carries the fix already) taught to take one as a text part, as training does: a system
    message or an earlier answer sent as a string would otherwise vanish from the prompt."""
    from tunelab.data.templates import teach_strings
    from tunelab.models.vision import reads_images

    if reads_images(model.config):
        teach_strings(tokenizer)


@dataclass
class Prompting:
    """How prompts are written for the model, beyond the chat template itself: a system message opening each
    (where the conversation has none of its own), and more variables for the template (Qwen3's enable_thinking)."""

    system: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self, tokenizer: Any, command: str = "generate") -> Prompting:
        """These settings, checked against the model's template before any work (TunelabError saying what is
        wrong): template_kwargs as training checks its chat_template_kwargs (one the template never reads would
        change nothing), a system message against a template that takes none (Gemma 2's)."""
        templated = bool(getattr(tokenizer, "chat_template", None))
        if self.template_kwargs:
            if not templated:
                raise TunelabError(f"{command}: chat_template_kwargs are for a chat template, and this model has none")
            from tunelab.data.templates import template_source

            template_source("tokenizer", tokenizer, self.template_kwargs)
        if self.system and templated:
            for prompting, fault in ((Prompting(None, self.template_kwargs), "cannot write a prompt"), (self, "")):
                try:  # without the system message first: a failure there is not the system message's
                    format_prompt("Hi", tokenizer, prompting)
                except Exception as err:  # noqa: BLE001 - jinja2's errors and the template's own raise_exception
                    fault = fault or "takes no system message"
                    raise TunelabError(f"{command}: this model's chat template {fault} ({err})") from None
        elif self.system:
            raise TunelabError(f"{command}: --system needs a chat template to write it, and this model has none")
        return self


def format_prompt(prompt: str | list[dict[str, Any]], tokenizer: Any, prompting: Prompting | None = None) -> str:
    """A chat model gets a text prompt as a user turn through its template, and a conversation (formats.read_prompts)
    as training wrote it, up to the turn to answer (`asked_turns`); a plain model gets a text as it is."""
    from tunelab.data.templates import template_text

    prompting = prompting or Prompting()
    if not getattr(tokenizer, "chat_template", None):
        if isinstance(prompt, list):
            raise TunelabError(
                "generate: the prompts are conversations, but the model has no chat template to write them"
            )
        return prompt
    turns = asked_turns(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if prompting.system and not any(turn["role"] == "system" for turn in turns):
        turns = [{"role": "system", "content": prompting.system}, *turns]
    if isinstance(prompt, list):
        from tunelab.data.templates import with_inputs, with_reasoning

        template = template_text(tokenizer)
        turns = with_reasoning(with_inputs([turns], template), template)[0]
    return tokenizer.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=True, **prompting.template_kwargs
    )


def asked_turns(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns a conversation asks the model to answer after: all of them, or, when it ends with an answer (a
    held-out chat from the training data, say), those before that answer, which is then its reference."""
    answered = len(conversation) > 1 and conversation[-1]["role"] == "assistant"
    return conversation[:-1] if answered else conversation


@dataclass(frozen=True)
class Answer:
    """One generated answer, read as `tunelab chat` reads it: the reasoning written before it in a think block
    (reasoning.py; None: there was none), the answer itself (None: the model stopped inside its reasoning), and
    why it ended, in OpenAI's words: "stop" (the model ended its turn) or "length" (max_new_tokens)."""

    reasoning: str | None
    text: str | None
    finish_reason: str = "stop"


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    options: GenerationParams | None = None,
    prompting: Prompting | None = None,
) -> list[str]:
    """Completions of one prompt (only the new text, as written: a think block's markers kept where the tokenizer
    marks them special), each ended where the chat template ends a turn. `generate_many` reads reasoning apart."""
    from tunelab.inference.reasoning import THINK

    text = format_prompt(prompt, tokenizer, prompting)
    _seed(options)
    return complete(model, tokenizer, text, options, add_special_tokens=text == prompt, keep=THINK.markers)


def generate_many(
    model: Any,
    tokenizer: Any,
    prompts: list[str] | list[str | list[dict[str, Any]]],
    options: GenerationParams | None = None,
    batch_size: int = 8,
    thinking: Thinking | None = None,
    prompting: Prompting | None = None,
    images: list[list[Any]] | None = None,
    processor: Any = None,
) -> Iterator[list[Answer]]:
    """`generate` for many prompts, `batch_size` at a time (left-padded, so every prompt ends where its answer
    starts): each prompt's answers, in order, as each batch is made. With `thinking` (reasoning.thinking_for), an
    answer's reasoning is read apart from it, else each answer is all text, as written (a think block's markers
    kept where the tokenizer marks them special, either way). `images`: each prompt's images (its conversation's
    image parts, in order), written by a vision-language model's `processor`."""
    from tunelab.inference.reasoning import THINK

    templated = bool(getattr(tokenizer, "chat_template", None))
    if tokenizer.pad_token_id is None:  # left-padding needs a pad token: one prompt at a time needs none
        batch_size = 1
    keep = (thinking or THINK).markers
    _seed(options)
    for start in range(0, len(prompts), batch_size):
        texts = [format_prompt(prompt, tokenizer, prompting) for prompt in prompts[start : start + batch_size]]
        shown = (images[start : start + batch_size], processor) if images is not None else None
        made = _generated(model, tokenizer, texts, options, not templated, keep, shown)
        count = len(made) // len(texts)  # each text's sequences come one after another
        for i, text in enumerate(texts):
            opened = thinking.opened_by(text) if thinking and templated else ""  # the template began the block
            yield [
                Answer(*(thinking.read(opened + answer, finish == "length") if thinking else (None, answer)), finish)
                for answer, finish in made[i * count : (i + 1) * count]
            ]


def _seed(options: GenerationParams | None) -> None:
    """Sampling from a known start: the same seed, prompts and batch size give the same answers."""
    if options is not None and options.seed is not None:
        import torch

        torch.manual_seed(options.seed)  # torch's generators alone, as serve seeds a request: nothing else changes


def answers_path(data: Path, output: str | None) -> Path:
    """Where `write_answers` writes (checked before any model loads): `output`, or `<data>.answers.jsonl`."""
    return beside_data(data, output, ".answers.jsonl", "generate", "JSON lines file")


def write_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str | list[dict[str, Any]]],
    target: Path,
    options: GenerationParams | None = None,
    batch_size: int = 8,
    thinking: Thinking | None = None,
    prompting: Prompting | None = None,
) -> Path:
    """Answer every prompt and write the answers as JSON lines ({"prompt", "answer"}, or "answers" when asking for
    several), in order, batch by batch as they are made, each with why it ended ("finish_reason", or
    "finish_reasons": "stop", or "length" when max_new_tokens cut it off); the file appears whole or not at all.
    A conversation's "prompt" is the turns asked; one that ended with an answer also gets it as its "reference".

    With `thinking`, an answer's reasoning goes apart, as "reasoning" (several: "reasonings", null where an answer
    has none), and a reference's too ("reference_reasoning"); a row with none has no such field. An answer that
    stopped inside its reasoning is "". Without, every answer and reference is as the model writes it (reasoning
    first, in its think block)."""
    import json

    from tunelab.data.templates import answer_as_written

    if any(isinstance(p, list) for p in prompts) and not getattr(tokenizer, "chat_template", None):
        format_prompt(next(p for p in prompts if isinstance(p, list)), tokenizer)  # the one line, before any work
    several = options is not None and options.num_return_sequences > 1
    answered = generate_many(model, tokenizer, prompts, options, batch_size, thinking, prompting)
    # A reference has its reasoning, if any, in a block it opens itself (answer_as_written), and is never cut off.
    references = replace(thinking, begins_inside=False) if thinking else None
    with written_whole(target, "generate") as f:
        for prompt, answers in zip(prompts, answered, strict=True):
            row: dict[str, Any] = {"prompt": asked_turns(prompt) if isinstance(prompt, list) else prompt}
            texts, reasonings = [a.text or "" for a in answers], [a.reasoning for a in answers]
            row |= {"answers": texts} if several else {"answer": texts[0]}
            if any(reasonings):
                row |= {"reasonings": reasonings} if several else {"reasoning": reasonings[0]}
            finishes = [a.finish_reason for a in answers]
            row |= {"finish_reasons": finishes} if several else {"finish_reason": finishes[0]}
            if isinstance(prompt, list) and len(row["prompt"]) < len(prompt):
                reference = answer_as_written(prompt[-1])
                reasoning, text = references.read(reference) if references else (None, reference)
                row["reference"] = text or ""
                row |= {"reference_reasoning": reasoning} if reasoning else {}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return target


def complete(
    model: Any,
    tokenizer: Any,
    text: str | list[str],
    options: GenerationParams | None = None,
    add_special_tokens: bool = True,
    keep: tuple[str, ...] = (),
    shown: tuple[list[list[Any]], Any] | None = None,
    encoded: dict[str, Any] | None = None,
) -> list[str] | list[list[str]]:
    """Completions of an already formatted text (only the new text), each ended at the model's EOS or where the
    chat template ends a turn. `generate` and evaluate's sample answers both go through here. A list of texts is
    generated as one left-padded batch: each text's completions, in order.

    add_special_tokens: False for a text rendered by the chat template (it holds its own BOS, if any).
    keep: special tokens whose text the answers keep (`<think>`, which some tokenizers mark special).
    shown: each text's images and the vision-language model's processor that writes them (_generated).
    encoded: the model's inputs for `text` as made already (its ids, a vision-language model's pixels beside them)."""
    made = _generated(model, tokenizer, text, options, add_special_tokens, keep, shown, encoded)
    answers = [answer for answer, _ in made]
    if not isinstance(text, list):
        return answers
    count = len(answers) // len(text)  # generate gives each text's sequences one after another
    return [answers[i * count : (i + 1) * count] for i in range(len(text))]


def _generated(
    model: Any,
    tokenizer: Any,
    text: str | list[str],
    options: GenerationParams | None,
    add_special_tokens: bool,
    keep: tuple[str, ...],
    shown: tuple[list[list[Any]], Any] | None = None,
    encoded: dict[str, Any] | None = None,
) -> list[tuple[str, str]]:
    """`complete`'s work: every sequence made, in order, as (answer, finish reason). `shown`: each text's images
    and the processor that writes them into its tokens and pixels; `encoded`: the inputs made already."""
    import torch

    from tunelab.inference.streaming import keeping
    from tunelab.models.turns import turn_end

    options = options or GenerationParams()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # every text ends where its answer starts
    encode = tokenizer
    if shown is not None:
        shown[1].tokenizer = tokenizer  # the run's (its template, its padding side), as the processor's own
        encode = functools.partial(shown[1], images=shown[0])
    try:
        if encoded is not None:
            inputs = {key: value.to(model.device) for key, value in encoded.items()}
        else:
            inputs = encode(
                text=text,
                return_tensors="pt",
                add_special_tokens=add_special_tokens,
                padding=isinstance(text, list) and len(text) > 1,
            ).to(model.device)
    finally:
        tokenizer.padding_side = side
    sampling = {"temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p}
    end_ids, markers = turn_end(tokenizer, model)
    # A turn-end marker of several tokens: transformers stops at its text, and it is cut from the answer below.
    stop = {"stop_strings": markers, "tokenizer": tokenizer} if markers else {}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            num_return_sequences=options.num_return_sequences,
            eos_token_id=end_ids or None,
            pad_token_id=tokenizer.pad_token_id,
            **stop,
            **(sampling if options.do_sample else {}),
        )
    new = output[:, inputs["input_ids"].shape[1] :]
    decoder = keeping(tokenizer, keep)
    made = []
    for seq in new:
        written = decoder.decode(seq, skip_special_tokens=True)
        answer = min((written.split(m)[0] for m in markers), key=len, default=written)
        finish = finish_reason(seq.tolist(), end_ids, options.max_new_tokens, at_stop_string=answer != written)
        made.append((answer.strip(), finish))
    return made


def load_processor_of(path: str | Path) -> Any:
    """The processor of a vision-language run or model (its tokenizer and image processor), for prompts that show
    images; TunelabError for a model that reads text only."""
    from tunelab.models import resolve_model
    from tunelab.models.load import ModelSource, load_config
    from tunelab.models.vision import load_processor, reads_images

    folder = Path(path)
    run = folder.is_dir() and (folder / "tunelab_run.json").is_file()
    source = ModelSource(str(folder), str(folder)) if run else resolve_model(str(path))
    adapter = run and (folder / "adapter_config.json").is_file()
    base = resolve_model(read_run(folder)["base_model"]) if adapter else source
    if not reads_images(load_config(base)):
        raise TunelabError(f"{path} reads text only: images are for a vision-language model")
    return load_processor(source)


def saved_processor(path: str | Path) -> Any:
    """A vision-language run's processor when it saved one (a run of a method that reads no images saved none, and
    its prompts are text: None), else that of the model at `path` (load_processor_of)."""
    from tunelab.inference.merge import PROCESSOR_FILES

    folder = Path(path)
    if (folder / "tunelab_run.json").is_file() and not any((folder / name).is_file() for name in PROCESSOR_FILES):
        return None
    return load_processor_of(path)


def image_prompt(prompt: str, images: list[str]) -> list[dict[str, Any]]:
    """A user turn showing `images` (files, opened and checked as training data's are) before the prompt's text."""
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


def opened_images(images: list[str]) -> list[Any]:
    """The images of a prompt, opened; TunelabError naming one that is missing or no image."""
    from tunelab.data.images import ImageProblem, checked_ref, open_image

    try:
        return [open_image(checked_ref(image, None)) for image in images]
    except ImageProblem as err:
        raise TunelabError(f"--image: {err}") from None


def finish_reason(new_ids: list[int], end_ids: list[int], budget: int, at_stop_string: bool) -> str:
    """Why a generated sequence ended, in OpenAI's words: "length" when it used its whole token budget without an
    end, else "stop". A row that ended before the others of its batch holds its end token and then padding; one
    that met a stop string (a turn-end marker of several tokens) has it in its text."""
    ended = at_stop_string or any(i in end_ids for i in new_ids)
    return "length" if len(new_ids) >= budget and not ended else "stop"
