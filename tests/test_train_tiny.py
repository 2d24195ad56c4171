"""Whole runs on a tiny model through the CLI and the Python API: loss falls, outputs reload and generate."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests.conftest import SHARED, SHARED_DATA, needs_shared, read_metrics, train_losses
from tunelab.cli import main

FAST = [
    "--lr",
    "3e-3",
    "--batch-size",
    "4",
    "--gradient-accumulation",
    "1",
    "--block-size",
    "128",
    "--model-max-length",
    "256",
    "--disable-gradient-checkpointing",
]


def first_last(losses, n=5):
    return statistics.mean(losses[:n]), statistics.mean(losses[-n:])


def assert_generates(model, tokenizer):
    inputs = tokenizer("Write a function", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@needs_shared()
def test_sft_lora_on_chat_data_cli(tiny_llama, tmp_path, capsys):
    out = tmp_path / "chat-run"
    code = main(
        [
            "llm",
            "--train",
            "--model",
            str(tiny_llama),
            "--data-path",
            str(SHARED_DATA / "chat"),
            "--text-column",
            "messages",
            "--chat-template",
            "tokenizer",
            "--trainer",
            "sft",
            "--peft",
            "--lora-r",
            "8",
            "--max-steps",
            "30",
            "--project-name",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    losses = train_losses(out)
    first, last = first_last(losses)
    assert last < first, losses
    # reload with plain transformers + peft
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert_generates(model, tokenizer)
    # the run folder describes itself
    run = json.loads((out / "tunelab_run.json").read_text())
    assert run["adapter"] and run["template"] == "tokenizer" and run["row_format"].startswith("messages")
    assert (out / "README.md").read_text().startswith("---\nbase_model:")
    assert json.loads((out / "training_params.json").read_text())["trainer"] == "sft"
    assert not list(out.glob("checkpoint-*")) and not (tmp_path / ".chat-run.partial").exists()
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--max-new-tokens", "4", "Hello there"]) == 0
    assert capsys.readouterr().out.strip()


@needs_shared()
def test_default_trainer_full_finetune_on_alpaca(tiny_llama, tmp_path):
    out = tmp_path / "clm-run"
    code = main(
        [
            "llm",
            "--train",
            "--model",
            str(tiny_llama),
            "--data-path",
            str(SHARED_DATA / "alpaca"),
            "--trainer",
            "default",
            "--max-steps",
            "30",
            "--project-name",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    first, last = first_last(train_losses(out))
    assert last < first
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_generates(model, AutoTokenizer.from_pretrained(out))
    before = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_python_api_packing_eval_tensorboard_and_merge(tiny_llama, tmp_path):
    rows = [
        {"prompt": f"Count to {i}:", "completion": " " + " ".join(str(j) for j in range(1, i + 2))} for i in range(60)
    ]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[50:]))
    folder = tunelab.train(
        model=str(tiny_llama),
        data_path=str(data),
        valid_split="valid",
        trainer="sft",
        packing=True,
        peft=True,
        merge_adapter=True,
        log="tensorboard",
        eval_strategy="steps",
        logging_steps=5,
        max_steps=20,
        lr=3e-3,
        batch_size=2,
        gradient_accumulation=1,
        block_size=128,
        model_max_length=256,
        project_name=str(tmp_path / "api-run"),
    )
    assert folder == tmp_path / "api-run"
    records = read_metrics(folder)
    assert any("eval_loss" in r and "eval_perplexity" in r for r in records)
    assert list((folder / "runs").rglob("events.out.tfevents*")), "tensorboard events written"
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged")
    assert_generates(merged, AutoTokenizer.from_pretrained(folder / "merged"))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and metrics["trained_tokens"] > 0


@needs_shared()
def test_autotrain_gpt2_config_trains_with_local_model_and_data(tiny_gpt2, tmp_path, monkeypatch):
    """AutoTrain's own gpt2_sft example, pointed at a local GPT-2 and local data, CUDA-only options off."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = yaml.safe_load((SHARED / "autotrain-configs" / "llm_finetuning__gpt2_sft.yml").read_text())
    config["base_model"] = str(tiny_gpt2)
    config["project_name"] = str(tmp_path / "gpt2-run")
    config["data"]["path"] = str(SHARED_DATA / "alpaca")
    config["params"].update({"mixed_precision": None, "max_steps": 12, "block_size": 128, "lr": 3e-3})
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path)]) == 0
    folder = tmp_path / "gpt2-run"
    assert (folder / "runs").is_dir()  # log: tensorboard
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token is not None  # GPT-2 has none; tunelab set one
    assert_generates(AutoModelForCausalLM.from_pretrained(folder), tokenizer)


