"""The LLM spine: params -> checks -> data -> model -> method rows -> Trainer -> run folder.

`prepare` is the part that needs no weights; `plan` (the dry run) and `run` both start with it. The CLI, the
Python API and the web app reach this module through the dispatcher, tasks/__init__.py.

Everything that can fail because of the user's input fails before the first weight is loaded and before
anything is written: the parameters validate themselves, the machine is checked, the data is read, formatted
and tokenized in full.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from tunelab import outputs
from tunelab.config.llm import LLMParams
from tunelab.data import cache as data_cache
from tunelab.data import image_codec, load_data, stream_data
from tunelab.data.holdout import hold_out
from tunelab.data.kto import check_both_kinds, load_kto_data
from tunelab.data.mixture import is_mixture
from tunelab.data.packing import row_lengths
from tunelab.data.preference import load_preference_data
from tunelab.data.prompts import load_prompt_data
from tunelab.data.templates import teach_strings
from tunelab.env import check_machine, device_name
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.memory import choose_checkpointing, log_run_estimate, sampling_cache
from tunelab.methods import METHODS, Method, RowStats
from tunelab.models import ModelSource, check_model, load_config, load_model, load_tokenizer, positions, resolve_model
from tunelab.models.checks import check_teacher, check_token_ids, fit_tokenizer
from tunelab.models.positions import rope_scaling_of
from tunelab.models.vision import load_processor, reads_images
from tunelab.models.vocabulary import add_tokens, grow_vocabulary
from tunelab.tasks import dry_run
from tunelab.tasks.dry_run import TRAINED_CLOSE, TRAINED_OPEN, RunPlan, SplitSummary, marked_text
from tunelab.training.checkpoints import check_disk_space, checkpoint_bytes

log = logging.getLogger("tunelab")


@dataclass
class Prepared:
    """Everything decided and checked before the model loads: what `run` trains and what `--dry-run` shows."""

    params: LLMParams
    method: Method
    folder: outputs.RunFolder
    resume_from: Path | None
    source: ModelSource
    config: Any  # the model's transformers config, read before any weight loads
    tokenizer: Any
    data: Any  # EncodedData, PreferenceData or PromptData
    train_rows: Any  # a sequence of rows: data/rows.py views for examples, lists of pairs or prompts
    valid_rows: Any | None
    stats: RowStats
    prepared: data_cache.Entry | None  # where the prepared data is kept (None: streamed); its key is logged
    checkpointing: str = ""  # what gradient_checkpointing was resolved to, and why (params holds the choice)
    new_token_ids: list[int] = dataclasses.field(default_factory=list)  # tokens the run added to the tokenizer
    rope_scaling: dict[str, Any] | None = None  # how the run stretches the model's positions (models/positions.py)
    processor: Any = None  # a vision-language model's processor: its images' tokens and pixels (models/vision.py)


def prepare(params: LLMParams) -> Prepared:
    """Check the folder, the machine and the data (read, formatted, tokenized, cut into rows), writing nothing.

    Every problem a user can fix raises TunelabError here, before any weights are loaded.
    """
    method = METHODS[params.trainer]
    folder = outputs.RunFolder(params.project_name)
    folder.check_free()
    resume_from = folder.resume_point(params)
    check_machine(params)

    source = resolve_model(params.model)
    config = check_model(source, params, kind=method.model_kind)
    ref_config = None
    if params.model_ref:  # found now, not when the Trainer loads it (the params allow it only where it is read)
        # Checked as the frozen model it is, without LoRA (a copy: replace() would validate again, and refuse the
        # run's LoRA settings without peft).
        reference = copy.copy(params)
        reference.peft = False
        ref_config = check_model(resolve_model(params.model_ref), reference, kind="causal_lm", reference=True)
    tokenizer = load_tokenizer(source, params.model_max_length)
    fit_tokenizer(tokenizer, config, source)
    processor, images_problem = _processor(source, config, params, method, tokenizer)
    if reads_images(config):  # LLaVA's own template writes nothing for a plain string: for every method, taught to
        teach_strings(tokenizer)
    if params.teacher_model:  # distill: found now, with the tokens it reads, not when the Trainer loads it
        check_teacher(params, config, tokenizer)
    new_token_ids = add_tokens(tokenizer, params.add_tokens or [], params.add_special_tokens or [])
    if new_token_ids:
        grow_vocabulary(config, len(tokenizer))  # as load_model grows the model's embeddings
    if method.data == "prompts":  # a reward file that does not import is found now, not after the model loads
        from tunelab.methods.completions import completion_length
        from tunelab.rewards import load_rewards

        load_rewards(params, completion_length(params))
    if params.streaming:
        entry = None
        data, train_rows, valid_rows, stats = _stream(params, method, tokenizer, processor)
    else:
        with data_cache.entry_for(params, tokenizer, processor) as entry:
            if not entry.hit:
                prepared = _prepare_data(
                    params, method, tokenizer, entry.folder, processor, images_problem, entry.final
                )
                entry.save(prepared)
        bundle = entry.bundle
        data, train_rows, valid_rows = bundle["data"], bundle["train_rows"], bundle["valid_rows"]
        stats = bundle["stats"]
    check_token_ids(_highest_token_id(data, method.data), config, source)
    if shows_images(data):
        if not method.images:
            raise ConfigError(f"the data shows images, but {takes_no_images(params.trainer)}")
        if params.tools:
            raise ConfigError("tools: the data shows images, and tool rounds with images are not sampled yet")
        if params.model_ref and getattr(ref_config, "model_type", None) != getattr(config, "model_type", None):
            raise ConfigError(
                f"model_ref {params.model_ref}: the data shows images, which a reference reads only as the model "
                f"does: give a {getattr(config, 'model_type', 'vision-language')} model (or leave model_ref unset)"
            )
        if params.packing:
            raise ConfigError("packing: the data shows images, and rows with images are not packed yet: leave it off")
    if params.tools:  # how the template writes a call and a tool turn, tried now: not after the model loads
        from tunelab.tools import check_template

        check_template(params.tools, tokenizer, data.template_source)
    log.info("%s", _described(entry))
    rows = (train_rows, valid_rows, stats)
    # from the model's own config (the one check_model returned is stretched already)
    rope_scaling = rope_scaling_of(load_config(source), params, source.name) if params.rope_scaling else None
    return Prepared(
        params, method, folder, resume_from, source, config, tokenizer, data, *rows, entry,
        new_token_ids=new_token_ids, rope_scaling=rope_scaling, processor=processor,
    )  # fmt: skip


def _processor(
    source: ModelSource, config: Any, params: LLMParams, method: Method, tokenizer: Any
) -> tuple[Any, str | None]:
    """A vision-language model's processor (None for a text model, and for the methods that read no images: those on
    examples get it too, to refuse such rows by name), its chat template given to the tokenizer that has none of its
    own; and why rows that show images cannot be trained, when that is known now (the method takes none, or a pair
    method's processor does not load: its text-only pairs still train)."""
    budget = params.image_max_pixels or params.image_min_pixels
    if not reads_images(config):
        if budget:
            raise ConfigError(f"image_max_pixels / image_min_pixels: model {params.model} reads text only")
        return None, None
    if budget and not method.images:
        raise ConfigError(f"image_max_pixels / image_min_pixels: {takes_no_images(params.trainer)}")
    if method.data != "examples" and not method.images:
        return None, takes_no_images(params.trainer)
    try:
        processor = load_processor(source, params.image_max_pixels, params.image_min_pixels)
    except ConfigError:
        raise
    except TunelabError as err:
        if method.data == "examples":
            raise
        return None, str(err)
    if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template  # kept beside the processor (chat_template.json) only
    return processor, None


def takes_no_images(trainer: str) -> str:
    """Why a trainer's rows that show images cannot be trained, naming those that take them (Method.images)."""
    taking = [name for name, method in METHODS.items() if method.images]
    return f"trainer {trainer} takes no images yet (trainers {', '.join(taking)} do)"


def _with_checkpointing(prep: Prepared) -> Prepared:
    """prep with gradient_checkpointing resolved (auto: the fewest checkpointed layers whose estimate fits the
    device's free memory). Done by run and plan, not prepare: the checks a launching parent runs before its
    processes start must not open a CUDA context (available_memory) that would sit on a GPU through the run."""
    chosen, why = choose_checkpointing(prep.config, prep.params, *microbatch(prep), prep.method.model_kind)
    return dataclasses.replace(prep, params=chosen, checkpointing=why)


def _stream(
    params: LLMParams, method: Method, tokenizer: Any, processor: Any = None
) -> tuple[Any, Any, Any, RowStats]:
    """streaming: true (data/streaming.py): the first block prepared now (checks, the dry run's figures), the rest
    as training reads it."""
    if method.data != "examples" or is_mixture(params.data_path):
        what = "a mixture of sources" if is_mixture(params.data_path) else f"trainer {params.trainer}"
        raise ConfigError(f"streaming: true is for one source and trainers default and sft, not {what}")
    refused = None if method.images else takes_no_images(params.trainer)
    data, train_rows, valid_rows = stream_data(params, tokenizer, method.build_rows, processor, refused)
    stats = method.build_rows(data.train, params)[1]
    if not stats.rows:
        raise DataError(
            f"{data.origins['train']}: no training rows in the first block of the data: of {stats.examples} "
            f"examples, {stats.truncated} were truncated to block_size={params.block_size} and {stats.dropped} "
            "dropped with nothing left to learn"
        )
    stats.notes.append(
        f"streaming: the figures above are the first block's ({stats.examples} examples); the rest is read, "
        "checked and tokenized as training goes, in file order"
    )
    return data, train_rows, valid_rows, stats


def _described(entry: data_cache.Entry | None) -> str:
    return entry.describe() if entry else "prepared data: streamed (each block prepared as training reads it)"


def _prepare_data(
    params: LLMParams,
    method: Method,
    tokenizer: Any,
    folder: Path,
    processor: Any = None,
    images_problem: str | None = None,
    final: Path | None = None,
) -> dict[str, Any]:
    """The data read, checked and tokenized (token tables into `folder`, which moves to `final` once complete when
    given) and cut into the method's rows. `images_problem`: why a vision-language model's rows that show images
    cannot be trained (bad rows, by name)."""
    if method.data != "examples" and is_mixture(params.data_path):
        raise ConfigError(
            f"data_path lists several sources, which trainer {params.trainer} does not take yet (mixtures are for "
            "default and sft): give it one file, folder or hub dataset"
        )
    store = (folder, final or folder)  # image bytes written once beside the prepared data
    if method.data == "pairs":
        data = load_preference_data(
            params, tokenizer, processor=processor, images_problem=images_problem, image_store=store
        )
    elif method.data == "prompts":
        data = load_prompt_data(params, tokenizer, images_problem, processor, store)
    elif method.data == "labeled":
        data = load_kto_data(params, tokenizer, images_problem=images_problem)
    else:
        data = load_data(params, tokenizer, folder, processor)
    if params.valid_size is not None and not is_mixture(params.data_path):  # a mixture's sources: load_data
        data = hold_out(data, params.valid_size, params.seed)
        if method.data == "labeled":  # what is left to train on must still hold both kinds of answer
            check_both_kinds(data.train, f"{data.origins['train']} (less the examples valid_size held out)")
    train_rows, stats = method.build_rows(data.train, params)
    valid_rows = method.build_rows(data.valid, params)[0] if data.valid else None
    if method.data in ("pairs", "labeled"):
        stats.truncated = data.stats.prompts_truncated + data.stats.completions_truncated
        stats.dropped = data.stats.dropped_no_room
        stats.examples += stats.dropped
    if not len(train_rows):
        raise DataError(
            f"{data.origins['train']}: no training rows left: of {stats.examples} examples, "
            f"{stats.truncated} were truncated to block_size={params.block_size} and {stats.dropped} dropped with "
            "nothing left to learn (no answer tokens, or a prompt with no room for an answer); "
            + (_FEWER_IMAGE_TOKENS if getattr(getattr(data, "stats", None), "long_image_prompts", 0) else "")
            + "raise block_size (and model_max_length), or lower max_prompt_length (for prompts without images)"
        )
    return {"data": data, "train_rows": train_rows, "valid_rows": valid_rows, "stats": stats}


_FEWER_IMAGE_TOKENS = "prompts that show images are never cut: have an image take fewer tokens (image_max_pixels), or "


def run(params: LLMParams) -> Path:
    """Run one fine-tuning job end to end and return the finished run folder."""
    try:
        return _run(params)
    finally:
        outputs.release_locks()  # a failed run's too: the process may go on (the Python API, a notebook)


def _run(params: LLMParams) -> Path:
    prep = _with_checkpointing(prepare(params))
    # Now, by every process, not by the main one while the others wait; from the data cache's hashes when it has them.
    hashed = prep.prepared.inputs["files"] if prep.prepared and prep.prepared.inputs else None
    prep.folder.data_fingerprint(params, hashed)
    params = prep.params
    log.info("gradient checkpointing: %s", prep.checkpointing)
    if params.unsloth:  # AutoTrain's flag: said, not silently dropped
        log.info("unsloth: accepted for AutoTrain compatibility; tunelab trains with its own fast path (speed/)")
    method, folder, tokenizer, data = prep.method, prep.folder, prep.tokenizer, prep.data
    train_rows, valid_rows, stats = prep.train_rows, prep.valid_rows, prep.stats
    _report_data(params, data, stats, stats.rows if data_is_streamed(data) else len(train_rows))

    set_seed(params.seed)  # LoRA's initial weights, dropout: the same run twice is the same run
    model = load_model(prep.source, params, method.model_kind, tokenizer, new_token_ids=prep.new_token_ids)
    _report_model(model, params)
    images = None
    if shows_images(data):
        images, problem = image_codec(prep.processor, data.template_source, tokenizer)
        if images is None:
            raise ConfigError(f"the data shows images, but {problem}")
    elif data_is_streamed(data) and prep.processor is not None and method.images and not params.packing:
        images = image_codec(prep.processor, data.template_source, tokenizer)[0]  # for later blocks' images
    if method.rows_with_model is not None:  # dpo's precomputed reference log-probs
        folder_of = prep.prepared.folder if prep.prepared else None
        shown = {"images": images} if images is not None else {}
        train_rows, valid_rows = method.rows_with_model(model, train_rows, valid_rows, params, folder_of, **shown)
    log_run_estimate(model.config, params, *microbatch(prep), method.model_kind)

    # Imported here: transformers' Trainer takes seconds to import, and the dry run (`plan`) never needs it.
    from tunelab.training.callbacks import ProgressAndMetrics
    from tunelab.training.trainer import build_trainer, run_training

    copies = 2 if params.sync_ref_model else 1  # dpo's TR-DPO keeps its moved reference in each checkpoint
    needed = 2 * checkpoint_bytes(model, not params.peft, copies)
    check_disk_space(folder.final.parent, needed, "checkpoints and outputs")
    perplexity = method.data == "examples" and method.perplexity
    progress = ProgressAndMetrics(folder.staging / "metrics.jsonl", perplexity=perplexity)
    if data.template_source:  # the template trained with, from the start: grpo reads its turn end (models/turns.py)
        tokenizer.chat_template = data.template_source
    trainer = build_trainer(
        model, tokenizer, params, train_rows, valid_rows, str(folder.staging), [progress], method.trainer_class,
        images=images,
    )  # fmt: skip
    if hasattr(trainer, "trained_tokens"):
        progress.count_tokens = lambda: trainer.trained_tokens
    staging = folder.open_for(trainer, params, prep.resume_from)
    result = run_training(trainer, folder, prep.resume_from)

    # The whole run's figures, a resumed run's too (the part before the resume is kept with the checkpoint)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["trained_tokens"] = trainer.trained_tokens_all_processes()
    metrics["trained_tokens_per_second"] = round(metrics["trained_tokens"] / max(metrics["train_runtime"], 1e-9), 2)
    if valid_rows:
        metrics.update(trainer.evaluate())
        if perplexity:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))

    run_info = {
        "base_model": outputs.model_reference(params.model),
        "trainer": params.trainer,
        "adapter": params.peft,
        "merged": "merged" if params.merge_adapter and params.peft else None,
        "row_format": data.describe(),
        "template": data.template,
        "teacher_model": outputs.model_reference(params.teacher_model) if params.teacher_model else None,
        "reasoning": data.reasoning,  # it learned to write <think> blocks: export --format ollama reads this
        # an adapter's base is stretched again when loaded (outputs.load_base); a full model's config.json says it
        "rope_scaling": prep.rope_scaling,
        "data": data.origins,
        "skipped_rows": data.skipped_rows,
        "prepared_data": prep.prepared.key if prep.prepared else "streamed",
        "device": device_name(),
    }
    outputs.write_run(staging, trainer, tokenizer, params, data.template_source, metrics, run_info, prep.processor)
    log.info("done: %s (train loss %.4f)", folder.final, metrics.get("train_loss", float("nan")))
    return folder.close_for(trainer, params)


