"""Reading data files (CSV, JSONL, JSON, Parquet, folders) and detecting row formats; bad data names file and line."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import SHARED_DATA, needs_shared
from tunelab.data.formats import detect_format, to_examples
from tunelab.data.sources import hub_subset, read_file, read_splits, sniff_delimiter
from tunelab.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path, header, rows):
    import csv

    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def examples_of(split, text_column="text", prompt_text_column=None):
    fmt = detect_format(split, text_column, prompt_text_column)
    return fmt, to_examples(split, fmt)


# ---------------------------------------------------------------------------------------------- reading files


def test_csv_rows_and_lines(tmp_path):
    path = tmp_path / "train.csv"
    # the second row's quoted text spans two lines: the third row starts on line 5
    path.write_text('text,label\nhello,1\n"two\nlines",0\nlast,1\n', encoding="utf-8")
    split = read_file(path, "train")
    assert split.name == "train"
    assert split.origin == str(path)
    assert split.rows == [
        {"text": "hello", "label": "1"},
        {"text": "two\nlines", "label": "0"},
        {"text": "last", "label": "1"},
    ]
    assert split.lines == [2, 3, 5]
    assert split.columns == ["text", "label"]
    assert split.where(2) == f"{path} line 5"


def test_csv_with_utf8_bom(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text\nhéllo\n".encode("utf-8-sig"))
    split = read_file(path, "train")
    assert split.columns == ["text"]  # the BOM is not part of the first column's name
    assert split.rows == [{"text": "héllo"}]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n   \n{"text": "c"}\n', encoding="utf-8")
    split = read_file(path, "train")
    assert [row["text"] for row in split.rows] == ["a", "b", "c"]
    assert split.lines == [1, 3, 5]
    assert split.where(1) == f"{path} line 3"


def test_jsonl_line_separators_inside_strings_do_not_split_rows(tmp_path):
    """U+2028, form feeds and friends are line breaks to str.splitlines(), but JSON writers leave them raw."""
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a\u2028b"}, {"text": "c\x0cd\x1ce\x85f"}, {"text": "g"}]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    split = read_file(path, "train")
    assert split.rows == rows
    assert split.lines == [1, 2, 3]


def test_csv_line_separators_inside_fields_do_not_split_rows(tmp_path):
    path = write_csv(tmp_path / "train.csv", ["text"], [["a\u2028b"], ["c\x0cd"], ["e"]])
    split = read_file(path, "train")
    assert [row["text"] for row in split.rows] == ["a\u2028b", "c\x0cd", "e"]
    assert split.lines == [2, 3, 4]


def test_csv_field_longer_than_the_csv_module_default_limit(tmp_path):
    long_text = "word " * 40_000  # 200,000 characters; the csv module refuses fields over 131,072 by default
    path = write_csv(tmp_path / "train.csv", ["text"], [[long_text], ["short"]])
    assert read_file(path, "train").rows[0]["text"] == long_text


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"text": ' + "9" * 5000 + "}", "4300 digits"), ('{"text": ' + "[" * 50_000 + "]" * 50_000 + "}", "too deeply")],
)
def test_jsonl_line_python_cannot_parse_names_its_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: not usable JSON (") + ".*" + message):
        read_file(path, "train")


def test_json_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2), encoding="utf-8")
    split = read_file(path, "train")
    assert split.rows == [{"text": "a"}, {"text": "b"}]
    assert split.where(1) == f"{path} row 2"


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"version": 1, "data": [{"text": "a"}, {"text": "b"}]}), encoding="utf-8")
    split = read_file(path, "train")
    assert split.rows == [{"text": "a"}, {"text": "b"}]


def test_json_object_with_two_lists_is_refused(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"train": [{"text": "a"}], "test": [{"text": "b"}]}), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: expected a JSON list of objects")):
        read_file(path, "train")


def test_json_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "a"}, "b"]), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} item 2: expected a JSON object, got str")):
        read_file(path, "train")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [1, 2, 3]}), path)
    split = read_file(path, "train")
    assert split.rows == [{"text": "a", "label": 1}, {"text": "b", "label": 2}, {"text": "c", "label": 3}]
    assert split.columns == ["text", "label"]
    fmt, examples = examples_of(split)
    assert fmt.kind == "text"
    assert examples == [{"text": "a"}, {"text": "b"}, {"text": "c"}]


def test_parquet_with_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    pq.write_table(pa.table({"messages": [conversation, conversation]}), path)
    fmt, examples = examples_of(read_file(path, "train"))
    assert fmt.kind == "messages"
    assert examples[0] == {"messages": conversation}


def test_damaged_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable Parquet file")):
        read_file(path, "train")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: unsupported file type '.txt'")):
        read_file(path, "train")


def test_folder_with_train_jsonl_and_valid_csv(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "one"}, {"text": "two"}])
    write_csv(tmp_path / "valid.csv", ["text"], [["three"]])
    splits = read_splits(str(tmp_path), "train", "valid")
    assert set(splits) == {"train", "valid"}
    assert splits["train"].origin == str(tmp_path / "train.jsonl")
    assert splits["valid"].origin == str(tmp_path / "valid.csv")
    assert [row["text"] for row in splits["train"].rows] == ["one", "two"]
    assert splits["valid"].rows == [{"text": "three"}]
    assert splits["valid"].lines == [2]


def test_folder_without_valid_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "one"}])
    splits = read_splits(str(tmp_path), "train", None)
    assert list(splits) == ["train"]


def test_folder_missing_split_lists_what_is_there(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "one"}])
    with pytest.raises(DataError, match=r"no file for split 'valid' in .*found: train\.jsonl"):
        read_splits(str(tmp_path), "train", "valid")


def test_file_with_valid_split_beside_it(tmp_path):
    train = write_jsonl(tmp_path / "mine.jsonl", [{"text": "one"}])
    write_jsonl(tmp_path / "held_out.jsonl", [{"text": "two"}])
    splits = read_splits(str(train), "train", "held_out")
    assert splits["valid"].rows == [{"text": "two"}]


def test_data_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(DataError, match=re.escape(f"data_path {str(missing)!r} does not exist")):
        read_splits(str(missing), "train", None)


@pytest.mark.parametrize("name", ["data/train.jsonl", "data/train.csv.gz", "data/Train.PARQUET"])
def test_missing_relative_data_file_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, name):
    """`owner/name` is a hub id, but not when the name is a data file's: a mistyped path is reported as one."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"data_path {name!r} does not exist")):
        read_splits(name, "train", None)


