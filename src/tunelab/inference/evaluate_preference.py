"""`tunelab evaluate` on a preference run (dpo, kto, orpo, simpo, reward): the figures TRL logs, on pairs.

evaluate.py hands a run here when its method trains on pairs or labeled answers and the evaluation split holds
that kind of data (a rejected column; for kto, a label column). The split is read by the reader training used
(data/preference.py; data/kto.py for kto) with the run's saved columns, chat template, length limits and bad_rows,
so every pair is formatted and cut as in training. Log-probs come from the methods' own code
(methods/preference.score_answers), and the figures from their loss functions (DPOLoss, kto_loss, orpo_loss,
simpo_loss, reward_loss), under TRL's names:

- dpo (and kto on pairs): rewards = beta * (log p - log p_ref) summed over the answer; `rewards/accuracies` (chosen's
  reward above rejected's), `rewards/margins`, `rewards/chosen`, `rewards/rejected`, `logps/chosen`, `logps/rejected`.
  The reference is training's: `model_ref`, else the base (a LoRA run's adapter switched off).
- kto on single answers: the same per answer kind (desirable: chosen), without accuracies (there are no pairs).
- orpo, simpo: no reference; rewards = beta * the mean log-prob per answer token, as their training logs them.
- reward: the score head's `accuracy` (score(chosen) > score(rejected)), `margin` and `mean_reward`.

With compare_base the base model's figures stand beside them (`base_...`), except where the base is the reference
the rewards are measured against (dpo, kto without model_ref): that is said instead. Sample answers are generated
from the pairs' prompts. A run trained with valid_size, given its own data and `--split valid`, is measured on the
pairs (kto: answers) it held out (data/holdout.saved_hold_out). evaluate.py writes the report.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tunelab.data.holdout import SavedHoldOut, prompt_groups
from tunelab.errors import DataError, TunelabError
from tunelab.methods import METHODS, REGISTRY, readers
from tunelab.models.vision import reads_images
from tunelab.outputs import load_base, model_reference, read_run, training_params

log = logging.getLogger("tunelab")
# The saved training settings the pair readers and the methods' figures read: columns, template, bad rows, the
# length rules, the reference model, and every preference method's own parameters (its registry line's).
PAIR_SETTINGS = (
    "text_column",
    "image_column",
    "prompt_text_column",
    "chat_template",
    "bad_rows",
    "block_size",
    "model_max_length",
    "batch_size",
    "mixed_precision",
    "fast_loss",
    "model_ref",
    "rope_scaling",  # a model_ref is stretched as training stretched it
    "rope_scaling_factor",
    *dict.fromkeys(
        name
        for entry in REGISTRY.values()
        if entry.data in ("pairs", "labeled")
        for name in (*entry.settings, *entry.data_params)
    ),
)
# Figures a method's loss function gives that depend on training's batches or switches, not on the pairs alone:
# kto's KL estimate (each batch's answers paired with the next row's), the NLL (completion_only_loss).
BATCH_FIGURES = ("kl", "nll_loss")
SHOWN = (
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)
REWARD_SHOWN = ("accuracy", "margin", "mean_reward")


def holds_preference_data(folder: Path, data_path: str, split: str) -> bool:
    """Whether `split` of `data_path` is a preference run's own kind of data: any split for a reward run, else one
    with the run's chosen or rejected column (kto: its rejected or label column), which the pair reader then
    checks whole. A file of texts or chats is measured as a language model instead (next-token loss), as for any
    causal run."""
    from tunelab.data.sources import locate_splits, stream_split

    trainer = read_run(folder).get("trainer")
    if trainer not in REGISTRY or REGISTRY[trainer].data not in ("pairs", "labeled"):
        return False
    if trainer == "reward":
        return True
    saved = training_params(folder)
    columns = stream_split(locate_splits(data_path, split, None)["train"], "train").head.columns
    wanted = [saved.get("rejected_text_column") or "rejected"]
    if REGISTRY[trainer].data == "labeled":  # (kto's answer column is also a prompt/completion file's)
        wanted += ["rejected", saved.get("label_column") or "label"]
        if wanted[-1] == "label":
            wanted.append("kto_tag")  # LLaMA-Factory's (data/kto.kto_columns)
    else:  # data/preference.py reads a text_column left at "text" as "chosen"
        wanted.append("chosen" if saved.get("text_column", "text") == "text" else saved["text_column"])
    if any(column in columns for column in wanted):
        return True
    log.info(
        "evaluate: %s holds no %s column: measured as a language model (next-token loss); a file of %s gives the "
        "%s run's preference figures",
        data_path,
        " or ".join(repr(c) for c in dict.fromkeys(wanted)),
        "pairs or labeled answers" if REGISTRY[trainer].data == "labeled" else "prompt/chosen/rejected pairs",
        trainer,
    )
    return False


def evaluate_pairs(
    folder: Path,
    data_path: str,
    split: str,
    compare_base: bool,
    max_rows: int,
    samples: int,
    max_new_tokens: int,
    held: SavedHoldOut | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's figures on the first `max_rows` pairs (kto: pairs, or labeled answers) of `split`, and sample
    answers to the first `samples` prompts as dicts (prompt, reference, rejected, tuned, base). `held`: the run's
    own hold-out (data/holdout.saved_hold_out), its examples the only ones read from `split`."""
    import time

    from tunelab.inference.generate import load_run, saved_processor

    run = read_run(folder)
    params = evaluation_params(folder, PAIR_SETTINGS, data_path, split, run["trainer"])
    if params.trainer == "reward":
        return _evaluate_reward(folder, params, compare_base, max_rows, held), []
    model, tokenizer = load_run(folder)
    processor = saved_processor(folder) if reads_images(model.config) else None
    data, rows, pairs = _read(params, tokenizer, max_rows, held, processor)
    images = codec_of(processor, data, tokenizer) if getattr(data, "shows_images", False) else None
    started = time.time()
    results = _described(folder, params, data, len(pairs) if pairs is not None else len(rows), pairs is not None)
    policy = _logps(model, rows, params, tokenizer, images)
    reference = reference_is_base = ref_model = None
    if REGISTRY[params.trainer].reference:
        ref_model, ref_context, reference_is_base, results["reference"] = _reference(model, folder, params)
        with ref_context():
            reference = _logps(ref_model, rows, params, tokenizer, images)
    if getattr(params, "sync_ref_model", False):  # TR-DPO: the moved reference was a checkpoint's, now gone
        results["reference"] += " (where training's started; TR-DPO moved training's own as it went)"
    results.update(figures(params, rows, pairs, policy, reference))

    base_model = base_context = None
    if compare_base:
        results["base_model"] = run.get("base_model")
        if reference_is_base:
            results["base_is_reference"] = True  # its rewards are 0 by definition: nothing to show twice
            base_model, base_context = ref_model, _context_of(ref_model, model)
        else:
            base_model, base_context = comparison_base(model, folder)
            with base_context():
                base = _logps(base_model, rows, params, tokenizer, images)
            results.update({f"base_{k}": v for k, v in figures(params, rows, pairs, base, reference).items()})
    shown = _samples(model, tokenizer, rows, pairs, samples, max_new_tokens, base_model, base_context, images)
    results["seconds"] = round(time.time() - started, 1)
    return results, shown


