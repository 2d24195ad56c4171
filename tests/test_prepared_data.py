"""Prepared data at scale: streamed in blocks, tokenized in worker processes into token tables, cached under a key
of everything that shapes it, reused by the next dry run, run, resume and launched process."""

from __future__ import annotations

import bisect
import dataclasses
import gzip
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tunelab
from tests.conftest import CHATML, build_sentencepiece_tokenizer, build_tokenizer, train_losses
from tunelab.config.llm import LLMParams
from tunelab.data import cache as data_cache
from tunelab.data import load_data
from tunelab.data.rows import best_fit_rows
from tunelab.data.sources import BLOCK_BYTES
from tunelab.data.templates import render_messages, template_source
from tunelab.data.tokenize import IGNORE, encode_arrays
from tunelab.errors import DataError
from tunelab.tasks import llm

ROOT = Path(__file__).resolve().parents[1]


def _alpaca(path: Path, count: int, bad: dict[int, str] | None = None) -> Path:
    """count Alpaca rows, some with an input; `bad` maps a 1-based line to the text written there instead."""
    bad = bad or {}
    lines = []
    for i in range(1, count + 1):
        row = {
            "instruction": f"Add {i} and {i % 7}.",
            "input": "" if i % 3 else f"numbers {i}",
            "output": f"{i + i % 7}",
        }
        lines.append(bad.get(i, json.dumps(row)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _params(model: Path, data: Path, tmp_path: Path, **extra) -> LLMParams:
    values = dict(
        model=str(model), data_path=data if isinstance(data, list) else str(data), trainer="sft", block_size=256,
        model_max_length=512,
        project_name=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    return LLMParams(**{**values, **extra})


# ------------------------------------------------------------------------------------------------ the cache key


def test_the_key_changes_with_every_input(tiny_llama, tmp_path):
    data = _alpaca(tmp_path / "train.jsonl", 20)
    tokenizer = llm.load_tokenizer(llm.resolve_model(str(tiny_llama)), 128)
    base = _params(tiny_llama, data, tmp_path)
    key = data_cache.data_key(data_cache.key_inputs(base, tokenizer))
    assert key == data_cache.data_key(data_cache.key_inputs(base, tokenizer))  # stable

    changed = {
        "method": dataclasses.replace(base, trainer="default"),
        "block size": dataclasses.replace(base, block_size=128),
        "masking": dataclasses.replace(base, completion_only_loss=False),
        "packing": dataclasses.replace(base, packing=True),
        "bad-row policy": dataclasses.replace(base, bad_rows="skip"),
        "template choice": dataclasses.replace(base, chat_template="chatml"),
        "column": dataclasses.replace(base, text_column="output"),
        "eos": dataclasses.replace(base, add_eos_token=False),
    }
    keys = {what: data_cache.data_key(data_cache.key_inputs(p, tokenizer)) for what, p in changed.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(keys), keys

    def key_with(tok):
        return data_cache.data_key(data_cache.key_inputs(base, tok))

    edited = llm.load_tokenizer(llm.resolve_model(str(tiny_llama)), 128)
    edited.chat_template = CHATML.replace("<|im_start|>assistant", "<|im_start|>Assistant")  # one character
    assert key_with(edited) != key
    other = build_tokenizer(tmp_path / "other-tok")
    other.add_tokens(["<extra>"])  # one more token
    assert key_with(other) != key

    data.write_text(data.read_text(encoding="utf-8").replace("Add 5 ", "Add 6 "), encoding="utf-8")  # same size
    assert key_with(tokenizer) != key


def test_the_key_changes_with_the_format_version_and_a_builtin_template(tiny_llama, tmp_path, monkeypatch):
    data = _alpaca(tmp_path / "train.jsonl", 20)
    tokenizer = llm.load_tokenizer(llm.resolve_model(str(tiny_llama)), 128)
    params = _params(tiny_llama, data, tmp_path)
    key = data_cache.data_key(data_cache.key_inputs(params, tokenizer))
    monkeypatch.setattr(data_cache, "FORMAT_VERSION", data_cache.FORMAT_VERSION + 1)
    assert data_cache.data_key(data_cache.key_inputs(params, tokenizer)) != key
    monkeypatch.undo()
    real = data_cache.builtin_template
    monkeypatch.setattr(data_cache, "builtin_template", lambda name: real(name) + ("x" if name == "alpaca" else ""))
    assert data_cache.data_key(data_cache.key_inputs(params, tokenizer)) != key


# ------------------------------------------------------------------------------------------------ reuse


def _rows(prep) -> list:
    return [prep.train_rows[i] for i in range(len(prep.train_rows))]


@pytest.mark.parametrize("extra", [{}, {"packing": True}, {"trainer": "default"}], ids=["sft", "packed", "default"])
def test_a_second_prepare_reuses_the_cache_and_gets_the_same_rows(tiny_llama, tmp_path, caplog, extra):
    data = _alpaca(tmp_path / "train.jsonl", 120)
    params = _params(tiny_llama, data, tmp_path, valid_split=str(_alpaca(tmp_path / "valid.jsonl", 10)), **extra)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        first = llm.prepare(params)
        second = llm.prepare(params)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepared data")]
    assert lines[0].startswith("prepared data: prepared in") and first.prepared.key in lines[0]
    assert lines[1].startswith(f"prepared data: reused {first.prepared.key} in ")
    assert second.prepared.key == first.prepared.key and second.prepared.hit
    assert _rows(second) == _rows(first) and len(_rows(first)) > 0
    assert second.stats == first.stats
    assert [second.valid_rows[i] for i in range(len(second.valid_rows))] == [
        first.valid_rows[i] for i in range(len(first.valid_rows))
    ]
    entry = tmp_path / "cache" / first.prepared.key
    assert json.loads((entry / "inputs.json").read_text())["options"]["block_size"] == 256
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # nothing half-written


def test_a_dry_run_prepares_and_the_run_after_it_reuses(tiny_llama, tmp_path):
    data = _alpaca(tmp_path / "train.jsonl", 40)
    args = dict(model=str(tiny_llama), data_path=str(data), trainer="sft", block_size=256, model_max_length=512)
    args.update(project_name=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), max_steps=2, batch_size=2)
    plan = tunelab.plan(**args)
    note = next(n for n in plan.notes if n.startswith("prepared data"))
    assert "prepared in" in note and "cached as" in note
    key = note.split("cached as ")[1].split()[0]
    folder = tunelab.train(**args)
    info = json.loads((folder / "tunelab_run.json").read_text())
    assert info["prepared_data"] == key


def test_no_cache_keeps_nothing(tiny_llama, tmp_path):
    data = _alpaca(tmp_path / "train.jsonl", 20)
    prep = llm.prepare(_params(tiny_llama, data, tmp_path, no_cache=True))
    assert prep.prepared.key is None and "not cached" in prep.prepared.describe()
    assert not (tmp_path / "cache").exists()
    assert len(prep.train_rows) == 20


def test_skipped_bad_rows_are_reported_again_when_reused(tiny_llama, tmp_path, caplog):
    data = _alpaca(tmp_path / "train.jsonl", 30, bad={7: json.dumps({"instruction": "x", "input": "", "output": ""})})
    params = _params(tiny_llama, data, tmp_path, bad_rows="skip")
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tunelab"):
            prep = llm.prepare(params)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("line 7, column 'output': empty text" in w for w in warnings), warnings
        assert prep.data.skipped_rows["train"] == 1
    assert prep.prepared.hit


def test_a_deleted_or_damaged_entry_is_prepared_again(tiny_llama, tmp_path):
    data = _alpaca(tmp_path / "train.jsonl", 20)
    params = _params(tiny_llama, data, tmp_path)
    first = llm.prepare(params)
    entry = tmp_path / "cache" / first.prepared.key
    (entry / "prepared.pkl").write_bytes(b"not a pickle")
    again = llm.prepare(params)
    assert not again.prepared.hit and _rows(again) == _rows(first)
    import shutil

    shutil.rmtree(tmp_path / "cache")
    assert not llm.prepare(params).prepared.hit


def test_a_cache_folder_that_cannot_be_written_is_a_warning_not_a_failure(tiny_llama, tmp_path, caplog):
    data = _alpaca(tmp_path / "train.jsonl", 12)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        prep = llm.prepare(_params(tiny_llama, data, tmp_path, cache_dir=str(blocker / "cache")))
    assert prep.prepared.key is None and len(prep.train_rows) == 12
    assert any("cannot be written" in r.getMessage() for r in caplog.records)


def test_two_processes_at_once_prepare_once(tiny_llama, tmp_path):
    """What every process of a launch does: the first prepares under the lock, the other waits and reuses."""
    data = _alpaca(tmp_path / "train.jsonl", 3000)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TUNELAB_DATA_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable, "-m", "tunelab.cli", "llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(data),
        "--trainer", "sft", "--block-size", "256", "--model-max-length", "512",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*command, "--project-name", str(tmp_path / f"p{i}")], env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    everything = "".join(logs)
    assert everything.count("prepared data: prepared in") == 1, everything
    assert everything.count("prepared data: reused") == 1, everything


# ------------------------------------------------------------------------------------------------ streaming


def test_a_large_file_in_worker_processes_equals_one_process(tiny_llama, tmp_path):
    data = _alpaca(tmp_path / "train.jsonl", 6000)  # several blocks of rows
    one = llm.prepare(_params(tiny_llama, data, tmp_path, dataset_num_proc=1, no_cache=True))
    two = llm.prepare(_params(tiny_llama, data, tmp_path, dataset_num_proc=2, no_cache=True))
    a, b = one.data.train, two.data.train
    assert len(a) == len(b) == 6000
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.trained, b.trained)
    assert np.array_equal(a.lengths, b.lengths)


def test_bad_rows_and_bad_lines_far_into_a_file_are_named(tiny_llama, tmp_path):
    count = 3 * BLOCK_BYTES // 60  # past the first block read
    last = count - 3
    data = _alpaca(tmp_path / "train.jsonl", count, bad={last: '{"instruction": "x", "input": "", "output": 5'})
    with pytest.raises(DataError, match=rf"train.jsonl line {last}: not valid JSON"):
        llm.prepare(_params(tiny_llama, data, tmp_path, dataset_num_proc=2))
    data = _alpaca(
        tmp_path / "train.jsonl", count, bad={10: "{}", last: json.dumps({"instruction": "x", "output": ""})}
    )
    with pytest.raises(DataError) as err:
        llm.prepare(_params(tiny_llama, data, tmp_path, dataset_num_proc=2))
    message = str(err.value)
    assert message.startswith(f"2 bad row(s) in {data}: {data} line 10, column 'instruction': missing value")
    assert f"line {last}, column 'output': empty text" in message
    raw = data.read_bytes().replace(b"Add 5 and", b"Add \xff and")
    data.write_bytes(raw)
    with pytest.raises(DataError, match=r"train.jsonl line 5: not valid UTF-8 \(byte 0xff\)"):
        llm.prepare(_params(tiny_llama, data, tmp_path))


def test_a_compressed_file_is_streamed_like_a_plain_one(tiny_llama, tmp_path):
    plain = _alpaca(tmp_path / "train.jsonl", 500)
    packed = tmp_path / "gz" / "train.jsonl.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a = llm.prepare(_params(tiny_llama, plain, tmp_path, no_cache=True)).data.train
    b = llm.prepare(_params(tiny_llama, packed, tmp_path, no_cache=True)).data.train
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.trained, b.trained)
    packed.write_bytes(gzip.compress(plain.read_bytes())[:-200])  # cut short
    with pytest.raises(DataError, match="not a readable gzip file"):
        llm.prepare(_params(tiny_llama, packed, tmp_path, no_cache=True))


