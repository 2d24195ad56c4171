"""The `tunelab` command: argument parsing and printing only; the work is done by tasks/ (train, dry run) and
inference/ (everything after training), which the Python API calls too. Parameter flags are generated from
config/llm.py and config/text_classification.py; AutoTrain's spellings come from config/aliases.py. Every
user-input problem ends as one line on stderr and exit code 2.

    tunelab llm --train --model M --data-path D --trainer sft --peft ...
    tunelab --config config.yaml            (AutoTrain's config schema, or tunelab's flat one)
    tunelab llm --dry-run ...               (check everything and print the plan; train nothing)
    tunelab generate --model RUN_FOLDER "prompt"
    tunelab evaluate | chat | merge | export | serve --model RUN_FOLDER ...
    tunelab env
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab import __version__
from tunelab.config.aliases import ALIASES
from tunelab.config.llm import LLMParams
from tunelab.config.text_classification import TextClassificationParams
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.inference.generate import Answer

log = logging.getLogger("tunelab")
# inference/export.DTYPES, spelled out here so that building the parser imports nothing more (a test keeps them equal)
EXPORT_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0")


def _flag_names(name: str) -> list[str]:
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    return names


def add_param_flags(parser: argparse.ArgumentParser, schema: type = LLMParams) -> None:
    """One flag per field of the parameter class (snake_case and kebab-case), plus AutoTrain's older spellings.

    Defaults are suppressed so that only the flags a user typed override a config file.
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for f in fields.values():
        kind = str(f.type)
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kind.startswith("bool"):
            parser.add_argument(
                *_flag_names(f.name),
                dest=f.name,
                nargs="?",
                const="true",
                metavar="BOOL",
                help=help_text,
                default=argparse.SUPPRESS,
            )
        else:
            choices = f.metadata.get("choices")
            shown = dict.fromkeys("none" if c is None else c for c in choices or ())
            if f.metadata.get("open_choices"):
                shown["..."] = None  # or a value of another kind, as the help says
            metavar = "{" + ",".join(shown) + "}" if choices else None
            parser.add_argument(
                *_flag_names(f.name), dest=f.name, metavar=metavar, help=help_text, default=argparse.SUPPRESS
            )
    for alias, (target, fixed) in ALIASES.items():
        names = [n for n in _flag_names(alias) if n not in parser._option_string_actions]
        if not names or target not in fields:
            continue
        if fixed is None:
            parser.add_argument(*names, dest=target, help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        else:
            parser.add_argument(
                *names,
                dest=target,
                action="store_const",
                const=fixed,
                help=argparse.SUPPRESS,
                default=argparse.SUPPRESS,
            )


def add_dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        "--dry_run",
        action="store_true",
        help="Check everything and print the plan (rows, token lengths, truncation, examples as trained, steps, "
        "memory estimate) without training or writing anything.",
    )


def add_reasoning_flags(parser: argparse.ArgumentParser, shown: str, hidden: str = "") -> None:
    """How a reasoning model's answers are read and shown (chat, generate), and its template's variables."""
    from tunelab.inference.reasoning import PARSERS

    parser.add_argument(
        "--reasoning-parser",
        choices=PARSERS,
        default="think",
        help="How the model writes its reasoning, as for serve: think (also deepseek_r1, qwen3: <think>...</think> "
        f"before the answer, read apart: {shown}), or none (answers as written). Default think.",
    )
    parser.add_argument(
        "--hide-reasoning", action="store_true", help=f"Show only the answer, not the reasoning before it{hidden}."
    )
    parser.add_argument(
        "--chat-template-kwargs",
        "--chat_template_kwargs",
        metavar="JSON",
        help="More variables for the chat template, as a JSON object: e.g. '{\"enable_thinking\": false}' (Qwen3).",
    )


