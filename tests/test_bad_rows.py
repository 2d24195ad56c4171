"""Bad rows (issue 6, data): every kind is named by file, line (or row) and column before any weight loads, with
no traceback and no folder left behind; `bad_rows: skip` drops and counts them; the loaders never crash on any
input (a property-based test)."""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tunelab
from tests.test_bad_input import assert_nothing_written, check_error
from tunelab.cli import main
from tunelab.data import load_data
from tunelab.data.classification import load_labelled_data
from tunelab.data.preference import load_preference_data
from tunelab.errors import DataError, TunelabError

TEXT = [{"text": f"Example number {i}: the quick brown fox jumps over the lazy dog."} for i in range(3)]
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    }
    for i in range(3)
]
ALPACA = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 1)))} for i in range(3)]
PAIRS = [{"prompt": f"Is {i} even?", "chosen": "Let me think: yes.", "rejected": "No idea."} for i in range(3)]
CHAT_PAIRS = [
    {
        "chosen": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Go away."}],
    }
    for i in range(3)
]


# ---------------------------------------------------------------------------------------------- writing files


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def jsonl_lines(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def conversation(*turns: tuple) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def with_bad(good: list[dict], bad) -> list:
    """Two good rows, the bad one (line 3 / row 3), then another good row."""
    return [*good[:2], bad, good[2]]


def csv_bytes(header: list[str], rows: list[list], bom: bool = False) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8-sig" if bom else "utf-8")


def parquet_writer(columns: dict[str, list], types: dict | None = None) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(name, (types or {}).get(name, pa.string())) for name in columns])
        pq.write_table(pa.table(columns, schema=schema), path)

    return write


def deeply_nested() -> str:
    return '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class Case:
    file: str  # the data file's name (its extension picks the reader)
    content: bytes | Callable[[Path], None]
    where: str | None  # "line 3" / "row 3" / None for problems of the file as a whole
    column: str | None  # the column at fault, None when the problem is not one cell's
    reason: str  # a part of the message that says what is wrong
    extra: tuple[str, ...] = ()


DPO = ("--trainer", "dpo", "--max-prompt-length", "32")
CHAT_ROWS = [row["messages"] for row in CHAT]

