"""Preference methods: pair data, the DPO / ORPO / reward losses against TRL, training end to end, bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tunelab
from tests.conftest import SHARED_DATA, needs_shared, read_metrics, train_losses
from tunelab.data.preference import load_preference_data, split_common_prefix
from tunelab.errors import ConfigError, DataError

HH = SHARED_DATA / "preference"


@pytest.fixture
def tokenizer(tiny_tokenizer):
    """The test tokenizer with the pad token tunelab's loader gives it (EOS)."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    return tok


def _params(**overrides):
    values = {"model": "unused", "data_path": str(HH), "trainer": "dpo", "block_size": 256, "model_max_length": 512}
    values.update(overrides)
    return tunelab.LLMParams(**values)


def _hh_rows(n: int, start: int = 0) -> list[dict]:
    lines = (HH / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[start : start + n]]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ data


def test_shared_prompt_is_cut_at_a_word_boundary():
    chosen = "\n\nHuman: hello\n\nAssistant: hi there"
    rejected = "\n\nHuman: hello\n\nAssistant: how are you"
    cut = split_common_prefix(chosen, rejected)
    assert chosen[:cut] == "\n\nHuman: hello\n\nAssistant:"
    assert (chosen[cut:], rejected[cut:]) == (" hi there", " how are you")
    # One answer continuing the other: the last word still belongs to the answers.
    cut = split_common_prefix("Q: say it A: yes", "Q: say it A: yes please")
    assert "Q: say it A: yes please"[cut:] == " yes please"


@needs_shared()
def test_hh_rows_become_a_shared_prompt_and_two_answers(tiny_tokenizer):
    data = load_preference_data(_params(max_prompt_length=256), tiny_tokenizer)
    assert len(data.train) == 1500 - data.stats.dropped_no_room
    assert data.template is None  # whole dialogues in text: used as they are
    pair = data.train[0]
    prompt = tiny_tokenizer.decode(pair.prompt_ids)
    assert prompt.startswith("\n\nHuman: What do I do if I'm walking down the street")
    assert prompt.endswith("Assistant:")
    assert tiny_tokenizer.decode(pair.chosen_ids).startswith(" Can you say a little more")
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tiny_tokenizer.eos_token_id
    assert all(p.chosen_ids and p.rejected_ids for p in data.train)


def test_message_rows_share_their_leading_turns_as_the_prompt(tmp_path, tiny_tokenizer):
    user = {"role": "user", "content": "Name a colour."}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "Blue."}],
            "rejected": [user, {"role": "assistant", "content": "No."}],
        }
    ] * 3
    data = load_preference_data(_params(data_path=str(_write_jsonl(tmp_path / "p.jsonl", rows))), tiny_tokenizer)
    pair = data.train[0]
    assert data.template == "tokenizer"  # the tiny tokenizer carries ChatML
    assert (
        tiny_tokenizer.decode(pair.prompt_ids) == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.decode(pair.chosen_ids).startswith("Blue.<|im_end|>")
    assert tiny_tokenizer.decode(pair.rejected_ids).startswith("No.<|im_end|>")


def test_llama_factory_pairwise_rows_read_as_its_own_are(tmp_path, tiny_tokenizer):
    """LLaMA-Factory's preference datasets (`ranking: true`): ShareGPT rows, `conversations` holding the prompt and
    chosen / rejected one message each (its dpo_en_demo.json), with a `system` column; and Alpaca rows,
    `instruction` and `input` (joined by a new line, as LLaMA-Factory joins them) with text answers, after the turns
    of their `history`."""
    sharegpt = [
        {
            "conversations": [{"from": "human", "value": "Name a colour."}],
            "chosen": {"from": "gpt", "value": "Blue."},
            "rejected": {"from": "gpt", "value": "No."},
            "system": "Be brief.",
        }
    ] * 2
    (tmp_path / "s.json").write_text(json.dumps(sharegpt, indent=2), encoding="utf-8")  # a JSON array, as its files
    data = load_preference_data(_params(data_path=str(tmp_path / "s.json")), tiny_tokenizer)
    pair = data.train[0]
    assert data.columns["prompt"] == "conversations"
    assert tiny_tokenizer.decode(pair.prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.decode(pair.chosen_ids).startswith("Blue.<|im_end|>")
    assert tiny_tokenizer.decode(pair.rejected_ids).startswith("No.<|im_end|>")

    alpaca = [{"instruction": "Name a colour.", "input": "One word.", "chosen": "Blue.", "rejected": "No."}] * 2
    path = _write_jsonl(tmp_path / "a.jsonl", alpaca)
    data = load_preference_data(_params(data_path=str(path), chat_template="chatml"), tiny_tokenizer)
    pair = data.train[0]
    assert data.columns["prompt"] == "instruction"
    assert tiny_tokenizer.decode(pair.prompt_ids) == (
        "<|im_start|>user\nName a colour.\nOne word.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.decode(pair.chosen_ids).startswith("Blue.<|im_end|>")
    # its `history` pairs are the turns before the instruction, its `system` the system turn
    earlier = [{**alpaca[0], "history": [["Hi.", "Hello."]], "system": "Be brief."}] * 2
    path = _write_jsonl(tmp_path / "h.jsonl", earlier)
    data = load_preference_data(_params(data_path=str(path), chat_template="chatml"), tiny_tokenizer)
    assert tiny_tokenizer.decode(data.train[0].prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello."
        "<|im_end|>\n<|im_start|>user\nName a colour.\nOne word.<|im_end|>\n<|im_start|>assistant\n"
    )
    # no chat_template: templated as sft's Alpaca rows are (LLaMA-Factory always templates them), not glued text
    data = load_preference_data(_params(data_path=str(path)), tiny_tokenizer)
    assert data.template == "alpaca"
    assert "### Instruction:\nName a colour.\nOne word." in tiny_tokenizer.decode(data.train[0].prompt_ids)

    # a conversation that ends with an answer is no prompt; a text answer that is a JSON object stays text
    bad = [{**sharegpt[0], "conversations": [*sharegpt[0]["conversations"], {"from": "gpt", "value": "Blue."}]}]
    path = _write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match="column 'conversations': the prompt's conversation ends with an answer"):
        load_preference_data(_params(data_path=str(path)), tiny_tokenizer)
    objects = [{"prompt": "Give JSON.", "chosen": '{"content": "4"}', "rejected": '{"content": "5"}'}] * 2
    data = load_preference_data(_params(data_path=str(_write_jsonl(tmp_path / "o.jsonl", objects))), tiny_tokenizer)
    assert tiny_tokenizer.decode(data.train[0].chosen_ids).startswith('{"content": "4"}')


def test_identical_chat_pairs_are_dropped_with_a_warning_as_text_pairs_are(tmp_path, tiny_tokenizer, caplog):
    """Compared whole: split into a shared prompt first, identical conversations would read as no answer."""
    user = {"role": "user", "content": "Name a colour."}
    good = {
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "No."}],
    }
    same = {"chosen": good["chosen"], "rejected": good["chosen"]}
    path = _write_jsonl(tmp_path / "p.jsonl", [good, same, good])
    with caplog.at_level("WARNING", logger="tunelab"):
        data = load_preference_data(_params(data_path=str(path)), tiny_tokenizer)
    assert len(data.train) == 2
    assert data.stats.dropped_identical == [f"{path} line 2"]
    assert any("1 row(s) with chosen identical to rejected skipped" in r.getMessage() for r in caplog.records)