def build_parser() -> argparse.ArgumentParser:
    from tunelab.methods import SUMMARIES

    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune LLMs on your own data. AutoTrain Advanced's flags and config files work as they are.",
    )
    parser.add_argument("--config", help="Run the job described by a YAML config (AutoTrain's schema or tunelab's).")
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    add_dry_run(parser)
    sub = parser.add_subparsers(dest="command")

    llm = sub.add_parser(
        "llm",
        help="fine-tune a causal language model",
        description="Fine-tune a causal LM. Trainers: "
        + "; ".join(f"{name}: {summary}" for name, summary in SUMMARIES.items()),
    )
    llm.add_argument("--train", action="store_true", help="Train (accepted for AutoTrain compatibility; implied).")
    llm.add_argument("--config", dest="config", help="YAML config; flags given here override it.")
    llm.add_argument("--backend", help=argparse.SUPPRESS)  # AutoTrain's; tunelab always trains here
    add_dry_run(llm)
    add_param_flags(llm)

    vlm = sub.add_parser(
        "vlm",
        help="fine-tune a vision-language model on images (AutoTrain's vlm task)",
        description="AutoTrain's vlm task: --trainer vqa (image_column, prompt_text_column, text_column: the image, "
        "the question, the answer) or captioning (image_column, text_column: the image and its caption), trained by "
        "sft on the model's images. Chats that show images train with `tunelab llm --trainer sft` (docs/data.md).",
    )
    vlm.add_argument("--train", action="store_true", help="Train (accepted for AutoTrain compatibility; implied).")
    vlm.add_argument("--config", dest="config", help="YAML config; flags given here override it.")
    vlm.add_argument("--backend", help=argparse.SUPPRESS)
    add_dry_run(vlm)
    add_param_flags(vlm)

    gen = sub.add_parser("generate", help="generate text with a trained run folder (or any model)")
    gen.add_argument("prompt", nargs="*", help="Prompt text (a chat model gets it as a user turn).")
    gen.add_argument("--model", required=True, help="Run folder, model folder, .gguf file or hub id.")
    gen.add_argument(
        "--data-path", "--data_path", help="Answer every row of this CSV/JSONL/Parquet file (written as JSON lines)."
    )
    gen.add_argument("--text-column", "--text_column", default="prompt", help="Column with the prompts.")
    gen.add_argument("--output", help="The JSON lines file to write (default: <data file>.answers.jsonl).")
    gen.add_argument("--batch-size", "--batch_size", type=int, default=8, help="Prompts generated at once.")
    gen.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=128)
    gen.add_argument("--do-sample", "--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", "--top_k", type=int, default=50)
    gen.add_argument("--top-p", "--top_p", type=float, default=1.0)
    gen.add_argument("--num-return-sequences", "--num_return_sequences", type=int, default=1)
    gen.add_argument(
        "--seed", type=int, help="With --do-sample: start sampling from this seed, for the same answers each run."
    )
    gen.add_argument("--system", help="A system message opening each prompt (a conversation with its own keeps it).")
    gen.add_argument(
        "--image",
        action="append",
        default=[],
        help="An image the prompt shows (a vision-language model; repeat for several, shown in order).",
    )
    add_reasoning_flags(
        gen,
        "printed on stderr after 'thinking>'; with --data-path, written as \"reasoning\"",
        " (on the terminal: a --data-path file keeps it)",
    )

    classify = sub.add_parser(
        "text-classification",
        help="fine-tune a model to label texts",
        description="Fine-tune a sequence classifier (encoder or decoder model) on labelled texts.",
    )
    classify.add_argument("--train", action="store_true", help="Train (accepted for AutoTrain compatibility).")
    classify.add_argument("--config", dest="config", help="YAML config; flags given here override it.")
    classify.add_argument("--backend", help=argparse.SUPPRESS)
    add_dry_run(classify)
    add_param_flags(classify, TextClassificationParams)

    predict = sub.add_parser("predict", help="label texts with a trained text-classification run")
    predict.add_argument("texts", nargs="*", help="Texts to label.")
    predict.add_argument("--model", required=True, help="Run folder of a text-classification run.")
    predict.add_argument("--data-path", "--data_path", help="Label every row of this CSV/JSONL/Parquet file.")
    predict.add_argument("--text-column", "--text_column", default="text", help="Column with the texts.")
    predict.add_argument("--output", help="Write predictions here (CSV; default: <data-path stem>.predictions.csv).")

    score = sub.add_parser("score", help="score texts with a trained reward model (higher: preferred)")
    score.add_argument("texts", nargs="*", help="Texts to score (each a whole prompt + answer).")
    score.add_argument("--model", required=True, help="Run folder of a reward run (--trainer reward).")
    score.add_argument("--data-path", "--data_path", help="Also score every row of this CSV/JSONL/Parquet file.")
    score.add_argument("--text-column", "--text_column", default="text", help="Column to score in --data-path.")

    evaluate = sub.add_parser(
        "evaluate",
        help="a run on a data split: loss, perplexity and sample answers beside its base model; a preference "
        "run's rewards/accuracies and margins on pairs; a classifier's accuracy, macro F1 and confusion matrix; "
        "accuracy on multiple-choice questions (MMLU, ARC, HellaSwag shapes)",
        description="Evaluate a run folder on a data split (formatted as in training); writes evaluation/ "
        "(report.md, results.json, and loss_curves.png or, for a text classifier, confusion_matrix.png) into the "
        "run folder and adds the figures to its model card. A dpo, kto, orpo, simpo or reward run given "
        "prompt/chosen/rejected pairs (kto: its labeled answers too) is measured by the figures its training logs "
        "(rewards/accuracies, rewards/margins, rewards/chosen, rewards/rejected, logps/*; a reward model's accuracy "
        "and margin). A file of multiple-choice questions in MMLU's (question, choices, answer), ARC's (question, "
        "choices {text, label}, answerKey) or HellaSwag's (ctx, endings, label) shape is scored as "
        "lm-evaluation-harness scores it: accuracy and per-character accuracy_norm (docs/after-training.md).",
    )
    evaluate.add_argument("--model", required=True, help="Run folder (or model folder) to evaluate.")
    evaluate.add_argument("--data-path", "--data_path", required=True, help="File or folder of the data.")
    evaluate.add_argument(
        "--split",
        default="test",
        help="Split to evaluate (file stem in a folder; a hub dataset's split, or subset:split such as all:test; "
        "default test; a --data-path file is its own split). On the data a valid_size run trained on: "
        "valid, the examples it held out; train, those it trained on.",
    )
    evaluate.add_argument("--compare-base", "--compare_base", action="store_true", help="Evaluate the base too.")
    evaluate.add_argument(
        "--max-rows",
        "--max_rows",
        type=int,
        help="Rows scored (default: 200 for a language model, 200 pairs for a preference run, 200 for "
        "multiple-choice questions, all for a classifier).",
    )
    evaluate.add_argument(
        "--samples",
        type=int,
        default=3,
        help="Sample answers shown side by side (default 3); a language model's on its own kind of data are also "
        "scored against their references (exact match, ROUGE-1/2/L, BLEU-4): give 100 or more for figures worth "
        "comparing.",
    )
    evaluate.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=64)
    evaluate.add_argument(
        "--fewshot",
        "--num-fewshot",
        "--num_fewshot",
        type=int,
        default=0,
        help="Multiple-choice questions: answered examples shown before each (MMLU's figures are 5-shot), the first "
        "of --fewshot-split (of the question's subject), as lm-evaluation-harness's MMLU tasks take them (its ARC and "
        "HellaSwag tasks draw theirs at random from train).",
    )
    evaluate.add_argument(
        "--fewshot-split",
        "--fewshot_split",
        help="Where the few-shot examples come from: a split (default dev, MMLU's; a hub subset carries over: "
        "college_biology:test takes college_biology:dev); beside a --data-path file, a file (a path, or a name in "
        "its folder), by default the file's own other questions.",
    )

    chat = sub.add_parser("chat", help="talk to a trained model in the terminal (streamed; /reset, /exit)")
    chat.add_argument("--model", required=True, help="Run folder, model folder, .gguf file or hub id.")
    chat.add_argument("--system", help="A system message opening the conversation.")
    chat.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=256)
    chat.add_argument("--do-sample", "--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", "--top_p", type=float, default=0.9)
    add_reasoning_flags(chat, "shown after 'thinking>'")

    merge = sub.add_parser("merge", help="merge a run's LoRA adapter into its base: one full transformers model")
    merge.add_argument("--model", required=True, help="Run folder holding a LoRA adapter.")
    merge.add_argument("--output", required=True, help="Folder to create for the merged model.")
    merge.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="Default: the base's dtype.")

    export = sub.add_parser("export", help="export a run or model to a GGUF file (llama.cpp, Ollama, ...)")
    export.add_argument("--model", required=True, help="Run folder (a LoRA adapter is merged first) or model folder.")
    export.add_argument(
        "--format",
        default="gguf",
        choices=("gguf", "ollama", "gguf-lora"),
        help="gguf: one .gguf file; ollama: a folder with model.gguf and a Modelfile (TEMPLATE from the run's chat "
        "template, its stop tokens, its default system prompt), for `ollama create NAME -f FOLDER/Modelfile`; "
        "gguf-lora: a LoRA run's adapter alone, as llama.cpp's adapter file, to load on a GGUF of its base "
        "(llama.cpp --lora, llama-cpp-python lora_path, Ollama's ADAPTER); --dtype f32, f16 or bf16.",
    )
    export.add_argument(
        "--output", required=True, help="The .gguf file to write (gguf, gguf-lora) or the folder (ollama)."
    )
    export.add_argument("--system", help="ollama: the Modelfile's SYSTEM prompt (default: the chat template's own).")
    export.add_argument(
        "--thinking",
        action=argparse.BooleanOptionalAction,
        help="ollama: the model writes its reasoning in <think>...</think> before its answers, so Ollama is to read "
        "it apart as thinking (default: as the run's tunelab_run.json says: it trained on reasoning).",
    )
    export.add_argument(
        "--dtype",
        default="f16",
        choices=EXPORT_DTYPES,
        help="Weight type: f32, f16, bf16 and q8_0 are written by tunelab; q4_k_m (Ollama's default), q5_k_m, q6_k "
        "and q4_0 by llama.cpp's quantizer (pip install llama-cpp-python).",
    )

    from tunelab.inference.serve import add_arguments as add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API"))

    app = sub.add_parser(
        "app",
        help="the web app: upload data, pick a model and method, train, watch, try the model (docs/app.md)",
        description="A local web app on the same engine as the CLI. Serves 127.0.0.1 by default; any other --host "
        "needs --token.",
    )
    app.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only).")
    app.add_argument("--port", type=int, default=7860, help="Port to listen on (default: 7860).")
    app.add_argument("--data-dir", "--data_dir", default="~/.tunelab/app", help="The app's database, uploads, jobs.")
    app.add_argument(
        "--token",
        default=os.environ.get("TUNELAB_APP_TOKEN"),
        help="Access token asked for at login (default: $TUNELAB_APP_TOKEN, which keeps it out of the process list)."
        " Required with a --host other than loopback.",
    )
    app.add_argument("--max-upload-mb", "--max_upload_mb", type=float, default=200, help="Largest upload (MB).")
    app.add_argument(
        "--allow-path",
        "--allow_path",
        action="append",
        default=[],
        metavar="FOLDER",
        help="A folder whose data files and models may be chosen by path (repeatable; the data dir always is).",
    )

    sub.add_parser("env", help="print versions and the device tunelab would train on")
    return parser