# ------------------------------------------------------------------------------------------------ the arrays


def _reference_labels(text: str, spans: list, ids: list, offsets: list) -> list[int]:
    """The per-token rule the arrays implement: trained when the token's characters touch a trainable span."""
    labels = [
        tok if end > begin and any(begin < stop and end > start for start, stop in spans) else IGNORE
        for tok, (begin, end) in zip(ids, offsets, strict=True)
    ]
    return [IGNORE, *labels[1:]] if labels else labels


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_encode_arrays_marks_the_same_tokens_as_the_per_token_rule(tmp_path, kind):
    build = build_tokenizer if kind == "byte-level" else build_sentencepiece_tokenizer
    tiny_tokenizer = build(tmp_path / "tok")
    source = template_source("chatml", tiny_tokenizer)
    rng = random.Random(0)
    rendered = []
    for i in range(60):
        turns = []
        for t in range(rng.randint(1, 3)):
            turns += [
                {"role": "user", "content": f"question {i} {t} " * rng.randint(1, 4)},
                {"role": "assistant", "content": f"answer {i}-{t} é ✓ 🙂 " * rng.randint(1, 4)},
            ]
        rendered.append(render_messages(turns, source, tiny_tokenizer))
    ids, trained, lengths = encode_arrays(rendered, tiny_tokenizer, add_special_tokens=True)
    bounds = np.cumsum(lengths)[:-1]
    for r, row_ids, row_trained in zip(rendered, np.split(ids, bounds), np.split(trained, bounds), strict=True):
        enc = tiny_tokenizer(r.text, add_special_tokens=True, return_offsets_mapping=True)
        assert row_ids.tolist() == enc["input_ids"]
        got = np.where(row_trained != 0, row_ids, IGNORE).tolist()
        assert got == _reference_labels(r.text, r.spans, enc["input_ids"], enc["offset_mapping"])
        assert 0 < row_trained.sum() < len(row_ids)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