def _report_data(params: LLMParams, data: Any, stats: Any, rows: int) -> None:
    log.info("data: %s", ", ".join(f"{k}={v}" for k, v in data.origins.items()))
    log.info("rows: %s; chat template: %s", data.describe(), data.template or "none (text as is)")
    log.info(
        "%d training examples -> %d rows (method %s); %d truncated to block_size=%d, %d dropped with nothing to learn",
        stats.examples,
        rows,
        params.trainer,
        stats.truncated,
        params.block_size,
        stats.dropped,
    )
    for note in stats.notes:
        log.info(note)
    pair_stats = getattr(data, "stats", None)
    if pair_stats is not None:
        log.info(
            "pairs: %d prompts cut to max_prompt_length=%d (their beginning dropped), %d answers cut to fit "
            "block_size/max_completion_length, %d pairs dropped with no room for an answer",
            pair_stats.prompts_truncated,
            params.max_prompt_length,
            pair_stats.completions_truncated,
            pair_stats.dropped_no_room,
        )
        if getattr(pair_stats, "long_image_prompts", 0):
            log.info(_LONG_IMAGE_PROMPTS, pair_stats.long_image_prompts, params.max_prompt_length)
    log.info("first example as trained:\n%s", data.preview[:600])


_LONG_IMAGE_PROMPTS = "pairs: %d prompts that show images kept longer than max_prompt_length=%d (never cut)"


