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


@pytest.mark.parametrize("native", [False, True], ids=["no-bf16-instructions", "bf16-instructions"])
def test_bf16_on_a_cpu_is_advised_before_training(native, capsys, tmp_path, tiny_llama, good_data, monkeypatch):
    """bf16 on a CPU without bf16 instructions is emulated (slower than float32): a warning; on one with them,
    a run in float32 hears that bf16 would be faster. Both before anything loads (the dry run shows them)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU advice")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for precision in ("bf16", "no"):
        project = tmp_path / precision
        assert main(cli_args(tiny_llama, good_data, project, "--dry-run", "--mixed-precision", precision)) == 0
        err = capsys.readouterr().err
        slower = "mixed_precision=bf16 on a CPU without bf16 instructions" in err
        faster = "this CPU has bf16 instructions: mixed_precision bf16 can train faster" in err
        assert (slower, faster) == ((precision == "bf16" and not native), (precision == "no" and native)), err


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


# ------------------------------------------------------------------------ compressed, delimited and odd files


def compress(kind, data):
    """data compressed as gzip / bz2 / xz / zstd, the way the usual command-line tools write them."""
    import bz2
    import gzip
    import lzma

    import pyarrow as pa

    packers = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
    if kind == "zst":
        return pa.Codec("zstd").compress(data, asbytes=True)
    return packers[kind](data)


def csv_text(rows, delimiter=","):
    import csv
    import io

    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(list(rows[0]))
    writer.writerows([list(row.values()) for row in rows])
    return out.getvalue()


def dry_run(capsys, tiny_llama, data, project, *extra):
    """A `--dry-run` of the CLI (the data read, checked and tokenized as a run does it); its stdout and stderr."""
    code = main(cli_args(tiny_llama, data, project, "--dry-run", *extra))
    out, err = capsys.readouterr()
    assert code == 0, f"exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert_nothing_written(project)
    return out, err


def jsonl_bytes(rows):
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


# Two columns, and text holding both a comma and a semicolon: the delimiter matters, and is not fooled by the text.
TABLE_ROWS = [{"id": str(i), "text": f"Row {i}, the quick brown fox; jumps over the lazy dog."} for i in range(8)]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("train.jsonl.gz", lambda: compress("gz", jsonl_bytes(TABLE_ROWS))),
        ("train.jsonl.bz2", lambda: compress("bz2", jsonl_bytes(TABLE_ROWS))),
        ("train.csv.xz", lambda: compress("xz", csv_text(TABLE_ROWS).encode())),
        ("train.csv.zst", lambda: compress("zst", csv_text(TABLE_ROWS, ";").encode())),
        ("train.tsv.gz", lambda: compress("gz", csv_text(TABLE_ROWS, "\t").encode())),
        ("train.jsonl", lambda: compress("gz", jsonl_bytes(TABLE_ROWS))),  # gzip data without .gz in its name
        ("train.csv", lambda: csv_text(TABLE_ROWS, ";").encode()),
        ("train.csv", lambda: csv_text(TABLE_ROWS, "\t").encode()),
        ("train.csv", lambda: csv_text(TABLE_ROWS, "|").encode()),
    ],
)
def test_compressed_and_semicolon_files_train_like_plain_ones(capsys, tmp_path, tiny_llama, name, content):
    data = tmp_path / name
    data.write_bytes(content())
    out, _ = dry_run(capsys, tiny_llama, data, tmp_path / "run")
    assert f"train ({data}): 8 examples -> 8 rows" in out
    assert "ow 0, the quick brown fox; jumps over the lazy dog.</s>" in out


def test_folder_with_compressed_split_files(capsys, tmp_path, tiny_llama):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl.gz").write_bytes(compress("gz", jsonl_bytes(GOOD_ROWS)))
    (tmp_path / "data" / "valid.csv.zst").write_bytes(compress("zst", csv_text(GOOD_ROWS[:3], ";").encode()))
    out, _ = dry_run(capsys, tiny_llama, tmp_path / "data", tmp_path / "run", "--valid-split", "valid")
    assert f"train ({tmp_path / 'data' / 'train.jsonl.gz'}): 8 examples" in out
    assert f"valid ({tmp_path / 'data' / 'valid.csv.zst'}): 3 examples" in out


@pytest.mark.parametrize(("kind", "compression"), [("gz", "gzip"), ("bz2", "bz2"), ("xz", "xz"), ("zst", "zstd")])
def test_truncated_compressed_file(capsys, tmp_path, tiny_llama, kind, compression):
    data = tmp_path / f"train.jsonl.{kind}"
    packed = compress(kind, jsonl_bytes(GOOD_ROWS * 20))
    data.write_bytes(packed[: len(packed) // 2])
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: {data}: not a readable {compression} file (")
    assert "damaged or cut short" in line


def test_damaged_gzip_data_under_a_plain_name(capsys, tmp_path, tiny_llama):
    data = tmp_path / "train.csv"
    packed = compress("gz", csv_text(GOOD_ROWS).encode())
    data.write_bytes(packed[:20] + b"\x00" * 30 + packed[50:])
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: {data}: not a readable gzip file (")


def test_gz_name_on_a_file_that_is_not_compressed(capsys, tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl.gz"
    data.write_bytes(jsonl_bytes(GOOD_ROWS))
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line == (
        f"tunelab: error: {data}: not a readable gzip file (it does not start like one); "
        "if it is not compressed, drop .gz from its name"
    )


def test_bad_line_in_a_compressed_file_is_named_by_its_decompressed_line(capsys, tmp_path, tiny_llama):
    lines = [json.dumps(row) for row in GOOD_ROWS[:4]]
    lines.insert(2, '{"text": "broken", ')
    data = tmp_path / "train.jsonl.xz"
    data.write_bytes(compress("xz", ("\n".join(lines) + "\n").encode()))
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: {data} line 3: not valid JSON")


def test_compressed_file_whose_name_does_not_say_what_it_holds(capsys, tmp_path, tiny_llama):
    data = tmp_path / "train.gz"
    data.write_bytes(compress("gz", jsonl_bytes(GOOD_ROWS)))
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert (
        line == f"tunelab: error: {data}: the name does not say what the gzip file holds (name it like train.jsonl.gz)"
    )


def test_semicolon_csv_with_a_stray_field_names_the_delimiter(capsys, tmp_path, tiny_llama):
    rows = [{**row, "label": "1"} for row in GOOD_ROWS[:3]]
    data = tmp_path / "train.csv"
    data.write_text(csv_text(rows, ";") + "one;two;1\n", encoding="utf-8")
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line == f"tunelab: error: {data} line 5: 3 fields where the header has 2 (an unquoted semicolon or quote?)"


def test_semicolon_csv_column_is_found(capsys, tmp_path, tiny_llama):
    """A `;` file used to be read as one column named 'question;answer': 'column not found' misled."""
    rows = [{"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}; simple."} for i in range(8)]
    data = tmp_path / "train.csv"
    data.write_text(csv_text(rows, ";"), encoding="utf-8")
    out, _ = dry_run(
        capsys, tiny_llama, data, tmp_path / "run", "--prompt-text-column", "question", "--text-column", "answer"
    )
    assert f"train ({data}): 8 examples" in out
    assert "It is 0; simple." in out


def test_utf16_file_with_a_byte_order_mark(capsys, tmp_path, tiny_llama):
    data = tmp_path / "train.csv"
    data.write_bytes(csv_text(TABLE_ROWS, "\t").encode("utf-16"))  # Excel's "Unicode Text": UTF-16, tab-separated
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line == (
        f"tunelab: error: {data} line 1: not valid UTF-8 but UTF-16 (it starts with a UTF-16 byte-order mark); "
        "save the file as UTF-8 (Excel: CSV UTF-8)"
    )


def test_utf16_file_without_a_byte_order_mark(capsys, tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl_bytes(GOOD_ROWS).decode().encode("utf-16-le"))
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: {data} line 1: holds NUL characters, so it is not UTF-8 text (UTF-16")
    assert line.endswith("save the file as UTF-8")


def test_excel_workbook_saved_as_csv(capsys, tmp_path, tiny_llama):
    import zipfile

    data = tmp_path / "train.csv"
    with zipfile.ZipFile(data, "w") as book:
        book.writestr("xl/workbook.xml", "<workbook/>")
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line == (
        f"tunelab: error: {data}: not a .csv file but a zip archive (an Excel .xlsx workbook is one): "
        "save the sheet as CSV UTF-8, or unzip it"
    )


@pytest.mark.parametrize(("name", "hint"), [("train.xlsx", "save the sheet as CSV UTF-8"), ("train.txt", ".jsonl")])
def test_unsupported_file_type_says_what_to_do(capsys, tmp_path, tiny_llama, name, hint):
    data = tmp_path / name
    data.write_bytes(b"PK\x03\x04" if name.endswith("xlsx") else b"hello\n")
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: {data}: unsupported file type '{data.suffix}' (use .jsonl, .json, .csv")
    assert hint in line.split(")")[-1]


def test_json_lines_named_json_and_a_json_list_named_jsonl(capsys, tmp_path, tiny_llama):
    lines_file = tmp_path / "train.json"  # what `datasets`' Dataset.to_json writes
    lines_file.write_bytes(jsonl_bytes(GOOD_ROWS))
    out, _ = dry_run(capsys, tiny_llama, lines_file, tmp_path / "run")
    assert "8 examples" in out
    list_file = tmp_path / "list.jsonl"
    list_file.write_text(json.dumps(GOOD_ROWS, indent=2), encoding="utf-8")
    out, _ = dry_run(capsys, tiny_llama, list_file, tmp_path / "run")
    assert "8 examples" in out


def test_broken_json_list_named_jsonl_names_the_broken_line(capsys, tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl"
    text = json.dumps(GOOD_ROWS[:3], indent=2)  # '[', then 3 lines per row
    data.write_text(text.replace('"\n  },', '"\n  }', 1), encoding="utf-8")
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: {data} line 5: not valid JSON (Expecting ',' delimiter")


def test_split_that_is_a_folder(capsys, tmp_path, tiny_llama):
    (tmp_path / "data" / "train").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "train" / "part-0.jsonl", GOOD_ROWS)
    line = run_bad(capsys, tiny_llama, tmp_path / "data", tmp_path / "run")
    assert line.startswith(f"tunelab: error: {tmp_path / 'data' / 'train'} is a folder, where the data file of split")
    assert "merge the files in it into train.jsonl" in line


def test_valid_split_naming_a_missing_path(capsys, tmp_path, tiny_llama, good_data):
    """A valid_split with a slash used to reach pathlib's with_name() and end in a ValueError traceback."""
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", "--valid-split", "held/out")
    assert line.startswith(f"tunelab: error: no file for split 'held/out' in {tmp_path}")