@pytest.mark.parametrize("packing", [False, True])
def test_gpt2_padding_free_batches_match_padded(tiny_gpt2, packing):
    """GPT-2 (learned positions, no chat template) sees packed rows as separate examples too."""
    from tunelab.data.packing import PackedRowsCollator, examples_in, pack
    from tunelab.data.tokenize import Encoded

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    examples = [Encoded(list(range(10, 10 + n)), [-100] * n) for n in (6, 9, 4)]
    rows = pack(examples, 32) if packing else examples
    batch = PackedRowsCollator(0, flat=True)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([examples[1].input_ids]), use_cache=False).logits[0]
    order = [e for row in rows for e in examples_in(row)]
    start = sum(len(e) for e in order[: order.index(examples[1])])
    torch.testing.assert_close(logits[start : start + 9], alone, atol=1e-5, rtol=1e-4)


@needs_shared()
def test_bf16_mixed_precision_with_lora_on_a_cpu(tiny_llama, tmp_path):
    """AutoTrain's configs mostly ask for mixed precision with LoRA: bf16 base weights, the forward under
    autocast (on a CPU too), and the loss from the hidden states that accelerate hands back in float32."""
    out = tmp_path / "bf16-run"
    argv = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(SHARED_DATA / "alpaca")]
    argv += ["--trainer", "sft", "--peft", "--lora-r", "8", "--mixed-precision", "bf16", "--max-steps", "30"]
    assert main([*argv, "--project-name", str(out), *FAST]) == 0
    first, last = first_last(train_losses(out))
    assert last < first
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    assert_generates(model, AutoTokenizer.from_pretrained(out))


@needs_shared()
@pytest.mark.parametrize("trainer", ["dpo", "orpo", "simpo", "reward", "kto", "grpo"])
def test_every_method_trains_with_lora_under_bf16(trainer, tiny_llama, tmp_path):
    """Each method's loss reads the model's hidden states its own way (token log-probabilities, rewards,
    generations): all of them train a LoRA adapter on bf16 base weights."""
    from tests.test_grpo import grpo_args
    from tests.test_kto import _short_hh, _write, thumbs_from_pairs

    if trainer == "grpo":
        argv = grpo_args(tmp_path, tiny_llama, "format_tag", "--mixed-precision", "bf16")
    else:
        pairs = _short_hh(8)
        data = _write(tmp_path / "data" / "train.jsonl", thumbs_from_pairs(pairs) if trainer == "kto" else pairs)
        argv = ["llm", "--train", "--trainer", trainer, "--peft", "--model", str(tiny_llama), "--data-path", str(data)]
        argv += ["--project-name", str(tmp_path / "run"), "--block-size", "128", "--max-prompt-length", "96"]
        argv += ["--batch-size", "4" if trainer == "kto" else "2", "--max-steps", "3", "--logging-steps", "1"]
        argv += ["--mixed-precision", "bf16", "--disable-gradient-checkpointing"]
    assert main(argv) == 0
    losses = train_losses(tmp_path / "run")
    assert losses and all(math.isfinite(loss) for loss in losses), losses


def test_a_run_from_a_relative_model_path_merges_from_another_directory(tiny_llama, tmp_path, monkeypatch):
    """The run folder names a local base model by its absolute path: merge, export and evaluate --compare-base
    find it from any directory (the path as typed, `./base`, was looked for from wherever they ran)."""
    import json
    import shutil
    from pathlib import Path

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_llama, work / "base")
    monkeypatch.chdir(work)
    data = Path(__file__).resolve().parents[1] / "samples" / "alpaca.jsonl"
    args = ["llm", "--train", "--model", "./base", "--data-path", str(data), "--project-name", "run", "--peft"]
    assert main([*args, "--max-steps", "1", "--block-size", "64"]) == 0
    assert json.loads((work / "run" / "tunelab_run.json").read_text())["base_model"] == str(work / "base")
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "--model", str(work / "run"), "--output", str(tmp_path / "merged")]) == 0