def param_flags(args: argparse.Namespace) -> dict:
    """The parameter flags a user typed (defaults are suppressed), without the command's own options."""
    own = ("command", "train", "config", "backend", "dry_run", "argv", "from_command_line")
    return {k: v for k, v in vars(args).items() if k not in own}


def run_llm(args: argparse.Namespace, schema: type = LLMParams) -> int:
    """Train: `tunelab llm`, `tunelab text-classification` or `tunelab --config` (the config's task decides)."""
    from tunelab.config import read_config_file, split_task
    from tunelab.config.overrides import build_params

    flags = param_flags(args)
    base: dict = {}
    if args.config:
        config_schema, base = split_task(read_config_file(args.config))
        if args.command and config_schema is not schema:
            raise TunelabError(f"{args.config} is a config for another task than `tunelab {args.command}`")
        schema = config_schema
    params = build_params(base, flags, schema=schema)
    from tunelab import tasks

    if args.dry_run:
        print(tasks.plan(params).render())
        return 0
    from tunelab import allocator

    if args.from_command_line:  # on a CPU: tcmalloc when installed (returns if nothing to do)
        allocator.restart_with_allocator(args.argv)
    logging.getLogger("tunelab").info("%s", allocator.describe())
    print(f"tunelab: finished; outputs in {tasks.train(params, argv=args.argv)}")
    return 0