def codec_of(processor: Any, data: Any, tokenizer: Any) -> Any:
    """How the run's processor writes the images the data shows (data/images.ImageCodec), as training's did."""
    from tunelab.data import image_codec

    codec, problem = image_codec(processor, data.template_source, tokenizer)
    if codec is None:
        raise TunelabError(f"evaluate: {data.origins['train']} shows images, but {problem}")
    return codec


def evaluation_params(folder: Path, settings: tuple[str, ...], data_path: str, split: str, trainer: str) -> Any:
    """The run's saved `settings` (its own chat template as the run's tokenizer carries it), pointed at the
    evaluation data, for `trainer`'s reader."""
    from tunelab.config.llm import LLMParams, run_template

    saved = training_params(folder)
    # another method's own setting is left out: a run saved before that setting was refused on this trainer may
    # carry it (it did nothing there), and evaluating that run must not fail on it
    owners = readers()
    values = {k: saved[k] for k in settings if k in saved and trainer in owners.get(k, (trainer,))}
    values["chat_template"] = run_template(values.get("chat_template"))
    values.update(model=str(folder), data_path=data_path, train_split=split, valid_split=None, trainer=trainer)
    return LLMParams(**values)


def _read(
    params: Any, tokenizer: Any, max_rows: int, held: SavedHoldOut | None = None, processor: Any = None
) -> tuple[Any, list[Any], list[tuple[int, int]] | None]:
    """(the reader's data, the rows to score, and for kto on pairs each pair's (desirable, undesirable) row).
    `processor`: a vision-language run's, which writes the images the pairs' prompts show."""
    if REGISTRY[params.trainer].data != "labeled":
        from tunelab.data.preference import load_preference_data

        data, _ = _held_out(load_preference_data(params, tokenizer, processor=processor), held)
        rows, pairs = data.train[:max_rows], None
    else:
        from tunelab.data.kto import load_kto_data

        data, picked = _held_out(load_kto_data(params, tokenizer), held)
        rows, pairs = data.train, None
        # Pairs unpaired by the reader: each pair's desirable answer, then its undesirable one. valid_size held
        # answers out one by one, so a run's held-out answers are measured as answers, every one of them.
        if "pairs" in data.columns and picked is None:
            pairs, i = [], 0
            while i + 1 < len(rows) and len(pairs) < max_rows:
                if rows[i].desirable and not rows[i + 1].desirable:
                    pairs.append((i, i + 1))
                    i += 1
                i += 1
            rows = rows[: pairs[-1][1] + 1] if pairs else []
        else:
            rows = rows[:max_rows]
    if not rows:
        stats = data.stats
        raise DataError(
            f"{data.origins['train']}: nothing to score: {stats.dropped_no_room} row(s) left no room for an answer "
            f"(block_size {params.block_size}, max_prompt_length {params.max_prompt_length}), "
            f"{len(stats.dropped_identical)} had chosen identical to rejected"
        )
    return data, rows, pairs


