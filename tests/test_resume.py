"""A run killed with SIGKILL resumes from its last complete checkpoint and ends exactly where an uninterrupted run
ends; half-written checkpoints are ignored; a NaN loss or a full disk stops the run with a message, keeping the
last good checkpoint and no finished-looking folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_metrics
from tunelab.cli import main
from tunelab.training.checkpoints import COMPLETE_MARK

ROOT = Path(__file__).resolve().parents[1]
# Runs tunelab's CLI in a child process which, when KILL_AT_STEP is set, kills itself with SIGKILL right after
# the checkpoint of that step is complete: no cleanup, no atexit, as in a crash or an OOM kill.
CHILD = r"""
import os, signal, sys
from tunelab.training.callbacks import ProgressAndMetrics

kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
if kill_at:
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    ProgressAndMetrics.on_save = on_save

from tunelab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def twenty_rows(tmp_path) -> Path:
    lines = (ROOT / "samples" / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    path = tmp_path / "twenty.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _args(model: Path, data: Path, project: Path, *extra: str) -> list[str]:
    # 20 rows, 4 per optimizer step: 5 steps per epoch; 12 steps run into the third epoch. LoRA dropout is on, so
    # the random state must be restored too.
    return [
        "llm", "--train", "--model", str(model), "--data-path", str(data), "--project-name", str(project),
        "--trainer", "sft", "--peft", "--lora-r", "4", "--lora-dropout", "0.1", "--lr", "1e-3",
        "--batch-size", "2", "--gradient-accumulation", "2", "--max-steps", "12", "--save-steps", "4",
        "--save-total-limit", "1", "--logging-steps", "1", "--block-size", "128", "--model-max-length", "256",
        *extra,
    ]  # fmt: skip


def _run_child(args: list[str], kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT_STEP": str(kill_at), "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def _losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(folder) if "loss" in r}


def _final_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted_run(tiny_llama, twenty_rows, tmp_path):
    straight = tmp_path / "straight"
    done = _run_child(_args(tiny_llama, twenty_rows, straight))
    assert done.returncode == 0, done.stderr

    resumed = tmp_path / "resumed"
    staging = tmp_path / ".resumed.partial"
    killed = _run_child(_args(tiny_llama, twenty_rows, resumed), kill_at=8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not resumed.exists()  # nothing that looks finished
    assert (staging / "checkpoint-8" / COMPLETE_MARK).is_file()
    assert not (staging / "checkpoint-4").exists()  # save_total_limit 1: pruned once checkpoint-8 was complete
    # A crash while writing the next checkpoint leaves a folder without the mark: it must be ignored.
    half = staging / "checkpoint-10"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 100)

    again = _run_child(_args(tiny_llama, twenty_rows, resumed))
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr and "checkpoint-8" in again.stderr
    assert "removed checkpoint-10" in again.stderr
    assert not staging.exists()

    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    # The final figures are the whole run's, as the uninterrupted run's (Trainer's own cover the resumed part only)
    straight_metrics, resumed_metrics = _final_metrics(straight), _final_metrics(resumed)
    assert resumed_metrics["trained_tokens"] == straight_metrics["trained_tokens"] > 0
    assert resumed_metrics["train_loss"] == pytest.approx(straight_metrics["train_loss"], rel=1e-5)
    assert resumed_metrics["total_flos"] == straight_metrics["total_flos"]
    assert resumed_metrics["resumed_from_step"] == 8 and "resumed_from_step" not in straight_metrics
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_a_resumed_runs_final_figures_are_the_whole_runs(tiny_llama, twenty_rows, tmp_path):
    """train_loss is the mean of every step's loss, train_runtime the time of every part, the speeds from those:
    in metrics.json and in the summary that ends log_history.json and metrics.jsonl. Trainer's own figures, counted
    from the resume, covered the steps after it only (train_loss the mean of steps 9 to 12). The run is killed
    twice, the second time once its last checkpoint is written (as a crash while the run is saved): the part
    after that trains no step (its samples/s was 0)."""
    project, staging = tmp_path / "run", tmp_path / ".run.partial"
    killed = _run_child(_args(tiny_llama, twenty_rows, project), kill_at=8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first_part = next(r["time"] for r in read_metrics(staging) if r["step"] == 8 and "loss" in r)
    killed = _run_child(_args(tiny_llama, twenty_rows, project), kill_at=12)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    second_part = next(r["time"] for r in read_metrics(staging) if r["step"] == 12 and "loss" in r)
    again = _run_child(_args(tiny_llama, twenty_rows, project))
    assert again.returncode == 0, again.stderr

    metrics, records = _final_metrics(project), read_metrics(project)
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert metrics["train_loss"] == pytest.approx(sum(losses) / 12, rel=1e-5)
    assert metrics["resumed_from_step"] == 12
    history = json.loads((project / "log_history.json").read_text())
    assert [h["loss"] for h in history if "loss" in h] == losses
    for summary in (history[-1], records[-1]):  # Trainer's end-of-training record, in both logs
        for name in ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second"):
            assert summary[name] == metrics[name], name
    # metrics.jsonl's times count from the start of each part
    assert metrics["train_runtime"] >= first_part + 0.9 * second_part
    assert metrics["train_steps_per_second"] == pytest.approx(12 / metrics["train_runtime"], rel=1e-2)
    # 4 rows a step
    assert metrics["train_samples_per_second"] == pytest.approx(48 / metrics["train_runtime"], rel=1e-2)
    assert metrics["trained_tokens_per_second"] == pytest.approx(
        metrics["trained_tokens"] / metrics["train_runtime"], rel=1e-2
    )


def _labelled(folder: Path) -> Path:
    """24 training and 8 validation texts, labelled by whether they ask a question."""
    lines = (ROOT / "samples" / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["instruction"] for line in lines[:32]]
    folder.mkdir()
    for name, part in (("train", texts[:24]), ("valid", texts[24:])):
        rows = [{"text": t, "label": "question" if "?" in t else "other"} for t in part]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_a_resumed_classifiers_eval_report_holds_the_evaluations_before_the_resume(tiny_llama, tmp_path):
    """eval_report.json's per_evaluation: every epoch's evaluation and the final one, those before the crash
    included (it held only the evaluations of the process that finished the run)."""
    data = _labelled(tmp_path / "texts")
    project = tmp_path / "classifier"
    args = [
        "text-classification", "--train", "--model", str(tiny_llama), "--data-path", str(data),
        "--valid-split", "valid", "--target-column", "label", "--project-name", str(project), "--epochs", "3",
        "--batch-size", "4", "--logging-steps", "1", "--lr", "1e-3", "--warmup-ratio", "0",
    ]  # fmt: skip
    # 6 steps an epoch, an evaluation and a checkpoint at the end of each: killed once the second epoch's is written
    killed = _run_child(args, kill_at=12)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = _run_child(args)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr and "checkpoint-12" in again.stderr

    report = json.loads((project / "eval_report.json").read_text())
    history = json.loads((project / "log_history.json").read_text())
    evaluations = [h for h in history if "eval_accuracy" in h]
    assert [h["step"] for h in evaluations] == [6, 12, 18, 18]  # each epoch's, then the final evaluation
    assert len(report["per_evaluation"]) == 4
    for logged, kept in zip(evaluations, report["per_evaluation"], strict=True):
        assert kept["accuracy"] == pytest.approx(logged["eval_accuracy"], abs=1e-4)
        assert sum(map(sum, kept["confusion_matrix"])) == 8
    assert report["final"] == report["per_evaluation"][-1]
    metrics = _final_metrics(project)
    assert metrics["resumed_from_step"] == 12
    losses = [r["loss"] for r in read_metrics(project) if "loss" in r]
    assert len(losses) == 18 and metrics["train_loss"] == pytest.approx(sum(losses) / 18, rel=1e-5)


def test_resume_refuses_other_parameters_and_resume_false_starts_over(tiny_llama, twenty_rows, tmp_path, capsys):
    project = tmp_path / "run"
    killed = _run_child(_args(tiny_llama, twenty_rows, project), kill_at=4)
    assert killed.returncode == -signal.SIGKILL

    code = main([*_args(tiny_llama, twenty_rows, project), "--lr", "5e-4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "other parameters" in err and "lr: 0.001 then, 0.0005 now" in err and "--resume false" in err

    code = main([*_args(tiny_llama, twenty_rows, project), "--lr", "5e-4", "--resume", "false", "--max-steps", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "starting over" in err
    assert json.loads((project / "training_params.json").read_text())["lr"] == 5e-4


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(tiny_llama, twenty_rows, tmp_path, capsys):
    project = tmp_path / "nan"
    args = _args(tiny_llama, twenty_rows, project)
    # lr 1e30 turns the weights to inf on the first update: the second step's loss is not finite.
    code = main([*args, "--lr", "1e30", "--save-steps", "1", "--warmup-ratio", "0", "--max-grad-norm", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "at step 2" in err and "learning rate" in err and "checkpoint-1" in err
    assert "Traceback" not in err
    assert not project.exists()
    assert (tmp_path / ".nan.partial" / "checkpoint-1" / COMPLETE_MARK).is_file()


def test_low_disk_space_is_found_before_training(tiny_llama, twenty_rows, tmp_path, capsys, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    code = main(_args(tiny_llama, twenty_rows, tmp_path / "full"))
    err = capsys.readouterr().err
    assert code == 2
    assert "not enough disk space" in err and "GiB free" in err
    assert not (tmp_path / "full").exists() and not (tmp_path / ".full.partial").exists()


def test_checkpoints_of_a_lora_run_on_a_gguf_base_say_nothing_a_user_cannot_act_on(tiny_llama, twenty_rows, tmp_path):
    """PEFT looks up the base model's config.json at every adapter save; a GGUF base has none and an offline machine
    cannot fetch it, and PEFT warned about it at every checkpoint."""
    import warnings

    from tunelab.inference.export import export_gguf

    gguf = export_gguf(tiny_llama, tmp_path / "tiny.gguf", "f32")
    project = tmp_path / "lora-on-gguf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([*_args(gguf, twenty_rows, project), "--max-steps", "3", "--save-steps", "1"])
    assert code == 0 and (project / "adapter_config.json").is_file()
    noise = [str(w.message) for w in caught if "config file" in str(w.message) or "remote file" in str(w.message)]
    assert noise == []


def test_a_streamed_run_resumes_to_the_same_losses(tiny_llama, twenty_rows, tmp_path):
    """Streamed rows come in file order, the same on every pass: the resumed run skips what was trained."""
    straight = tmp_path / "straight"
    done = _run_child(_args(tiny_llama, twenty_rows, straight, "--streaming"))
    assert done.returncode == 0, done.stderr
    resumed = tmp_path / "resumed"
    killed = _run_child(_args(tiny_llama, twenty_rows, resumed, "--streaming"), kill_at=8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = _run_child(_args(tiny_llama, twenty_rows, resumed, "--streaming"))
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr and "prepared data: streamed" in again.stderr
    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_resume_refuses_changed_data_and_skips_a_torn_metrics_line(tiny_llama, twenty_rows, tmp_path, capsys):
    """The checkpoint's place in the data and its optimizer state belong to the rows it trained on: edited data, or
    an edited chat template file the rows are rendered through, is refused (both were resumed silently). A metrics
    line the kill cut in half does not stop the resumption."""
    from tunelab.data.templates import builtin_template

    template = tmp_path / "chat.jinja"
    template.write_text(builtin_template("chatml"), encoding="utf-8")
    project = tmp_path / "run"
    args = _args(tiny_llama, twenty_rows, project, "--chat-template", str(template))
    killed = _run_child(args, kill_at=4)
    assert killed.returncode == -signal.SIGKILL
    for edited, change in ((twenty_rows, lambda b: b.replace(b"a", b"b", 1)), (template, lambda b: b + b"{# #}")):
        original = edited.read_bytes()
        edited.write_bytes(change(original))
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "interrupted run of other data" in err and "--resume false" in err
        edited.write_bytes(original)

    metrics = tmp_path / ".run.partial" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo', encoding="utf-8")
    assert main(args) == 0, capsys.readouterr().err
    assert sorted(_losses(project)) == list(range(1, 13))


def test_a_second_run_of_a_project_in_progress_is_refused(tiny_llama, twenty_rows, tmp_path, capsys):
    """Another process holds the project (the OS lock a run takes when it starts writing): a second run of it is
    refused instead of resuming into, or removing, the folder the first is writing."""
    project = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, sys, time\nfd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / ".run.partial").mkdir()
        (tmp_path / ".run.partial" / "metrics.jsonl").write_text("{}\n")  # the other run's work so far
        assert main(_args(tiny_llama, twenty_rows, project, "--max-steps", "2")) == 2
        err = capsys.readouterr().err
        assert "another run of run is writing" in err and "Traceback" not in err
        assert (tmp_path / ".run.partial" / "metrics.jsonl").is_file()  # left alone
    finally:
        holder.kill()
        holder.wait()
    assert main(_args(tiny_llama, twenty_rows, project, "--max-steps", "2")) == 0  # the lock went with its holder
    assert not lock.exists()


def test_a_run_finished_but_killed_while_dropping_its_checkpoints_stays_finished(
    tiny_llama, twenty_rows, tmp_path, monkeypatch
):
    """The staging folder becomes the run folder first, then loses its checkpoints: a crash in between leaves a
    finished run (it used to leave a staging folder without checkpoints, which the next run trained again)."""
    import shutil

    real = shutil.rmtree
    project = tmp_path / "run"

    def crash_on_checkpoints(path, *args, **kwargs):
        if Path(path).name.startswith("checkpoint-") and Path(path).parent in (project, tmp_path / ".run.partial"):
            if (tmp_path / ".run.partial" / "tunelab_run.json").exists() or project.exists():
                raise KeyboardInterrupt  # the process dies here, while the finished run drops its checkpoints
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", crash_on_checkpoints)
    assert main(_args(tiny_llama, twenty_rows, project, "--max-steps", "2", "--save-steps", "1")) == 130
    monkeypatch.setattr(shutil, "rmtree", real)
    assert (project / "tunelab_run.json").is_file() and (project / "adapter_model.safetensors").is_file()
    assert not (tmp_path / ".run.partial").exists()


def test_checkpoints_marked_by_several_machines_are_pruned_on_one_that_cannot_see_them_all(tmp_path):
    """Without a shared disk the main machine never sees the other processes' random states: its marked
    checkpoints are pruned all the same (resume still checks them whole), or they would fill its disk."""
    from tunelab.training.checkpoints import checkpoints, mark_complete, prune

    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "rng_state_0.pth").write_bytes(b"x")
        mark_complete(folder, world_size=2)
    prune(tmp_path, keep=1)
    assert [path.name for _, path in checkpoints(tmp_path)] == ["checkpoint-6"]


def test_a_tr_dpo_run_resumes_with_the_reference_it_had_moved(tiny_llama, tmp_path):
    """sync_ref_model (TR-DPO): the reference moved towards the policy is kept in each checkpoint; a run killed
    after step 4 resumes with it, and its later losses (which compare with that reference) are the uninterrupted
    run's. The kept reference is the mix it should be: alpha x the policy + (1 - alpha) x the reference before."""
    pairs = [
        {"prompt": f"Question {i}: which colour is the sky?", "chosen": " Blue.", "rejected": f" Colour {i}, maybe."}
        for i in range(16)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")

    def args(project: Path) -> list[str]:
        return [
            "llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--project-name", str(project),
            "--trainer", "dpo", "--lr", "1e-3", "--batch-size", "4", "--gradient-accumulation", "1",
            "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "3", "--logging-steps", "1",
            "--block-size", "64", "--model-max-length", "128", "--max-prompt-length", "32",
            "--sync-ref-model", "true", "--ref-model-sync-steps", "2", "--ref-model-mixup-alpha", "0.5",
        ]  # fmt: skip

    straight = tmp_path / "straight"
    done = _run_child(args(straight))
    assert done.returncode == 0, done.stderr
    resumed = tmp_path / "resumed"
    killed = _run_child(args(resumed), kill_at=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    staging = tmp_path / ".resumed.partial"
    # checkpoint-2's reference: half the policy after step 2, half the starting model (the reference before)
    kept = load_file(staging / "checkpoint-2" / "synced_reference.safetensors")
    policy = load_file(staging / "checkpoint-2" / "model.safetensors")
    start = load_file(tiny_llama / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(kept[name], 0.5 * policy[name] + 0.5 * start[name])
    assert not torch.allclose(policy[name], start[name])

    again = _run_child(args(resumed))
    assert again.returncode == 0, again.stderr
    assert "the synced reference (sync_ref_model) read back" in again.stderr
    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    # `tunelab evaluate` compares with the starting reference (the moved one went with the checkpoints): said so
    from tunelab.inference.evaluate import evaluate_run

    results = evaluate_run(resumed, str(data), samples=0)
    assert "TR-DPO moved training's own" in results["reference"] and results["rows"] == 16
