"""`tunelab evaluate`: did the fine-tune help? Loss and perplexity on a data split, the base model beside it, sample
answers side by side, and a report (Markdown + a PNG of the training and eval loss curves) in the run folder.

The split is read, formatted and masked exactly as in training (the run's own parameters: columns, chat
template, block size), so the loss is the training loss's counterpart: next-token cross-entropy over the trained
(answer) tokens only. A preference run (dpo, kto, orpo, simpo, reward) given its own kind of data (pairs; kto's
labeled answers) is measured by the figures its training logs instead (evaluate_preference.py), and a
text-classification run by its predictions (evaluate_classifier.py); the report is written here for both kinds of
language model. Given the run's own data and `--split valid`, a run trained with valid_size is measured on exactly
the examples it held out (`--split train`: those it trained on), drawn again as training drew them
(data/holdout.saved_hold_out), on all three paths; the results' `data` says which examples they are. A
vision-language run's rows (and pairs) that show images are measured with them, as trained: each row's pixels
beside its ids, and the sample answers asked with the prompt's images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tunelab.config.llm import LLMParams
from tunelab.data.images import as_template_reads, content_text
from tunelab.data.templates import answer_as_written, template_text, with_inputs, with_reasoning
from tunelab.errors import TunelabError
from tunelab.inference.report import REPORT_DIR, publish_report
from tunelab.methods import REGISTRY
from tunelab.models.vision import reads_images
from tunelab.outputs import check_run_folder, read_run, training_params

log = logging.getLogger("tunelab")
LM_ROWS = 200  # rows a language model's loss is measured on by default (one forward pass each)
# The saved training settings that decide how the data's rows become token ids and labels (data/__init__.py reads
# them): columns, template, end-of-text token, which answers carry the loss, what a bad row does, lengths.
DATA_SETTINGS = (
    "text_column",
    "prompt_text_column",
    "chat_template",
    "add_eos_token",
    "mask_history",
    "bad_rows",
    "block_size",
    "model_max_length",
    "image_column",
)


@dataclasses.dataclass
class Sample:
    prompt: str
    reference: str
    tuned: str
    base: str | None = None
    rejected: str | None = None  # a preference pair's other answer


def evaluate_run(
    path: str | Path,
    data_path: str,
    split: str = "test",
    compare_base: bool = False,
    max_rows: int | None = None,
    samples: int = 3,
    max_new_tokens: int = 64,
    fewshot: int = 0,
    fewshot_split: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder on `data_path` (its `split`); write the report into the folder and return the results.

    A text-classification run is measured by its predictions instead (evaluate_classifier.py), a preference run on
    pairs by its rewards (evaluate_preference.py); `max_rows` defaults to LM_ROWS for language models and reward
    models, to every row for classifiers. A run trained with valid_size, given its own data and split "valid"
    (or "validation"), is measured on the examples it held out; split "train": on those it trained on. A split of
    multiple-choice questions (MMLU's, ARC's, HellaSwag's shape) is scored by multiple_choice.py (`max_rows`
    default 200 questions; `fewshot` answered examples before each, from `fewshot_split`)."""
    from tunelab.data import load_data
    from tunelab.data.holdout import saved_hold_out
    from tunelab.inference.evaluate_preference import evaluate_pairs, holds_preference_data
    from tunelab.inference.generate import load_run
    from tunelab.inference.multiple_choice import evaluate_choices, shape_of

    folder = check_run_folder(path, "evaluate")
    run_info = read_run(folder)
    if max_rows is not None and max_rows < 1:
        raise TunelabError(f"evaluate: --max-rows must be 1 or more (got {max_rows})")
    if fewshot < 0:
        raise TunelabError(f"evaluate: --fewshot must be 0 or more (got {fewshot})")
    # The run's own data with --split valid: the examples its valid_size held out (read from its train split)
    held = saved_hold_out(training_params(folder), run_info, folder, data_path, split)
    split = held.split if held else split
    classifier = run_info.get("trainer") == "text_classification"
    # multiple-choice questions (MMLU's, ARC's, HellaSwag's shape); a run's held-out examples are its own data
    shape = None if held or classifier else shape_of(data_path, split)
    if fewshot and shape is None:
        why = (
            "a classifier is measured by its labels" if classifier
            else "its run's held-out examples are measured by their loss" if held
            else "it holds none (question/choices/answer, question/choices {text, label}/answerKey or "
            "ctx/endings/label, with the choices a list)"
        )  # fmt: skip
        raise TunelabError(f"evaluate: --fewshot needs multiple-choice questions, and {data_path} ({split}): {why}")
    if classifier:
        from tunelab.inference.evaluate_classifier import evaluate_classifier

        if compare_base:
            log.info("evaluate: --compare-base does not apply to a classifier (its base has no trained head)")
        return evaluate_classifier(folder, data_path, split, max_rows, held)
    max_rows = LM_ROWS if max_rows is None else max_rows
    if shape is not None:
        if run_info.get("trainer") == "reward":
            raise TunelabError(
                f"evaluate: {data_path} holds multiple-choice questions, which a reward model does not answer "
                "(it scores whole answers: give it prompt/chosen/rejected pairs)"
            )
        results, shown = evaluate_choices(
            folder, data_path, split, shape, compare_base=compare_base, max_rows=max_rows, samples=samples,
            fewshot=fewshot, fewshot_split=fewshot_split,
        )  # fmt: skip
        write_report(folder, results, [Sample(**sample) for sample in shown])
        return results
    if holds_preference_data(folder, data_path, split):
        results, pairs = evaluate_pairs(
            folder, data_path, split, compare_base, max_rows, samples, max_new_tokens, held
        )
        write_report(folder, results, [Sample(**sample) for sample in pairs])
        return results
    params = _data_params(folder, data_path, split)
    model, tokenizer = load_run(folder)
    processor = images = None
    if reads_images(model.config):  # rows that show images are read with them, not taken for a text model's bad rows
        from tunelab.inference.generate import saved_processor

        processor = saved_processor(folder)
    data = load_data(params, tokenizer, processor=processor)
    if data.train.images is not None:
        from tunelab.inference.evaluate_preference import codec_of

        images = codec_of(processor, data, tokenizer)
    origin, picked = data.origins["train"], None
    if held:
        picked, origin = held.pick(len(data.train), origin)
    indices = range(min(max_rows, len(data.train))) if picked is None else [int(i) for i in picked[:max_rows]]
    rows = [data.train.example(i, limit=params.block_size) for i in indices]  # (a cut keeps whole images)
    rows = [row for row in rows if row.trained_tokens > 0]
    if not rows:
        raise TunelabError(f"evaluate: {origin}: no rows with answer tokens to score")

    started = time.time()
    results: dict[str, Any] = {"data": origin, "rows": len(rows), "model": str(folder)}
    results["eval_loss"] = mean_loss(model, rows, images)
    results["eval_perplexity"] = math.exp(min(results["eval_loss"], 50))
    base_model, base_context = _base(model, folder, compare_base)
    if compare_base:
        with base_context():
            results["base_eval_loss"] = mean_loss(base_model, rows, images)
        results["base_eval_perplexity"] = math.exp(min(results["base_eval_loss"], 50))
        results["base_model"] = run_info.get("base_model")

    shown = []
    for prompt, reference, tools in _prompts(params, samples, picked, len(data.train), processor):
        tuned = _answer(model, tokenizer, prompt, max_new_tokens, processor, tools)
        base = None
        if compare_base:
            with base_context():
                base = _answer(base_model, tokenizer, prompt, max_new_tokens, processor, tools)
        shown.append(Sample(as_template_reads(prompt) if isinstance(prompt, list) else prompt, reference, tuned, base))
    if shown:  # how near the sample answers come to their references (LLaMA-Factory's predict_with_generate figures)
        from tunelab.inference.overlap import answer_scores

        references = [sample.reference for sample in shown]
        results["answer_scores"] = answer_scores([sample.tuned for sample in shown], references)
        if compare_base:
            results["base_answer_scores"] = answer_scores([sample.base or "" for sample in shown], references)
    results["seconds"] = round(time.time() - started, 1)
    write_report(folder, results, shown)
    return results