def test_hub_error_with_an_empty_message(monkeypatch):
    """No hub here: `datasets` is made to fail as it may, with an exception that has no message."""
    import datasets

    import tunelab.hub

    def fail(*args, **kwargs):
        raise ConnectionError()

    monkeypatch.setattr(tunelab.hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fail)
    message = "cannot load hub dataset 'owner/name' split 'train': ConnectionError (no network?"
    with pytest.raises(DataError, match=re.escape(message)):
        read_splits("owner/name", "train", None)


# ---------------------------------------------------------------------------------------------- shared data


@needs_shared()
def test_shared_alpaca_jsonl():
    splits = read_splits(str(SHARED_DATA / "alpaca"), "train", "test")
    assert set(splits) == {"train", "valid"}
    train, test = splits["train"], splits["valid"]
    assert train.origin.endswith("train.jsonl")  # .jsonl is preferred over the train.csv beside it
    assert len(train.rows) == 1500
    assert len(test.rows) == 200
    assert train.columns == ["instruction", "input", "output"]
    fmt, examples = examples_of(train)
    assert fmt.kind == "alpaca"
    assert fmt.columns == {"instruction": "instruction", "output": "output", "input": "input"}
    assert len(examples) == 1500
    first = examples[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"] == train.rows[0]["instruction"]
    assert first[1]["content"] == train.rows[0]["output"]
    # rows with an empty input carry no "input" key
    empty = next(i for i, row in enumerate(train.rows) if not row["input"].strip())
    assert "input" not in examples[empty]["messages"][0]


@needs_shared()
def test_shared_alpaca_csv_matches_jsonl():
    jsonl = read_file(SHARED_DATA / "alpaca" / "train.jsonl", "train")
    csv_split = read_file(SHARED_DATA / "alpaca" / "train.csv", "train")
    assert csv_split.rows == jsonl.rows  # multi-line quoted fields and "" escapes read back exactly
    assert csv_split.lines[0] == 2
    assert csv_split.lines == sorted(csv_split.lines)
    assert detect_format(csv_split, "text").kind == "alpaca"


@needs_shared()
def test_shared_chat():
    splits = read_splits(str(SHARED_DATA / "chat"), "train", None)
    train = splits["train"]
    assert len(train.rows) == 1200
    fmt, examples = examples_of(train)
    assert fmt.kind == "messages"
    assert fmt.columns == {"messages": "messages"}
    assert len(examples) == 1200
    for example in examples:
        roles = {m["role"] for m in example["messages"]}
        assert roles <= {"user", "assistant"}
        assert "assistant" in roles


# ---------------------------------------------------------------------------------------------- format detection


def test_detect_text(tmp_path):
    split = read_file(write_jsonl(tmp_path / "t.jsonl", [{"text": "<s>[INST] hi [/INST] ho</s>"}]), "train")
    fmt, examples = examples_of(split)
    assert fmt.kind == "text"
    assert fmt.columns == {"text": "text"}
    assert examples == [{"text": "<s>[INST] hi [/INST] ho</s>"}]


def test_detect_text_in_custom_column(tmp_path):
    split = read_file(write_csv(tmp_path / "t.csv", ["id", "body"], [["1", "hello"]]), "train")
    fmt, examples = examples_of(split, text_column="body")
    assert fmt.kind == "text"
    assert examples == [{"text": "hello"}]


def test_text_that_looks_like_a_list_but_is_not_json_stays_text(tmp_path):
    split = read_file(write_jsonl(tmp_path / "t.jsonl", [{"text": "[see the notes]"}]), "train")
    assert detect_format(split, "text").kind == "text"


def test_detect_messages_list(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    split = read_file(write_jsonl(tmp_path / "t.jsonl", [{"messages": conversation}]), "train")
    fmt, examples = examples_of(split, text_column="messages")
    assert fmt.kind == "messages"
    assert fmt.columns == {"messages": "messages"}
    assert examples == [{"messages": conversation}]


def test_detect_messages_column_by_default_name(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    split = read_file(write_jsonl(tmp_path / "t.jsonl", [{"messages": conversation}]), "train")
    fmt, examples = examples_of(split)  # text_column left at "text"
    assert fmt.kind == "messages"
    assert examples == [{"messages": conversation}]


def test_detect_messages_stored_as_json_string_in_csv(tmp_path):
    conversation = [{"role": "user", "content": "Hi, there"}, {"role": "assistant", "content": 'Say "hello"'}]
    path = write_csv(tmp_path / "t.csv", ["text", "id"], [[json.dumps(conversation), "7"]])
    split = read_file(path, "train")
    assert isinstance(split.rows[0]["text"], str)
    fmt, examples = examples_of(split)
    assert fmt.kind == "messages"
    assert fmt.columns == {"messages": "text"}
    assert examples == [{"messages": conversation}]


def test_detect_sharegpt(tmp_path):
    conversation = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
    ]
    split = read_file(write_jsonl(tmp_path / "t.jsonl", [{"conversations": conversation}]), "train")
    fmt, examples = examples_of(split)
    assert fmt.kind == "messages"
    assert fmt.columns == {"messages": "conversations"}
    assert examples == [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]
        }
    ]