CASES = {
    # plain text rows
    "empty text": Case("t.jsonl", jsonl(with_bad(TEXT, {"text": ""})), "line 3", "text", "empty text"),
    "whitespace-only text": Case("t.jsonl", jsonl(with_bad(TEXT, {"text": " \t "})), "line 3", "text", "empty text"),
    "null text": Case("t.jsonl", jsonl(with_bad(TEXT, {"text": None})), "line 3", "text", "missing value"),
    "text key absent": Case("t.jsonl", jsonl(with_bad(TEXT, {"other": "x"})), "line 3", "text", "missing value"),
    "boolean text": Case("t.jsonl", jsonl(with_bad(TEXT, {"text": True})), "line 3", "text", "got true/false"),
    "object as text": Case("t.jsonl", jsonl(with_bad(TEXT, {"text": {"a": 1}})), "line 3", "text", "got an object"),
    "list of strings as text": Case(
        "t.jsonl", jsonl(with_bad(TEXT, {"text": ["a", "b"]})), "line 3", "text", "expected text, got a list"
    ),
    "NaN as text": Case(
        "t.jsonl",
        jsonl_lines([json.dumps(r) for r in TEXT[:2]] + ['{"text": NaN}', json.dumps(TEXT[2])]),
        "line 3",
        "text",
        "missing value (NaN)",
    ),
    "Infinity as text": Case(
        "t.jsonl",
        jsonl_lines([json.dumps(r) for r in TEXT[:2]] + ['{"text": -Infinity}', json.dumps(TEXT[2])]),
        "line 3",
        "text",
        "got the number -inf",
    ),
    "lone surrogate": Case(
        "t.jsonl", jsonl(with_bad(TEXT, {"text": "caf\ud800"})), "line 3", "text", "half of a UTF-16 surrogate pair"
    ),
    # JSONL lines that are not rows
    "malformed JSON line": Case(
        "t.jsonl", jsonl_lines([json.dumps(r) for r in TEXT[:2]] + ['{"text": "cut']), "line 3", None, "not valid JSON"
    ),
    "JSON line that is a list": Case(
        "t.jsonl", jsonl(with_bad(TEXT, ["text", "x"])), "line 3", None, "expected a JSON object, got list"
    ),
    "number of 5000 digits": Case(
        "t.jsonl",
        jsonl_lines([json.dumps(r) for r in TEXT[:2]] + ['{"text": ' + "7" * 5000 + "}"]),
        "line 3",
        None,
        "4300 digits",
    ),
    "nesting too deep": Case(
        "t.jsonl", jsonl_lines([json.dumps(r) for r in TEXT[:2]] + [deeply_nested()]), "line 3", None, "too deeply"
    ),
    "invalid UTF-8 in JSONL": Case(
        "t.jsonl", jsonl(TEXT[:2]) + b'{"text": "caf\xe9"}\n', "line 3", None, "not valid UTF-8 (byte 0xe9)"
    ),
    # conversations
    "unknown role": Case(
        "c.jsonl",
        jsonl(with_bad(CHAT, conversation(("user", "Hi"), ("bot", "Yo")))),
        "line 3",
        "messages",
        "message 2 has unknown role 'bot'",
    ),
    "missing role": Case(
        "c.jsonl",
        jsonl(with_bad(CHAT, {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Yo"}]})),
        "line 3",
        "messages",
        "message 1 has unknown role None",
    ),
    "no assistant turn": Case(
        "c.jsonl",
        jsonl(with_bad(CHAT, conversation(("system", "Be kind."), ("user", "Hi")))),
        "line 3",
        "messages",
        "no assistant message to learn from",
    ),
    "null message content": Case(
        "c.jsonl",
        jsonl(with_bad(CHAT, conversation(("user", "Hi"), ("assistant", None)))),
        "line 3",
        "messages",
        "message 2 has no content",
    ),
    "tool call without a function name": Case(
        "c.jsonl",
        jsonl(
            with_bad(
                CHAT,
                {
                    "messages": [
                        {"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "c1"}]},
                        {"role": "tool", "content": "18 C"},
                        {"role": "assistant", "content": "18 C and sunny."},
                    ]
                },
            )
        ),
        "line 3",
        "messages",
        "message 2 has a tool call without a function name",
    ),
    "tool call whose arguments are not an object": Case(
        "c.jsonl",
        jsonl(
            with_bad(
                CHAT,
                {
                    "messages": [
                        {"role": "user", "content": "Weather in Paris?"},
                        {
                            "role": "assistant",
                            "tool_calls": [{"function": {"name": "get_weather", "arguments": "[1]"}}],
                        },
                        {"role": "tool", "content": "18 C"},
                        {"role": "assistant", "content": "18 C and sunny."},
                    ]
                },
            )
        ),
        "line 3",
        "messages",
        "message 2 has a tool call to 'get_weather' whose arguments are not a JSON object",
    ),
    "tool call the chat template does not write": Case(
        "c.jsonl",
        jsonl(
            with_bad(
                CHAT,
                {
                    "messages": [
                        {"role": "user", "content": "Weather?"},
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                            ],
                        },
                    ]
                },
            )
        ),
        "line 3",
        "messages",
        "the chat template does not write its tool calls: use a template that does",
    ),
    "message content that is a number": Case(
        "c.jsonl",
        jsonl(with_bad(CHAT, conversation(("user", "Hi"), ("assistant", 4)))),
        "line 3",
        "messages",
        "message 2 content is not text (got a number)",
    ),
    "message that is a string": Case(
        "c.jsonl",
        jsonl(with_bad(CHAT, {"messages": ["Hi", {"role": "assistant", "content": "Yo"}]})),
        "line 3",
        "messages",
        "message 1 is not an object (got text)",
    ),
    "empty message list": Case(
        "c.jsonl", jsonl(with_bad(CHAT, {"messages": []})), "line 3", "messages", "got an empty list"
    ),
    "ShareGPT unknown speaker": Case(
        "c.jsonl",
        jsonl(
            [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}] * 2
            + [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Yo"}]}]
        ),
        "line 3",
        "conversations",
        "unknown role 'robot'",
    ),
    "messages cell holding a JSON object (CSV)": Case(
        "c.csv",
        csv_bytes(["text"], [[json.dumps(m)] for m in CHAT_ROWS[:2]] + [['{"role": "user", "content": "Hi"}']]),
        "line 4",
        "text",
        "expected a non-empty list of {role, content} messages, got an object",
    ),
    "messages cell with broken JSON (CSV)": Case(
        "c.csv",
        csv_bytes(["text"], [[json.dumps(m)] for m in CHAT_ROWS[:2]] + [['[{"role": "user"']]),
        "line 4",
        "text",
        "not a JSON list of messages",
    ),
    # instructions, prompt/completion
    "Alpaca output missing": Case(
        "a.jsonl",
        jsonl(with_bad(ALPACA, {"instruction": "Say hi.", "input": ""})),
        "line 3",
        "output",
        "missing value",
    ),
    "Alpaca instruction that is a list": Case(
        "a.jsonl",
        jsonl(with_bad(ALPACA, {"instruction": ["Say", "hi"], "input": "", "output": "hi"})),
        "line 3",
        "instruction",
        "expected text, got a list",
    ),
    "empty completion (CSV)": Case(
        "p.csv",
        csv_bytes(["prompt", "completion"], [["Say hi.", "hi"], ["Say yo.", "yo"], ["Say no.", ""]]),
        "line 4",
        "completion",
        "empty text",
    ),
    # CSV damage
    "CSV row with more fields than the header": Case(
        "t.csv",
        b"text\nfine\nalso fine\nwith, a comma\n",
        "line 4",
        None,
        "2 fields where the header has 1",
    ),
    "invalid UTF-8 in CSV": Case("t.csv", b"text\nfine\nalso fine\ncaf\xe9\n", "line 4", None, "not valid UTF-8"),
    "CSV with a BOM and an empty cell": Case(
        "t.csv", csv_bytes(["text"], [["fine"], ["also fine"], [""]], bom=True), "line 4", "text", "empty text"
    ),
    "UTF-16 file": Case("t.csv", "text\nfine\n".encode("utf-16"), "line 1", None, "not valid UTF-8"),
    # JSON files
    "JSON file that is not a list": Case("t.json", b'"just a string"', None, None, "expected a JSON list of objects"),
    "JSON item that is not an object": Case(
        "t.json", json.dumps(with_bad(TEXT, "text")).encode(), "item 3", None, "expected a JSON object, got str"
    ),
    "empty text in a JSON list": Case(
        "t.json", json.dumps(with_bad(TEXT, {"text": ""})).encode(), "row 3", "text", "empty text"
    ),
    # Parquet
    "Parquet null text": Case(
        "t.parquet", parquet_writer({"text": ["one two", "three four", None]}), "row 3", "text", "missing value"
    ),
    "Parquet NaN as pandas writes it": Case(
        "t.parquet",
        parquet_writer({"text": [1.5, 2.5, float("nan")]}, types={"text": __import__("pyarrow").float64()}),
        "row 3",
        "text",
        "missing value (NaN)",
    ),
    "Parquet binary text": Case(
        "t.parquet",
        parquet_writer({"text": [b"one", b"two", b"three"]}, types={"text": __import__("pyarrow").binary()}),
        "row 1",
        "text",
        "expected text, got binary data",
    ),
    # preference pairs
    "null rejected": Case(
        "d.jsonl", jsonl(with_bad(PAIRS, {**PAIRS[0], "rejected": None})), "line 3", "rejected", "missing value", DPO
    ),
    "chosen that is a number list": Case(
        "d.jsonl", jsonl(with_bad(PAIRS, {**PAIRS[0], "chosen": [1, 2]})), "line 3", "chosen", "got a list", DPO
    ),
    "pair of texts with no shared prompt": Case(
        "d.jsonl",
        jsonl([{"chosen": "Q: hi? A: yes", "rejected": "Q: hi? A: no"}] * 2 + [{"chosen": "yes", "rejected": "no"}]),
        "line 3",
        "chosen",
        "no prompt: chosen and rejected share no beginning",
        DPO,
    ),
    "chat pair with a text rejected": Case(
        "d.jsonl",
        jsonl(with_bad(CHAT_PAIRS, {**CHAT_PAIRS[0], "rejected": "Go away."})),
        "line 3",
        "rejected",
        "not a JSON list of messages",
        DPO,
    ),
    "chat pair without an assistant answer": Case(
        "d.jsonl",
        jsonl(with_bad(CHAT_PAIRS, {**CHAT_PAIRS[0], "rejected": [{"role": "user", "content": "Hi 0"}]})),
        "line 3",
        "rejected",
        "no assistant answer after the prompt",
        DPO,
    ),
    "text pair among chat pairs": Case(
        "d.jsonl",
        jsonl([{"chosen": "Hi? Yes", "rejected": "Hi? No"}, *CHAT_PAIRS]),
        "line 2",
        "chosen",
        "a list of messages, where the other rows hold text",
        DPO,
    ),
    # lengths
    "every prompt too long for block_size": Case(
        "p.jsonl",
        jsonl([{"prompt": "word " * 300, "completion": "yes"}] * 3),
        None,
        None,
        "no training rows left",
    ),
}


def write_case(folder: Path, case: Case) -> Path:
    path = folder / case.file
    if isinstance(case.content, bytes):
        path.write_bytes(case.content)
    else:
        case.content(path)
    return path


def train_args(model: Path, data: Path, project: Path, *extra: str) -> list[str]:
    return [
        "llm", "--train", "--model", str(model), "--data-path", str(data), "--project-name", str(project),
        "--trainer", "sft", "--max-steps", "2", "--block-size", "64", "--model-max-length", "128", *extra,
    ]  # fmt: skip


def test_the_table_has_at_least_twenty_kinds_of_bad_rows():
    assert len(CASES) >= 20
    assert {Path(case.file).suffix for case in CASES.values()} == {".jsonl", ".csv", ".json", ".parquet"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_row_is_named_by_file_line_and_column(name, tmp_path, tiny_llama, capsys):
    case = CASES[name]
    data = write_case(tmp_path, case)
    project = tmp_path / "run"
    code = main(train_args(tiny_llama, data, project, *case.extra))
    out, err = capsys.readouterr()
    line = check_error(code, out, err)  # exit code 2, one `tunelab: error:` line, no traceback
    assert_nothing_written(project)
    assert str(data) in line
    if case.where:
        assert f"{data} {case.where}" in line, line
    if case.column:
        assert f"{case.where}, column {case.column!r}: " in line, line
    assert case.reason in line, line


def test_the_error_lists_the_first_rows_and_counts_the_rest(tmp_path, tiny_llama, capsys):
    data = tmp_path / "t.jsonl"
    data.write_bytes(jsonl([TEXT[0], *[{"text": ""}] * 7, TEXT[1]]))
    line = check_error(main(train_args(tiny_llama, data, tmp_path / "run")), *capsys.readouterr())
    assert line.startswith(f"tunelab: error: 7 bad row(s) in {data}: {data} line 2, column 'text': empty text; ")
    assert f"{data} line 6, column 'text': empty text (and 2 more)" in line
    assert "line 7" not in line
    assert line.endswith("fix them, or set bad_rows: skip (--bad-rows skip) to leave them out")


# ---------------------------------------------------------------------------------------------- bad_rows: skip


@pytest.fixture
def tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    return tok


def llm_params(data: Path, **overrides) -> tunelab.LLMParams:
    values = {"model": "unused", "data_path": str(data), "trainer": "sft", "block_size": 64, "model_max_length": 128}
    return tunelab.LLMParams(**{**values, **overrides})


def test_skip_drops_bad_rows_counts_them_and_trains(tmp_path, tiny_llama, capsys):
    rows = [*CHAT, {"messages": []}, {"messages": [{"role": "bot", "content": "x"}]}, {"messages": None}]
    data = tmp_path / "c.jsonl"
    data.write_bytes(jsonl(rows))
    project = tmp_path / "run"
    code = main(train_args(tiny_llama, data, project, "--bad-rows", "skip", "--peft"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err
    assert project.is_dir()
    assert not project.with_name(f".{project.name}.partial").exists()
    warning = next(line for line in err.splitlines() if "bad row(s)" in line)
    assert f"{data}: skipped 3 bad row(s) (bad_rows=skip): {data} line 4, column 'messages': " in warning
    assert f"{data} line 5, column 'messages': message 1 has unknown role 'bot'" in warning
    assert f"{data} line 6, column 'messages': missing value" in warning


def test_skip_records_the_count_per_split(tmp_path, tokenizer, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl(with_bad(TEXT, {"text": ""}) + [{"text": None}]))
    (folder / "valid.jsonl").write_bytes(jsonl([*TEXT, {"text": 3.5}, {"text": False}]))
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        data = load_data(llm_params(folder, valid_split="valid", bad_rows="skip"), tokenizer)
    assert data.skipped_rows == {"train": 2, "valid": 1}  # 3.5 is text ("3.5"); false is not
    assert len(data.train) == 3 and len(data.valid) == 4
    assert any("skipped 2 bad row(s)" in record.getMessage() for record in caplog.records)
    with pytest.raises(DataError, match=r"2 bad row\(s\) in .*train.jsonl: .*line 3, column 'text': empty text"):
        load_data(llm_params(folder, valid_split="valid"), tokenizer)


def test_skip_with_no_good_row_left_is_an_error(tmp_path, tokenizer):
    data = tmp_path / "t.jsonl"
    data.write_bytes(jsonl([{"text": ""}, {"text": None}]))
    with pytest.raises(DataError, match=r"every row of .*t.jsonl is bad, nothing is left to train on: .*line 1"):
        load_data(llm_params(data, bad_rows="skip"), tokenizer)


def test_skip_in_preference_pairs(tmp_path, tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl([*CHAT_PAIRS, {**CHAT_PAIRS[0], "rejected": None}, {"chosen": "a", "rejected": "b"}]))
    pairs = load_preference_data(llm_params(data, trainer="dpo", bad_rows="skip", max_prompt_length=32), tokenizer)
    assert pairs.skipped_rows == {"train": 2}
    assert len(pairs.train) == 3
    with pytest.raises(DataError, match=r"2 bad row\(s\) in .*line 4, column 'rejected': missing value"):
        load_preference_data(llm_params(data, trainer="dpo", max_prompt_length=32), tokenizer)


def test_empty_tool_calls_and_tool_results_train(tmp_path, tokenizer):
    """`"tool_calls": []` or null, as exports write on every message, is no call; a `tool` message is context."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Hi", "tool_calls": None},
                {"role": "tool", "content": "clock: 9:00"},
                {"role": "assistant", "content": "Good morning.", "tool_calls": []},
            ]
        }
    ]
    data = tmp_path / "c.jsonl"
    data.write_bytes(jsonl(rows))
    loaded = load_data(llm_params(data, chat_template="chatml"), tokenizer)
    assert loaded.preview == (
        # a tool's result as Qwen2.5's ChatML writes it: a user turn, inside <tool_response>
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>user\n<tool_response>\nclock: 9:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nGood morning.<|im_end|>\n"
    )


def test_a_conversation_the_chat_template_refuses_is_a_bad_row(tmp_path, tokenizer):
    """Model templates may raise_exception() (e.g. on roles that do not alternate): that row's problem."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role here') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    system = {"role": "system", "content": "Be brief."}
    data = tmp_path / "c.jsonl"
    data.write_bytes(jsonl(with_bad(CHAT, {"messages": [system, *CHAT[0]["messages"]]})))
    with pytest.raises(DataError, match=r"line 3, column 'messages': the chat template cannot render it"):
        load_data(llm_params(data), tok)
    assert load_data(llm_params(data, bad_rows="skip"), tok).skipped_rows == {"train": 1}


# ---------------------------------------------------------------------------------------------- fuzzing

ROLES = st.sampled_from(["system", "user", "assistant", "tool", "bot", "", "human", "gpt"]) | st.none() | st.integers()
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSONABLE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES, "content": st.text(max_size=20) | SCALARS}, optional={"from": ROLES, "value": JSONABLE}
)
MESSAGES = st.lists(MESSAGE | JSONABLE, max_size=4)
ODD_CELL = SCALARS | JSONABLE | MESSAGES | MESSAGES.map(json.dumps) | st.sampled_from(["", " ", "[]", "[{}]", "{}"])
# Mostly usable values, so that the fuzzing reaches formatting, templates and tokenizing, not only the first check
TEXT_CELL = st.text(min_size=1, max_size=30)
GOOD_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT_CELL}),
    min_size=1,
    max_size=4,
)
CELL = TEXT_CELL | GOOD_MESSAGES | GOOD_MESSAGES.map(json.dumps) | ODD_CELL
SHAPES = [
    ["text"], ["messages"], ["conversations"], ["instruction", "input", "output"], ["prompt", "completion"],
    ["chosen", "rejected"], ["prompt", "chosen", "rejected"], ["text", "label"],
]  # fmt: skip
SHAPED_ROWS = st.sampled_from(SHAPES).flatmap(
    lambda keys: st.lists(
        st.fixed_dictionaries(dict.fromkeys(keys, CELL), optional={"other": ODD_CELL}), min_size=1, max_size=6
    )
)
TEXT_PAIR = st.tuples(TEXT_CELL, TEXT_CELL, TEXT_CELL).map(
    lambda t: {"chosen": f"{t[0]} {t[1]}", "rejected": f"{t[0]} {t[2]}"}
)
CHAT_PAIR = st.tuples(GOOD_MESSAGES, GOOD_MESSAGES, GOOD_MESSAGES).map(
    lambda t: {"chosen": t[0] + t[1], "rejected": t[0] + t[2]}
)
PAIR_ROWS = st.lists(
    TEXT_PAIR | CHAT_PAIR | st.dictionaries(st.sampled_from(["chosen", "rejected"]), CELL), max_size=6
)
ANY_ROWS = st.lists(
    st.dictionaries(st.sampled_from(["text", "messages", "chosen", "rejected", "label"]) | st.text(max_size=6), CELL),
    min_size=1,
    max_size=5,
)
ROWS = SHAPED_ROWS | PAIR_ROWS.filter(bool) | ANY_ROWS


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rows as the file type of `path` would hold them (CSV cells that are not text become JSON)."""
    if path.suffix == ".jsonl":
        path.write_bytes(jsonl(rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        header = list(dict.fromkeys(key for row in rows for key in row))
        cells = [[v if isinstance(v := row.get(key, ""), str) else json.dumps(v) for key in header] for row in rows]
        path.write_bytes(csv_bytes(header, cells))


def loads_or_explains(path: Path, tokenizer, **params) -> None:
    """Every loader on this file either succeeds or raises a TunelabError (anything else escapes and fails)."""
    for trainer, loader in (("sft", load_data), ("default", load_data), ("dpo", load_preference_data)):
        try:
            loader(llm_params(path, trainer=trainer, max_prompt_length=32, **params), tokenizer)
        except TunelabError:
            pass
    classifier = tunelab.TextClassificationParams(
        model="unused", data_path=str(path), target_column="label", max_seq_length=32
    )
    try:
        load_labelled_data(classifier, tokenizer)
    except TunelabError:
        pass


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(
    rows=ROWS,
    suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
    bad_rows=st.sampled_from(["error", "skip"]),
    chat_template=st.sampled_from([None, "chatml", "zephyr", "none", "tokenizer"]),
)
def test_loaders_never_crash_on_any_rows(tokenizer, rows, suffix, bad_rows, chat_template):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train{suffix}"
        write_rows(path, rows)
        loads_or_explains(path, tokenizer, bad_rows=bad_rows, chat_template=chat_template)


GOOD_FILES = [jsonl(TEXT), jsonl(CHAT), jsonl(PAIRS), jsonl(CHAT_PAIRS), json.dumps(ALPACA).encode()]
GOOD_FILES += [csv_bytes(["prompt", "completion"], [["Say hi.", "hi"], ["Say yo.", '"yo", he said']])]
DAMAGED = st.tuples(st.sampled_from(GOOD_FILES), st.floats(0, 1), st.binary(min_size=1, max_size=6)).map(
    lambda t: t[0][: int(t[1] * len(t[0]))] + t[2] + t[0][int(t[1] * len(t[0])) + len(t[2]) :]
)  # a good file with a few bytes overwritten somewhere


@FUZZ
@given(raw=st.binary(max_size=200) | DAMAGED, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_loaders_never_crash_on_any_bytes(tokenizer, raw, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train{suffix}"
        path.write_bytes(raw)
        loads_or_explains(path, tokenizer)


@pytest.mark.parametrize("command", ["generate", "predict", "score"])
def test_a_file_of_prompts_with_bad_rows_is_one_line_before_the_model_loads(command, tmp_path, capsys):
    """`tunelab generate|predict|score --data-path`: an empty, missing or non-text cell is named (file, line,
    column) as training names one, not answered, labelled or scored as "" or as a list's Python spelling (a list
    given to generate is a conversation, and read as one); the model (here a folder that does not exist) is not
    loaded first."""
    import json

    from tunelab.cli import main

    column = "prompt" if command == "generate" else "text"
    rows = [{column: "fine"}, {column: ""}, {column: ["a", "list"]}, {"other": 1}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main([command, "--model", str(tmp_path / "no-model"), "--data-path", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"3 bad row(s) in {data}: {data} line 2, column {column!r}: empty text" in err, err
    listed = "message 1 is not an object (got text)" if command == "generate" else "expected text, got a list"
    assert f"line 3, column {column!r}: {listed}" in err and "line 4" in err
    assert "no-model" not in err and "Traceback" not in err