def run_vlm(args: argparse.Namespace) -> int:
    """`tunelab vlm --trainer vqa|captioning`: `tunelab llm --trainer sft` with AutoTrain's vlm columns."""
    from tunelab.config import read_config_file, split_task
    from tunelab.config.aliases import VLM_TRAINERS
    from tunelab.config.autotrain import vlm_params

    flags = param_flags(args)
    base = split_task(read_config_file(args.config))[1] if args.config else {}
    typed = flags.get("trainer")
    kind = typed or (base.get("trainer") if base.get("trainer") in VLM_TRAINERS else None)
    # the columns the config or the flags leave unset take the vlm trainer's defaults, unless a config has decided
    # them (an AutoTrain vlm config, or a flat one naming its image column)
    chosen = vlm_params(kind, "vqa", {**base, **flags})
    if typed is None and base.get("image_column"):
        chosen = {"trainer": "sft"}
    for key, value in chosen.items():
        setattr(args, key, value)
    args.command = "llm"  # the parameters are an LLM run's; a config for `tunelab llm` goes too
    return run_llm(args)


def run_generate(args: argparse.Namespace) -> int:
    from tunelab.config.llm import template_variables
    from tunelab.data.formats import read_prompts
    from tunelab.inference.generate import (
        GenerationParams,
        Prompting,
        answers_path,
        generate_many,
        image_prompt,
        load_processor_of,
        load_run,
        opened_images,
        write_answers,
    )
    from tunelab.inference.reasoning import thinking_for

    options = GenerationParams(
        args.max_new_tokens,
        args.do_sample,
        args.temperature,
        args.top_k,
        args.top_p,
        args.num_return_sequences,
        args.seed,
    )
    options.check()
    variables = template_variables(args.chat_template_kwargs)
    if not args.prompt and not args.data_path:
        raise TunelabError("generate: give a prompt on the command line or --data-path")
    if args.batch_size < 1:
        raise TunelabError(f"--batch-size must be at least 1, got {args.batch_size}")
    prompts, target = [], None
    if args.image and (args.data_path or not args.prompt):
        raise TunelabError("generate: --image goes with a prompt on the command line, not with --data-path")
    shown = opened_images(args.image) if args.image else None  # checked before the model loads
    processor = load_processor_of(args.model) if args.image else None
    if args.data_path:  # the file and where its answers go are checked before the model loads
        prompts = read_prompts(Path(args.data_path), args.text_column, "generate")
        target = answers_path(Path(args.data_path), args.output)
    model, tokenizer = load_run(args.model)
    prompting = Prompting(args.system, variables or {}).check(tokenizer)
    thinking = thinking_for(args.reasoning_parser)
    if target is not None:
        out = write_answers(model, tokenizer, prompts, target, options, args.batch_size, thinking, prompting)
        print(f"tunelab: answers written to {out}", file=sys.stderr)
    if args.prompt:
        text = " ".join(args.prompt)
        prompt = [image_prompt(text, args.image) if shown else text]
        images = [shown] if shown else None
        answers = generate_many(model, tokenizer, prompt, options, 1, thinking, prompting, images, processor)
        for answer in next(answers):
            print_answer(answer, show_reasoning=not args.hide_reasoning)
    return 0