def test_detect_alpaca(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    split = read_file(write_jsonl(tmp_path / "t.jsonl", rows), "train")
    fmt, examples = examples_of(split)
    assert fmt.kind == "alpaca"
    assert fmt.columns == {"instruction": "instruction", "output": "output", "input": "input"}
    assert examples == [
        {"messages": [{"role": "user", "content": "Add.", "input": "2 and 3"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    ]


def test_a_stray_text_key_does_not_turn_an_alpaca_file_into_plain_text(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(5)]
    rows.append({"instruction": "Say 5.", "input": "", "output": "5", "text": "a leftover column"})
    split = read_file(write_jsonl(tmp_path / "t.jsonl", rows), "train")
    assert detect_format(split, "text").kind == "alpaca"
    # Where most rows do have it, `text` is still the text column.
    rows = [{"text": f"Row {i}.", "instruction": "unused"} for i in range(4)] + [{"instruction": "x", "output": "y"}]
    assert detect_format(read_file(write_jsonl(tmp_path / "u.jsonl", rows), "train"), "text").kind == "text"


def sft_params(data, **overrides):
    import tunelab

    values = {"model": "unused", "data_path": str(data), "trainer": "sft", "block_size": 128, "model_max_length": 256}
    return tunelab.LLMParams(**{**values, **overrides})


def test_alpaca_input_is_kept_by_templates_without_an_input_section(tmp_path, tiny_tokenizer):
    """Only the alpaca template lays out `input`; through chatml (or any other) it joins the instruction."""
    from tunelab.data import load_data

    data = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    chatml = load_data(sft_params(data, chat_template="chatml"), tiny_tokenizer)
    assert chatml.preview == "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    none = load_data(sft_params(data, chat_template="none"), tiny_tokenizer)
    assert none.preview == "Add.\n\n2 and 35</s>"
    alpaca = load_data(sft_params(data), tiny_tokenizer)  # unset: the alpaca template, its own layout
    assert alpaca.template == "alpaca"
    assert "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5</s>" in alpaca.preview


def test_alpaca_input_first_seen_after_the_first_thousand_rows_is_read(tmp_path, tiny_tokenizer):
    """The row format is decided from the first 1000 rows of a streamed JSONL file; a later `input` still counts."""
    from tunelab.data import load_data

    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(1200)]
    rows[1100]["input"] = "in French"
    data = load_data(sft_params(write_jsonl(tmp_path / "t.jsonl", rows), chat_template="chatml"), tiny_tokenizer)
    assert "Say 1100.\n\nin French<|im_end|>" in tiny_tokenizer.decode(data.train[1100].input_ids)


def test_columns_first_seen_after_the_first_thousand_rows(tmp_path):
    rows = [{"chosen": "a b", "rejected": "a c"}] * 1001 + [{"prompt": "q", "chosen": "x", "rejected": "y"}]
    (tmp_path / "t.json").write_text(json.dumps(rows), encoding="utf-8")
    assert read_file(tmp_path / "t.json", "train").columns == ["chosen", "rejected", "prompt"]


def test_detect_alpaca_without_input_column(tmp_path):
    split = read_file(write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Say hi.", "output": "Hi!"}]), "train")
    fmt, examples = examples_of(split)
    assert fmt.kind == "alpaca"
    assert "input" not in fmt.columns
    assert examples == [
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}
    ]


def test_detect_prompt_completion_via_prompt_text_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["question", "answer"], [["What is 2+2?", "4"]])
    split = read_file(path, "train")
    fmt, examples = examples_of(split, text_column="answer", prompt_text_column="question")
    assert fmt.kind == "prompt_completion"
    assert fmt.columns == {"prompt": "question", "completion": "answer"}
    assert examples == [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    ]


def test_detect_prompt_completion_columns_by_default_name(tmp_path):
    split = read_file(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q", "completion": "A"}]), "train")
    fmt, examples = examples_of(split)
    assert fmt.kind == "prompt_completion"
    assert examples == [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]


def test_numbers_become_text(tmp_path):
    split = read_file(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "2+2?", "completion": 4}]), "train")
    _, examples = examples_of(split)
    assert examples[0]["messages"][1]["content"] == "4"


