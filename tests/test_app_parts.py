"""The app's small display parts, without a server or a model: the evaluation report as HTML, the log with short
paths, the metrics with readable labels, and the machine status strip."""

from __future__ import annotations

import json
import re
import shutil
import sys
import sysconfig
import types
from pathlib import Path

import pytest

from tunelab.app.machine import human_bytes, machine_status
from tunelab.app.render import markdown
from tunelab.app.results import log_tail, shown_log, shown_metrics
from tunelab.app.worker import LOG_FILE
from tunelab.inference.evaluate import Sample, write_report

CODE_ANSWER = 'Like this:\n\n```python\ndef greet(name):\n    return f"<script>alert({name})</script>"\n```\n\nDone.'
RESULTS = {"data": "valid.jsonl", "rows": 4, "model": "run", "eval_loss": 1.25, "eval_perplexity": 3.49}


def report_of(tmp_path: Path, samples: list[Sample]) -> str:
    """The report.md that `tunelab evaluate` writes for these samples (its own writer, no model needed)."""
    folder = tmp_path / "run"
    folder.mkdir()
    return (write_report(folder, dict(RESULTS), samples) / "report.md").read_text(encoding="utf-8")


def test_report_code_answer_is_one_code_block_with_its_lines_and_escaped(tmp_path):
    prompt = [{"role": "user", "content": "Write greet.\nKeep it short."}]
    html = markdown(report_of(tmp_path, [Sample(prompt, CODE_ANSWER, "Sure:\n- one\n- two")]))

    blocks = re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", html, flags=re.S)
    assert blocks == ["def greet(name):\n    return f&quot;&lt;script&gt;alert({name})&lt;/script&gt;&quot;"]
    assert "<script>" not in html and 'class="language-python"' in html
    assert "<p><b>Prompt:</b> Write greet.<br>Keep it short.</p>" in html  # one paragraph, its line break kept
    assert "<p><b>Reference:</b> Like this:</p>" in html and "<p>Done.</p>" in html
    assert "<p><b>Fine-tuned:</b> Sure:</p>\n<ul><li>one</li><li>two</li></ul>" in html
    assert "<table><tr><th>model</th>" in html and "<h3>Sample 1</h3>" in html


def test_report_answer_cut_inside_its_code_does_not_swallow_the_next_sample(tmp_path):
    cut = "```python\ndef greet(name):\n    return"  # generation stopped at max_new_tokens, fence never closed
    samples = [Sample("say hi", "hi", cut, base="<b>hello</b>"), Sample("say bye", "bye", "bye")]
    html = markdown(report_of(tmp_path, samples))

    assert (
        '<p><b>Fine-tuned:</b></p>\n<pre><code class="language-python">def greet(name):\n    return</code></pre>'
        in html
    )
    assert "<p><b>Base:</b> &lt;b&gt;hello&lt;/b&gt;</p>" in html
    assert "<h3>Sample 2</h3>" in html and "<p><b>Reference:</b> bye</p>" in html


def test_markdown_nested_lists_quotes_and_inline_code():
    html = markdown("1. first\n2. second\n   - inner `**not bold**`\n\n> quoted **bold**\n> on two lines")
    assert html == (
        "<ol><li>first</li><li>second\n<ul><li>inner <code>**not bold**</code></li></ul></li></ol>\n"
        "<blockquote><p>quoted <b>bold</b><br>on two lines</p></blockquote>"
    )