def test_long_prompts_lose_their_beginning_and_answers_fit_block_size(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "word " * 100, "chosen": " good answer " * 20, "rejected": " bad"}] * 2
    params = _params(data_path=str(_write_jsonl(tmp_path / "p.jsonl", rows)), block_size=64, max_prompt_length=32)
    data = load_preference_data(params, tiny_tokenizer)
    pair = data.train[0]
    assert len(pair.prompt_ids) == 32 and len(pair.prompt_ids) + len(pair.chosen_ids) == 64
    assert data.stats.prompts_truncated == 2 and data.stats.completions_truncated == 2


def test_length_rules_are_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="max_prompt_length .*block_size"):
        _params(block_size=64, max_prompt_length=128)
    with pytest.raises(ConfigError, match="max_completion_length"):
        _params(block_size=64, max_prompt_length=32, max_completion_length=100)


def test_preference_loss_settings_are_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="dpo_loss_type: 'sigmod': use one or more of sigmoid, hinge, ipo"):
        _params(dpo_loss_type="sigmod")
    with pytest.raises(ConfigError, match="dpo_loss_weights has 1 weight.s. for 2 dpo_loss_type"):
        _params(dpo_loss_type="sigmoid,sft", dpo_loss_weights="1")
    with pytest.raises(ConfigError, match="label_smoothing is read by the dpo losses robust, exo_pair, aot"):
        _params(label_smoothing=0.1)
    with pytest.raises(ConfigError, match="exo_pair needs label_smoothing above 0"):
        _params(dpo_loss_type="exo_pair")
    with pytest.raises(ConfigError, match="f_divergence_type forward_kl with dpo_loss_type apo_zero: only the"):
        _params(dpo_loss_type="sigmoid,apo_zero", f_divergence_type="forward_kl")
    with pytest.raises(ConfigError, match="f_divergence_type: 'kl' is not one of reverse_kl, forward_kl"):
        _params(f_divergence_type="kl")
    with pytest.raises(ConfigError, match=r"ld_alpha must be in \[0, 1\]"):
        _params(ld_alpha=1.2)
    with pytest.raises(ConfigError, match="use_weighting with the aot losses"):
        _params(dpo_loss_type="aot_unpaired", use_weighting=True)
    with pytest.raises(ConfigError, match="discopop_tau must be positive"):
        _params(dpo_loss_type="discopop", discopop_tau=0)
    with pytest.raises(ConfigError, match="discopop_tau is read by dpo_loss_type discopop only"):
        _params(discopop_tau=0.1)
    with pytest.raises(ConfigError, match="f_alpha_divergence_coef is read by f_divergence_type alpha_divergence"):
        _params(f_alpha_divergence_coef=0.2)
    with pytest.raises(ConfigError, match="dpo_loss_type is read by trainers dpo and online_dpo, not orpo"):
        _params(trainer="orpo", dpo_loss_type="hinge")
    with pytest.raises(ConfigError, match="sync_ref_model: with LoRA the model is the base and an adapter"):
        _params(sync_ref_model=True, peft=True)
    with pytest.raises(ConfigError, match="sync_ref_model: precompute_ref_log_probs scores"):
        _params(sync_ref_model=True, precompute_ref_log_probs=True)
    with pytest.raises(ConfigError, match="ref_model_sync_steps is read with sync_ref_model"):
        _params(ref_model_sync_steps=64)
    with pytest.raises(ConfigError, match=r"ref_model_mixup_alpha must be in \(0, 1\]"):
        _params(sync_ref_model=True, ref_model_mixup_alpha=0)
    with pytest.raises(ConfigError, match="kto_loss_type is read by trainer kto, not dpo"):
        _params(kto_loss_type="apo_zero_unpaired")
    with pytest.raises(ConfigError, match="kto estimates its KL term from the other answers"):
        _params(trainer="kto", batch_size=1)
    assert _params(trainer="kto", batch_size=1, kto_loss_type="apo_zero_unpaired").batch_size == 1  # no KL term
    for name, value in (("ld_alpha", 0.5), ("use_weighting", True), ("f_divergence_type", "js_divergence")):
        readers = "trainers dpo and online_dpo" if name == "f_divergence_type" else "trainer dpo"
        with pytest.raises(ConfigError, match=f"{name} is read by {readers}, not simpo: leave it out"):
            _params(trainer="simpo", **{name: value})
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 0.5\)"):
        _params(dpo_loss_type="robust", label_smoothing=0.5)
    params = _params(dpo_loss_type=["sigmoid", "sft"], dpo_loss_weights=[1, 0.25])  # as a YAML list gives them
    assert params.dpo_loss_types == ("sigmoid", "sft") and params.dpo_loss_weight_values == (1.0, 0.25)
    assert _params(trainer="simpo", label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ConfigError, match="precompute_ref_log_probs is for trainer dpo"):
        _params(trainer="kto", precompute_ref_log_probs=True)
    with pytest.raises(ConfigError, match="dpo with init_lora_weights=pissa: the base with the adapter off is"):
        _params(peft=True, init_lora_weights="pissa")