@pytest.mark.parametrize("template", ["alpaca", "system prompt"])
def test_shared_openings_are_tokenized_once_and_give_the_same_tokens(tmp_path, kind, template):
    """Texts that open alike (a template's preamble, a fixed system prompt) have that opening tokenized once per
    block where the tokenizer splits text into pieces (byte-level BPE); the ids and trained tokens are those of
    tokenizing every text whole, and a SentencePiece tokenizer (a marker added per call) is never cut."""
    from tunelab.data.tokenize import _shared_cuts

    build = build_tokenizer if kind == "byte-level" else build_sentencepiece_tokenizer
    tokenizer = build(tmp_path / "tok")
    source = template_source("alpaca" if template == "alpaca" else "chatml", tokenizer)
    system = [{"role": "system", "content": "You are a careful assistant. Answer briefly, and say so when unsure."}]
    rng = random.Random(1)
    rendered = []
    for i in range(80):
        user = {
            "role": "user",
            "content": rng.choice(["Na", "Name", "Names", "Nan'", "Nan's", "Na 42", "Na\n\nx"]) + f" thing {i}?",
        }
        if template == "alpaca" and i % 3 == 0:
            user["input"] = f"context {i}"
        turns = [user, {"role": "assistant", "content": f"answer {i} " * rng.randint(1, 3)}]
        rendered.append(render_messages(turns if template == "alpaca" else system + turns, source, tokenizer))
    cuts, heads = _shared_cuts(rendered, tokenizer.backend_tokenizer)
    assert bool(heads) == (kind == "byte-level")
    ids, trained, lengths = encode_arrays(rendered, tokenizer, add_special_tokens=False)
    bounds = np.cumsum(lengths)[:-1]
    for r, row_ids, row_trained in zip(rendered, np.split(ids, bounds), np.split(trained, bounds), strict=True):
        enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
        assert row_ids.tolist() == enc["input_ids"]
        got = np.where(row_trained != 0, row_ids, IGNORE).tolist()
        assert got == _reference_labels(r.text, r.spans, enc["input_ids"], enc["offset_mapping"])