def _counting_rows(tmp_path, count=40):
    rows = [
        {"prompt": f"Count to {i}:", "completion": " " + " ".join(str(j) for j in range(1, i % 9 + 2))}
        for i in range(count)
    ]
    path = tmp_path / "count.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_neftune_noise_changes_training_not_the_model_s_use(tiny_llama, tmp_path):
    """NEFTune noise on the input embeddings while training: the same run's first loss differs with it, the same
    seed repeats it, and the trained model is used without it (the hook is gone after training)."""
    data = _counting_rows(tmp_path)

    def first_loss(name, **extra):
        folder = tunelab.train(
            model=str(tiny_llama), data_path=str(data), trainer="sft", max_steps=2, batch_size=4, lr=1e-3,
            gradient_accumulation=1, logging_steps=1, block_size=64, project_name=str(tmp_path / name), **extra,
        )  # fmt: skip
        return train_losses(folder)[0], folder

    plain, _ = first_loss("plain")
    noisy, folder = first_loss("noisy", neftune_noise_alpha=50.0)
    again, _ = first_loss("again", neftune_noise_alpha=50.0)
    assert noisy != plain and noisy == again
    model = AutoModelForCausalLM.from_pretrained(folder).train()  # training mode: a left-over hook would add noise
    ids = torch.tensor([[1, 20, 30, 40]])
    assert torch.equal(model.get_input_embeddings()(ids), model.get_input_embeddings()(ids))


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A 2-layer Qwen3-MoE (4 experts, 2 a token; the model matrix's config) with the test tokenizer."""
    from tests.conftest import build_tokenizer
    from tests.model_matrix import family_configs

    folder = tmp_path_factory.mktemp("tiny-moe")
    tokenizer = build_tokenizer(folder)
    config = family_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)["qwen3_moe"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_a_mixture_of_experts_trains_with_its_load_balancing_loss(tiny_moe, tmp_path, peft):
    """A mixture of experts adds its router's load-balancing loss (TRL's SFTTrainer does, at the model's own
    coefficient by default): over two accumulated micro-batches, the first step's loss is that of the same run
    without it plus coefficient x the micro-batches' mean aux loss, logged as aux_loss; 0 turns it off."""
    data = _counting_rows(tmp_path)

    def first_step(name, **extra):
        folder = tunelab.train(
            model=str(tiny_moe), data_path=str(data), trainer="sft", max_steps=2, batch_size=2, lr=1e-3, peft=peft,
            gradient_accumulation=2, logging_steps=1, block_size=64, project_name=str(tmp_path / name), **extra,
        )  # fmt: skip
        return next(r for r in read_metrics(folder) if "loss" in r)

    balanced, default, off = (
        first_step("balanced", router_aux_loss_coef=0.1),
        first_step("default"),
        first_step("off", router_aux_loss_coef=0),
    )
    assert "aux_loss" not in off and balanced["aux_loss"] > 1  # (about top_k, 2, when the routing is even)
    assert balanced["loss"] == pytest.approx(off["loss"] + 0.1 * balanced["aux_loss"], abs=2e-5)
    assert default["loss"] == pytest.approx(off["loss"] + 0.001 * default["aux_loss"], abs=2e-5)  # Qwen3-MoE's
    # nothing of it stays with the model: its saved config is the base's, and it generates in batches
    if not peft:
        folder = tmp_path / "balanced"
        saved = json.loads((folder / "config.json").read_text())
        assert not saved.get("output_router_logits") and saved.get("router_aux_loss_coef") == 0.001
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.padding_side = "left"
        batch = tokenizer(["Count: 1", "Count to ten: 1 2"], return_tensors="pt", padding=True)
        out = AutoModelForCausalLM.from_pretrained(folder).generate(**batch, max_new_tokens=4, do_sample=False)
        assert out.shape[0] == 2


def test_a_mixture_of_experts_balancing_loss_leaves_padding_out(tiny_moe, tmp_path):
    """Padding is routed too, but is no token of the data: the load-balancing loss of rows padded to a common
    length equals that of the same rows laid end to end with no padding (the flat layout)."""
    from tunelab.config.llm import LLMParams
    from tunelab.data.packing import PackedRowsCollator
    from tunelab.data.tokenize import Encoded
    from tunelab.models import ROUTER_AUX, route_experts
    from tunelab.training.trainer import TunelabTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_moe).eval()
    route_experts(model, LLMParams(trainer="sft", router_aux_loss_coef=0.1))
    assert getattr(model, ROUTER_AUX).weight == 0.1 and getattr(model, ROUTER_AUX).top_k == 2
    rows = [Encoded(list(range(5, 5 + n)), list(range(5, 5 + n))) for n in (3, 11, 6)]
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = TunelabTrainer(model=model, args=args, fast_loss=True, params=None)
    aux = {}
    for flat in (False, True):
        batch = PackedRowsCollator(0, flat=flat, mark_tokens=True)(rows)
        labels = batch.pop("labels")
        with torch.no_grad():
            trainer.loss_sum(model, batch, labels)
        aux[flat] = trainer.__dict__.pop("_aux_loss")
    torch.testing.assert_close(aux[False], aux[True])
    unmasked = PackedRowsCollator(0, mark_tokens=False)(rows)
    labels = unmasked.pop("labels")
    with torch.no_grad():
        trainer.loss_sum(model, unmasked, labels)
    assert not torch.allclose(trainer.__dict__.pop("_aux_loss"), aux[True])  # (the padding did count)