# ------------------------------------------------------------------ losses against TRL


def _pairs_and_models(tiny_llama, tiny_tokenizer, n=4):
    from transformers import AutoModelForCausalLM

    rows = _hh_rows(n)
    data = load_preference_data(_params(max_prompt_length=128, block_size=192), tiny_tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    policy = copy.deepcopy(reference)
    torch.manual_seed(1)
    with torch.no_grad():  # a policy that differs from the reference, so rewards are not all zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return rows, data.train[:n], policy, reference


def _tunelab_trainer(trainer_class, model, tokenizer, tmp_path, extra=None, **overrides):
    from tunelab.training.trainer import training_arguments

    params = _params(model=str(tmp_path), block_size=192, max_prompt_length=128, **overrides)
    args = training_arguments(params, str(tmp_path / "out"), 1, False)
    return trainer_class(
        params=params, model=model, args=args, processing_class=tokenizer, train_dataset=[1], **(extra or {})
    )


def _trl_config(config_class, tmp_path, **extra):
    """TRL's trainer settings for a one-batch comparison: fp32 on CPU (TRL defaults to bf16 and checkpointing)."""
    return config_class(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        max_length=1024,
        beta=0.1,
        **extra,
    )


@needs_shared()
def test_dpo_loss_and_rewards_equal_trl(tiny_llama, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    from tunelab.methods.dpo import DPOTrainer

    rows, pairs, policy, reference = _pairs_and_models(tiny_llama, tokenizer)
    ours = _tunelab_trainer(
        DPOTrainer, copy.deepcopy(policy), tokenizer, tmp_path, extra={"ref_model": copy.deepcopy(reference)}
    )
    ours.model.train()  # dropout is off in both trainers; train mode files the metrics under "train"
    batch = ours.data_collator(pairs)
    loss = ours.compute_loss(ours.model, batch)
    metrics = {k: v[0] for k, v in ours._metrics["train"].items()}

    config = _trl_config(DPOConfig, tmp_path, per_device_train_batch_size=len(pairs))
    trl = TRLDPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    features = [
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs
    ]
    trl.model.train()
    trl_loss = trl.compute_loss(trl.model, trl.data_collator(features))
    trl_metrics = {k: v[0] for k, v in trl._metrics["train"].items()}

    assert abs(loss.item() - 0.693) > 1e-3  # the rewards are not trivially zero
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-4), name
    # Gradients flow to the policy only.
    loss.backward()
    assert any(p.grad is not None for p in ours.model.parameters())
    assert all(p.grad is None for p in ours.ref_model.parameters())


@needs_shared()
def test_orpo_loss_equals_trl(tiny_llama, tokenizer, tmp_path):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

    from tunelab.methods.orpo import ORPOTrainer

    rows, pairs, policy, _ = _pairs_and_models(tiny_llama, tokenizer)
    # TRL's NLL term covers the prompt too: tunelab does the same with completion_only_loss off.
    ours = _tunelab_trainer(ORPOTrainer, copy.deepcopy(policy), tokenizer, tmp_path, completion_only_loss=False)
    ours.model.train()
    loss = ours.compute_loss(ours.model, ours.data_collator(pairs))
    metrics = {k: v[0] for k, v in ours._metrics["train"].items()}

    config = _trl_config(ORPOConfig, tmp_path)
    trl = TRLORPOTrainer(
        model=copy.deepcopy(policy), args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    features = []
    for p in pairs:
        row = {"prompt_input_ids": p.prompt_ids, "prompt_attention_mask": [1] * len(p.prompt_ids)}
        for side, answer in (("chosen", p.chosen_ids), ("rejected", p.rejected_ids)):
            ids = p.prompt_ids + answer
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [-100] * len(p.prompt_ids) + answer
        features.append(row)
    trl.model.eval()
    with torch.no_grad():
        trl_loss, trl_metrics = trl.get_batch_loss_metrics(trl.model, trl.data_collator(features), train_eval="train")

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "nll_loss", "log_odds_ratio"):
        assert metrics[name] == pytest.approx(float(trl_metrics[name]), abs=1e-4), name


@needs_shared()
@pytest.mark.parametrize(
    ("loss_type", "extra"),
    [
        ("hinge", {}),
        ("ipo", {}),
        ("robust", {"label_smoothing": 0.1}),
        ("sigmoid,sft", {"dpo_loss_weights": "1.0,0.5"}),
        ("exo_pair", {"label_smoothing": 0.01}),
        ("nca_pair", {}),
        ("bco_pair", {}),
        ("sppo_hard", {}),
        ("aot", {"label_smoothing": 0.1}),
        ("aot_unpaired", {}),
        ("apo_zero", {}),
        ("apo_down", {}),
        ("discopop", {"discopop_tau": 0.2}),
        ("sigmoid_norm", {}),
        # the variants around the loss: f-DPO's divergences, LD-DPO, WPO, and all of them at once
        ("sigmoid", {"f_divergence_type": "forward_kl"}),
        ("ipo", {"f_divergence_type": "js_divergence"}),
        ("robust,sigmoid_norm", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3,
                                 "label_smoothing": 0.1}),
        ("sigmoid", {"ld_alpha": 0.5}),
        ("sft,sigmoid_norm", {"ld_alpha": 0.0, "dpo_loss_weights": "0.5,1.0"}),
        ("sigmoid", {"use_weighting": True}),
        ("sigmoid", {"use_weighting": True, "fast_loss": False}),  # the weights from full logits
        # (not sft with use_weighting: TRL 1.16 scales its shared per-pair value in place, and fails)
        ("hinge,sigmoid_norm", {"use_weighting": True, "ld_alpha": 0.3, "f_divergence_type": "js_divergence"}),
    ],
)  # fmt: skip
def test_dpo_loss_types_equal_trl(loss_type, extra, tiny_llama, tokenizer, tmp_path):
    """Each dpo_loss_type, TRL's weighted multi-loss form, and the variants around the loss (f_divergence_type,
    ld_alpha, use_weighting) give TRL's loss and rewards on one batch."""
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    from tunelab.methods.dpo import DPOTrainer

    rows, pairs, policy, reference = _pairs_and_models(tiny_llama, tokenizer)
    ours = _tunelab_trainer(
        DPOTrainer,
        copy.deepcopy(policy),
        tokenizer,
        tmp_path,
        extra={"ref_model": copy.deepcopy(reference)},
        dpo_loss_type=loss_type,
        **extra,
    )
    ours.model.train()
    loss = ours.compute_loss(ours.model, ours.data_collator(pairs))
    metrics = {k: v[0] for k, v in ours._metrics["train"].items()}

    ours_only = ("dpo_loss_weights", "fast_loss")
    trl_extra = {"loss_type": loss_type.split(","), **{k: v for k, v in extra.items() if k not in ours_only}}
    if "dpo_loss_weights" in extra:
        trl_extra["loss_weights"] = [float(w) for w in extra["dpo_loss_weights"].split(",")]
    config = _trl_config(DPOConfig, tmp_path, per_device_train_batch_size=len(pairs), **trl_extra)
    trl = TRLDPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    features = [
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs
    ]
    trl.model.train()
    trl_loss = trl.compute_loss(trl.model, trl.data_collator(features))
    trl_metrics = {k: v[0] for k, v in trl._metrics["train"].items()}

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-4), name
    sigmoid = _tunelab_trainer(DPOTrainer, copy.deepcopy(policy), tokenizer, tmp_path, extra={"ref_model": reference})
    assert abs(sigmoid.compute_loss(sigmoid.model, sigmoid.data_collator(pairs)).item() - loss.item()) > 1e-3