def test_shown_log_shortens_the_job_folder_and_site_packages(tmp_path):
    folder = tmp_path / "jobs" / "ab12"
    text = (
        f"$ -m tunelab.cli --config {folder}/config.yaml\n"
        f"saving {folder}/.run.partial/checkpoint-2 then {folder}/run\n"
        f"{folder}3/other stays\n"
        "/opt/my venv/lib/python3.12/site-packages/transformers/x.py:3: UserWarning: careful\n"
        '  File "/usr/lib/python3/dist-packages/yaml/y.py", line 9\n'
    )
    shown = shown_log(text, folder)
    assert shown.splitlines() == [
        "$ -m tunelab.cli --config ./config.yaml",
        "saving ./.run.partial/checkpoint-2 then ./run",
        f"{folder}3/other stays",
        # Another interpreter's folder with a space in it stays whole rather than cut in the middle.
        "/opt/my venv/lib/python3.12/site-packages/transformers/x.py:3: UserWarning: careful",
        '  File "dist-packages/yaml/y.py", line 9',
    ]
    ours = Path(sysconfig.get_paths()["purelib"]) / "pkg" / "m.py"
    assert shown_log(f"warning in {ours}", folder) == "warning in site-packages/pkg/m.py"


def test_log_tail_shortens_text_but_counts_the_file_bytes(tmp_path):
    folder = tmp_path / "jobs" / "ab12"
    folder.mkdir(parents=True)
    first = f"writing {folder}/run/model.safetensors\n".encode()
    (folder / LOG_FILE).write_bytes(first)
    job = {"folder": str(folder)}

    text, offset = log_tail(job, 0)
    assert text == "writing ./run/model.safetensors\n" and offset == len(first)
    with (folder / LOG_FILE).open("ab") as f:
        f.write(f"done: {folder}/run\n".encode())
    text, offset = log_tail(job, offset)
    assert text == "done: ./run\n" and offset == (folder / LOG_FILE).stat().st_size


def test_shown_metrics_labels_orders_and_hides():
    metrics = {
        "total_flos": 1.2e15,
        "train_runtime": 72.4,
        "train_samples_per_second": 3.14159,
        "epoch": 3.0,
        "eval_rewards/margins": 0.5,
        "eval_accuracy": 0.875,
        "train_loss": 1.23456,
        "eval_loss": 1.5,
        "rewards/format/mean": 0.25,
        "some_new_key": 7,
    }
    shown = shown_metrics(metrics)
    assert [key for key, _, _ in shown] == [
        "train_loss", "eval_loss", "eval_accuracy", "eval_rewards/margins", "rewards/format/mean",
        "train_runtime", "train_samples_per_second", "epoch", "some_new_key",
    ]  # fmt: skip
    labels = {key: (label, value) for key, label, value in shown}
    assert labels["train_runtime"] == ("training time", "1 min 12 s")
    assert labels["train_loss"] == ("training loss", "1.235")
    assert labels["eval_accuracy"] == ("eval accuracy", "87.5%")
    assert labels["eval_rewards/margins"] == ("eval reward margin", "0.5")
    assert labels["rewards/format/mean"] == ("reward format (mean)", "0.25")
    assert labels["train_samples_per_second"] == ("samples/s", "3.142")
    assert labels["epoch"] == ("epochs", "3")
    assert labels["some_new_key"] == ("some new key", "7")


def test_machine_status_reads_disk_ram_and_the_running_jobs_peak_memory(tmp_path):
    job = tmp_path / "jobs" / "ab12"
    staging = job / ".run.partial"
    staging.mkdir(parents=True)
    records = [{"step": 1, "loss": 2.0, "peak_memory_gib": 1.5}, {"step": 2, "loss": 1.9, "peak_memory_gib": 2.25}]
    lines = [json.dumps(r) for r in records] + [json.dumps({"step": 2, "eval_loss": 1.8}), '{"step": 3, "peak_']
    (staging / "metrics.jsonl").write_text("\n".join(lines), encoding="utf-8")

    status = machine_status(tmp_path, job)
    disk = shutil.disk_usage(tmp_path)
    assert status["disk_total_bytes"] == disk.total
    assert abs(status["disk_free_bytes"] - disk.free) < 64 * 2**20  # other processes write meanwhile
    assert status["peak_memory_gib"] == 2.25  # the latest record that has it; the half-written line skipped
    assert 0 < status["ram_available_bytes"] <= status["ram_total_bytes"]
    assert machine_status(tmp_path / "not-yet", None)["peak_memory_gib"] is None
    assert machine_status(tmp_path, tmp_path / "jobs" / "none")["peak_memory_gib"] is None

    (job / "run").mkdir()
    (job / "run" / "metrics.jsonl").write_text(json.dumps({"step": 9, "peak_memory_gib": 3}) + "\n")
    shutil.rmtree(staging)  # a finished job: its staging folder was renamed to run/
    assert machine_status(tmp_path, job)["peak_memory_gib"] == 3.0