def _held_out(data: Any, held: SavedHoldOut | None) -> tuple[Any, Any]:
    """(the reader's data with only the run's held-out (or trained-on) pairs or answers as its train split, named by
    what they are; the indices of those among all it read), or the data as read (and None) without a hold-out."""
    if held is None:
        return data, None
    picked, origin = held.pick(len(data.train), data.origins["train"], groups=prompt_groups(data.train))
    train = [data.train[int(i)] for i in picked]
    return dataclasses.replace(data, train=train, origins={**data.origins, "train": origin}), picked


def _described(folder: Path, params: Any, data: Any, count: int, paired: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {"data": data.origins["train"], "rows": count, "model": str(folder)}
    results["method"] = params.trainer
    results["unit"] = "answers" if REGISTRY[params.trainer].data == "labeled" and not paired else "pairs"
    evaluation = METHODS[params.trainer].evaluation
    if evaluation is not None:  # (a reward model has no rewards of its own to describe)
        results["beta"] = getattr(params, evaluation.beta)
        results["rewards"] = evaluation.rewards
    stats = data.stats
    dropped = {
        "bad_rows_skipped": data.skipped_rows.get("train", 0),
        "identical": len(stats.dropped_identical),
        "no_room": stats.dropped_no_room,
        "prompts_truncated": stats.prompts_truncated,
        "answers_truncated": stats.completions_truncated,
    }
    results["rows_left_out_or_cut"] = {k: v for k, v in dropped.items() if v}
    return results


def _logps(model: Any, rows: list[Any], params: Any, tokenizer: Any, images: Any = None) -> Any:
    """(sums, counts) of every row's answer log-probs: (N, 2) for pairs, (N, 1) for kto's answers. `images`: the
    ImageCodec of pairs that show images (their pixels beside the ids, as trained)."""
    from tunelab.methods.preference import PairCollator, score_answers
    from tunelab.speed.loss import fast_loss_supported

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if REGISTRY[params.trainer].data == "labeled":
        from tunelab.methods.kto import KTOCollator

        collate: Any = KTOCollator(pad, params.block_size, kl=False)  # no KL estimate here
    else:
        collate = PairCollator(pad, images)
    fast = params.fast_loss and fast_loss_supported(model)
    summed = METHODS[params.trainer].evaluation.summed
    extra = {"summed": summed(params)} if summed is not None else {}
    return score_answers(model, rows, collate, params.batch_size, fast, model.device, **extra)


def figures(
    params: Any, rows: list[Any], pairs: list[tuple[int, int]] | None, policy: Any, reference: Any
) -> dict[str, float]:
    """The method's figures from the policy's (sums, counts) of answer log-probs and the reference's, computed by
    the method's own loss function over every row at once (its PairEvaluation); the batch-dependent ones
    (BATCH_FIGURES) left out."""
    found = METHODS[params.trainer].evaluation.figures(params, rows, pairs, policy, reference)
    return {name: round(float(value), 6) for name, value in found.items() if name not in BATCH_FIGURES}


def _reference(model: Any, folder: Path, params: Any) -> tuple[Any, Any, bool, str]:
    """(the reference model, the context it runs in, whether it is the base, its name), as training chose it:
    `model_ref` when the run had one, else the base (a LoRA run's adapter switched off, no second copy)."""
    if params.model_ref:
        from tunelab.inference.device import to_inference_device
        from tunelab.models import load_reference

        is_base = model_reference(params.model_ref) == read_run(folder).get("base_model")
        return to_inference_device(load_reference(params, like=model)), nullcontext, is_base, params.model_ref
    base, context = comparison_base(model, folder)
    name = "the base model with the adapter off" if base is model else str(read_run(folder).get("base_model"))
    return base, context, True, name


def comparison_base(model: Any, folder: Path) -> tuple[Any, Any]:
    """The base model a run is compared with: the same weights with the adapter off (no second copy), or, for a
    fully fine-tuned run, the base model loaded beside it in the run's dtype (as training's frozen copy was)."""
    if hasattr(model, "disable_adapter"):
        return model, model.disable_adapter
    if not read_run(folder).get("base_model"):
        raise TunelabError(f"evaluate: {folder} does not say which base model it was trained from")
    from tunelab.inference.device import to_inference_device
    from tunelab.models.load import load_causal_lm
    from tunelab.models.vocabulary import embedding_rows, fit_embeddings

    # its positions stretched as training's frozen copy had them (rope_scaling)
    base = load_base(folder, lambda source: load_causal_lm(source, dtype=model.dtype))
    fit_embeddings(base, embedding_rows(model))  # the tokens the run added, as new rows started
    return to_inference_device(base), nullcontext


def _context_of(base: Any, model: Any) -> Any:
    return model.disable_adapter if base is model and hasattr(model, "disable_adapter") else nullcontext


def _samples(
    model: Any,
    tokenizer: Any,
    rows: list[Any],
    pairs: list[tuple[int, int]] | None,
    count: int,
    max_new_tokens: int,
    base: Any,
    base_context: Any,
    images: Any = None,
) -> list[dict[str, Any]]:
    """Answers to the first prompts, greedy and ended as `generate` ends them, beside the pair's answers. `images`:
    the ImageCodec of pairs that show images: a prompt is asked with its images, from training's own ids (the
    report's prompt text leaves their tokens out)."""
    import torch

    from tunelab.inference.generate import GenerationParams, complete

    options = GenerationParams(max_new_tokens=max_new_tokens)
    shown = []
    for index, (prompt_ids, chosen, rejected) in enumerate(_sample_rows(rows, pairs)[:count]):
        spans = getattr(rows[pairs[index][0] if pairs else index], "images", None)
        text = tokenizer.decode(prompt_ids)  # as training saw it: template, BOS and all
        extra = {}
        if spans:  # training's own ids and the images' pixels beside them (no round trip through the text)
            ids = torch.tensor([prompt_ids])
            encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            extra["encoded"] = {**encoded, **images.batch_inputs([[span.ref for span in spans]], ids)}
        sample = {
            "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True).strip(),
            "reference": tokenizer.decode(chosen, skip_special_tokens=True).strip() if chosen else "",
            "rejected": tokenizer.decode(rejected, skip_special_tokens=True).strip() if rejected else None,
            "tuned": complete(model, tokenizer, text, options, add_special_tokens=False, **extra)[0],
            "base": None,
        }
        if base is not None:
            with base_context():
                sample["base"] = complete(base, tokenizer, text, options, add_special_tokens=False, **extra)[0]
        shown.append(sample)
    return shown


def _sample_rows(rows: list[Any], pairs: list[tuple[int, int]] | None) -> list[tuple[list[int], Any, Any]]:
    """(prompt ids, chosen ids, rejected ids) of each pair; kto's single answers as chosen or rejected."""
    if pairs is not None:
        return [(rows[i].prompt_ids, rows[i].completion_ids, rows[j].completion_ids) for i, j in pairs]
    if rows and hasattr(rows[0], "desirable"):
        return [(r.prompt_ids, *((r.completion_ids, None) if r.desirable else (None, r.completion_ids))) for r in rows]
    return [(r.prompt_ids, r.chosen_ids, r.rejected_ids) for r in rows]


def _evaluate_reward(
    folder: Path, params: Any, compare_base: bool, max_rows: int, held: SavedHoldOut | None = None
) -> dict[str, Any]:
    """A reward model's pairwise accuracy, margin and mean reward: each pair scored as its training batches were
    (prompt + answer ids, padded with the pad token, the score read at the last real token)."""
    import time

    import torch

    from tunelab.data.preference import load_preference_data
    from tunelab.inference.score import load_reward_model
    from tunelab.methods.preference import PairCollator
    from tunelab.methods.reward import reward_loss

    if compare_base:
        log.info("evaluate: --compare-base does not apply to a reward model (its base has no trained score head)")
    model, tokenizer, _ = load_reward_model(folder)
    data = _held_out(load_preference_data(params, tokenizer, margins=False), held)[0]  # (scores need none)
    started = time.time()
    rows = data.train[:max_rows]
    if not rows:
        raise DataError(f"{data.origins['train']}: nothing to score: no pair left room for an answer")
    results = _described(folder, params, data, len(rows))
    collate = PairCollator(tokenizer.pad_token_id)  # the pad id the score head looks past, as in training
    scores = []
    with torch.no_grad():
        for start in range(0, len(rows), params.batch_size):
            batch = {k: v.to(model.device) for k, v in collate(rows[start : start + params.batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            scores.append(torch.stack(logits.logits.squeeze(-1).float().chunk(2), dim=1).cpu())
    chosen, rejected = torch.cat(scores).unbind(1)
    _, found = reward_loss(chosen, rejected)
    results.update({name: round(float(value), 6) for name, value in found.items()})
    results["seconds"] = round(time.time() - started, 1)
    return results


def preference_table(results: dict[str, Any]) -> list[str]:
    """The report's Markdown table of the figures, fine-tuned and base (or what the base is)."""
    if results["method"] == "reward":
        lines = ["| model | accuracy | margin | mean reward |", "| --- | --- | --- | --- |"]
        return lines + ["| reward model | " + " | ".join(f"{results[k]:.4f}" for k in REWARD_SHOWN) + " |"]
    names = [name for name in SHOWN if name in results]
    lines = ["| model | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    lines.append("| fine-tuned | " + " | ".join(f"{results[name]:.4f}" for name in names) + " |")
    if any(f"base_{name}" in results for name in names):
        cells = [f"{results[f'base_{name}']:.4f}" if f"base_{name}" in results else "" for name in names]
        lines.append(f"| base ({results.get('base_model')}) | " + " | ".join(cells) + " |")
    notes = _notes(results)
    return lines + ["", *notes] if notes else lines


def _notes(results: dict[str, Any]) -> list[str]:
    method = results["method"]
    reference = f"; reference: {results['reference']}" if "reference" in results else ""
    notes = [f"Rewards are {results['rewards']} (beta {results['beta']}{reference}), as {method} logs them."]
    if results.get("base_is_reference"):
        notes.append(
            f"Base ({results.get('base_model')}): the reference the rewards are measured against (its rewards are 0)."
        )
    return notes


def summary(results: dict[str, Any]) -> list[str]:
    """What `tunelab evaluate` prints for a preference run: one line of figures, one for the base."""
    count = f"{results['rows']} {results['unit']}"
    if results["method"] == "reward":
        return [
            f"reward model on {count}: accuracy {results['accuracy']:.4f}, margin {results['margin']:.4f} "
            f"(mean reward {results['mean_reward']:.4f})"
        ]
    shown = ", ".join(f"{name} {results[name]:.4f}" for name in SHOWN if name in results)
    lines = [f"{results['method']} on {count}: {shown}"]
    base = ", ".join(f"{name} {results[f'base_{name}']:.4f}" for name in SHOWN if f"base_{name}" in results)
    if base:
        lines.append(f"base: {base}")
    elif results.get("base_is_reference"):
        lines.append(f"base: {results.get('base_model')} is the reference the rewards are measured against")
    return lines