@needs_shared()
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_loss_equals_trl_cpo_simpo(cpo_alpha, tiny_llama, tokenizer, tmp_path):
    """simpo is TRL's CPOTrainer with loss_type=simpo: the same loss and logged figures on one batch."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer

    from tunelab.methods.simpo import SimPOTrainer

    rows, pairs, policy, _ = _pairs_and_models(tiny_llama, tokenizer)
    settings = {"dpo_beta": 2.0, "simpo_gamma": 0.8, "label_smoothing": 0.05, "cpo_alpha": cpo_alpha}
    ours = _tunelab_trainer(SimPOTrainer, copy.deepcopy(policy), tokenizer, tmp_path, trainer="simpo", **settings)
    ours.model.train()
    loss = ours.compute_loss(ours.model, ours.data_collator(pairs))
    metrics = {k: v[0] for k, v in ours._metrics["train"].items()}

    config = _trl_config(
        CPOConfig, tmp_path, loss_type="simpo", simpo_gamma=0.8, label_smoothing=0.05, cpo_alpha=cpo_alpha
    )
    config.beta = 2.0
    trl = TRLCPOTrainer(
        model=copy.deepcopy(policy), args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    features = []
    for p in pairs:
        row = {"prompt_input_ids": p.prompt_ids, "prompt_attention_mask": [1] * len(p.prompt_ids)}
        for side, answer in (("chosen", p.chosen_ids), ("rejected", p.rejected_ids)):
            ids = p.prompt_ids + answer
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [-100] * len(p.prompt_ids) + answer
        features.append(row)
    trl.model.eval()
    with torch.no_grad():
        trl_loss, trl_metrics = trl.get_batch_loss_metrics(trl.model, trl.data_collator(features), train_eval="train")

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"]
    for name in names + (["nll_loss"] if cpo_alpha else []):
        assert metrics[name] == pytest.approx(float(trl_metrics[name]), abs=1e-4), name


@needs_shared()
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_and_metrics_equal_trl(loss_type, tiny_llama, tokenizer, tmp_path):
    """kto: TRL's KTOTrainer on the same batch (its KL estimate from the answers rotated by one row included) gives
    the same loss, KL and rewards; and with kto_loss_type apo_zero_unpaired (TRL's loss_type), which has no KL."""
    from datasets import Dataset
    from trl import KTOConfig
    from trl import KTOTrainer as TRLKTOTrainer

    from tunelab.data.kto import Labeled
    from tunelab.methods.kto import KTOTrainer

    rows, pairs, policy, reference = _pairs_and_models(tiny_llama, tokenizer, n=3)
    items = [Labeled(p.prompt_ids, p.chosen_ids, True) for p in pairs]
    items += [Labeled(pairs[0].prompt_ids, pairs[0].rejected_ids, False)]
    items += [Labeled(p.prompt_ids, p.rejected_ids, False) for p in pairs[1:]]
    weights = {"desirable_weight": 1.0, "undesirable_weight": 1.5}
    extra = {"ref_model": copy.deepcopy(reference)}
    ours = _tunelab_trainer(
        KTOTrainer, copy.deepcopy(policy), tokenizer, tmp_path, extra=extra, trainer="kto", kto_beta=0.2,
        kto_loss_type=loss_type, **weights,
    )  # fmt: skip
    ours.model.train()
    loss = ours.compute_loss(ours.model, ours.data_collator(items))
    metrics = {k: v[0] for k, v in ours._metrics["train"].items()}

    unpaired = [{"prompt": r["chosen"][:20], "completion": r["chosen"][20:], "label": True} for r in rows[:3]]
    unpaired += [{"prompt": r["rejected"][:20], "completion": r["rejected"][20:], "label": False} for r in rows[:3]]
    config = _trl_config(KTOConfig, tmp_path, per_device_train_batch_size=len(items), loss_type=loss_type, **weights)
    config.beta = 0.2
    trl = TRLKTOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=config,
        train_dataset=Dataset.from_list(unpaired),
        processing_class=tokenizer,
    )
    answers = [item.completion_ids for item in items]
    shifted = answers[-1:] + answers[:-1]
    features = [
        {"prompt_ids": i.prompt_ids, "completion_ids": i.completion_ids, "KL_completion_ids": k, "label": i.desirable}
        for i, k in zip(items, shifted, strict=True)
    ]
    trl.model.train()
    trl_loss = trl.compute_loss(trl.model, trl.data_collator(features))
    trl_metrics = {k: v[0] for k, v in trl._metrics["train"].items()}

    assert abs(metrics["rewards/margins"]) > 1e-3  # the policy differs from the reference
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-4), name
    assert (metrics["kl"] == 0) == (loss_type == "apo_zero_unpaired")
    assert ("kl_input_ids" in ours.data_collator(items)) == (loss_type == "kto")  # no second pass without it
    loss.backward()
    assert any(p.grad is not None for p in ours.model.parameters())