def test_describe(tmp_path):
    split = read_file(write_jsonl(tmp_path / "t.jsonl", [{"q": "Q", "a": "A"}]), "train")
    assert detect_format(split, "a", "q").describe() == "prompt_completion (prompt='q', completion='a')"


# ---------------------------------------------------------------------------------------------- errors: files


def test_malformed_jsonl_line_names_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n{"text": "d"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: not valid JSON")):
        read_file(path, "train")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n["b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: expected a JSON object, got list")):
        read_file(path, "train")


def test_malformed_json_names_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} line 4: not valid JSON")):
        read_file(path, "train")


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv", "train.json"])
def test_invalid_utf8_names_its_line(tmp_path, name):
    path = tmp_path / name
    lines = {
        "train.jsonl": [b'{"text": "a"}', b'{"text": "b"}', b'{"text": "caf\xe9"}'],
        "train.csv": [b"text", b"a", b"caf\xe9"],
        "train.json": [b"[", b'{"text": "a"},', b'{"text": "caf\xe9"}]'],
    }[name]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: not valid UTF-8 (byte 0xe9)")):
        read_file(path, "train")


def test_csv_row_with_wrong_field_count_names_its_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,1\nalso fine,0\nHello, world,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} line 4: 3 fields where the header has 2")):
        read_file(path, "train")


def test_csv_wrong_field_count_after_multiline_row(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"two\nlines",1\ntoo,many,fields\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} line 4: 3 fields where the header has 2")):
        read_file(path, "train")


def test_csv_with_blank_lines_above_the_header(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("\n\r\ntext;label\nfine;1\nalso, fine;0\n", encoding="utf-8")
    split = read_file(path, "train")
    assert split.rows == [{"text": "fine", "label": "1"}, {"text": "also, fine", "label": "0"}]
    assert split.lines == [4, 5]


def test_csv_duplicate_header(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,text\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} line 1: duplicate column names")):
        read_file(path, "train")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.jsonl", "", "the file has no rows"),
        ("train.jsonl", "\n  \n\n", "the file has no rows"),
        ("train.csv", "", "the file is empty"),
        ("train.csv", "text,label\n", "the file has no rows"),
        ("train.json", "[]", "the file has no rows"),
    ],
)
def test_empty_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        read_file(path, "train")


def test_empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: the file has no rows")):
        read_file(path, "train")


# ---------------------------------------------------------------------------------------------- errors: columns, rows


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "train.csv", ["question", "answer"], [["Q", "A"]])
    split = read_file(path, "train")
    with pytest.raises(
        DataError,
        match=re.escape(f"{path}: text column 'body' not found (columns: question, answer); set --text-column"),
    ):
        detect_format(split, "body")


def test_missing_default_text_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"sentence": "hi", "label": 1}])
    with pytest.raises(DataError, match=re.escape("text column 'text' not found (columns: sentence, label)")):
        detect_format(read_file(path, "train"), "text")


def test_missing_prompt_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "Q", "answer": "A"}])
    split = read_file(path, "train")
    with pytest.raises(DataError, match=re.escape(f"{path}: column 'prompt' not found (columns: question, answer)")):
        detect_format(split, "answer", "prompt")
    with pytest.raises(
        DataError, match=re.escape(f"{path}: column 'completion' not found (columns: question, answer)")
    ):
        detect_format(split, "completion", "question")


def test_empty_text_value_names_file_line_and_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text\nfine\n""\nfine too\n', encoding="utf-8")
    split = read_file(path, "train")
    fmt = detect_format(split, "text")
    with pytest.raises(
        DataError, match=re.escape(f"1 bad row(s) in {path}: {path} line 3, column 'text': empty text")
    ):
        to_examples(split, fmt)


def test_whitespace_only_and_missing_text_values(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, {"text": "   "}, {"text": None}, {"other": 1}])
    split = read_file(path, "train")
    with pytest.raises(DataError) as info:
        to_examples(split, detect_format(split, "text"))
    message = str(info.value)
    assert message.startswith(f"3 bad row(s) in {path}: ")
    assert f"{path} line 2, column 'text': empty text" in message
    assert f"{path} line 3, column 'text': missing value" in message
    assert f"{path} line 4, column 'text': missing value" in message


def test_many_bad_rows_are_summarised(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok"}] + [{"text": ""}] * 8)
    split = read_file(path, "train")
    summary = r"^8 bad row\(s\) in .*line 6, column 'text': empty text \(and 3 more\); fix them, or set bad_rows: skip"
    with pytest.raises(DataError, match=summary):
        to_examples(split, detect_format(split, "text"))


def test_message_with_unknown_role(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation}])
    split = read_file(path, "train")
    with pytest.raises(
        DataError,
        match=re.escape(f"{path} line 1, column 'messages': message 2 has unknown role 'bot' (use system, user"),
    ):
        to_examples(split, detect_format(split, "messages"))