def _method_rows(tmp_path, trainer):
    """A few rows in the shape `trainer` reads: pairs, labelled answers or prompts."""
    count = [" ".join(str(j) for j in range(1, n)) for n in range(3, 11)]
    if trainer in ("dpo", "orpo", "simpo"):
        rows = [
            {"prompt": f"Count to {i}:", "chosen": " " + c, "rejected": " " + c[::-1]} for i, c in enumerate(count)
        ]
    elif trainer == "kto":
        rows = [{"prompt": f"Count to {i}:", "completion": " " + c, "label": i % 2 == 0} for i, c in enumerate(count)]
    else:
        rows = [{"prompt": f"Count to {i}:"} for i in range(len(count))]
    path = tmp_path / f"{trainer}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("trainer", ["dpo", "orpo", "kto", "grpo", "rloo"])
def test_every_causal_method_adds_the_load_balancing_loss(tiny_moe, tmp_path, trainer):
    """TRL's DPO, KTO, GRPO and RLOO trainers add a mixture of experts' balancing loss too: over two accumulated
    micro-batches, a LoRA run's first logged loss is that of the same run without it plus coefficient x the logged
    aux loss (the reference, the adapter switched off, asks for no router logits: it would replace the policy's)."""
    data = _method_rows(tmp_path, trainer)
    sampled = {"reward_functions": "length_penalty", "num_generations": 2, "max_completion_length": 6}

    def first_step(name, coefficient):
        folder = tunelab.train(
            model=str(tiny_moe), data_path=str(data), trainer=trainer, max_steps=1, batch_size=2, lr=1e-3, peft=True,
            gradient_accumulation=2, logging_steps=1, block_size=64, max_prompt_length=32,
            project_name=str(tmp_path / name), router_aux_loss_coef=coefficient,
            **(sampled if trainer in ("grpo", "rloo") else {}),
        )  # fmt: skip
        return next(r for r in read_metrics(folder) if "loss" in r)

    balanced, off = first_step("balanced", 0.1), first_step("off", 0)
    assert "aux_loss" not in off and balanced["aux_loss"] > 1  # (about top_k, 2, when the routing is even)
    assert balanced["loss"] == pytest.approx(off["loss"] + 0.1 * balanced["aux_loss"], abs=2e-5)