def mean_loss(model: Any, rows: list[Any], images: Any = None) -> float:
    """Next-token cross-entropy averaged over every trained token of every row (one row at a time: no padding).
    `images`: a vision-language run's data/images.ImageCodec, which gives each row's pixels beside its ids."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row.input_ids], device=model.device)
            labels = torch.tensor(row.labels[1:], device=model.device)
            shown = {}
            if images is not None:
                inputs = images.batch_inputs([[span.ref for span in row.images or ()]], ids.cpu())
                shown = {key: value.to(model.device) for key, value in inputs.items()}
            logits = model(input_ids=ids, use_cache=False, **shown).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / max(count, 1)


def _data_params(folder: Path, data_path: str, split: str) -> Any:
    """The run's own data settings (columns, template, block size) pointed at the evaluation data."""
    from tunelab.inference.evaluate_preference import evaluation_params

    # Only what shapes the rows: the other saved settings belong to the run's own trainer (a DPO run's
    # precompute_ref_log_probs is refused for trainer sft) or to its launch (a relative accelerate_config).
    # (image_column is sft's image-and-caption column only for a run of the examples' methods: a pair method's
    # names the column listing its prompts' images.)
    method = REGISTRY.get(read_run(folder).get("trainer"))
    settings = DATA_SETTINGS
    if method is None or method.data != "examples":
        settings = tuple(name for name in DATA_SETTINGS if name != "image_column")
    return evaluation_params(folder, settings, data_path, split, "sft")