@needs_shared()
@pytest.mark.parametrize("settings", [{}, {"ld_alpha": 0.4}])
def test_precomputed_reference_gives_the_live_reference_losses(settings, tiny_llama, tokenizer, tmp_path):
    """precompute_ref_log_probs: the pairs scored by the starting model once (and kept in the prepared-data
    folder, reused the next time) give the losses and rewards of the live reference model; with LD-DPO too, its
    weighting applied to the reference's scores as it is to the live reference's."""
    from tunelab.methods.dpo import DPOTrainer, ScoredPair, with_reference_logps

    _, pairs, policy, reference = _pairs_and_models(tiny_llama, tokenizer)
    live = _tunelab_trainer(
        DPOTrainer, copy.deepcopy(policy), tokenizer, tmp_path, extra={"ref_model": reference}, **settings
    )
    live.model.train()
    live_loss = live.compute_loss(live.model, live.data_collator(pairs))

    params = _params(
        model=str(tiny_llama), block_size=192, max_prompt_length=128, precompute_ref_log_probs=True, **settings
    )
    scored, _ = with_reference_logps(copy.deepcopy(reference), pairs, None, params, tmp_path)
    assert all(isinstance(p, ScoredPair) for p in scored) and len(list(tmp_path.glob("reference-*.npy"))) == 1
    again, _ = with_reference_logps(None, pairs, None, params, tmp_path)  # no model needed: read back
    assert [(p.ref_chosen, p.ref_rejected) for p in again] == [(p.ref_chosen, p.ref_rejected) for p in scored]
    ours = _tunelab_trainer(
        DPOTrainer, copy.deepcopy(policy), tokenizer, tmp_path, precompute_ref_log_probs=True, **settings
    )
    assert ours.ref_model is None
    ours.model.train()
    loss = ours.compute_loss(ours.model, ours.data_collator(scored))
    assert loss.item() == pytest.approx(live_loss.item(), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ours._metrics["train"][name][0] == pytest.approx(live._metrics["train"][name][0], abs=1e-5), name


@needs_shared()
def test_precomputed_reference_leaves_the_reference_out_of_the_memory_estimate(tiny_llama, tmp_path):
    data = _preference_folder(tmp_path, 8, 4, valid_from_train=True)
    common = {"model": str(tiny_llama), "data_path": str(data), "project_name": str(tmp_path / "p")}
    live = tunelab.plan(_params(**common))
    precomputed = tunelab.plan(_params(**common, precompute_ref_log_probs=True))
    weights = precomputed.memory.weights
    assert live.memory.weights == 2 * weights  # the frozen copy of the starting model, gone
    notes = precomputed.memory.notes
    assert any(n.startswith("reference log-probs precomputed: no reference model in memory") for n in notes)


@needs_shared()
def test_dpo_run_with_precomputed_reference(tiny_llama, tmp_path):
    data = _preference_folder(tmp_path, 16, 4, valid_from_train=True)
    cache = tmp_path / "cache"
    params = _params(
        model=str(tiny_llama), data_path=str(data), valid_split="valid", precompute_ref_log_probs=True, lr=1e-3,
        batch_size=4, max_steps=6, logging_steps=1, project_name=str(tmp_path / "run"), cache_dir=str(cache),
        max_prompt_length=96, block_size=192,
    )  # fmt: skip
    folder = tunelab.train(params)
    assert _falls(train_losses(folder))
    assert len(list(cache.glob("*/reference-*.npy"))) == 1  # beside the prepared data
    # `tunelab evaluate` reads the run's data settings only: precompute_ref_log_probs belongs to its trainer.
    from tunelab.inference.evaluate import evaluate_run

    texts = _write_jsonl(tmp_path / "texts" / "test.jsonl", [{"text": row["chosen"]} for row in _hh_rows(4)])
    results = evaluate_run(folder, str(texts.parent), samples=1, max_new_tokens=4)
    assert results["rows"] == 4 and results["eval_loss"] > 0


def test_orpo_answer_only_nll_by_hand(tiny_llama, tokenizer, tmp_path):
    """With completion_only_loss (the default), the NLL is the mean over the chosen answer tokens only."""
    from transformers import AutoModelForCausalLM

    from tunelab.data.preference import Pair
    from tunelab.methods.orpo import ORPOTrainer, log1mexp

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    pairs = [Pair([5, 6, 7], [8, 9, 2], [10, 2]), Pair([11, 12], [13, 2], [14, 15, 16, 2])]
    trainer = _tunelab_trainer(ORPOTrainer, model, tokenizer, tmp_path)
    loss = trainer.compute_loss(model, trainer.data_collator(pairs))

    def answer_logps(prompt, answer):
        ids = torch.tensor([prompt + answer])
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return torch.stack([logps[len(prompt) - 1 + i, t] for i, t in enumerate(answer)])

    with torch.no_grad():
        chosen = [answer_logps(p.prompt_ids, p.chosen_ids) for p in pairs]
        rejected = [answer_logps(p.prompt_ids, p.rejected_ids) for p in pairs]
        nll = -torch.cat(chosen).mean()
        lc = torch.stack([c.mean() for c in chosen])
        lr = torch.stack([r.mean() for r in rejected])
        log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
        expected = nll - 0.1 * torch.nn.functional.logsigmoid(log_odds).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


# ------------------------------------------------------------------ training end to end


def _preference_folder(tmp_path: Path, n_train: int, n_valid: int, valid_from_train: bool) -> Path:
    folder = tmp_path / "hh"
    _write_jsonl(folder / "train.jsonl", _hh_rows(n_train))
    valid = _hh_rows(n_train) if valid_from_train else _hh_rows(n_valid, start=n_train)
    _write_jsonl(folder / "valid.jsonl", valid[:n_valid])
    return folder


def _falls(losses: list[float]) -> bool:
    head, tail = losses[: max(1, len(losses) // 3)], losses[-max(1, len(losses) // 3) :]
    return sum(tail) / len(tail) < sum(head) / len(head)


def _autotrain_config(tmp_path: Path, model: Path, data: Path, trainer: str) -> Path:
    """An AutoTrain-style config.yaml for a short preference run, as AutoTrain's own examples are written."""
    import yaml

    config = {
        "task": f"llm-{trainer}",
        "base_model": str(model),
        "project_name": str(tmp_path / trainer),
        "data": {
            "path": str(data),
            "train_split": "train",
            "valid_split": "valid",
            "chat_template": None,
            "column_mapping": {"text_column": "chosen", "rejected_text_column": "rejected"},
        },
        "params": {
            "block_size": 192,
            "model_max_length": 512,
            "max_prompt_length": 96,
            "max_steps": 16,
            "batch_size": 4,
            "lr": 3e-3 if trainer == "reward" else 1e-3,
            "gradient_accumulation": 1,
            "disable_gradient_checkpointing": True,
            "logging_steps": 4,
            "eval_strategy": "no",
            "mixed_precision": "none",
        },
    }
    path = tmp_path / f"{trainer}.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@needs_shared()
@pytest.mark.parametrize("trainer", ["dpo", "orpo"])
def test_dpo_and_orpo_train_a_tiny_model_from_an_autotrain_config(trainer, tiny_llama, tmp_path):
    data = _preference_folder(tmp_path, 16, 16, valid_from_train=True)
    folder = tunelab.train(_autotrain_config(tmp_path, tiny_llama, data, trainer))
    losses = train_losses(folder)
    assert _falls(losses), losses
    metrics = json.loads((folder / "metrics.json").read_text())
    # On the rows it trained on, the chosen answer now gets the higher reward more often than not.
    assert metrics["eval_rewards/accuracies"] > 0.5
    logged = [r for r in read_metrics(folder) if "rewards/margins" in r]
    assert logged and "rewards/chosen" in logged[-1]
    # The run folder holds a causal LM that generates.
    from tunelab.inference.generate import generate, load_run

    model, tokenizer = load_run(folder)
    assert isinstance(generate(model, tokenizer, "Hello")[0], str)


@needs_shared()
def test_reward_model_learns_and_reloads_in_plain_transformers(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.inference.score import load_reward_model, score

    data = _preference_folder(tmp_path, 16, 16, valid_from_train=True)
    folder = tunelab.train(_autotrain_config(tmp_path, tiny_llama, data, "reward"))
    assert _falls(train_losses(folder))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > 0.5

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    rows = _hh_rows(16)
    ours, _, eos = load_reward_model(folder)
    from tunelab.inference.device import inference_device

    assert {p.device for p in ours.parameters()} == {inference_device()}  # the GPU when there is one
    chosen = score(ours, tokenizer, [r["chosen"] for r in rows], eos)
    rejected = score(ours, tokenizer, [r["rejected"] for r in rows], eos)
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) > len(rows) / 2
    # `tunelab score` prints the same scores.
    from tunelab.cli import main

    capsys.readouterr()
    assert main(["score", "--model", str(folder), rows[0]["chosen"], rows[0]["rejected"]]) == 0
    printed = [float(line.split("\t")[0]) for line in capsys.readouterr().out.splitlines()]
    assert printed == pytest.approx([chosen[0], rejected[0]], abs=1e-3)
    # Plain transformers scores the same texts the same way (the same last 192 tokens: the run's block_size).
    tokenizer.truncation_side = "left"
    batch = tokenizer([rows[0]["chosen"] + tokenizer.eos_token], return_tensors="pt", truncation=True, max_length=192)
    with torch.no_grad():
        plain = model(**batch).logits[0, 0].item()
    assert plain == pytest.approx(chosen[0], abs=1e-4)
    # A sequence classifier is neither merged onto a causal LM nor exported as one: one line says so.
    from tunelab.errors import TunelabError
    from tunelab.inference.export import export_run
    from tunelab.inference.merge import merge_run

    for refused in (lambda: merge_run(folder, tmp_path / "merged"), lambda: export_run(folder, tmp_path / "rm.gguf")):
        with pytest.raises(TunelabError, match=f"{folder} is a reward model"):
            refused()
    assert not (tmp_path / "merged").exists() and not (tmp_path / "rm.gguf").exists()


@needs_shared()
def test_reward_margins_and_centring_equal_trl(tiny_llama, tokenizer, tmp_path):
    """reward with a margin column (read by its default name, as TRL reads it) and center_rewards_coefficient:
    the loss of TRL's RewardTrainer on the same batch; the margins change it."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    from tunelab.methods.reward import RewardTrainer

    data = tmp_path / "hh"
    rows = [{**r, "margin": [0.5, 2.0, "1.5", 0][i]} for i, r in enumerate(_hh_rows(4))]  # "1.5": text, read
    _write_jsonl(data / "train.jsonl", rows)
    pairs = load_preference_data(
        _params(trainer="reward", data_path=str(data), max_prompt_length=128, block_size=192), tokenizer
    ).train
    assert [p.margin for p in pairs] == [0.5, 2.0, 1.5, 0.0]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    ours = _tunelab_trainer(
        RewardTrainer, copy.deepcopy(model), tokenizer, tmp_path, trainer="reward", center_rewards_coefficient=0.01
    )
    ours.model.train()
    batch = ours.data_collator(pairs)
    loss = ours.compute_loss(ours.model, batch)
    plain = ours.compute_loss(ours.model, {k: v for k, v in batch.items() if k != "margin"})

    config = RewardConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        save_strategy="no", max_length=1024, center_rewards_coefficient=0.01,
    )  # fmt: skip
    trl = TRLRewardTrainer(
        model=copy.deepcopy(model), args=config, train_dataset=Dataset.from_list(rows[:1]), processing_class=tokenizer
    )
    features = [
        {"chosen_ids": p.prompt_ids + p.chosen_ids, "rejected_ids": p.prompt_ids + p.rejected_ids, "margin": p.margin}
        for p in pairs
    ]
    trl.model.train()
    trl_loss = trl.compute_loss(trl.model, trl.data_collator(features))
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert abs(loss.item() - plain.item()) > 1e-2


def test_a_bad_margin_is_named_by_file_row_and_column(tiny_llama, tmp_path, capsys):
    from tests.test_bad_input import assert_nothing_written, cli_args, error_line
    from tunelab.cli import main

    rows = [{"prompt": "Hi", "chosen": " hello", "rejected": " go", "score_gap": 1}] * 3
    rows.append({"prompt": "Hi", "chosen": " hey", "rejected": " no", "score_gap": "lots"})
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    project = tmp_path / "run"
    args = cli_args(
        tiny_llama, data, project, "--trainer", "reward", "--margin-column", "score_gap", "--max-prompt-length", "32"
    )
    line = error_line(capsys, main(args))
    assert f"{data} line 4, column 'score_gap': expected a number (the margin), got 'lots'" in line
    assert_nothing_written(project)
    with pytest.raises(ConfigError, match="margin_column is read by trainer reward, not dpo"):
        _params(margin_column="score_gap")
    # what the train split has, the valid split must: a margin column named by its default name too
    good = _write_jsonl(tmp_path / "both" / "train.jsonl", [{**r, "margin": 1} for r in rows[:3]])
    _write_jsonl(tmp_path / "both" / "valid.jsonl", [{k: v for k, v in r.items() if k != "score_gap"} for r in rows])
    line = error_line(
        capsys,
        main(
            cli_args(
                tiny_llama,
                good.parent,
                project,
                "--trainer",
                "reward",
                "--valid-split",
                "valid",
                "--max-prompt-length",
                "32",
            )
        ),
    )
    assert "valid.jsonl: margin column 'margin' not found" in line


@pytest.mark.slow
@needs_shared()
@pytest.mark.parametrize("trainer", ["dpo", "orpo"])
def test_default_model_with_lora_from_the_cli(trainer, tmp_path):
    """The real SmolLM2-135M-Instruct, LoRA, AutoTrain's flags: the loss falls. Eight short pairs seen four times
    (a CPU step of the default model costs seconds per hundred tokens)."""
    from tests.test_kto import _short_hh

    data = tmp_path / "hh"
    _write_jsonl(data / "train.jsonl", _short_hh(8))
    _write_jsonl(data / "valid.jsonl", _short_hh(10)[8:])
    project = tmp_path / f"smol-{trainer}"
    result = _cli(
        "--trainer", trainer, "--peft", "--data-path", str(data), "--valid-split", "valid",
        "--project-name", str(project), "--block-size", "128", "--max-prompt-length", "96",
        "--lr", "5e-4", "--batch-size", "2", "--gradient-accumulation", "1", "--max-steps", "16",
        "--logging-steps", "2", "--disable-gradient-checkpointing", "--eval-strategy", "no",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    losses = train_losses(project)
    assert _falls(losses), losses


@pytest.mark.slow
@needs_shared()
def test_default_model_reward_generalises_to_held_back_rows(tmp_path):
    """SmolLM2 + LoRA, one epoch over 200 HH pairs: on 120 held-back training rows the reward model prefers the
    chosen answer more often than chance (0.70 on this machine, 2026-12-08, at block_size 96; 0.675 at 128), and its
    merged copy, loaded by plain transformers, does too (27 of 40)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "hh"
    _write_jsonl(data / "train.jsonl", _hh_rows(200))
    held_back = _hh_rows(120, start=1300)
    _write_jsonl(data / "valid.jsonl", held_back)
    project = tmp_path / "smol-reward"
    result = _cli(
        "--trainer", "reward", "--peft", "--merge-adapter", "--data-path", str(data), "--valid-split", "valid",
        "--project-name", str(project), "--block-size", "96", "--max-prompt-length", "48", "--lr", "1e-3",
        "--batch-size", "8", "--gradient-accumulation", "1", "--epochs", "1", "--logging-steps", "5",
        "--disable-gradient-checkpointing", "--eval-strategy", "no",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > 0.55, metrics

    model = AutoModelForSequenceClassification.from_pretrained(project / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(project / "merged")
    wins = 0
    for row in held_back[:40]:
        texts = [row["chosen"][-400:] + tokenizer.eos_token, row["rejected"][-400:] + tokenizer.eos_token]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            chosen, rejected = model(**batch).logits[:, 0].tolist()
        wins += chosen > rejected
    assert wins > 20, wins


# ------------------------------------------------------------------ bad input


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunelab", "llm", "--train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )


BAD = {
    "missing rejected column": ([{"chosen": "a b", "answer": "c"}] * 3, "rejected column 'rejected' not found"),
    "empty chosen": (
        [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}, {"prompt": "Q?", "chosen": "  ", "rejected": "no"}],
        "line 2, column 'chosen': empty text",
    ),
    "identical everywhere": ([{"prompt": "Q?", "chosen": "same", "rejected": "same"}] * 3, "identical in every row"),
    "prompt too long everywhere": (
        [{"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}] * 3,
        "no training rows left",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_preference_data_fails_before_training(case, tiny_llama, tmp_path):
    rows, message = BAD[case]
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    project = tmp_path / "project"
    result = _cli(
        "--model", str(tiny_llama), "--trainer", "dpo", "--data-path", str(data), "--project-name", str(project),
        "--block-size", "64", "--max-prompt-length", "64", "--model-max-length", "128", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tunelab: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not project.exists() and not list(tmp_path.glob(".project*"))


def test_pair_batches_are_grouped_by_length(tiny_llama, tokenizer, tmp_path):
    """Pairs are batched with pairs of similar length (group_by_length, the default): over an epoch the padded
    batches hold far fewer tokens than in a random order, and every pair is still seen once."""
    import random

    from transformers import AutoModelForCausalLM

    from tunelab.data.preference import Pair
    from tunelab.methods.reward import RewardTrainer
    from tunelab.training.trainer import ListDataset

    rng = random.Random(0)
    pairs = [Pair([5] * rng.randint(4, 60), [6] * rng.randint(2, 60), [7] * rng.randint(2, 60)) for _ in range(96)]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    padded = {}
    for grouped in (True, False):
        trainer = _tunelab_trainer(RewardTrainer, model, tokenizer, tmp_path, batch_size=8, group_by_length=grouped)
        trainer.train_dataset = ListDataset(pairs)
        batches = list(trainer.get_train_dataloader())
        assert sum(len(b["input_ids"]) for b in batches) == 2 * len(pairs)
        padded[grouped] = sum(b["input_ids"].numel() for b in batches)
    assert padded[True] < 0.8 * padded[False], padded
