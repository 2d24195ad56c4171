"""What lands on disk, and when: the run folder.

A run works in `.<project_name>.partial/` next to the final folder (checkpoints, metrics) and renames it to
`<project_name>/` only when everything is written, so a folder under the final name is always complete. A run that
stops early (crash, kill, NaN, full disk) leaves the staging folder with its complete checkpoints; the same command
resumes from the newest one.
It holds the adapter or model weights, the tokenizer with the chat template used in training, the parameters
(token redacted), the metrics, and a model card - everything `tunelab generate` needs.

This module is also the one reader of a finished run folder (`check_run_folder`, `read_run`, `training_params`,
`base_model_of`), for everything after training (inference/) and the web app.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tunelab.config.base import RunParams
from tunelab.data.cache import data_fingerprint, file_identities, template_files
from tunelab.env import distributed_kind
from tunelab.errors import TunelabError
from tunelab.models.freeze import is_freezing
from tunelab.models.peft import merge_into_base, quiet_peft_save, save_converted_adapter
from tunelab.models.turns import mark_turn_end
from tunelab.training import checkpoints

log = logging.getLogger("tunelab")

RUN_FILE = "tunelab_run.json"  # written last: its presence marks a complete run folder


class RunFolder:
    """The final folder of a run and its staging twin."""

    def __init__(self, project_name: str) -> None:
        self.final = Path(os.path.expanduser(project_name)).absolute()
        self.staging = self.final.with_name(f".{self.final.name}.partial")
        self.lock_file = self.final.with_name(f".{self.final.name}.lock")
        self._data: tuple[str | None] | None = None  # (the data's sha256,), worked out once (data_fingerprint)

    def check_free(self) -> None:
        """Refuse to start when the final folder exists (nothing is written by this check)."""
        if self.final.exists():
            raise TunelabError(
                f"project folder {self.final} already exists: choose another --project-name or remove it"
            )

    def resume_point(self, params: RunParams) -> Path | None:
        """The checkpoint to resume from: the newest complete one an interrupted run of this project left, when
        params.resume allows and the parameters are the same (checked here, before anything is loaded)."""
        checkpoint = checkpoints.last_complete_checkpoint(self.staging)
        if checkpoint is None or not params.resume:
            return None
        checkpoints.check_same_run(self.staging, params)
        checkpoints.check_same_data(self.staging, self.data_fingerprint(params))
        return checkpoint

    def data_fingerprint(self, params: RunParams, files: dict[str, Any] | None = None) -> str | None:
        """The sha256 of the run's data files and chat template files, worked out once (they may be gigabytes):
        from `files` when the data cache has hashed them already (data.cache.file_identities), else by hashing
        them. The spines ask for it once the data is checked, on every process before the model loads, so the main
        process does not hash while the others wait for it."""
        if self._data is None:
            files = files if files is not None else file_identities(params)
            self._data = (data_fingerprint(files, template_files(params)),)
        return self._data[0]

    def start(self, params: RunParams, resume_from: Path | None) -> Path:
        """Create (or, resuming, reopen) the staging folder; an unfinished run that is not resumed is removed.
        The project is locked first: a second run of it started meanwhile would otherwise resume into the folder
        the first is writing, or remove it."""
        self.hold()
        self.check_free()  # again, under the lock: a run of this project may have finished since prepare's check
        if resume_from is None and self.staging.exists():
            if checkpoints.checkpoints(self.staging) or (self.staging / "metrics.jsonl").exists():
                why = "it has no complete checkpoint" if params.resume else "--resume false"
                log.info("starting over: removing the unfinished run in %s (%s)", self.staging, why)
            shutil.rmtree(self.staging)  # (an empty one is transformers' Trainer making its output_dir)
        self.staging.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            for name in checkpoints.drop_incomplete(self.staging):
                log.info("removed %s: a crash left it half-written", name)
            checkpoints.trim_step_logs(self.staging, checkpoints.step_of(resume_from))
        write_json(self.staging / checkpoints.PARAMS_FILE, params.to_dict(redact=True))
        write_json(self.staging / checkpoints.DATA_FILE, {"sha256": self.data_fingerprint(params)})
        return self.staging

    def hold(self) -> None:
        """Lock the project for this process (an OS lock on `.<name>.lock`: the system releases it when the
        process ends, however it ends); TunelabError when another process holds it."""
        if self.lock_file in _HELD:
            return
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # lockf, not flock: a record lock belongs to the process, so a run retried in the same Python process
            # (the API, after an error) takes it again; another process cannot.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TunelabError(
                f"another run of {self.final.name} is writing to {self.staging} right now (it holds "
                f"{self.lock_file}): wait for it to end, or choose another --project-name"
            ) from None
        _HELD[self.lock_file] = fd

    def left_behind(self) -> str:
        """What a failed run leaves, for its error message."""
        last = checkpoints.last_complete_checkpoint(self.staging)
        if last is None:
            return f"No checkpoint was written; the unfinished run is in {self.staging}."
        return (
            f"The last complete checkpoint ({last.name}) is in {self.staging}: run the same command again to resume "
            "from it."
        )

    def open_for(self, trainer: Any, params: RunParams, resume_from: Path | None) -> Path:
        """`start` on the main process only (the others wait): with several processes, one writes."""
        if trainer.is_world_process_zero():
            self.start(params, resume_from)
        trainer.accelerator.wait_for_everyone()
        return self.staging

    def close_for(self, trainer: Any, params: RunParams) -> Path:
        """Once every process has written its part: the main process renames the folder and pushes it."""
        trainer.accelerator.wait_for_everyone()
        if not trainer.is_world_process_zero():
            return self.final
        final = self.finish()
        if params.push_to_hub:
            from tunelab.hub import push_folder

            repo_id = params.repo_id or f"{params.username}/{final.name}"
            try:
                log.info("pushed to %s", push_folder(str(final), repo_id, params.token))
            except TunelabError as err:  # the run is done: say so, and how to push it without training again
                raise TunelabError(
                    f"{err}. The run itself is complete in {final}; upload it later with `hf upload {repo_id} "
                    f"{final} --private` (huggingface_hub's CLI)"
                ) from None
        return final

    def finish(self) -> Path:
        """Move the staging folder to its final name in one rename, then drop its checkpoints (renamed first: a
        crash in between leaves a complete run with some checkpoints in it, not a staging folder without them
        that the next run would have to train again) and the lock."""
        for name in (checkpoints.PARAMS_FILE, checkpoints.DATA_FILE):  # training_params.json says the same
            (self.staging / name).unlink(missing_ok=True)
        os.replace(self.staging, self.final)
        for _, checkpoint in checkpoints.checkpoints(self.final):
            shutil.rmtree(checkpoint, ignore_errors=True)
        if self.lock_file in _HELD:
            self.lock_file.unlink(missing_ok=True)
        release_locks()
        return self.final


_HELD: dict[Path, int] = {}  # the project locks this process holds: lock file -> its open descriptor


def release_locks() -> None:
    """Let go of every project lock this process holds: a run ended, finished or failed (the Python API or a
    notebook lives on after a failed run, and other processes could not run that project until it exited)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