def test_valid_split_that_is_a_folder(capsys, tmp_path, tiny_llama, good_data):
    (tmp_path / "valid").mkdir()
    line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run", "--valid-split", "valid")
    assert f"{tmp_path / 'valid'} is a folder, where the data file of split 'valid' is expected" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_data_file_that_cannot_be_read(capsys, tmp_path, tiny_llama, good_data):
    good_data.chmod(0)
    try:
        line = run_bad(capsys, tiny_llama, good_data, tmp_path / "run")
    finally:
        good_data.chmod(0o644)
    assert (
        line
        == f"tunelab: error: {good_data}: cannot read the file (permission denied); make it readable for this user"
    )


def test_data_file_that_even_root_cannot_read(capsys, tmp_path, tiny_llama):
    """A write-only sysctl file refuses reading to root too (as chmod 0 does not): behind a data file's name, it is
    first read to hash it for the prepared-data cache, which must give the readers' one line, not a traceback."""
    target = Path("/proc/sys/vm/compact_memory")
    try:
        target.open("rb").close()
    except PermissionError:
        pass
    except OSError:
        pytest.skip(f"no {target} here")
    else:
        pytest.skip(f"{target} is readable here")
    data = tmp_path / "train.jsonl"
    data.symlink_to(target)
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line == f"tunelab: error: {data}: cannot read the file (permission denied); make it readable for this user"


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("train_split: null\n", "train_split: a value is required"),
        ("train_split:\n", "train_split: a value is required"),
        ("text_column: ~\n", "text_column: a value is required"),
        ("data_path: null\n", "data_path: a value is required"),
        ("data_path:\n  - path: {data}\n    split: null\n", "data_path item 1: split: a value is required"),
    ],
    ids=["train_split", "empty", "text_column", "data_path", "mixture-split"],
)
def test_yaml_null_for_a_required_parameter(capsys, tmp_path, tiny_llama, good_data, lines, message):
    head = f"model: {tiny_llama}\ndata_path: {good_data}\ntrainer: sft\nproject_name: {tmp_path / 'run'}\n"
    if lines.startswith("data_path"):
        head = head.replace(f"data_path: {good_data}\n", "")
    config = write_config(tmp_path / "config.yaml", head + lines.format(data=good_data))
    line = error_line(capsys, main(["--config", str(config), "--dry-run"]))
    assert line.startswith(f"tunelab: error: {message}"), line
    assert_nothing_written(tmp_path / "run")