def test_machine_status_asks_torch_only_when_it_is_there(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    status = machine_status(tmp_path)
    assert status["accelerator_used_bytes"] is None and "torch" not in sys.modules  # never imported for this

    cuda = types.SimpleNamespace(
        is_initialized=lambda: True,
        is_available=lambda: True,
        mem_get_info=lambda index: (30 * 2**30, 80 * 2**30),
        get_device_name=lambda index: "NVIDIA Test GPU",
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda, backends=types.SimpleNamespace()))
    status = machine_status(tmp_path)
    assert status["device"] == "NVIDIA Test GPU"
    assert (status["accelerator_used_bytes"], status["accelerator_total_bytes"]) == (50 * 2**30, 80 * 2**30)

    # CUDA not started in this process: no memory figures (asking would create a CUDA context here).
    monkeypatch.setattr(cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(cuda, "mem_get_info", lambda index: (_ for _ in ()).throw(AssertionError("asked")))
    assert machine_status(tmp_path)["accelerator_used_bytes"] is None

    monkeypatch.setattr(cuda, "is_available", lambda: False)
    assert re.fullmatch(r"CPU \(\d+ cores?\)", machine_status(tmp_path)["device"])


def test_human_bytes():
    assert [human_bytes(n) for n in (None, 512, 1536, 12.3 * 2**30, 5 * 2**50)] == [
        "", "512 B", "1.5 KiB", "12.3 GiB", "5120.0 TiB",
    ]  # fmt: skip


def test_each_method_gets_its_own_charts_from_what_it_logged():
    from tunelab.app.charts import charts, series

    dpo = [
        {"step": 1, "loss": 0.69, "learning_rate": 1e-4, "rewards/margins": 0.0, "rewards/accuracies": 0.5},
        {"step": 2, "loss": 0.6, "learning_rate": 9e-5, "rewards/margins": 0.3, "rewards/accuracies": 0.75},
        {"step": 2, "eval_loss": 0.62, "eval_rewards/margins": 0.2},
    ]
    drawn = {chart["id"]: chart for chart in charts(series(dpo))}
    assert list(drawn) == ["loss", "lr", "margin", "reward_accuracy"]
    assert drawn["loss"]["series"] == {"loss": [[1, 0.69], [2, 0.6]], "eval_loss": [[2, 0.62]]}
    assert set(drawn["margin"]["series"]) == {"rewards/margins", "eval_rewards/margins"}

    grpo = [
        {"step": s, "reward": 0.1 * s, "rewards/format_tag/mean": 0.2 * s, "rewards/format_tag/std": 0.1,
         "rewards/answer_tag/mean": 0.05 * s, "kl": 0.01, "completions/mean_length": 20 + s, "epoch": 0.1,
         "entropy": 2.0 - 0.1 * s, "aux_loss": 2.01, "tools/call_frequency": 0.5, "tools/failure_frequency": 0.0}
        for s in (1, 2, 3)
    ]  # fmt: skip
    drawn = {chart["id"]: chart for chart in charts(series(grpo))}
    assert set(drawn["reward"]["series"]) == {"reward", "rewards/format_tag/mean", "rewards/answer_tag/mean"}
    assert {"kl", "completion_length", "entropy", "aux_loss", "tools"} <= set(drawn) and "epoch" not in str(drawn)
    assert set(drawn["tools"]["series"]) == {"tools/call_frequency", "tools/failure_frequency"}
    assert drawn["aux_loss"]["series"] == {"aux_loss": [[1, 2.01], [2, 2.01], [3, 2.01]]}

    classifier = [{"step": 4, "eval_accuracy": 0.5, "eval_macro_f1": 0.4}, {"step": 8, "eval_accuracy": 0.7}]
    assert charts(series(classifier))[0]["series"]["eval_accuracy"] == [[4, 0.5], [8, 0.7]]


def test_only_the_parameters_that_differ_are_compared():
    from tunelab.app.charts import differing_params
    from tunelab.app.compare import parse_job_ids
    from tunelab.app.uploads import FieldError

    jobs = [
        {"params": {"lr": 1e-4, "epochs": 1, "project_name": "/a/run", "seed": 1}},
        {"params": {"lr": 1e-3, "epochs": 1, "project_name": "/b/run"}},
    ]
    assert differing_params(jobs) == [{"name": "lr", "values": [1e-4, 1e-3]}, {"name": "seed", "values": [1, None]}]
    assert parse_job_ids(["3", "1,3"]) == [3, 1]
    for bad in ("", "1,x", "²", "9" * 20, ",".join(map(str, range(1, 10)))):
        with pytest.raises(FieldError):
            parse_job_ids(bad)


def test_a_job_starting_frees_the_chat_models(tiny_llama, tmp_path):
    """The chat box keeps the last run it answered with loaded; on a GPU machine that would hold memory a job
    then trains on. The worker drops them as each job's process starts."""
    from tunelab.app.server import create_app
    from tunelab.inference.generate import GenerationParams

    app = create_app(tmp_path / "app", start_worker=False)
    state = app.state.tunelab
    assert state.worker.before_job == state.chat.release
    state.chat.answer(tiny_llama, [], "Hello", GenerationParams(max_new_tokens=2))
    assert state.chat._loaded is not None
    state.worker.before_job()
    assert state.chat._loaded is None and state.chat._base is None


def test_report_chosen_answer_cut_inside_its_code_is_closed_at_the_rejected_label(tmp_path):
    """A preference sample's chosen answer, cut to max_completion_length inside its code, ends at **Rejected:**."""
    cut = "```python\ndef greet(name):\n    return"
    samples = [Sample("say hi", cut, "hi", rejected="```python\nprint(1)\n```"), Sample("say bye", "bye", "bye")]
    html = markdown(report_of(tmp_path, samples))

    blocks = re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", html, flags=re.S)
    assert blocks == ["def greet(name):\n    return", "print(1)"]
    assert "<p><b>Reference:</b></p>" in html and "<p><b>Rejected:</b></p>" in html
    assert "<p><b>Fine-tuned:</b> hi</p>" in html and "<h3>Sample 2</h3>" in html


def test_shown_metrics_labels_a_reward_model_s_figures():
    shown = shown_metrics({"eval_mean_reward": 0.1, "eval_margin": 1.5, "eval_accuracy": 0.75, "train_runtime": 3.0})
    assert shown == [
        ("eval_accuracy", "eval accuracy", "75.0%"),
        ("eval_margin", "eval reward margin", "1.5"),
        ("eval_mean_reward", "eval mean reward", "0.1"),
        ("train_runtime", "training time", "3.0 s"),
    ]


def test_killing_a_job_s_group_also_kills_its_processes_in_sessions_of_their_own(tmp_path):
    """A distributed run's workers are started by torch's agent in sessions of their own: a SIGKILL to the job's
    process group alone would leave them training, orphaned."""
    import os
    import subprocess
    import time

    import psutil

    from tunelab.app.worker import kill_group

    starts = (
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print(worker.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    job = subprocess.Popen([sys.executable, "-c", starts], stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = int(job.stdout.readline())
    assert os.getpgid(worker) != job.pid  # out of the job's group
    kill_group(job.pid)
    job.wait(timeout=10)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the worker outlived its job"
        time.sleep(0.05)