def test_sharegpt_message_with_unknown_speaker(tmp_path):
    conversation = [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"conversations": conversation}])
    split = read_file(path, "train")
    with pytest.raises(
        DataError, match=re.escape("line 1, column 'conversations': message 2 has unknown role 'robot'")
    ):
        to_examples(split, detect_format(split, "text"))


def test_conversation_without_assistant_message(tmp_path):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    bad = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": good}, {"messages": bad}])
    split = read_file(path, "train")
    with pytest.raises(
        DataError, match=re.escape(f"{path} line 2, column 'messages': no assistant message to learn from")
    ):
        to_examples(split, detect_format(split, "messages"))


def test_conversation_with_only_an_empty_assistant_message(tmp_path):
    bad = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": bad}])
    split = read_file(path, "train")
    with pytest.raises(DataError, match=re.escape("line 1, column 'messages': no assistant message to learn from")):
        to_examples(split, detect_format(split, "messages"))


def test_messages_json_string_that_is_broken(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = tmp_path / "train.csv"
    write_csv(path, ["text"], [[json.dumps(conversation)], ['[{"role": "user", "content": "Hi"']])
    split = read_file(path, "train")
    fmt = detect_format(split, "text")
    assert fmt.kind == "messages"  # decided from the first good row
    with pytest.raises(DataError, match=re.escape(f"{path} line 3, column 'text': not a JSON list of messages")):
        to_examples(split, fmt)


def test_message_content_that_is_not_text(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ["Hello"]}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation}])
    split = read_file(path, "train")
    with pytest.raises(DataError, match=re.escape("line 1, column 'messages': message 2 content is not text")):
        to_examples(split, detect_format(split, "messages"))


def test_empty_alpaca_output(tmp_path):
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"instruction": "Say bye.", "input": "", "output": ""},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    split = read_file(path, "train")
    with pytest.raises(DataError, match=re.escape(f"{path} line 2, column 'output': empty text")):
        to_examples(split, detect_format(split, "text"))


def test_bad_row_in_json_list_is_named_by_row(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": ""}]), encoding="utf-8")
    split = read_file(path, "train")
    with pytest.raises(DataError, match=re.escape(f"{path} row 3, column 'text': empty text")):
        to_examples(split, detect_format(split, "text"))


# ---------------------------------------------------------------------------------------------- compressed files


def compressed(kind, data):
    import bz2
    import gzip
    import lzma

    import pyarrow as pa

    if kind == "zst":
        return pa.Codec("zstd").compress(data, asbytes=True)
    if kind == "gz":
        return gzip.compress(data, mtime=0)  # the same bytes every time: test ids stay stable (pytest-xdist)
    return {"bz2": bz2.compress, "xz": lzma.compress}[kind](data)


COMPRESSIONS = [("gz", "gzip"), ("bz2", "bz2"), ("xz", "xz"), ("zst", "zstd")]
# a quoted two-line field and a blank line: line numbers must be those of the decompressed text
CSV_TEXT = 'text,label\nhello,1\n"two\nlines",0\n\nlast,1\n'
JSONL_TEXT = '{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n'


@pytest.mark.parametrize(("kind", "_name"), COMPRESSIONS)
def test_compressed_csv_and_jsonl_rows_and_lines(tmp_path, kind, _name):
    csv_path = tmp_path / f"train.csv.{kind}"
    csv_path.write_bytes(compressed(kind, CSV_TEXT.encode()))
    split = read_file(csv_path, "train")
    assert split.origin == str(csv_path)
    assert split.rows == [
        {"text": "hello", "label": "1"},
        {"text": "two\nlines", "label": "0"},
        {"text": "last", "label": "1"},
    ]
    assert split.lines == [2, 3, 6]
    jsonl_path = tmp_path / f"train.jsonl.{kind}"
    jsonl_path.write_bytes(compressed(kind, JSONL_TEXT.encode()))
    split = read_file(jsonl_path, "train")
    assert [row["text"] for row in split.rows] == ["a", "b", "c"]
    assert split.lines == [1, 3, 4]


def test_compressed_json_and_tsv(tmp_path):
    json_path = tmp_path / "train.json.xz"
    json_path.write_bytes(compressed("xz", json.dumps([{"text": "a"}, {"text": "b"}]).encode()))
    assert read_file(json_path, "train").rows == [{"text": "a"}, {"text": "b"}]
    tsv_path = tmp_path / "train.tsv.zst"
    tsv_path.write_bytes(compressed("zst", b"text\tlabel\na, b\t1\n"))
    assert read_file(tsv_path, "train").rows == [{"text": "a, b", "label": "1"}]


def test_compressed_file_with_a_utf8_bom_and_several_gzip_members(tmp_path):
    import gzip

    path = tmp_path / "train.csv.gz"
    path.write_bytes(gzip.compress("\ufefftext\nhéllo\n".encode()) + gzip.compress("wörld\n".encode()))
    split = read_file(path, "train")
    assert split.columns == ["text"]
    assert split.rows == [{"text": "héllo"}, {"text": "wörld"}]


@pytest.mark.parametrize(("kind", "name"), COMPRESSIONS)
def test_compressed_data_under_a_plain_name_is_read(tmp_path, kind, name):
    path = tmp_path / "train.jsonl"
    path.write_bytes(compressed(kind, JSONL_TEXT.encode()))
    split = read_file(path, "train")
    assert [row["text"] for row in split.rows] == ["a", "b", "c"]
    assert split.lines == [1, 3, 4]


@pytest.mark.parametrize(("kind", "name"), COMPRESSIONS)
def test_truncated_compressed_file(tmp_path, kind, name):
    path = tmp_path / f"train.jsonl.{kind}"
    packed = compressed(kind, JSONL_TEXT.encode() * 50)
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable {name} file (") + ".*cut short"):
        read_file(path, "train")


def test_invalid_utf8_in_a_compressed_file_names_its_decompressed_line(tmp_path):
    path = tmp_path / "train.csv.bz2"
    path.write_bytes(compressed("bz2", b'text\na\n"two\nlines"\ncaf\xe9\n'))
    with pytest.raises(DataError, match=re.escape(f"{path} line 5: not valid UTF-8 (byte 0xe9)")):
        read_file(path, "train")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.jsonl.gz", b'{"text": "a"}\n', "not a readable gzip file (it does not start like one); if it is not"),
        ("train.jsonl.zst", b"", "the file has no rows"),
        ("train.xz", compressed("xz", b'{"text": "a"}\n'), "the name does not say what the xz file holds"),
        ("train.parquet.gz", compressed("gz", b"PAR1"), "a gzip-compressed Parquet file; Parquet compresses"),
    ],
)
def test_compressed_file_problems(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        read_file(path, "train")


def test_folder_finds_compressed_and_tsv_split_files(tmp_path):
    (tmp_path / "train.jsonl.gz").write_bytes(compressed("gz", JSONL_TEXT.encode()))
    (tmp_path / "valid.tsv").write_text("text\nthree\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not data\n", encoding="utf-8")
    splits = read_splits(str(tmp_path), "train", "valid")
    assert splits["train"].origin == str(tmp_path / "train.jsonl.gz")
    assert splits["train"].lines == [1, 3, 4]
    assert splits["valid"].rows == [{"text": "three"}]
    with pytest.raises(DataError, match=r"no file for split 'test' .*found: train\.jsonl\.gz, valid\.tsv\)"):
        read_splits(str(tmp_path), "train", "test")


def test_folder_prefers_the_uncompressed_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "plain"}])
    (tmp_path / "train.jsonl.gz").write_bytes(compressed("gz", b'{"text": "packed"}\n'))
    assert read_splits(str(tmp_path), "train", None)["train"].rows == [{"text": "plain"}]