def beside_data(data: Path, output: str | None, suffix: str, command: str, kind: str) -> Path:
    """Where `command` writes what it made of a data file (checked before any model loads): `output`, or the data
    file's stem + `suffix` beside it; `kind` names the file in the message for an `output` that is a folder."""
    target = Path(output) if output else data.with_name(f"{data.stem}{suffix}")
    if target.is_dir():
        raise TunelabError(f"{command}: --output {target} is a folder; give the path of the {kind} to write")
    if not target.parent.is_dir():
        raise TunelabError(f"{command}: cannot write {target}: {target.parent} is not an existing folder")
    return target


@contextlib.contextmanager
def written_whole(target: Path, command: str, newline: str | None = None) -> Iterator[TextIO]:
    """A text file written through a temporary one beside it and renamed over `target` when the block ends without
    an error: the file appears whole or not at all. An OSError (a full disk, a read-only or missing folder) is one
    TunelabError naming `command` and the path, not a traceback."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline=newline) as file:
            yield file
        tmp.replace(target)
    except OSError as error:
        raise TunelabError(f"{command}: cannot write {target}: {error.strerror or error}") from error
    finally:
        with contextlib.suppress(OSError):  # gone after the rename; left only by a failure
            tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_model(trainer: Any, tokenizer: Any, folder: Path, template_source: str | None, processor: Any = None) -> None:
    """Weights (adapter or full model) in safetensors and the tokenizer carrying the training chat template (and a
    vision-language model's processor, with that tokenizer).

    Every process calls it: under FSDP or DeepSpeed the full weights are gathered from all of them; only the main
    process writes.
    """
    if template_source:
        tokenizer.chat_template = template_source
    # A full model's generation config says where its turns end (an adapter's base keeps its own; tunelab's chat,
    # generate and serve read the end from the tokenizer's template either way).
    mark_turn_end(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    with quiet_peft_save():
        trainer.save_model(str(folder))  # the tokenizer (trainer.processing_class) too
    if trainer.is_world_process_zero():
        (folder / "training_args.bin").unlink(missing_ok=True)  # transformers' pickle; training_params.json says it
        save_converted_adapter(trainer.accelerator.unwrap_model(trainer.model), folder)
        if processor is not None:
            save_processor(processor, tokenizer, folder)


def save_processor(processor: Any, tokenizer: Any, folder: Path) -> None:
    """A vision-language model's processor beside its weights, with the run's tokenizer and chat template in it (so
    AutoProcessor loads what training used)."""
    processor.tokenizer = tokenizer
    if getattr(tokenizer, "chat_template", None):
        processor.chat_template = tokenizer.chat_template
    processor.save_pretrained(folder)


def save_merged(model: Any, tokenizer: Any, folder: Path, processor: Any = None) -> None:
    """Merge a LoRA adapter into its base and save the full model (in the base's dtype)."""
    merged = merge_into_base(model)
    mark_turn_end(merged, tokenizer)
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if processor is not None:
        save_processor(processor, tokenizer, folder)


def model_reference(name: str) -> str:
    """How a run names its base model for later: a local folder or file by its absolute path (merge, export and
    evaluate --compare-base then work from any directory), a hub id as it is."""
    path = Path(os.path.expanduser(name))
    return str(path.absolute()) if path.exists() else name


def write_run(
    staging: Path,
    trainer: Any,
    tokenizer: Any,
    params: RunParams,
    template_source: str | None,
    metrics: dict[str, Any],
    run_info: dict[str, Any],
    processor: Any = None,
) -> None:
    """Everything a finished run leaves in its folder; tunelab_run.json last, as the mark of completeness.

    Called on every process (the weights may have to be gathered); the rest is written by the main process.
    """
    save_model(trainer, tokenizer, staging, template_source, processor)
    if not trainer.is_world_process_zero():
        return
    if run_info.get("merged") and distributed_kind():
        log.info("merge_adapter: skipped (weights sharded by %s); run `tunelab merge` on the run", distributed_kind())
        run_info["merged"] = None
    if run_info.get("merged"):
        save_merged(trainer.model, tokenizer, staging / run_info["merged"], processor)
    write_json(staging / "training_params.json", params.to_dict(redact=True))
    write_json(staging / "metrics.json", metrics)
    write_json(staging / "log_history.json", trainer.state.log_history)
    (staging / "README.md").write_text(model_card(params, run_info, metrics), encoding="utf-8")
    write_json(staging / RUN_FILE, run_info)


def _data_line(run: dict[str, Any]) -> str:
    if run.get("labels"):
        return "Labels: " + ", ".join(f"`{label}`" for label in run["labels"])
    return f"Rows: {run.get('row_format')}; chat template: {run.get('template') or 'none (text as is)'}"


def _data_sources(data_path: Any) -> str:
    """`data.jsonl`, or a mixture's sources one after the other."""
    if not isinstance(data_path, list):
        return f"`{data_path}`"
    return " + ".join(f"`{item['path'] if isinstance(item, dict) else item}`" for item in data_path)


def model_card(params: RunParams, run: dict[str, Any], metrics: dict[str, Any]) -> str:
    """A README.md for the run folder: what was trained on what, how, and how it went."""
    kind = (
        "LoRA adapter"
        if params.peft
        else "model fine-tuned in part (freeze training)"
        if is_freezing(params)
        else "fully fine-tuned model"
    )
    method = run.get("trainer") or params.trainer
    usage = run.get("usage") or f'tunelab generate --model {Path(params.project_name).name} "your prompt"'
    rows = "\n".join(f"| {k} | {_short(v)} |" for k, v in sorted(params.to_dict(redact=True).items()))
    shown = "\n".join(f"| {k} | {_short(v)} |" for k, v in sorted(metrics.items()))
    return f"""---
base_model: {params.model}
library_name: {"peft" if params.peft else "transformers"}
tags: [tunelab, {method}]
---
# {Path(params.project_name).name}

A {kind} of `{params.model}`, trained with [tunelab](https://pypi.org/project/tunelab/) (`{method}`
method) on {_data_sources(params.data_path)}.

- {_data_line(run)}
- Use it: `{usage}`

## Results
| metric | value |
| --- | --- |
{shown}

## Parameters
| parameter | value |
| --- | --- |
{rows}
"""


def _short(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


# ---- reading a finished run folder ------------------------------------------------------------------------------


def check_run_folder(path: str | Path, command: str) -> Path:
    """A folder that exists and holds a model (adapter or full weights); else one clear error for `command`."""
    folder = Path(os.path.expanduser(str(path)))
    if not folder.exists():
        raise TunelabError(f"{command}: {folder} does not exist (give a tunelab run folder or a model folder)")
    if not folder.is_dir():
        raise TunelabError(f"{command}: {folder} is not a folder (give a tunelab run folder or a model folder)")
    if not any((folder / name).is_file() for name in ("adapter_config.json", "config.json")):
        partial = folder.with_name(f".{folder.name}.partial")
        hint = f" ({partial} holds an unfinished run: run its command again to resume it)" if partial.exists() else ""
        raise TunelabError(f"{command}: {folder} holds no model (no adapter_config.json or config.json){hint}")
    return folder


def read_run(folder: str | Path) -> dict[str, Any]:
    """What a finished run says of itself (tunelab_run.json: trainer, base model, template, data, labels...);
    {} for a folder tunelab did not write (a plain model folder)."""
    return _read_json(Path(folder) / RUN_FILE)


def training_params(folder: str | Path) -> dict[str, Any]:
    """The parameters a run was trained with (token redacted); {} when the folder does not say."""
    return _read_json(Path(folder) / "training_params.json")


def base_model_of(folder: str | Path) -> str:
    """The base model an adapter run folder was trained from (its run record, else PEFT's adapter config)."""
    base = read_run(folder).get("base_model")
    if base:
        return base
    adapter = _read_json(Path(folder) / "adapter_config.json")
    if not adapter.get("base_model_name_or_path"):
        raise TunelabError(f"{folder}: the adapter does not say which base model it was trained from")
    return adapter["base_model_name_or_path"]


def load_base(folder: str | Path, loader: Callable[[Any], Any] | None = None) -> Any:
    """The base model of an adapter run folder, as the run trained on it: loaded by `loader` (a ModelSource ->
    model function; default a causal LM) and its rotary positions stretched as the run stretched them
    (rope_scaling: the base's own config does not say so, the run does, `rope_scaling_of_run`)."""
    from tunelab.models.load import load_causal_lm, resolve_model
    from tunelab.models.positions import stretch_model

    base = (loader or load_causal_lm)(resolve_model(base_model_of(folder)))
    return stretch_model(base, rope_scaling_of_run(folder))


def rope_scaling_of_run(folder: str | Path) -> dict[str, Any] | None:
    """How a run stretched its base's positions (models/positions.py), None for not at all: its record says, or,
    for a checkpoint-N/ folder, the run's beside it (finished), else the unfinished run's parameters."""
    folder = Path(folder)
    for place in (folder, folder.parent):
        record = read_run(place)
        if record:
            return record.get("rope_scaling")
    saved = _read_json(folder.parent / checkpoints.PARAMS_FILE)
    if not saved.get("rope_scaling"):
        return None
    from types import SimpleNamespace

    from tunelab.models.load import load_config, resolve_model
    from tunelab.models.positions import rope_scaling_of

    base = base_model_of(folder)
    fields = {"rope_scaling_factor": None, "block_size": 0, **saved}
    return rope_scaling_of(load_config(resolve_model(base)), SimpleNamespace(**fields), base)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TunelabError(f"{path}: damaged ({err}); the run folder was changed after tunelab wrote it") from None
    if not isinstance(data, dict):
        raise TunelabError(f"{path}: damaged (not a JSON object); the run folder was changed after tunelab wrote it")
    return data