def _reference_pack(lengths: list[int], block_size: int) -> list[list[int]]:
    """Best-fit decreasing as a sorted list of (room, row): the rows best_fit_rows must give."""
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[item]
        slot = bisect.bisect_left(open_rows, (size, -1))
        if slot < len(open_rows):
            room, index = open_rows.pop(slot)
            rows[index].append(item)
        else:
            room, index = block_size, len(rows)
            rows.append([item])
        if room - size > 0:
            bisect.insort(open_rows, (room - size, index))
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_rows_packs_as_best_fit_decreasing(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 64), rng.randint(1, 8), 64]) for _ in range(rng.randint(1, 400))]
    order, starts = best_fit_rows(np.array(lengths), 64)
    got = [order[starts[r] : starts[r + 1]].tolist() for r in range(len(starts) - 1)]
    assert got == _reference_pack(lengths, 64)
    assert all(sum(lengths[i] for i in row) <= 64 for row in got)


def test_load_data_keeps_tables_in_memory_without_a_folder(tiny_llama, tmp_path):
    data = _alpaca(tmp_path / "train.jsonl", 12)
    params = _params(tiny_llama, data, tmp_path)
    encoded = load_data(params, llm.load_tokenizer(llm.resolve_model(str(tiny_llama)), 128))
    assert encoded.train.name is None and len(encoded.train) == 12  # no files behind it
    assert all(example.trained_tokens > 0 for example in encoded.train)