def _base(model: Any, folder: Path, wanted: bool) -> tuple[Any, Any]:
    """The base model to compare with (evaluate_preference.comparison_base), when wanted."""
    from tunelab.inference.evaluate_preference import comparison_base

    return comparison_base(model, folder) if wanted else (None, nullcontext)


def _prompts(
    params: LLMParams, count: int, picked: Any = None, encoded: int = 0, processor: Any = None
) -> list[tuple[Any, str, list[dict[str, Any]] | None]]:
    """(prompt, reference answer, the conversation's tool definitions) of the first rows (of the `picked` ones: a
    run's held-out examples, among the `encoded` the loss was read from): the conversation up to its last answer, or
    the first half of a plain text. With a vision-language run's `processor`, a conversation's image parts point at
    their images, found as training found them (a path relative to the data file)."""
    from tunelab.data.formats import detect_format, to_examples
    from tunelab.data.sources import locate_splits, read_location

    place = locate_splits(params.data_path, params.train_split, None)["train"]
    source = read_location(place, "train")
    fmt = detect_format(source, params.text_column, params.prompt_text_column, params.image_column)
    if processor is not None:
        fmt = dataclasses.replace(fmt, images=True)
    examples = to_examples(source, fmt, params.bad_rows)  # the rows the loss was measured on, bad ones as trained
    if picked is not None:
        if len(examples) != encoded:  # rows only the template refused (bad_rows: skip): the indices would not match
            log.info(
                "evaluate: no sample answers: of the %d usable rows, %d became examples (the chat template refused "
                "the others), so the held-out ones cannot be picked from the rows",
                len(examples), encoded,
            )  # fmt: skip
            return []
        examples = [examples[int(i)] for i in picked[:count]]
    shown = []
    for example in examples[:count]:
        if "messages" in example:
            messages = example["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = _found_images(messages[:last], place) if processor is not None else messages[:last]
            if prompt is not None:  # its reasoning too, as trained; asked with the tools it was trained with
                shown.append((prompt, answer_as_written(messages[last]), example.get("tools")))
        else:
            words = example["text"].split()
            shown.append((" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :]), None))
    return shown


def _found_images(messages: list[dict[str, Any]], place: Any) -> list[dict[str, Any]] | None:
    """A prompt's image parts pointing at their images as found (data/images.checked_ref); None when one cannot be
    (a bad row the loss left out with bad_rows: skip: no sample of it either)."""
    from tunelab.data.images import ImageProblem, checked_ref

    folder = place.parent if isinstance(place, Path) else None
    try:
        return [
            {**m, "content": [{**p, "image": checked_ref(p["image"], folder)} if p["type"] == "image" else p
                              for p in m["content"]]}
            if isinstance(m["content"], list) else m
            for m in messages
        ]  # fmt: skip
    except ImageProblem:
        return None


def _answer(
    model: Any,
    tokenizer: Any,
    prompt: Any,
    max_new_tokens: int,
    processor: Any = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The greedy answer, ended as generate ends it: at EOS or where the chat template ends a turn; a prompt that
    shows images is asked with them (a vision-language run's `processor` writes them), a conversation that had
    tool definitions with them (the template writes them as training did)."""
    from tunelab.data.images import image_parts, open_image
    from tunelab.inference.generate import GenerationParams, complete

    options = GenerationParams(max_new_tokens=max_new_tokens)
    if isinstance(prompt, list):
        # An Alpaca row's input as training laid it out (the alpaca template's own section, else in the content),
        # and earlier answers' reasoning.
        template = template_text(tokenizer, bool(tools))  # of named templates, the one transformers renders with
        messages = with_reasoning(with_inputs([prompt], template), template)[0]
        turns = as_template_reads(messages)
        text = tokenizer.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=True)
        shown = [open_image(ref) for _, ref in image_parts(prompt)]
        pictures = ([shown], processor) if shown else None
        return complete(model, tokenizer, text, options, add_special_tokens=False, shown=pictures)[0]
    return complete(model, tokenizer, prompt, options)[0]


def write_report(folder: Path, results: dict[str, Any], samples: list[Sample]) -> Path:
    """A language model's evaluation/ (report.md, loss_curves.png, results.json) and model-card section."""
    from tunelab.metrics import draw_curves

    curves = _curves(folder)
    card = [f"On `{results['data']}` ({results['rows']} {results.get('unit', 'rows')}):", "", *_numbers(results)]
    if curves:
        card += ["", f"![training and eval loss]({REPORT_DIR}/loss_curves.png)"]

    def pictures(staging: Path) -> None:
        if curves:
            draw_curves(curves, staging / "loss_curves.png", title="loss", x_label="step", y_label="loss")

    shown = [{k: v for k, v in dataclasses.asdict(s).items() if k != "rejected" or v is not None} for s in samples]
    full = {**results, "samples": shown}
    return publish_report(folder, full, _report_markdown(results, samples, bool(curves)), card, pictures)


def _curves(folder: Path) -> dict[str, list[tuple[float, float]]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    curves = {
        "train loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
        "eval loss": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
    }
    return {name: points for name, points in curves.items() if points}


def _numbers(results: dict[str, Any]) -> list[str]:
    if "method" in results:  # a preference run on pairs
        from tunelab.inference.evaluate_preference import preference_table

        return preference_table(results)
    if results.get("task") == "multiple_choice":
        from tunelab.inference.multiple_choice import choices_table

        return choices_table(results)
    lines = ["| model | eval loss | perplexity |", "| --- | --- | --- |"]
    lines.append(f"| fine-tuned | {results['eval_loss']:.4f} | {results['eval_perplexity']:.2f} |")
    if "base_eval_loss" in results:
        lines.append(
            f"| base ({results.get('base_model')}) | {results['base_eval_loss']:.4f} | "
            f"{results['base_eval_perplexity']:.2f} |"
        )
    if "answer_scores" in results:
        lines += [
            "",
            "| sample answers | exact match | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, key in (("fine-tuned", "answer_scores"), ("base", "base_answer_scores")):
            if key in results:
                figures = [results[key][metric] for metric in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu4")]
                lines.append(f"| {name} | " + " | ".join(f"{value:.2f}" for value in figures) + " |")
    return lines


def _report_markdown(results: dict[str, Any], samples: list[Sample], has_curves: bool) -> str:
    measured = "loss over the answer tokens, as in training"
    if "method" in results:
        measured = f"{results['method']}'s figures, named as its training logs them"
    elif results.get("task") == "multiple_choice":
        measured = (
            f"{results['format']}-style multiple choice, {results.get('fewshot', 0)}-shot, {results['prompt']}: the "
            "choice the model finds likeliest "
            "(norm: per character), and below each sample the right choice and each model's pick"
        )
    lines = [
        "# Evaluation",
        "",
        f"Data: `{results['data']}`, {results['rows']} {results.get('unit', 'rows')}; {measured}.",
        "",
        *_numbers(results),
        "",
    ]
    if has_curves:
        lines += ["![training and eval loss](loss_curves.png)", ""]
    for number, sample in enumerate(samples, start=1):
        prompt = sample.prompt if isinstance(sample.prompt, str) else content_text(sample.prompt[-1]["content"])
        lines += [f"## Sample {number}", "", f"**Prompt:** {prompt}", "", f"**Reference:** {sample.reference}", ""]
        if sample.rejected is not None:
            lines += [f"**Rejected:** {sample.rejected}", ""]
        lines += [f"**Fine-tuned:** {sample.tuned}", ""]
        if sample.base is not None:
            lines += [f"**Base:** {sample.base}", ""]
    return "\n".join(lines)