# ---------------------------------------------------------------------------------------------- CSV delimiters


ROWS = [
    {"text": "hello, world", "label": "1"},
    {"text": "two\nlines; really", "label": "0"},
    {"text": "c", "label": "1"},
]


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_csv_delimiter_is_detected(tmp_path, delimiter):
    import csv

    path = tmp_path / "train.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "label"], delimiter=delimiter)
        writer.writeheader()
        writer.writerows(ROWS)
    split = read_file(path, "train")
    assert split.columns == ["text", "label"]
    assert split.rows == ROWS
    assert split.lines == [2, 3, 5]


def test_comma_csv_full_of_semicolons_stays_comma_delimited(tmp_path):
    rows = [[f"a; b; c; d; e {i}", "x;y;z"] for i in range(20)]
    path = write_csv(tmp_path / "train.csv", ["text", "note"], rows)
    split = read_file(path, "train")
    assert split.columns == ["text", "note"]
    assert split.rows[0] == {"text": "a; b; c; d; e 0", "note": "x;y;z"}


def test_one_column_csv_with_delimiters_in_its_text(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text\nuse a; or a | or a tab\t here\n"and, quoted"\n', encoding="utf-8")
    assert read_file(path, "train").rows == [{"text": "use a; or a | or a tab\t here"}, {"text": "and, quoted"}]


def test_excel_sep_line_sets_the_delimiter(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sep=;\r\ntext;label\r\nhello, world;1\r\n", encoding="utf-8")
    split = read_file(path, "train")
    assert split.rows == [{"text": "hello, world", "label": "1"}]
    assert split.lines == [3]


@pytest.mark.parametrize(
    ("header", "default", "expected"),
    [
        ("text,label\n", ",", ","),
        ("text;label;id\n", ",", ";"),
        ('"a;b",c\n', ",", ","),  # the semicolon is inside quotes
        ('"a,b";c\n', ",", ";"),
        ("text\n", ",", ","),
        ("text\n", "\t", "\t"),
        ("a,b\tc\n", "\t", "\t"),  # a tie keeps the file type's own
        ("a|b|c\nx,y,z,w,v\n", ",", "|"),  # only the header line counts
    ],
)
def test_sniff_delimiter(header, default, expected):
    assert sniff_delimiter(header, default) == expected


def test_semicolon_csv_with_a_stray_field_names_the_delimiter(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text;label\nfine;1\nnot; fine;0\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=re.escape(f"{path} line 3: 3 fields where the header has 2 (an unquoted semicolon")
    ):
        read_file(path, "train")


# ---------------------------------------------------------------------------------------------- encodings, odd files


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_with_a_byte_order_mark_is_named(tmp_path, encoding):
    path = tmp_path / "train.csv"
    text = "text\tlabel\nhéllo\t1\n"
    path.write_bytes((b"\xfe\xff" if encoding == "utf-16-be" else b"") + text.encode(encoding))
    with pytest.raises(
        DataError, match=re.escape(f"{path} line 1: not valid UTF-8 but UTF-16 (it starts with a UTF-16")
    ):
        read_file(path, "train")


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes('{"text": "a"}\n'.encode("utf-16-le"))
    with pytest.raises(DataError, match=re.escape(f"{path} line 1: holds NUL characters, so it is not UTF-8 text")):
        read_file(path, "train")


def test_json_lines_under_a_json_name(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    split = read_file(path, "train")
    assert split.rows == [{"text": "a"}, {"text": "b"}]
    assert split.lines == [1, 3]
    path.write_text('{"text": "a"}\n{"text": "b",\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: not valid JSON")):
        read_file(path, "train")


@pytest.mark.parametrize("indent", [None, 2])
def test_json_list_under_a_jsonl_name(tmp_path, indent):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=indent) + "\n", encoding="utf-8")
    split = read_file(path, "train")
    assert split.rows == [{"text": "a"}, {"text": "b"}]
    assert split.where(1) == f"{path} row 2"


def test_pretty_printed_object_under_a_jsonl_name(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"data": [{"text": "a"}]}, indent=2), encoding="utf-8")
    assert read_file(path, "train").rows == [{"text": "a"}]