# ------------------------------------------------------------------------------------------------ mixtures


def _chat(path: Path, count: int) -> Path:
    rows = [
        {"conversations": [{"role": "user", "content": f"Hi {i}?"}, {"role": "assistant", "content": f"Hello {i}."}]}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path: Path, count: int) -> Path:
    lines = ["prompt,completion"] + [f"Say {i},{i} said" for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_mixture_draws_each_source_with_its_own_format_and_template(tiny_llama, tmp_path):
    mixture = [
        str(_alpaca(tmp_path / "alpaca.jsonl", 30)),
        {"path": str(_chat(tmp_path / "chat.jsonl", 40)), "fraction": 0.25, "chat_template": "zephyr"},
        {"path": str(_csv(tmp_path / "pairs.csv", 5)), "weight": 2.4},
    ]
    params = _params(tiny_llama, mixture, tmp_path)
    prep = llm.prepare(params)
    table = prep.data.train
    assert len(table) == 30 + 10 + 2 * 5 + 2
    texts = [prep.tokenizer.decode(table[i].input_ids) for i in (0, 30, 40)]
    assert "### Instruction" in texts[0]  # alpaca rows: the alpaca template
    assert "<|user|>" in texts[1] and "Hi " in texts[1]  # the chat source's own template (zephyr)
    assert "<|im_start|>user\nSay 0" in texts[2]  # prompt/completion rows: the model's template
    parts = prep.data.mixture
    assert [p["taken"] for p in parts] == [30, 10, 12] and [p["examples"] for p in parts] == [30, 40, 5]
    assert sum(p["tokens"] for p in parts) == table.tokens
    assert sum(p["share"] for p in parts) == pytest.approx(1.0)

    plan = tunelab.plan(params)
    notes = "\n".join(plan.splits[0].notes)
    assert f"source {tmp_path / 'chat.jsonl'} (fraction 0.25): 10 of 40 examples" in notes, notes
    assert f"source {tmp_path / 'pairs.csv'} (weight 2.4): 12 of 5 examples" in notes
    again = llm.prepare(params)
    assert again.prepared.hit and again.data.mixture == parts


def test_a_mixture_draw_follows_the_seed_and_is_part_of_the_key(tiny_llama, tmp_path):
    chat = str(_chat(tmp_path / "chat.jsonl", 40))
    mixture = [str(_alpaca(tmp_path / "alpaca.jsonl", 10)), {"path": chat, "fraction": 0.5}]

    def drawn(**extra):
        prep = llm.prepare(_params(tiny_llama, mixture, tmp_path, **extra))
        return prep.prepared.key, [tuple(prep.data.train[i].input_ids) for i in range(len(prep.data.train))]

    key, rows = drawn(seed=1)
    assert drawn(seed=1) == (key, rows)
    other_key, other_rows = drawn(seed=2)
    assert other_key != key and other_rows != rows and len(other_rows) == len(rows) == 30
    mixture[1]["fraction"] = 0.25
    assert drawn(seed=1)[0] != key


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"path": "x.jsonl", "fraction": 0}, "data_path item 2: fraction must be a number above 0 and at most 1"),
        ({"path": "x.jsonl", "fraction": 0.5, "weight": 2}, "data_path item 2: give `fraction`"),
        ({"path": "x.jsonl", "share": 0.5}, "data_path item 2: unknown key 'share'"),
        ({"fraction": 0.5}, "data_path item 2: `path` is required"),
        (3, "data_path item 2: expected a path or a mapping"),
    ],
)
def test_a_bad_mixture_entry_is_one_line_naming_it(tiny_llama, tmp_path, item, message):
    from tunelab.errors import ConfigError

    mixture = [str(_alpaca(tmp_path / "alpaca.jsonl", 10)), item]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llm.prepare(_params(tiny_llama, mixture, tmp_path))