def shows_images(data: Any) -> bool:
    """Some example, pair or prompt of the train or valid split shows images."""
    if isinstance(getattr(data, "shows_images", None), bool):  # pairs (data/preference.PreferenceData)
        return data.shows_images
    return any(getattr(table, "images", None) is not None for table in (data.train, getattr(data, "valid", None)))


def _highest_token_id(data: Any, kind: str) -> int:
    """The largest token id of the tokenized data (the token tables know theirs)."""
    if kind == "examples":
        return max(table.max_id for table in (data.train, data.valid) if table is not None)
    highest = -1
    for item in [*data.train, *(data.valid or [])]:
        parts = {"pairs": ("prompt_ids", "chosen_ids", "rejected_ids"), "labeled": ("prompt_ids", "completion_ids")}
        ids = [getattr(item, part) for part in parts.get(kind, ("input_ids",))]
        highest = max(highest, *(max(part, default=-1) for part in ids))
    return highest


def microbatch(prep: Prepared) -> tuple[int, int]:
    """(rows per micro-batch, longest row in tokens): what the run's peak memory depends on."""
    kind, params = prep.method.data, prep.params
    longest = max(row_lengths(prep.train_rows))
    if kind == "prompts":  # each prompt's completions, each as long as the prompt plus a full completion
        from tunelab.methods.completions import completion_length

        return params.batch_size * params.completions_per_prompt, longest + completion_length(params)
    if getattr(params, "distill_lmbda", 0) or getattr(params, "distill_seq_kd", False):
        from tunelab.methods.completions import completion_length  # sampled answers: up to block_size long

        longest = min(params.block_size, longest + completion_length(params))
    # A pair batch holds chosen and rejected; a kto batch, its answers and (kto's own loss) the mismatched ones
    # of the KL estimate.
    kl_batch = kind == "labeled" and params.kto_loss_type == "kto"
    return params.batch_size * (2 if kind == "pairs" or kl_batch else 1), longest