def test_jsonl_whose_first_line_is_a_list_is_still_named_by_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('["a"]\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} line 1: expected a JSON object, got list")):
        read_file(path, "train")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "train.csv",
            b"PK\x03\x04rest of a zip",
            "not a .csv file but a zip archive (an Excel .xlsx workbook is one)",
        ),
        ("train.jsonl", b"PAR1rest of parquet", "not a .jsonl file but a Parquet file: name it .parquet"),
        ("train.csv", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "not a .csv file but an Excel .xls workbook"),
        ("train.xlsx", b"PK\x03\x04", "unsupported file type '.xlsx' (use .jsonl, .json, .csv, .tsv, .parquet;"),
        ("train", b"text\n", "unsupported file type '(none)'"),
    ],
)
def test_files_that_are_not_what_their_name_says(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        read_file(path, "train")


def test_folder_given_where_a_file_is_expected(tmp_path):
    (tmp_path / "train.jsonl").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.jsonl'}: a folder, where a data file")):
        read_file(tmp_path / "train.jsonl", "train")
    (tmp_path / "data" / "valid").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'data' / 'valid'} is a folder, where the data file")):
        read_splits(str(tmp_path / "data"), "train", "valid")


def test_valid_split_given_as_a_relative_path(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    (tmp_path / "held").mkdir()
    write_jsonl(tmp_path / "held" / "out.jsonl", [{"text": "b"}])
    assert read_splits(str(train), "train", "held/out")["valid"].rows == [{"text": "b"}]
    with pytest.raises(DataError, match=re.escape("no file for split 'held/missing'")):
        read_splits(str(train), "train", "held/missing")


# ---------------------------------------------------------------------------------------------- content parts


def test_message_text_parts_become_their_text(tmp_path):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there."}]
    conversation = [{"role": "user", "content": parts}, {"role": "assistant", "content": [parts[1]]}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation}])
    _, examples = examples_of(read_file(path, "train"))
    assert examples == [
        {"messages": [{"role": "user", "content": "Hello, there."}, {"role": "assistant", "content": "there."}]}
    ]


def test_message_text_parts_in_a_csv_json_string_and_in_sharegpt(tmp_path):
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Ho"},
    ]
    path = write_csv(tmp_path / "train.csv", ["text"], [[json.dumps(conversation)]])
    assert examples_of(read_file(path, "train"))[1][0]["messages"][0] == {"role": "user", "content": "Hi"}
    sharegpt = [{"from": "human", "value": [{"type": "text", "text": "Hi"}]}, {"from": "gpt", "value": "Ho"}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"conversations": sharegpt}])
    assert examples_of(read_file(path, "train"))[1][0]["messages"][0] == {"role": "user", "content": "Hi"}


def test_preference_message_lists_with_text_parts(tmp_path):
    """data/preference.py reads chosen and rejected through cell_messages: text parts become text there too."""
    from tunelab.data.formats import cell_messages

    answer = [{"role": "assistant", "content": [{"type": "text", "text": "Yes"}, {"type": "text", "text": "!"}]}]
    assert cell_messages({"chosen": answer}, "chosen", need_assistant=False) == [
        {"role": "assistant", "content": "Yes!"}
    ]