def test_a_mixture_in_a_config_file(tiny_llama, tmp_path):
    from tunelab.config import load_config

    config = tmp_path / "config.yaml"
    alpaca, chat = _alpaca(tmp_path / "alpaca.jsonl", 10), _chat(tmp_path / "chat.jsonl", 8)
    config.write_text(
        f"model: {tiny_llama}\ntrainer: sft\nblock_size: 256\nmodel_max_length: 512\n"
        f"project_name: {tmp_path / 'run'}\ndata_path:\n  - {alpaca}\n  - path: {chat}\n    fraction: 0.5\n",
        encoding="utf-8",
    )
    params = load_config(str(config))
    assert params.data_path == [str(alpaca), {"path": str(chat), "fraction": 0.5}]
    assert len(llm.prepare(params).data.train) == 14


def test_preference_trainers_refuse_a_mixture_for_now(tiny_llama, tmp_path):
    from tunelab.errors import ConfigError

    mixture = [str(_alpaca(tmp_path / "a.jsonl", 10)), str(_alpaca(tmp_path / "b.jsonl", 10))]
    with pytest.raises(ConfigError, match="data_path lists several sources, which trainer dpo does not take"):
        llm.prepare(_params(tiny_llama, mixture, tmp_path, trainer="dpo"))


# ------------------------------------------------------------------------------------------------ streaming


def test_streamed_rows_are_the_prepared_rows_in_file_order(tiny_llama, tmp_path):
    data = _alpaca(tmp_path / "train.jsonl", 2 * BLOCK_BYTES // 80)  # more than one block
    prepared = llm.prepare(_params(tiny_llama, data, tmp_path))
    streamed = llm.prepare(_params(tiny_llama, data, tmp_path, streaming=True, max_steps=5))
    assert streamed.prepared is None and streamed.data.streamed
    assert len(streamed.data.train) < len(prepared.data.train)  # only the first block was read up front
    rows = list(streamed.train_rows)
    assert rows == [prepared.train_rows[i] for i in range(len(prepared.train_rows))]
    assert list(streamed.train_rows) == rows  # the same on every pass (what a resumed run skips through)


def test_streaming_needs_max_steps_and_one_source_of_examples(tiny_llama, tmp_path):
    from tunelab.errors import ConfigError

    data = _alpaca(tmp_path / "train.jsonl", 20)
    with pytest.raises(ConfigError, match="streaming: true needs max_steps"):
        _params(tiny_llama, data, tmp_path, streaming=True)
    with pytest.raises(ConfigError, match="streaming: true is for one source and trainers default and sft"):
        llm.prepare(_params(tiny_llama, [str(data), str(data)], tmp_path, streaming=True, max_steps=2))


def test_a_streamed_bad_row_is_named_when_its_block_is_read(tiny_llama, tmp_path):
    count = 3 * BLOCK_BYTES // 60
    last = count - 5
    data = _alpaca(tmp_path / "train.jsonl", count, bad={last: json.dumps({"instruction": "x", "output": ""})})
    params = _params(tiny_llama, data, tmp_path, streaming=True, max_steps=5)
    plan = tunelab.plan(params)  # the first block is good: the dry run passes, and says it streams
    assert any("streamed" in note for note in plan.notes)
    with pytest.raises(DataError, match=rf"1 bad row\(s\) in {data} \(streamed.*line {last}, column 'output'"):
        list(llm.prepare(params).train_rows)
    skipping = llm.prepare(dataclasses.replace(params, bad_rows="skip"))
    assert sum(1 for _ in skipping.train_rows) == count - 1


def test_a_streamed_run_trains_and_says_so(tiny_llama, tmp_path):
    data = _alpaca(tmp_path / "train.jsonl", 60)
    args = dict(model=str(tiny_llama), data_path=str(data), trainer="sft", block_size=256, model_max_length=512)
    args.update(project_name=str(tmp_path / "run"), streaming=True, max_steps=3, batch_size=2, logging_steps=1)
    folder = tunelab.train(**args)
    info = json.loads((folder / "tunelab_run.json").read_text())
    assert info["prepared_data"] == "streamed"
    losses = train_losses(folder)
    assert len(losses) == 3 and all(np.isfinite(losses))