def test_the_balancing_loss_is_the_policy_forward_s_over_its_unpadded_tokens(tiny_moe, tmp_path):
    """The balancing loss a preference batch and a grpo batch keep is the one the model itself computes for that
    forward with its attention mask (`outputs.aux_loss`, which TRL adds): padding left out, one forward for the
    chosen and rejected rows; and forwards not marked as the policy's (a reference's) keep none."""
    from transformers import TrainingArguments

    from tunelab.config.llm import LLMParams
    from tunelab.data.preference import Pair
    from tunelab.methods.grpo import GRPOTrainer
    from tunelab.methods.preference import PairCollator, answer_logprobs
    from tunelab.models import route_experts
    from tunelab.training.trainer import TunelabTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_moe).eval()
    route_experts(model, LLMParams(trainer="dpo", router_aux_loss_coef=0.1))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = TunelabTrainer(model=model, args=args, fast_loss=True, params=None)
    pairs = [Pair([5, 6, 7], [8, 9], [10, 11, 12, 13, 14]), Pair([5, 6], [8, 9, 10, 11, 12, 13, 14, 15], [7])]
    batch = PairCollator(0)(pairs)
    expected = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True).aux_loss
    padded = model(batch["input_ids"], output_router_logits=True).aux_loss
    assert not torch.allclose(expected, padded)  # (the padding would count)
    for fast in (True, False):
        with torch.no_grad():
            answer_logprobs(model, model, batch, batch["labels"], fast, balance=trainer)
        torch.testing.assert_close(trainer.__dict__.pop("_aux_loss"), expected)
        answer_logprobs(model, model, batch, batch["labels"], fast)  # a reference's: nothing kept
        assert "_aux_loss" not in trainer.__dict__

    grpo = GRPOTrainer(
        params=LLMParams(trainer="grpo", reward_functions="length_penalty", num_generations=2, peft=False),
        model=model, args=args, processing_class=AutoTokenizer.from_pretrained(tiny_moe), train_dataset=[1],
    )  # fmt: skip
    rollout = {
        "prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "completion_ids": torch.tensor([[10, 11, 0], [12, 0, 0]]),
        "completion_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
    }
    ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], 1)
    attention = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], 1)
    expected = model(ids, attention_mask=attention, output_router_logits=True).aux_loss
    with torch.no_grad():
        grpo.completion_logps(model, rollout, policy=True)
    torch.testing.assert_close(grpo.__dict__.pop("_aux_loss"), expected)
    grpo.completion_logps(model, rollout)
    assert "_aux_loss" not in grpo.__dict__


def test_a_dense_reference_beside_a_mixture_of_experts_is_not_asked_to_balance(tiny_moe, tiny_llama, tmp_path):
    """router_aux_loss_coef weighs the trained model's balancing loss: a reference (model_ref) never routes, and
    a dense one is fine beside it."""
    args = ["llm", "--dry-run", "--model", str(tiny_moe), "--data-path", str(_method_rows(tmp_path, "dpo")),
            "--project-name", str(tmp_path / "run"), "--trainer", "dpo", "--model-ref", str(tiny_llama),
            "--router-aux-loss-coef", "0.01"]  # fmt: skip
    assert main(args) == 0


def test_the_load_balancing_weight_is_refused_where_nothing_reads_it(tiny_llama, tmp_path, capsys):
    data = _counting_rows(tmp_path)
    args = ["llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(data), "--project-name",
            str(tmp_path / "run"), "--trainer", "sft", "--router-aux-loss-coef", "0.01"]  # fmt: skip
    assert main(args) == 2
    assert "has no load-balancing loss for experts" in capsys.readouterr().err
    args[args.index("sft")] = "reward"
    assert main(args) == 2
    assert (
        "router_aux_loss_coef is read by trainers default, sft, dpo, orpo, kto, simpo, grpo, rloo and online_dpo, "
        "not reward" in (capsys.readouterr().err)
    )


def test_early_stopping_stops_on_the_eval_loss_and_keeps_the_best_weights(tiny_llama, tmp_path):
    """A learning rate far too high: the eval loss rises after its first evaluations, the run stops after
    `early_stopping_patience` evaluations without a better one, and the weights kept are the best evaluation's."""
    folder = tunelab.train(
        model=str(tiny_llama), data_path=str(_counting_rows(tmp_path)), trainer="sft", valid_size=8, max_steps=40,
        batch_size=4, gradient_accumulation=1, lr=0.3, eval_strategy="steps", logging_steps=2, block_size=64,
        early_stopping_patience=2, project_name=str(tmp_path / "run"),
    )  # fmt: skip
    *during, final = [r["eval_loss"] for r in read_metrics(folder) if "eval_loss" in r and "step" in r]
    best = during.index(min(during))
    assert len(during) == best + 1 + 2  # stopped after 2 evaluations without a better one, long before step 40
    assert final == pytest.approx(min(during), rel=1e-5)  # evaluated again at the end: the best weights
    assert json.loads((folder / "metrics.json").read_text())["eval_loss"] == pytest.approx(final)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"neftune_noise_alpha": 5.0, "trainer": "dpo"}, "neftune_noise_alpha is for trainers default and sft"),
        ({"neftune_noise_alpha": 0.0}, "neftune_noise_alpha must be positive"),
        ({"early_stopping_patience": 3}, "give a validation split"),
        ({"early_stopping_patience": 3, "valid_size": 0.1, "eval_strategy": "no"}, "eval_strategy steps or epoch"),
    ],
)
def test_regulariser_settings_that_cannot_work_are_refused(settings, message):
    from tunelab.config.llm import LLMParams
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        LLMParams(**settings)