def print_answer(answer: Answer, show_reasoning: bool) -> None:
    """A generated answer on stdout, its reasoning (if any) before it on stderr after `thinking> `, dimmed on a
    terminal, so a pipe gets the answer alone."""
    if answer.reasoning is not None and show_reasoning:
        dim = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
        print("thinking> " + (f"\x1b[2m{answer.reasoning}\x1b[0m" if dim else answer.reasoning), file=sys.stderr)
    if answer.text is None and answer.finish_reason == "length":
        print("(the answer was cut off while thinking: raise --max-new-tokens)", file=sys.stderr)
    elif answer.text is None:
        print("(the model stopped while thinking, without an answer)", file=sys.stderr)
    print(answer.text or "", flush=True)


def run_predict(args: argparse.Namespace) -> int:
    from tunelab.data.formats import read_texts
    from tunelab.inference.predict import load_classifier, predict, predictions_path, write_predictions

    if not args.texts and not args.data_path:
        raise TunelabError("predict: give texts on the command line or --data-path")
    texts, target = [], None
    if args.data_path:  # the file and where its labels go are checked before the model loads
        texts = read_texts(Path(args.data_path), args.text_column, "predict")
        target = predictions_path(Path(args.data_path), args.output)
    model, tokenizer = load_classifier(args.model)
    if target is not None:
        out = write_predictions(model, tokenizer, texts, args.text_column, target)
        print(f"tunelab: predictions written to {out}")
    if args.texts:
        for text, (label, score) in zip(args.texts, predict(model, tokenizer, args.texts), strict=True):
            print(f"{label}\t{score:.4f}\t{json.dumps(text[:80])}")
    return 0