def _report_model(model: Any, params: LLMParams) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %s on %s; %s trainable of %s parameters (%.2f%%); effective batch %d rows "
        "(batch_size x gradient_accumulation x processes)",
        params.model,
        device_name(),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
        params.batch_size * params.gradient_accumulation * params.num_processes * params.num_machines,
    )


def plan(params: LLMParams) -> RunPlan:
    """The dry run: what `run` would do, from the same `prepare`, with the first examples as trained."""
    prep = _with_checkpointing(prepare(params))
    params = prep.params
    data, stats, tokenizer = prep.data, prep.stats, prep.tokenizer
    kind = prep.method.data
    splits = []
    for name, examples, rows in (("train", data.train, prep.train_rows), ("valid", data.valid, prep.valid_rows)):
        if examples is None:
            continue
        lengths = examples.lengths if kind == "examples" else [len(e) for e in examples]
        count = len(method_rows(prep, examples)) if data_is_streamed(data) else len(rows or [])
        summary = SplitSummary(name, data.origins[name], len(examples), count, lengths)
        if data.skipped_rows.get(name):
            summary.notes.append(f"{data.skipped_rows[name]} bad rows skipped (bad_rows=skip)")
        splits.append(summary)
    train = splits[0]
    if kind == "prompts":
        from tunelab.methods.completions import completion_length

        length = completion_length(params)
        per_step = params.batch_size * params.gradient_accumulation * params.completions_per_prompt
        train.notes.append(f"{data.truncated} prompts cut to max_prompt_length={params.max_prompt_length}")
        weights = params.reward_weights or "1 each"
        train.notes.append(f"rewards: {params.reward_functions} (weights: {weights}), scored on every completion")
        if params.generation_kwargs:
            settings = ", ".join(f"{key}={value!r}" for key, value in params.generation_kwargs.items())
            train.notes.append(f"sampling also with generation_kwargs: {settings}")
        if params.tools:
            rounds = params.max_tool_calling_iterations
            train.notes.append(
                f"tools: {params.tools}: the model may call them while it writes (at most "
                f"{rounds if rounds else 'as many'} round(s) a completion); their turns count towards the {length} "
                "tokens, and are not trained on"
            )
        from tunelab.rewards import is_reward_model, reward_names

        models = list(filter(is_reward_model, reward_names(params.reward_functions)))
        if models:
            train.notes.append(
                f"reward model(s) {', '.join(models)}: loaded beside the policy when training starts (their weights "
                "are in the memory figure below, unless it says otherwise)"
            )
        train.notes.append(
            f"generation per step: {params.batch_size * params.gradient_accumulation} prompts x "
            f"{params.completions_per_prompt} completions x up to {length} tokens = up to {per_step * length:,} "
            "generated tokens (per process)"
        )
        together = params.steps_sampled_together
        if params.num_iterations > 1 or together > 1:
            from tunelab.methods.sampling import check_repeatable

            block = params.batch_size * params.gradient_accumulation * dry_run.processes(params)
            check_repeatable(train.rows, params.num_iterations, block, together)
            left = train.rows % (block * together)
            cycle = together * params.num_iterations
            said = []
            if together > 1:
                said.append(
                    f"steps_per_generation {params.steps_per_generation}: {together} steps' prompts sampled at once, "
                    "the later steps trained on completions of the policy before the earlier steps' updates"
                )
            if params.num_iterations > 1:
                said.append(
                    f"num_iterations {params.num_iterations}: each batch of completions trained on "
                    f"{params.num_iterations} times"
                )
            train.notes.append(
                "; ".join(said)
                + f" (generation once every {cycle} steps)"
                + (f"; the {left} prompts past the last whole sampling are left out of each epoch" if left else "")
            )
        rows, longest = microbatch(prep)  # each prompt's completions, prompt + full completion long
        sampled_prompts = params.batch_size * params.gradient_accumulation * together
        at_once = params.prompts_sampled_at_once
        sequences, cache = sampling_cache(prep.config, params, longest)  # one generate call's
        calls = -(-sampled_prompts // at_once)
        train.notes.append(
            f"generation: {calls} generate call(s) a sampling, {at_once} prompt(s) each; KV cache about "
            f"{cache / 2**20:,.0f} MiB ({sequences} sequences of up to {longest} tokens; lower "
            f"prompts_per_generation if it does not fit); training counts {rows} of them a micro-batch as rows"
        )
    elif kind in ("pairs", "labeled"):
        s = data.stats
        train.notes.append(
            f"{s.prompts_truncated} prompts cut to max_prompt_length={params.max_prompt_length}, "
            f"{s.completions_truncated} answers cut to fit, "
            f"{s.dropped_no_room} {'answers' if kind == 'labeled' else 'pairs'} dropped with no room for an answer"
        )
        if getattr(s, "long_image_prompts", 0):
            train.notes.append(_LONG_IMAGE_PROMPTS % (s.long_image_prompts, params.max_prompt_length))
    else:
        train.notes.append(
            f"{stats.truncated} truncated to block_size={params.block_size}, "
            f"{stats.dropped} dropped with nothing to learn (no answer tokens left)"
        )
    for part in getattr(data, "mixture", None) or []:
        train.notes.append(
            f"source {part['source']}: {part['taken']:,} of {part['examples']:,} examples, {part['tokens']:,} "
            f"tokens ({part['share']:.0%} of the mixture's tokens)"
        )
    train.notes += stats.notes
    examples = [_shown(item, tokenizer, kind) for item in data.train[:2]]
    rows_per_microbatch, longest = microbatch(prep)
    result = dry_run.new_plan(f"llm {params.trainer}", params, splits, examples, splits[0].rows, prep.resume_from)
    dry_run.add_memory(result, prep.config, params, rows_per_microbatch, longest, prep.method.model_kind)
    result.notes.append(f"gradient checkpointing: {prep.checkpointing}")
    if prep.rope_scaling:
        result.notes.append(f"positions: {positions.described(prep.rope_scaling)} (rope_scaling)")
    result.notes.append(_described(prep.prepared))
    if prep.method.model_kind == "causal_lm":
        from tunelab.inference.export import export_problem

        problem = export_problem(prep.config)
        result.notes.append(f"GGUF export: the model {problem}" if problem else "GGUF export: supported")
    return result


def data_is_streamed(data: Any) -> bool:
    return bool(getattr(data, "streamed", False))


def method_rows(prep: Prepared, examples: Any) -> Any:
    """A streamed run's rows of one split's first block (what the dry run can count)."""
    return prep.method.build_rows(examples, prep.params)[0]


def _shown(item: Any, tokenizer: Any, kind: str) -> str:
    """One example as trained, the tokens the loss is on between [[ ]] (a pair: both answers; a prompt: the
    completions the model will write)."""
    if kind == "prompts":
        return f"{tokenizer.decode(item.input_ids)}{TRAINED_OPEN}(sampled completions){TRAINED_CLOSE}"
    if kind == "examples":
        return marked_text(item.input_ids, item.labels, tokenizer)
    prompt = tokenizer.decode(item.prompt_ids, skip_special_tokens=False)
    if kind == "labeled":
        answer = tokenizer.decode(item.completion_ids, skip_special_tokens=False)
        return f"{prompt}{TRAINED_OPEN}{answer}{TRAINED_CLOSE}  ({'desirable' if item.desirable else 'undesirable'})"
    chosen = tokenizer.decode(item.chosen_ids, skip_special_tokens=False)
    rejected = tokenizer.decode(item.rejected_ids, skip_special_tokens=False)
    return f"{prompt}{TRAINED_OPEN}{chosen}{TRAINED_CLOSE}\n  rejected: {TRAINED_OPEN}{rejected}{TRAINED_CLOSE}"