def test_yaml_null_valid_split_means_no_validation(tmp_path, good_data):
    from tunelab import load_config

    config = write_config(tmp_path / "config.yaml", f"data_path: {good_data}\nvalid_split: null\n")
    assert load_config(config).valid_split is None


# ------------------------------------------------------------------------ message content parts


def chat_rows(content):
    """Eight conversations whose second one has `content` as its user message's content."""
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(8)
    ]
    rows[1]["messages"][0]["content"] = content
    return rows


def test_message_content_text_parts_train(capsys, tmp_path, tiny_llama):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there?"}]
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(parts))
    out, _ = dry_run(capsys, tiny_llama, data, tmp_path / "run")
    assert f"train ({data}): 8 examples" in out
    assert "Hello, there?" in out


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "image"),
        ({"type": "image", "image": "cat.png"}, "image"),
        ({"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}, "audio"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "file"),
    ],
)
def test_message_media_part_is_a_bad_row(capsys, tmp_path, tiny_llama, part, kind):
    """A text model shown an image, or any model given audio or a file: tests/test_vision.py trains on images."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows([{"type": "text", "text": "What is this?"}, part]))
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    article = "an" if kind[0] in "aeiou" else "a"
    why = (
        "but the model reads text only: train a vision-language model on it, or drop the image parts"
        if kind == "image"
        else f"tunelab trains on text and images; drop the {kind} parts or describe them in text"
    )
    separator = ", " if kind == "image" else ": "
    assert line == (
        f"tunelab: error: 1 bad row(s) in {data}: {data} line 2, column 'messages': message 1 has {article} {kind} "
        f"part{separator}{why}; fix them, or set bad_rows: skip (--bad-rows skip) to leave them out"
    )


def content_part_problems(tmp_path):
    rows = chat_rows([{"text": "no type"}])
    rows[3]["messages"][1]["content"] = [{"type": "refusal", "refusal": "I cannot."}]
    rows[5]["messages"][0]["content"] = []
    rows[6]["messages"][1]["content"] = [{"type": "text", "text": 42}]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_content_part_problems_are_listed(capsys, tmp_path, tiny_llama):
    data = content_part_problems(tmp_path)
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: 4 bad row(s) in {data}: ")
    assert f"{data} line 2, column 'messages': message 1 has a content part without a \"type\"" in line
    assert f"{data} line 4, column 'messages': message 2 has a content part of unknown type 'refusal'" in line
    assert f"{data} line 6, column 'messages': message 1 has an empty list of content parts" in line
    assert f"{data} line 7, column 'messages': message 2 has a text part whose text is a number, not text" in line


def test_content_part_problems_skipped(capsys, tmp_path, tiny_llama):
    data = content_part_problems(tmp_path)
    out, err = dry_run(capsys, tiny_llama, data, tmp_path / "run", "--bad-rows", "skip")
    assert f"train ({data}): 4 examples" in out
    assert f"{data}: skipped 4 bad row(s) (bad_rows=skip)" in err


def test_preference_pair_with_an_image_part(capsys, tmp_path, tiny_llama):
    def turn(answer):
        question = [{"type": "text", "text": "What is in "}, {"type": "text", "text": "the picture?"}]
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    rows = [{"chosen": turn(f"A cat {i}."), "rejected": turn(f"A dog {i}.")} for i in range(8)]
    rows[2]["rejected"][1]["content"] = [{"type": "image_url", "image_url": {"url": "dog.png"}}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    dpo = ("--trainer", "dpo", "--max-prompt-length", "32")
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run", *dpo)
    assert f"1 bad row(s) in {data}: {data} line 3, column 'rejected': message 2 has an image part" in line
    rows[2]["rejected"][1]["content"] = [{"type": "text", "text": "A dog 2."}]
    write_jsonl(data, rows)
    out, _ = dry_run(capsys, tiny_llama, data, tmp_path / "run", *dpo)
    assert f"train ({data}): 8 examples -> 8 rows" in out
    assert "user\n    What is in the picture?<|im_end|>" in out  # the text parts, joined


def test_json_lines_saved_as_csv(capsys, tmp_path, tiny_llama):
    """Read as CSV, its header would be JSON fragments and the error a misleading 'column not found'."""
    data = tmp_path / "train.csv"
    data.write_bytes(jsonl_bytes(GOOD_ROWS))
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert line == (
        f"tunelab: error: {data}: holds JSON Lines, not CSV (its first line is a JSON object): name it .jsonl"
    )


def test_dpo_reference_model_that_does_not_exist(capsys, tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."}] * 4)
    project = tmp_path / "out"
    ref = str(tmp_path / "no-such-ref")
    code = main(
        cli_args(tiny_llama, data, project, "--trainer", "dpo", "--max-prompt-length", "32", "--model-ref", ref)
    )
    out, err = capsys.readouterr()
    line = check_error(code, out, err)
    assert "no-such-ref" in line and "does not exist" in line, line
    assert "trainable" not in err, "the base model was loaded before the reference was found missing"
    assert_nothing_written(project)