def run_score(args: argparse.Namespace) -> int:
    from tunelab.data.formats import read_texts
    from tunelab.inference.score import load_reward_model, score

    texts = list(args.texts)
    if args.data_path:
        texts += read_texts(Path(args.data_path), args.text_column, "score")
    if not texts:
        raise TunelabError("score: give texts on the command line or --data-path")
    model, tokenizer, append_eos = load_reward_model(args.model)
    for text, value in zip(texts, score(model, tokenizer, texts, append_eos), strict=True):
        print(f"{value:.4f}\t{json.dumps(text[:80])}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from tunelab.inference.evaluate import REPORT_DIR, evaluate_run

    results = evaluate_run(
        args.model,
        args.data_path,
        args.split,
        compare_base=args.compare_base,
        max_rows=args.max_rows,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        fewshot=args.fewshot,
        fewshot_split=args.fewshot_split,
    )
    if "method" in results:  # a preference run on pairs
        from tunelab.inference.evaluate_preference import summary

        print("\n".join(summary(results)))
    elif results.get("task") == "multiple_choice":
        from tunelab.inference.multiple_choice import summary

        print("\n".join(summary(results)))
    elif "accuracy" in results:  # a text classifier
        print(
            f"accuracy {results['accuracy']:.4f}, macro F1 {results['macro_f1']:.4f} on {results['rows']} rows "
            f"(majority label: {results['majority_baseline']:.4f})"
        )
    else:
        print(
            f"eval loss {results['eval_loss']:.4f} (perplexity {results['eval_perplexity']:.2f}) on "
            f"{results['rows']} rows"
        )
    if "base_eval_loss" in results:
        print(f"base: eval loss {results['base_eval_loss']:.4f} (perplexity {results['base_eval_perplexity']:.2f})")
    for name, key in (("sample answers", "answer_scores"), ("base's sample answers", "base_answer_scores")):
        if key in results:
            figures = ", ".join(f"{metric} {value:.2f}" for metric, value in results[key].items())
            print(f"{name} against their references: {figures}")
    print(f"tunelab: report in {Path(args.model) / REPORT_DIR / 'report.md'}")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from tunelab.config.llm import template_variables
    from tunelab.inference.chat import ChatSession, chat_loop
    from tunelab.inference.generate import GenerationParams, load_run
    from tunelab.inference.reasoning import thinking_for
    from tunelab.outputs import check_run_folder

    if Path(args.model).exists():
        check_run_folder(args.model, "chat")
    options = GenerationParams(args.max_new_tokens, args.do_sample, args.temperature, top_p=args.top_p)
    options.check()
    variables = template_variables(args.chat_template_kwargs)
    model, tokenizer = load_run(args.model)
    thinking = thinking_for(args.reasoning_parser)
    session = ChatSession(model, tokenizer, options, args.system, thinking=thinking, template_kwargs=variables)
    chat_loop(session, name=args.model, show_reasoning=not args.hide_reasoning)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from tunelab.inference.merge import merge_run

    print(f"tunelab: merged model in {merge_run(args.model, args.output, args.dtype)}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    if args.format == "ollama":
        from tunelab.inference.ollama import export_ollama

        modelfile = export_ollama(args.model, args.output, args.dtype, args.system, args.thinking)
        print(f"tunelab: exported {modelfile.parent / 'model.gguf'} and {modelfile}")
        print(f"tunelab: load it into Ollama with: ollama create NAME -f {modelfile}")
        return 0
    if args.system is not None or args.thinking is not None:
        flag = "--system" if args.system is not None else "--thinking"
        raise TunelabError(f"export: {flag} is for --format ollama (a GGUF file carries the chat template alone)")
    if args.format == "gguf-lora":
        from tunelab.inference.gguf_adapter import export_adapter

        print(f"tunelab: exported {export_adapter(args.model, args.output, args.dtype)}")
        return 0
    from tunelab.inference.export import export_run

    print(f"tunelab: exported {export_run(args.model, args.output, args.dtype)}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from tunelab.inference.serve import serve, serve_arguments

    serve(**serve_arguments(args))
    return 0


def run_app(args: argparse.Namespace) -> int:
    from tunelab.app import run_app as serve_app

    serve_app(args.host, args.port, args.data_dir, args.token, args.allow_path, args.max_upload_mb)
    return 0


def run_env() -> int:
    from tunelab.env import versions

    for name, value in versions().items():
        print(f"{name}: {value}")
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (pytest, notebooks and the web app swap it), not the one at setup."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value):  # the base class assigns it; the property ignores that
        pass


def setup_logging() -> None:
    """tunelab's own log lines on stderr, installed once however often main() runs in one process."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("tunelab: %(message)s"))
        log.addHandler(handler)
    # With several processes, the main one tells the story; the others speak only of problems.
    from tunelab.env import is_main_process

    log.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    log.propagate = False
    # Upstream deprecation notices (transformers/peft internals) mean nothing to a user of the command.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars drown the training log
    except ImportError:
        pass


TRAINING_COMMANDS = ("llm", "vlm", "text-classification")


def token_to_environment(argv: list[str]) -> list[str]:
    """A training command's `--token T` moves to HF_TOKEN, where the run's downloads (gated models, private
    datasets), its push and its launched processes read it: out of sys.argv (which wandb records and uploads) and
    out of the command lines of the processes the run starts (the allocator's restart, accelerate's workers).
    Other commands' --token (the app's access token) is theirs, and left alone."""
    if not argv or (argv[0] not in TRAINING_COMMANDS and not argv[0].startswith("--config")):
        return argv

    def is_token_flag(arg: str) -> bool:  # argparse takes an unambiguous prefix (--tok) as the flag too
        flag = arg.split("=", 1)[0]
        return len(flag) >= len("--tok") and "--token".startswith(flag)

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if is_token_flag(arg) and "=" in arg:
            os.environ["HF_TOKEN"], i = arg.split("=", 1)[1], i + 1
        elif is_token_flag(arg) and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            os.environ["HF_TOKEN"], i = argv[i + 1], i + 2
        else:
            out.append(arg)
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    # Only the process's own command line may restart the process (allocator.py); main([...]) from Python never does.
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_command_line:
        argv = token_to_environment(argv)
        sys.argv[1:] = argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # a distributed run re-launches itself with the same arguments
    args.from_command_line = from_command_line
    setup_logging()
    try:
        commands = {
            "llm": run_llm,
            "vlm": run_vlm,
            "text-classification": lambda a: run_llm(a, TextClassificationParams),
            "predict": run_predict,
            "generate": run_generate,
            "score": run_score,
            "evaluate": run_evaluate,
            "chat": run_chat,
            "merge": run_merge,
            "export": run_export,
            "serve": run_serve,
            "app": run_app,
            "env": lambda a: run_env(),
        }
        if args.command in commands:
            return commands[args.command](args)
        if args.config:
            args.train, args.backend = True, None
            return run_llm(args)
        parser.print_help()
        return 2
    except TunelabError as err:
        print(f"tunelab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