def test_image_parts_are_kept_for_the_data_step(tmp_path):
    """sft rows keep a user turn's image parts (data/pipeline.py finds the files; tests/test_vision.py trains);
    the readers of pairs, prompts and kto answers refuse them."""
    from tunelab.data.formats import RowProblem, cell_messages

    content = [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "Hi"}]
    rows = [{"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Ho"}]}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    split = read_file(path, "train")
    kept = to_examples(split, detect_format(split, "text"))[0]["messages"][0]["content"]
    assert kept == [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Hi"}]
    with pytest.raises(
        RowProblem, match="message 1 has an image part: images are trained by sft, dpo, orpo, simpo or grpo"
    ):
        cell_messages(rows[0], "messages", need_assistant=False)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            [{"type": "input_audio", "input_audio": {}}],
            "message 1 has an audio part: tunelab trains on text and images; drop",
        ),
        ([{"type": "audio", "audio": "x.wav"}], "message 1 has an audio part"),
        ([{"type": "video", "video": "x.mp4"}], "message 1 has a video part"),
        (
            [{"type": "file", "file": {"file_id": "f"}}],
            "message 1 has a file part: tunelab trains on text and images; drop",
        ),
        ([{"text": "Hi"}], 'message 1 has a content part without a "type" (use {"type": "text", ...})'),
        (
            [{"type": "refusal", "refusal": "No"}],
            "message 1 has a content part of unknown type 'refusal' (use \"text\")",
        ),
        ([{"type": "text"}], "message 1 has a text part whose text is null, not text"),
        ([], "message 1 has an empty list of content parts"),
        (["Hi"], "message 1 content is not text (a list holding text; content parts are objects such as"),
    ],
)
def test_message_content_parts_that_cannot_be_trained_on(tmp_path, content, reason):
    conversation = [{"role": "user", "content": content}, {"role": "assistant", "content": "Ho"}]
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": good}, {"messages": conversation}])
    split = read_file(path, "train")
    fmt = detect_format(split, "text")
    with pytest.raises(
        DataError, match=re.escape(f"1 bad row(s) in {path}: {path} line 2, column 'messages': {reason}")
    ):
        to_examples(split, fmt)
    assert to_examples(split, fmt, bad_rows="skip") == [{"messages": good}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n', "holds JSON Lines, not CSV (its first line is a"),
        ('[{"text": "a"}]', "holds JSON, not CSV (it starts with '['): name it .json"),
        ('[\n  {"text": "a"}\n]\n', "holds JSON, not CSV (it starts with '['): name it .json"),
    ],
)
def test_json_under_a_csv_name(tmp_path, content, message):
    path = tmp_path / "train.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        read_file(path, "train")


def test_csv_header_with_brackets_is_still_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("[text],{label}\na,1\n", encoding="utf-8")
    assert read_file(path, "train").rows == [{"[text]": "a", "{label}": "1"}]


def test_file_that_cannot_be_read(tmp_path, monkeypatch):
    """chmod 0 does not stop root (as in CI containers), so the refusal is simulated."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read the file (permission denied); make it")):
        read_file(path, "train")


def test_lines_longer_than_a_block(tmp_path):
    """A JSON Lines row longer than the blocks it is read in (an inline data: URI): whole, at its own line."""
    from tunelab.data.sources import block_rows, stream_split

    rows = [{"text": "short"}, {"text": "x" * 300_000}, {"text": "after"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    stream = stream_split(path, "train", 200, 64 << 10)
    parsed = [block_rows(block, str(path), "train") for block in stream.blocks()]
    assert [len(row["text"]) for split in parsed for row in split.rows] == [5, 300_000, 5]
    assert [line for split in parsed for line in split.lines] == [1, 2, 3]


def test_autotrain_s_config_colon_split_names_a_hub_dataset_s_subset(tmp_path, monkeypatch):
    """train_split "all:test" (AutoTrain's way) loads the subset `all`'s `test` split: `datasets` itself reads a
    dataset whose README declares its configurations (a local copy stands in for the hub repository)."""
    import datasets

    import tunelab.hub

    repo = tmp_path / "mmlu"
    for subset, rows in (("all", 3), ("anatomy", 1)):
        (repo / subset).mkdir(parents=True)
        lines = [json.dumps({"question": f"{subset} {i}?", "answer": i}) for i in range(rows)]
        (repo / subset / "test.jsonl").write_text("\n".join(lines) + "\n")
    configs = "".join(
        f"- config_name: {subset}\n  data_files:\n  - split: test\n    path: {subset}/test.jsonl\n"
        for subset in ("all", "anatomy")
    )
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    load = datasets.load_dataset
    monkeypatch.setattr(tunelab.hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda path, **kw: load(str(repo) if path == "cais/mmlu" else path, **kw)
    )
    assert [row["question"] for row in read_splits("cais/mmlu", "anatomy:test", None)["train"].rows] == ["anatomy 0?"]
    assert len(read_splits("cais/mmlu", "all:test", "anatomy:test")["train"].rows) == 3
    # datasets' slices keep their colon: of a subset's split, and of a plain split
    assert len(read_splits("cais/mmlu", "all:test[:2]", None)["train"].rows) == 2
    assert hub_subset("train[:100]") == (None, "train[:100]") and hub_subset("all:test[:10%]") == ("all", "test[:10%]")
