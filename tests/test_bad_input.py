"""CLI acceptance for bad input: exit code 2, one `tunelab: error:` line naming the problem, no traceback, and
nothing written (no project folder, no `.<name>.partial` staging folder)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD_ROWS = [{"text": f"Example number {i}: the quick brown fox jumps over the lazy dog."} for i in range(8)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def good_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)


def cli_args(model, data, project, *extra):
    return [
        "llm",
        "--train",
        "--model",
        str(model),
        "--data-path",
        str(data),
        "--trainer",
        "sft",
        "--max-steps",
        "2",
        "--block-size",
        "64",
        "--model-max-length",
        "128",
        "--project-name",
        str(project),
        *extra,
    ]


def error_line(capsys, code):
    """The one `tunelab: error:` line, after checking the exit code, the absence of a traceback and stray output."""
    out, err = capsys.readouterr()
    return check_error(code, out, err)


def check_error(code, out, err):
    assert code == 2, f"exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, f"stdout:\n{out}\nstderr:\n{err}"
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("tunelab: error:")]
    assert len(errors) == 1, f"expected exactly one error line, stderr:\n{err}"
    # anything else on stderr must be tunelab's own log lines, before the error
    assert lines[-1] == errors[0], f"the error is not the last line of stderr:\n{err}"
    assert all(line.startswith("tunelab: ") for line in lines), f"stray lines on stderr:\n{err}"
    assert "finished" not in out
    return errors[0]


def assert_nothing_written(project):
    assert not project.exists(), f"{project} was created"
    partial = project.with_name(f".{project.name}.partial")
    assert not partial.exists(), f"{partial} was left behind"
    assert not list(project.parent.glob(f".{project.name}*")), list(project.parent.iterdir())


def run_bad(capsys, tiny_llama, data, project, *extra, model=None):
    code = main(cli_args(model or tiny_llama, data, project, *extra))
    line = error_line(capsys, code)
    assert_nothing_written(project)
    return line


def test_missing_text_column(capsys, tmp_path, tiny_llama, good_data):
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", "--text-column", "nope")
    assert str(good_data) in line
    assert "'nope'" in line
    assert "not found (columns: text)" in line


def test_empty_data_file(capsys, tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl"
    data.write_text("", encoding="utf-8")
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line == f"tunelab: error: {data}: the file has no rows"


def test_empty_csv_file(capsys, tmp_path, tiny_llama):
    data = tmp_path / "train.csv"
    data.write_text("", encoding="utf-8")
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line == f"tunelab: error: {data}: the file is empty"


def test_malformed_jsonl_line(capsys, tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl"
    lines = [json.dumps(row) for row in GOOD_ROWS[:4]]
    lines.insert(2, '{"text": "broken", ')
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: {data} line 3: not valid JSON")


def test_empty_text_value(capsys, tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", [*GOOD_ROWS[:3], {"text": " "}, *GOOD_ROWS[3:]])
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert f"{data} line 4, column 'text': empty text" in line


def test_every_example_truncated_away(capsys, tmp_path, tiny_llama):
    """Prompts longer than block_size leave no answer tokens to learn from: say so, with the counts it refers to."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "word " * 300, "completion": "yes"}] * 3)
    project = tmp_path / "run"
    code = main(cli_args(tiny_llama, data, project))
    out, err = capsys.readouterr()
    line = check_error(code, out, err)
    assert_nothing_written(project)
    assert f"{data}: no training rows left" in line
    assert "of 3 examples, 3 were truncated to block_size=64 and 3 dropped" in line


def test_block_size_larger_than_model_max_length(capsys, tmp_path, tiny_llama, good_data):
    project = tmp_path / "run"
    args = cli_args(tiny_llama, good_data, project)
    args[args.index("--block-size") + 1] = "256"
    line = error_line(capsys, main(args))
    assert_nothing_written(project)
    assert "block_size (256)" in line
    assert "model_max_length (128)" in line


def test_unknown_chat_template(capsys, tmp_path, tiny_llama, good_data):
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", "--chat-template", "llama9")
    assert "chat_template" in line
    assert "'llama9'" in line
    assert "chatml" in line  # the allowed values are listed


def test_data_path_that_does_not_exist(capsys, tmp_path, tiny_llama):
    data = tmp_path / "missing" / "train.jsonl"
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert f"data_path {str(data)!r} does not exist" in line


def test_model_path_that_does_not_exist(capsys, tmp_path, tiny_llama, good_data):
    model = tmp_path / "no-such-model"
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", model=model)
    assert f"model {str(model)!r} does not exist" in line


def test_model_folder_without_config(capsys, tmp_path, tiny_llama, good_data):
    model = tmp_path / "empty-model"
    model.mkdir()
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", model=model)
    assert str(model) in line
    assert "no config.json" in line


def test_fp16_on_cpu(capsys, tmp_path, tiny_llama, good_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a CUDA machine")
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", "--mixed-precision", "fp16")
    assert "mixed_precision=fp16 needs a CUDA GPU" in line


def test_int4_on_cpu(capsys, tmp_path, tiny_llama, good_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("int4 can run on a CUDA machine")
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", "--peft", "--quantization", "int4")
    assert "quantization=int4 needs a CUDA GPU" in line


def test_int4_without_peft(capsys, tmp_path, tiny_llama, good_data):
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", "--quantization", "int4")
    assert "quantization=int4" in line
    assert "--peft" in line


def test_paged_optimizer_on_cpu(capsys, tmp_path, tiny_llama, good_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("bitsandbytes optimizers can run on a CUDA machine")
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", "--optimizer", "paged_adamw_8bit")
    assert "optimizer=paged_adamw_8bit" in line
    assert "CUDA" in line


def test_project_folder_that_already_exists(capsys, tmp_path, tiny_llama, good_data):
    project = tmp_path / "run"
    project.mkdir()
    (project / "keep.txt").write_text("precious", encoding="utf-8")
    (project / "sub").mkdir()
    (project / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    before = sorted((str(p.relative_to(project)), p.stat().st_mtime_ns) for p in project.rglob("*"))

    line = error_line(capsys, main(cli_args(tiny_llama, good_data, project)))
    assert f"project folder {project} already exists" in line
    after = sorted((str(p.relative_to(project)), p.stat().st_mtime_ns) for p in project.rglob("*"))
    assert after == before
    assert (project / "keep.txt").read_text(encoding="utf-8") == "precious"
    assert (project / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
    assert not (tmp_path / ".run.partial").exists()


def test_repeated_in_process_calls_log_each_line_once(capsys, tmp_path, tiny_llama, good_data):
    """Two bad runs in one process (as from the Python API or a notebook): later log lines are not duplicated."""
    for name in ("run1", "run2"):
        run_bad(capsys, tiny_llama, good_data, tmp_path / name, "--text-column", "nope")
    logging.getLogger("tunelab").info("probe line")
    out, err = capsys.readouterr()
    assert "Logging error" not in err
    assert err.splitlines().count("tunelab: probe line") == 1, f"stderr:\n{err}"


def test_console_script_malformed_jsonl(tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "fine"}\n{not json}\n', encoding="utf-8")
    project = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "tunelab", *cli_args(tiny_llama, data, project)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tunelab: error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"tunelab: error: {data} line 3: not valid JSON"), result.stderr
    assert result.stderr.splitlines()[-1] == errors[0], result.stderr
    assert_nothing_written(project)


def test_hub_dataset_and_model_out_of_reach(capsys, tmp_path, tiny_llama, good_data):
    """Hub ids are real code paths; with the hub out of reach (HF_HUB_OFFLINE=1 here) they fail at once, clearly."""
    line = run_bad(capsys, tiny_llama, "someone/some-dataset", tmp_path / "run")
    assert "hub dataset 'someone/some-dataset'" in line and "out of reach" in line
    args = cli_args(tiny_llama, good_data, tmp_path / "run2")
    args[args.index("--model") + 1] = "someone/some-model"
    line = error_line(capsys, main(args))
    assert "cannot download model 'someone/some-model'" in line and "out of reach" in line
    assert_nothing_written(tmp_path / "run2")
