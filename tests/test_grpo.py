"""`--trainer grpo`: its loss equals TRL's GRPOTrainer's on the same batch (each normalisation, LoRA and full),
advantages are TRL's, a tiny run trains end to end and leaves completions.jsonl, and every bad reward is one line.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import read_metrics
from tunelab.cli import main
from tunelab.config.llm import LLMParams
from tunelab.methods.grpo import group_advantages
from tunelab.methods.sampling import nanstd

PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (4, 1), (6, 2), (1, 1)]]


def _data(tmp_path: Path, rows=PROMPTS) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- advantages and the loss against TRL


def test_advantages_are_group_normalised_as_trl_does():
    from trl.trainer.utils import nanstd as trl_nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, float("nan"), 2.0, 2.0, 2.0, 2.0])
    advantages, std = group_advantages(rewards, 4, "group")
    grouped = rewards.view(-1, 4)
    mean = torch.nanmean(grouped, 1).repeat_interleave(4)
    expected = torch.nan_to_num((rewards - mean) / (trl_nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4))
    torch.testing.assert_close(advantages, expected)
    assert advantages[3] == 0  # a completion no reward scored carries no signal
    assert torch.all(advantages[4:] == 0) and torch.all(std[4:] == 0)  # a group with one reward: nothing to learn
    assert nanstd(rewards) == pytest.approx(float(trl_nanstd(rewards)))
    batch, _ = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch, torch.nan_to_num((rewards - mean) / (trl_nanstd(rewards) + 1e-4)))


def _trainer(tiny_llama, tmp_path, **settings):
    """A grpo trainer on the tiny model, for its parts (no training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.methods.grpo import GRPOTrainer
    from tunelab.training.trainer import training_arguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.eos_token
    params = LLMParams(
        model=str(tiny_llama), project_name=str(tmp_path / "parts"), trainer="grpo", num_generations=4, batch_size=2,
        gradient_accumulation=2, peft=False, **{"reward_functions": "format_tag", **settings},
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    args = training_arguments(params, str(tmp_path / "parts"), 1, False)
    return GRPOTrainer(params=params, model=model, args=args, processing_class=tokenizer, train_dataset=[1])


@pytest.mark.parametrize(
    "settings",
    [
        {"scale_rewards": "batch"},
        {"multi_objective_aggregation": "normalize_then_sum", "reward_functions": "format_tag,format_think"},
    ],
    ids=["scale-batch", "gdpo"],
)
def test_step_wide_advantages_use_the_whole_steps_rewards_as_trl_does(tiny_llama, tmp_path, settings):
    """scale_rewards batch and multi_objective_aggregation normalize_then_sum normalise over TRL's generation batch
    (every micro-batch of the step, every process): two micro-batches' advantages, made final once both are
    rolled out, equal TRL's formulas over all their rewards at once; with unscored completions (NaN) in them."""
    from trl.trainer.utils import nanstd as trl_nanstd

    trainer = _trainer(tiny_llama, tmp_path, **settings)
    functions = len(trainer.rewards)
    generator = torch.Generator().manual_seed(0)
    per_function = torch.rand((16, functions), generator=generator) * torch.tensor([1.0, 3.0][:functions])
    per_function[3] = math.nan  # unscored by every reward
    per_function[9, 0] = math.nan  # unscored by one
    weights = torch.tensor([r.weight for r in trainer.rewards])
    total = (per_function * weights).nansum(1)
    total[torch.isnan(per_function).all(1)] = math.nan
    batches = []
    for part in (slice(0, 8), slice(8, 16)):
        batch = {"completion_mask": torch.ones(8, 3)}
        batch["advantages"], _ = trainer.advantages_of(total[part], batch, per_function[part])
        batches.append(batch)
    trainer.finish_advantages(batches)
    ours = torch.cat([b["advantages"] for b in batches])

    # TRL's, over the whole generation batch at once (grpo_trainer._generate_and_score_completions)
    if "scale_rewards" in settings:
        mean = torch.nanmean(total.view(-1, 4), dim=1).repeat_interleave(4)
        expected = (total - mean) / (trl_nanstd(total).expand_as(total) + 1e-4)
    else:
        grouped = per_function.view(-1, 4, functions)
        k_mean = torch.nanmean(grouped, dim=1, keepdim=True)
        k_std = trl_nanstd(grouped, dim=1, keepdim=True)
        rewards = (((grouped - k_mean) / (k_std + 1e-4)).view(-1, functions) * weights).nansum(1)
        rewards[torch.isnan(per_function).all(1)] = math.nan
        expected = (rewards - torch.nanmean(rewards)) / (trl_nanstd(rewards).expand_as(rewards) + 1e-4)
    torch.testing.assert_close(ours, torch.nan_to_num(expected, nan=0.0), atol=1e-5, rtol=1e-5)
    assert ours[3] == 0 and ours.abs().sum() > 1
    # each micro-batch alone would have been normalised by its own figures: not what TRL does
    alone = trainer.advantages_of(total[:8], {}, per_function[:8])
    assert alone[1] is None  # (deferred to the step's end)


def test_adaptive_entropy_control_is_kept_in_each_checkpoint(tiny_llama, tmp_path):
    """use_adaptive_entropy moves entropy_coef every step: a resumed run goes on from the checkpoint's value and
    the last step's entropy, not from the start."""
    settings = dict(use_adaptive_entropy=True, entropy_coef=0.1, entropy_target=2.0)
    trainer = _trainer(tiny_llama, tmp_path, **settings)
    assert trainer.bonus_coefficient() == 0.0  # no step yet: no entropy measured, no bonus
    mask = torch.ones(2, 3)
    trainer.control_entropy(torch.full((2, 3), 1.5), mask)  # a step at 1.5 nats, below the target: up
    assert trainer.entropy_coef == pytest.approx(0.105) and trainer.bonus_coefficient() == pytest.approx(0.105)
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    trainer.save_extras(folder)
    resumed = _trainer(tiny_llama, tmp_path, **settings)
    resumed.load_extras(folder)
    assert resumed.entropy_coef == pytest.approx(0.105) and resumed.bonus_coefficient() == pytest.approx(0.105)
    resumed.control_entropy(torch.full((2, 3), 2.5), mask)  # above the target: down, and no bonus next step
    assert resumed.entropy_coef == pytest.approx(0.1) and resumed.bonus_coefficient() == 0.0


def test_sync_ref_model_moves_grpo_s_reference_and_keeps_it_in_checkpoints(tiny_llama, tmp_path):
    """sync_ref_model (TRL's for GRPO too): every ref_model_sync_steps steps the KL term's reference (a frozen copy
    under full training) becomes alpha x the policy + (1 - alpha) x itself; the moved reference goes into each
    checkpoint and a resumed trainer reads it back."""
    from types import SimpleNamespace

    from tunelab.training.reference import SYNCED_REFERENCE, SyncReference

    trainer = _trainer(tiny_llama, tmp_path, beta=0.04, sync_ref_model=True, ref_model_sync_steps=2)
    (sync,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SyncReference)]
    assert sync.alpha == 0.6 and sync.every == 2
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.1)
    name = "model.layers.0.self_attn.q_proj.weight"
    start = dict(trainer.ref_model.named_parameters())[name].clone()
    policy = dict(trainer.model.named_parameters())[name].detach().clone()
    sync.on_step_end(None, SimpleNamespace(global_step=1), None)  # not a sync step: unchanged
    torch.testing.assert_close(dict(trainer.ref_model.named_parameters())[name], start)
    sync.on_step_end(None, SimpleNamespace(global_step=2), None)
    moved = dict(trainer.ref_model.named_parameters())[name].detach().clone()
    torch.testing.assert_close(moved, 0.6 * policy + 0.4 * start)
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    trainer.save_extras(folder)
    assert (folder / SYNCED_REFERENCE).is_file()
    resumed = _trainer(tiny_llama, tmp_path, beta=0.04, sync_ref_model=True, ref_model_sync_steps=2)
    resumed.load_extras(folder)
    torch.testing.assert_close(dict(resumed.ref_model.named_parameters())[name], moved)


def rollout_batch(tokenizer, completions: int = 4):
    """A fixed rollout: 2 prompts (left padded) x 2 completions of different lengths, one cut short."""
    torch.manual_seed(0)
    prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("Name a colour of the sea")["input_ids"]]
    width = max(map(len, prompts))
    prompt_ids = torch.full((2, width), tokenizer.pad_token_id)
    prompt_mask = torch.zeros((2, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, width - len(p) :] = torch.tensor(p)
        prompt_mask[i, width - len(p) :] = 1
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(2, 0), prompt_mask.repeat_interleave(2, 0)
    completion_ids = torch.randint(5, len(tokenizer), (completions, 7))
    completion_mask = torch.ones_like(completion_ids)
    for row, length in enumerate([7, 3, 5, 1]):
        completion_mask[row, length:] = 0
    advantages = torch.tensor([1.2, -0.7, 0.5, -0.3])
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
    }


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_equals_trl(tiny_llama, tmp_path, loss_type, peft):
    """The same batch (completions, advantages) through TRL's GRPOTrainer._compute_loss and tunelab's compute_loss,
    with the KL term on (beta 0.04, the reference being the adapter-less base under LoRA) and temperature 0.7."""
    _compare_with_trl(tiny_llama, tmp_path, peft, {"loss_type": loss_type})


@pytest.mark.parametrize(
    "settings",
    [
        {"loss_type": "grpo"},
        {"loss_type": "dapo", "epsilon_high": 0.28, "delta": 1.5},
        {"loss_type": "grpo", "importance_sampling_level": "sequence"},
        {"loss_type": "dr_grpo", "importance_sampling_level": "sequence", "delta": 1.3},
        {"loss_type": "cispo", "epsilon_high": 1.1},
        {"loss_type": "bnpo", "use_bias_correction_kl": False},
        {"loss_type": "sapo", "sapo_temperature_neg": 1.3},
        {"loss_type": "sapo", "importance_sampling_level": "sequence"},
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},
        {"loss_type": "luspo", "delta": 1.4},
        {"loss_type": "vespo", "vespo_k_neg": 2.5, "vespo_lambda_pos": 2.0},
        {"loss_type": "dapo", "top_entropy_quantile": 0.3},
        {"loss_type": "grpo", "entropy_coef": 0.05, "top_entropy_quantile": 0.5},
        {"loss_type": "dapo", "entropy_coef": 0.05, "accumulation": 2},
        {"loss_type": "dapo", "off_policy_mask_threshold": 0.2, "num_iterations": 2},
        {"loss_type": "bnpo", "use_adaptive_entropy": True, "entropy_coef": 0.1, "entropy_target": 100.0},
        {"loss_type": "dr_grpo", "use_adaptive_entropy": True, "entropy_coef": 0.1, "entropy_coef_delta": 0.05},
    ],
    ids=[
        "token", "delta", "gspo", "gspo-delta", "cispo", "no-kl-correction", "sapo", "sapo-sequence", "luspo",
        "luspo-token-delta", "vespo", "entropy-mask", "entropy-bonus", "entropy-bonus-dapo-accumulated",
        "off-policy-mask", "adaptive-entropy-below", "adaptive-entropy-above",
    ],
)  # fmt: skip
def test_a_later_step_on_the_same_completions_equals_trl(tiny_llama, tmp_path, settings):
    """num_iterations: a step after a batch's first trains against the log-probs of the policy that sampled it
    (FirstPass), so the ratios are not 1 and the clipping works: the loss, the figures logged and the gradients
    equal TRL's given the same old log-probs, for the token- and sequence-level (GSPO) ratios, delta, each loss
    type, the entropy mask and bonus (adaptive: two steps, the second's bonus set by the first's entropy) and the
    off-policy mask."""
    _compare_with_trl(tiny_llama, tmp_path, True, settings, moved=True)


def _compare_with_trl(tiny_llama, tmp_path, peft, settings, moved=False):
    """One batch through both trainers' losses; `moved`: the policy has moved since it sampled the batch (old
    log-probs about 0.3 away from the current ones, on the side that clips). With use_adaptive_entropy, two steps
    on it (the second's bonus depends on the first's entropy)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    from tunelab.methods.grpo import GRPOTrainer
    from tunelab.training.trainer import training_arguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.eos_token  # as tunelab's tokenizer loading sets it
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.manual_seed(1)
    if peft:
        base = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        )
        with torch.no_grad():  # an adapter that does something, so policy and reference differ
            for name, p in base.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    accumulation = settings.pop("accumulation", 1)  # a micro-batch of a step with this many
    settings = dict(beta=0.04, temperature=0.7, max_completion_length=7, **settings)
    batch = rollout_batch(tokenizer)

    params = LLMParams(
        model=str(tiny_llama), project_name=str(tmp_path / "ours"), trainer="grpo", reward_functions="format_tag",
        num_generations=2, batch_size=2, gradient_accumulation=accumulation, peft=peft, **settings,
    )  # fmt: skip
    args = training_arguments(params, str(tmp_path / "ours"), 1, False)
    reference = None if peft else copy.deepcopy(base)
    if reference is not None:
        with torch.no_grad():  # full training: the policy has moved away from its frozen starting copy
            for p in base.parameters():
                p.add_(0.02 * torch.randn_like(p))
    ours = GRPOTrainer(
        params=params, model=copy.deepcopy(base), args=args, processing_class=tokenizer, train_dataset=[1],
        ref_model=copy.deepcopy(reference) if reference is not None else None,
    )  # fmt: skip
    ours.current_gradient_accumulation_steps = accumulation
    ours.model.train()
    our_batch = {**batch, "ref_logps": ours.reference_logps(batch)}
    old = None
    if moved:
        from tunelab.methods.sampling import FirstPass

        with torch.no_grad():
            now = ours.completion_logps(ours.model, batch)
        torch.manual_seed(3)
        # each completion moved towards its advantage's side, so that some ratios leave the clip range
        towards = -0.3 * batch["advantages"].sign()[:, None]
        old = now + (towards + 0.25 * torch.randn_like(now)) * batch["completion_mask"]
        our_batch["first_pass"] = FirstPass()
        our_batch["first_pass"].logps = old
    steps = 2 if settings.get("use_adaptive_entropy") else 1
    for _ in range(steps):
        loss = ours.compute_loss(ours.model, our_batch, num_items_in_batch=batch["completion_mask"].sum())

    config = GRPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        save_strategy="no", per_device_train_batch_size=4, num_generations=2,
        gradient_accumulation_steps=accumulation, **settings,
    )  # fmt: skip
    trl = TRLGRPOTrainer(
        model=copy.deepcopy(base),
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=config,
        train_dataset=Dataset.from_list([{"prompt": "What is 2 + 3?"}] * 4),
        processing_class=tokenizer,
    )
    if reference is not None:
        trl.ref_model = copy.deepcopy(reference)
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(
            trl.ref_model, temperature=config.temperature, cast_lm_head_to_fp32=config.cast_lm_head_to_fp32
        )
    trl.current_gradient_accumulation_steps = accumulation
    trl.model.train()
    # Completions end where TRL ends them (the tokenizer's and the generation config's EOS), and also at the chat
    # template's turn end, which this tokenizer's EOS is not (models/turns.py).
    assert set(trl.eos_token_ids) < set(ours.end_ids)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ours.end_ids
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        if reference is not None:
            ref, _, _ = trl._get_per_token_logps_and_entropies(trl.ref_model, ids, mask, 7)
        else:
            with trl.model.disable_adapter():
                ref, _, _ = trl._get_per_token_logps_and_entropies(trl.model, ids, mask, 7)
    trl_inputs = {**batch, "ref_per_token_logps": ref, "num_items_in_batch": batch["completion_mask"].sum()}
    if old is not None:
        trl_inputs["old_per_token_logps"] = old
    for _ in range(steps):
        trl_loss = trl._compute_loss(trl.model, trl_inputs)

    torch.testing.assert_close(our_batch["ref_logps"] * batch["completion_mask"], ref * batch["completion_mask"])
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    assert abs(loss.item()) > 1e-2  # not trivially zero
    assert ours._metrics["kl"][0] == pytest.approx(trl._metrics["train"]["kl"][0], abs=1e-5)
    assert ours._metrics["kl"][0] > 0
    trl_metrics = trl._metrics["train"]
    compared = [name for name in ours._metrics if name in trl_metrics]
    for name in compared:  # clip ratios, entropy, policy_loss, entropy_coef, vespo's weights
        assert ours._metrics[name][-1] == pytest.approx(trl_metrics[name][-1], abs=1e-5), name
    assert ours._metrics["entropy"][-1] > 0.1  # (logged by both, whatever the settings)
    if moved and settings["loss_type"] in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):  # ratios not 1: some clipped
        assert ours._metrics["clip_ratio/region_mean"][0] > 0
    if settings.get("entropy_coef"):
        assert {"policy_loss", "entropy_coef"} <= set(compared)
        assert ours.entropy_coef == pytest.approx(trl.entropy_coef)
        if settings.get("use_adaptive_entropy"):  # moved by each step: up below the target, down above
            moved_by = 2 * settings.get("entropy_coef_delta", 0.005) * (1 if settings.get("entropy_target") else -1)
            assert ours.entropy_coef == pytest.approx(0.1 + moved_by)
    if settings["loss_type"] == "vespo":
        assert "vespo/phi_seq_mean" in compared
    if "off_policy_mask_threshold" in settings:  # some completions dropped, not all
        from tunelab.methods.grpo import off_policy_keep

        with torch.no_grad():
            now = ours.completion_logps(ours.model, batch)
        keep = off_policy_keep(batch["advantages"][:, None], now, old, batch["completion_mask"], 0.2)
        assert 0 < keep.sum() < len(keep)
    loss.backward()
    trl_loss.backward()
    ours_grads = [p.grad for p in ours.model.parameters() if p.requires_grad]
    trl_grads = [p.grad for p in trl.model.parameters() if p.requires_grad]
    for a, b in zip(ours_grads, trl_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


# ---- a run, and its rewards' failures


REWARDS = """
import math


def correct(prompts, completions, answer, **kwargs):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


def short(completion_ids):
    return [-len(ids) / 100 for ids in completion_ids]


def raises(completions, answer, **kwargs):
    if any(a == "2" for a in answer):
        raise ValueError("cannot score this one")
    return [0.0] * len(completions)


def too_few(completions, **kwargs):
    return [0.0]


def not_a_number(completions, **kwargs):
    return [math.nan] * len(completions)
"""


def grpo_args(tmp_path, tiny_llama, rewards: str, *extra: str) -> list[str]:
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    return [
        "llm", "--train", "--trainer", "grpo", "--model", str(tiny_llama), "--data-path", str(_data(tmp_path)),
        "--project-name", str(tmp_path / "run"), "--reward-functions", rewards, "--num-generations", "2",
        "--batch-size", "2", "--gradient-accumulation", "1", "--max-completion-length", "6", "--max-steps", "2",
        "--lr", "1e-3", "--peft", "--logging-steps", "1", "--completions-every", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_a_tiny_run_trains_and_writes_its_completions(tiny_llama, tmp_path, peft):
    rewards = f"{tmp_path / 'my_rewards.py'}:correct,{tmp_path / 'my_rewards.py'}:short,format_tag"
    args = grpo_args(tmp_path, tiny_llama, rewards, "--reward-weights", "1,0.5,0.2", "--beta", "0.04")
    if not peft:
        args.remove("--peft")
    assert main(args) == 0
    run = tmp_path / "run"
    records = [r for r in read_metrics(run) if "loss" in r]
    assert len(records) == 2
    for key in ("reward", "reward_std", "rewards/short/mean", "completions/mean_length", "clip_ratio/region_mean"):
        assert key in records[0], key
    assert records[0]["rewards/short/mean"] < 0  # the length penalty; logged by the function's name, as TRL does
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all("prompts.jsonl line" in s["where"] for s in samples)
    assert set(samples[0]["rewards"]) == {"correct", "short", "format_tag"}
    assert "kl" in records[0]  # beta > 0: the reference pass (adapter off, or the frozen copy) ran
    assert (run / ("adapter_model.safetensors" if peft else "model.safetensors")).is_file()


def test_trl_s_grpo_variants_train_together(tiny_llama, tmp_path, monkeypatch):
    """luspo with the entropy mask and bonus, GDPO's aggregation, and sampling filtered by top_k, min_p and a
    repetition penalty, over two micro-batches a step: the run trains and logs each variant's figures, and
    generation is given the filters."""
    import tunelab.methods.completions as completions

    original, given = completions.sampling_config, []

    def recording(*args, **kwargs):
        given.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(completions, "sampling_config", recording)
    args = grpo_args(tmp_path, tiny_llama, f"format_tag,{tmp_path / 'my_rewards.py'}:short")
    args[args.index("--gradient-accumulation") + 1] = "2"
    args += [
        "--loss-type", "luspo", "--importance-sampling-level", "sequence", "--top-entropy-quantile", "0.5",
        "--entropy-coef", "0.01", "--multi-objective-aggregation", "normalize_then_sum", "--top-k", "20",
        "--min-p", "0.01", "--repetition-penalty", "1.3",
    ]  # fmt: skip
    assert main(args) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 2
    for key in ("entropy", "policy_loss", "entropy_coef", "clip_ratio/region_mean", "frac_reward_zero_std"):
        assert key in records[0], key
    assert records[0]["entropy"] > 0 and records[0]["entropy_coef"] == 0.01
    assert given and all(call[3:] == (1.0, 20, 0.01, 1.3) for call in given)


def test_a_reward_model_run_scores_the_completions(tiny_llama, tmp_path, capsys):
    """--reward-functions naming a reward model's folder (a tunelab --trainer reward run, a LoRA adapter here), as
    TRL takes a reward model: each completion gets the score `tunelab score` gives its prompt and completion. A
    folder that holds no reward model is refused by the dry run, in one line."""
    import tunelab
    from tunelab.inference.score import load_reward_model, score

    pairs = [{"prompt": f"What is {i} + 1?", "chosen": " Fine.", "rejected": " No idea at all."} for i in range(8)]
    data = tmp_path / "pairs" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    reward_run = tunelab.train(
        LLMParams(
            model=str(tiny_llama), data_path=str(data.parent), trainer="reward", project_name=str(tmp_path / "rm"),
            peft=True, block_size=64, model_max_length=128, max_prompt_length=32, batch_size=4, max_steps=2,
            disable_gradient_checkpointing=True, eval_strategy="no",
        )
    )  # fmt: skip
    assert main(grpo_args(tmp_path, tiny_llama, f"{reward_run},format_tag")) == 0
    samples = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    model, tokenizer, plain_text = load_reward_model(reward_run)
    expected = score(model, tokenizer, [s["prompt"] + s["completion"] for s in samples], plain_text)
    got = [s["rewards"][reward_run.name] for s in samples]  # (TRL's label: the model's folder name)
    assert got == pytest.approx(expected, abs=2e-4) and len(set(got)) > 1
    record = next(r for r in read_metrics(tmp_path / "run") if "loss" in r)
    assert f"rewards/{reward_run.name}/mean" in record

    checked = grpo_args(tmp_path, tiny_llama, f"{reward_run},format_tag")
    checked[1], checked[checked.index("--project-name") + 1] = "--dry-run", str(tmp_path / "checked")
    capsys.readouterr()
    assert main(checked) == 0
    out = capsys.readouterr().out
    assert f"reward model(s) {reward_run}: loaded beside the policy" in out and "the reward models' weights" in out
    # the memory figure counts the reward model as it loads: its base's weights (the adapter is small)
    from tunelab.memory import reward_model_bytes

    base = [p for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    assert reward_model_bytes(str(reward_run)) == (sum(p.numel() * p.element_size() for p in base), [])
    dry = grpo_args(tmp_path, tiny_llama, f"{tiny_llama},format_tag")
    dry[1], dry[dry.index("--project-name") + 1] = "--dry-run", str(tmp_path / "other")
    assert main(dry) == 2
    assert "not a reward model's folder" in capsys.readouterr().err


def test_another_reward_model_scores_chats_as_trl_gives_them(tiny_llama, tmp_path, monkeypatch):
    """A sequence classifier that is not a tunelab run (no run record) gets what TRL's GRPOTrainer gives a reward
    model: chat prompts and completions through its tokenizer's chat template, no special tokens added, no EOS.
    A hub id is scored the same from the hub cache; the memory figure counts the weights as they load. A classifier
    of two labels (transformers writes no num_labels for its default) is refused before loading."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from tunelab.rewards import ModelReward, RewardError

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.eos_token
    config = json.loads((tiny_llama / "config.json").read_text())
    from transformers import LlamaConfig

    torch.manual_seed(0)
    classifier = LlamaForSequenceClassification(
        LlamaConfig(**{**config, "num_labels": 1, "pad_token_id": tokenizer.pad_token_id})
    )
    folder = tmp_path / "rm"
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Name a colour"}]]
    completions = [[{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "The sea is blue."}]]
    reward = ModelReward(str(folder))
    reward.load()
    got = reward(prompts, completions)
    texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions, strict=True)]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        expected = classifier.eval()(**inputs).logits[:, 0].tolist()
    assert got == pytest.approx(expected, abs=1e-5) and got[0] != got[1]
    # the memory figure counts its weights in the dtype they load in (the folder's own)
    from tunelab.memory import reward_model_bytes

    classifier.to(torch.bfloat16).save_pretrained(tmp_path / "rm16")
    tokenizer.save_pretrained(tmp_path / "rm16")
    loaded = ModelReward(str(tmp_path / "rm16"))
    loaded.load()
    weights = sum(p.numel() * p.element_size() for p in loaded._loaded[0].parameters())
    assert reward_model_bytes(f"{tmp_path / 'rm16'},format_tag") == (weights, [])
    assert next(loaded._loaded[0].parameters()).dtype == torch.bfloat16

    # a hub id: its cached copy with the hub out of reach (HF_HUB_OFFLINE in the tests), scored as the folder is
    import huggingface_hub

    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--acme--rm" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(folder, snapshot)
    (cache / "models--acme--rm" / "refs").mkdir()
    (cache / "models--acme--rm" / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub = ModelReward("acme/rm")
    assert hub.hub and hub.folder == snapshot
    assert hub(prompts, completions) == pytest.approx(got, abs=1e-6)
    assert reward_model_bytes("acme/rm")[0] == sum(p.numel() * 4 for p in classifier.parameters())
    # an adapter on the hub whose base is a path (the machine it was trained on): refused, never loaded from here
    adapter = cache / "models--acme--lora-rm" / "snapshots" / ("f" * 40)
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama)}))
    (cache / "models--acme--lora-rm" / "refs").mkdir()
    (cache / "models--acme--lora-rm" / "refs" / "main").write_text("f" * 40)
    with pytest.raises(RewardError, match="an adapter whose base model is a path on the machine it was trained on"):
        ModelReward("acme/lora-rm")
    assert reward_model_bytes("acme/lora-rm") == (0, ["acme/lora-rm"])
    with pytest.raises(RewardError, match="cannot download model 'acme/missing': the hub is out of reach and no copy"):
        ModelReward("acme/missing")
    assert reward_model_bytes("acme/missing") == (0, ["acme/missing"])

    two = tmp_path / "two-labels"
    LlamaForSequenceClassification(LlamaConfig(**config)).save_pretrained(two)
    with pytest.raises(RewardError, match="a classifier of 2 labels, not one score"):
        ModelReward(str(two))


@pytest.mark.parametrize(
    ("trainer", "iterations"), [("grpo", 1), ("rloo", 1), ("grpo", 2)], ids=["grpo", "rloo", "grpo-iterations"]
)
def test_steps_per_generation_samples_several_steps_at_once(trainer, iterations, tiny_llama, tmp_path, capsys):
    """steps_per_generation 2 (gradient_accumulation 1) over 4 prompts, 2 a step: one sampling of all 4 serves steps
    1 and 2 (with num_iterations 2, steps 1 to 4); the completions are scored and written at step 1 only, and the
    later steps train on them against their log-probs under the policy that sampled them, scored then: with a clip
    range this narrow the ratios clip there only, and with a learning rate of 1e-12 they never do (p_old is p)."""
    (tmp_path / "parity.py").write_text(
        "def parity(completion_ids, **kwargs):\n    return [float(ids[0] % 2) for ids in completion_ids]\n"
    )
    args = grpo_args(tmp_path, tiny_llama, f"{tmp_path / 'parity.py'}:parity", "--trainer", trainer)
    args[args.index("--max-steps") + 1] = "-1"
    args += ["--steps-per-generation", "2", "--num-iterations", str(iterations), "--epochs", "1"]
    args += ["--warmup-ratio", "0", "--epsilon", "0.0001"]
    if trainer == "rloo":  # its KL penalty scores the sampling policy's log-probs: a later step's p_old, kept
        args += ["--beta", "0.05"]
    dry = [*args, "--dry-run"]
    dry.remove("--train")
    assert main(dry) == 0
    out = capsys.readouterr().out
    steps = 2 * iterations
    assert f"{steps} per epoch" in out and f"(generation once every {steps} steps)" in out, out
    assert "steps_per_generation 2: 2 steps' prompts sampled at once" in out
    dry[dry.index("--batch-size") + 1] = "4"  # two steps of 4 prompts: more than there are, refused
    assert main(dry) == 2
    assert "steps_per_generation samples 2 steps' prompts at once: it needs at least" in capsys.readouterr().err

    for lr in ("2e-2", "1e-12"):
        args[args.index("--lr") + 1] = lr
        assert main([*args, "--project-name", str(tmp_path / f"lr{lr}")]) == 0
        folder = tmp_path / f"lr{lr}"
        records = [r for r in read_metrics(folder) if "loss" in r]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        assert ["reward" in r for r in records] == [True] + [False] * (steps - 1)
        samples = [json.loads(line) for line in (folder / "completions.jsonl").read_text().splitlines()]
        assert {s["step"] for s in samples} == {1} and len(samples) == 4  # (2 prompts x their 2 completions)
        clipped = [r["clip_ratio/region_mean"] for r in records]
        assert clipped[0] == 0  # the first step trains on completions of the policy as it is
        if lr == "1e-12":
            assert clipped == [0] * steps
        else:
            assert all(value > 0 for value in clipped[1:]), clipped


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_num_iterations_trains_each_batch_of_completions_in_several_steps(trainer, tiny_llama, tmp_path, capsys):
    """num_iterations 2 over 4 prompts, 2 a step: each step's prompts come round twice, so an epoch is 4 steps; the
    completions are sampled (and scored, and written) in steps 1 and 3 only, and steps 2 and 4 train on them against
    the log-probs of the policy that sampled them: with a clip range this narrow, the ratios clip there only."""
    (tmp_path / "parity.py").write_text(
        "def parity(completion_ids, **kwargs):\n    return [float(ids[0] % 2) for ids in completion_ids]\n"
    )  # a reward that differs within a group (the tiny model's completions all run to the length limit)
    args = grpo_args(tmp_path, tiny_llama, f"{tmp_path / 'parity.py'}:parity", "--trainer", trainer)
    args[args.index("--max-steps") + 1] = "-1"
    args += ["--num-iterations", "2", "--epochs", "1", "--lr", "2e-2", "--warmup-ratio", "0", "--epsilon", "0.0001"]
    args[args.index("--num-generations") + 1] = "4"
    dry = [*args, "--dry-run"]
    dry.remove("--train")
    assert main(dry) == 0
    out = capsys.readouterr().out
    assert "4 per epoch" in out and "num_iterations 2: each batch of completions trained on 2 times" in out
    dry[dry.index("--batch-size") + 1] = "8"  # more prompts a step than there are: refused before training too
    assert main(dry) == 2
    assert "num_iterations 2 trains each step's prompts again" in capsys.readouterr().err

    assert main(args) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert ["reward" in r for r in records] == [True, False, True, False]
    samples = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 3}
    clipped = [r["clip_ratio/region_mean"] for r in records]
    assert clipped[0] == 0 and clipped[2] == 0  # a batch's first step: the policy is the one that sampled
    assert clipped[1] > 0 and clipped[3] > 0


def test_model_ref_is_the_reference_of_a_pissa_run(tiny_llama, tmp_path, capsys):
    """A PiSSA adapter's base is the residual, not the starting model: the config asks for model_ref, and the KL
    term is then taken against it (it was silently ignored, the residual standing in)."""
    args = grpo_args(tmp_path, tiny_llama, "format_tag", "--beta", "0.04", "--init-lora-weights", "pissa")
    assert main(list(args)) == 2  # without model_ref: refused before anything loads
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    assert main([*args, "--model-ref", str(tiny_llama)]) == 0
    assert f"grpo: reference model = {tiny_llama}" in capsys.readouterr().err
    assert "kl" in next(r for r in read_metrics(tmp_path / "run") if "loss" in r)


@pytest.mark.parametrize(
    ("trainer", "extra"), [("orpo", []), ("sft", []), ("grpo", ["--beta", "0"])], ids=["orpo", "sft", "grpo-beta0"]
)
def test_model_ref_where_nothing_reads_it_is_refused(tiny_llama, tmp_path, capsys, trainer, extra):
    args = ["llm", "--train", "--trainer", trainer, "--model", str(tiny_llama), "--data-path", str(_data(tmp_path))]
    args += ["--project-name", str(tmp_path / "run"), "--model-ref", str(tiny_llama), *extra]
    assert main(args) == 2
    assert "model_ref names a reference model, read by dpo, kto, online_dpo, grpo and rloo" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("raises", r"reward .*:raises raised ValueError: cannot score this one \(.*prompts.jsonl line 4\)"),
        ("too_few", r"reward .*:too_few returned 1 values for 4 completions \(.*prompts.jsonl line \d\)"),
        ("not_a_number", r"reward .*:not_a_number returned nan \(.*prompts.jsonl line \d\)"),
    ],
)
def test_a_misbehaving_reward_stops_the_run_with_one_line(tiny_llama, tmp_path, capsys, function, message):
    import re

    code = main(grpo_args(tmp_path, tiny_llama, f"{tmp_path / 'my_rewards.py'}:{function}"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert re.search(message, errors[0]), errors[0]


def test_a_run_stopped_by_a_reward_keeps_its_checkpoint_and_resumes(tiny_llama, tmp_path, capsys):
    """The reward breaks at step 3, after the step-2 checkpoint: the line says what was kept; once the reward is
    fixed, the same command resumes from that checkpoint."""
    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "from pathlib import Path\n"
        "CALLS = Path(__file__).with_suffix('.calls')\n"
        "def score(completions, **kwargs):\n"
        "    n = int(CALLS.read_text()) + 1 if CALLS.exists() else 1\n"
        "    CALLS.write_text(str(n))\n"
        "    if n == 3 and Path(__file__).with_suffix('.broken').exists():\n"
        "        raise RuntimeError('the scoring service is down')\n"
        "    return [float(len(c) % 3) for c in completions]\n"
    )
    flaky.with_suffix(".broken").touch()
    args = grpo_args(tmp_path, tiny_llama, f"{flaky}:score", "--save-steps", "2")
    args[args.index("--max-steps") + 1] = "4"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the scoring service is down" in err and "checkpoint-2" in err, err
    flaky.with_suffix(".broken").unlink()
    assert main(args) == 0
    assert "resuming from" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r][-1] == 4


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def correct(:\n", r"my_rewards.py:1 does not import: SyntaxError"),
        ("import no_such_module\n", r"does not import: ModuleNotFoundError"),
        ("def other(): pass\n", r"has no function 'correct' \(it has other\)"),
    ],
)
def test_a_reward_file_that_does_not_load_is_caught_by_the_dry_run(tiny_llama, tmp_path, capsys, source, message):
    import re

    args = grpo_args(tmp_path, tiny_llama, f"{tmp_path / 'my_rewards.py'}:correct")
    (tmp_path / "my_rewards.py").write_text(source)
    args[1] = "--dry-run"
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and re.search(message, err), err
    assert not (tmp_path / "run").exists()


def _dry_run_error(tiny_llama, tmp_path, capsys, rewards: str, rows: list[dict]) -> str:
    args = grpo_args(tmp_path, tiny_llama, rewards)
    _data(tmp_path, rows)
    args[1] = "--dry-run"
    code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    return errors[0]


@pytest.mark.parametrize("first", ["text", "messages"])
def test_text_and_message_prompts_mixed_in_one_file_are_bad_rows(tiny_llama, tmp_path, capsys, first):
    text = {"prompt": "What is 2 + 2?", "answer": "4"}
    chat = {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}
    rows = [text, chat] if first == "text" else [chat, text]
    line = _dry_run_error(tiny_llama, tmp_path, capsys, "format_tag", rows)
    why = "a list of messages, where the other rows hold text" if first == "text" else "text, where the other rows"
    assert f"prompts.jsonl line 2, column 'prompt': {why}" in line, line


def test_answer_rewards_without_an_answer_column_are_refused_before_training(tiny_llama, tmp_path, capsys):
    rows = [{"prompt": f"What is {a} + 1?", "solution": str(a + 1)} for a in range(4)]
    args = grpo_args(tmp_path, tiny_llama, "format_tag")
    _data(tmp_path, rows)
    args[1] = "--dry-run"
    assert main(args) == 0  # prepared (and cached) with rewards that need no answer column
    capsys.readouterr()
    line = _dry_run_error(tiny_llama, tmp_path, capsys, "format_tag,answer_tag", rows)
    assert line == (
        f"tunelab: error: {tmp_path / 'prompts.jsonl'}: reward answer_tag compares with column 'answer', which the "
        "data does not have (columns: prompt, solution); set reward_answer_column (--reward-answer-column) to the "
        "column that holds the answer"
    )


def test_dry_run_reports_the_generation_budget(tiny_llama, tmp_path, capsys):
    args = grpo_args(tmp_path, tiny_llama, "answer_last_number")
    args[1] = "--dry-run"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 prompts x 2 completions x up to 6 tokens = up to 24 generated tokens" in out
    assert "generation: 1 generate call(s) a sampling, 2 prompt(s) each; KV cache about" in out
    args[args.index("--gradient-accumulation") + 1] = "3"
    assert main([*args, "--prompts-per-generation", "4"]) == 0
    assert "generation: 2 generate call(s) a sampling, 4 prompt(s) each; KV cache" in capsys.readouterr().out
    args[args.index("--gradient-accumulation") + 1] = "1"
    assert main([*args, "--steps-per-generation", "2"]) == 0  # two steps' prompts, in one call by default
    assert "generation: 1 generate call(s) a sampling, 4 prompt(s) each; KV cache" in capsys.readouterr().out


@pytest.mark.parametrize("per_call", [None, 1, 3])
def test_a_step_s_prompts_are_sampled_together_and_split_back(tiny_llama, tmp_path, per_call):
    """The step's prompts (every micro-batch's) go to generate in calls of prompts_per_generation (all at once by
    default, as TRL samples): each micro-batch gets its own prompts' completions back, trimmed to its own widest
    prompt and longest completion, as if it had been sampled alone."""
    from tunelab.data.prompts import PromptRow

    trainer = _trainer(tiny_llama, tmp_path, prompts_per_generation=per_call, max_completion_length=5)
    tokenizer = trainer.processing_class
    texts = ["Hi", "What is two plus two, in words?", "Name a colour", "Say yes"]
    rows = [PromptRow(t, tokenizer(t)["input_ids"], {}, f"line {i}") for i, t in enumerate(texts)]
    model = trainer.accelerator.unwrap_model(trainer.model)
    generate, calls = model.generate, []

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    model.generate = counting
    sampled = trainer.sample([rows[:2], rows[2:]])
    assert calls == {None: [4], 1: [1, 1, 1, 1], 3: [3, 1]}[per_call]
    for batch, samples in zip([rows[:2], rows[2:]], sampled, strict=True):
        prompt_ids, prompt_mask, completion_ids = samples.prompt_ids, samples.prompt_mask, samples.completion_ids
        assert prompt_ids.shape == (2 * 4, max(len(r.input_ids) for r in batch))
        for i, row in enumerate(batch):  # each prompt's 4 completions, its own prompt before them
            for ids, mask in zip(prompt_ids[4 * i : 4 * i + 4], prompt_mask[4 * i : 4 * i + 4], strict=True):
                assert ids[mask.bool()].tolist() == row.input_ids
        ends, truncated = trainer.completion_ends(completion_ids)
        assert completion_ids.size(1) == int(ends.max()) + 1 <= 5


def test_generation_kwargs_reach_generate_and_bad_values_stop_before_training(tiny_llama, tmp_path):
    """generation_kwargs (TRL's) go to generate: with half the vocabulary suppressed, no completion holds one of
    those tokens (it would otherwise: the tiny model's next tokens are near uniform), and a biased token comes up
    far more often. A token id past the vocabulary, or an end token suppressed, stops the trainer's start in one
    line (the forms of the values are the config's check: tests/test_rloo.py)."""
    from tunelab.data.prompts import PromptRow
    from tunelab.errors import ConfigError

    suppressed = list(range(5, 128))  # (the end tokens, 2 and 4, stay: completions can end)
    trainer = _trainer(
        tiny_llama, tmp_path, max_completion_length=8, generation_kwargs={"suppress_tokens": suppressed}
    )
    tokenizer = trainer.processing_class
    rows = [PromptRow(t, tokenizer(t)["input_ids"], {}, f"line {i}") for i, t in enumerate(["Hi", "Say yes"])]
    completions = trainer.sample([rows[:1], rows[1:]])[0].completion_ids
    assert completions.numel() > 8 and not torch.isin(completions, torch.tensor(suppressed)).any()
    plain = _trainer(tiny_llama, tmp_path, max_completion_length=8)
    completions = plain.sample([rows[:1], rows[1:]])[0].completion_ids
    assert torch.isin(completions, torch.tensor(suppressed)).any()
    vocabulary = len(tokenizer)
    with pytest.raises(ConfigError, match=f"token id {vocabulary + 5} is past the model's {vocabulary} tokens"):
        _trainer(tiny_llama, tmp_path, generation_kwargs={"bad_words_ids": [[3, vocabulary + 5]]})
    end = plain.end_ids[0]
    for settings in ({"suppress_tokens": [end]}, {"sequence_bias": [[[end], -1000.0]]}):
        with pytest.raises(ConfigError, match=f"end token {end} suppressed: completions could never end"):
            _trainer(tiny_llama, tmp_path, generation_kwargs=settings)
    # a sequence bias reaches generate as transformers takes it (floats): a favoured token comes up far more often
    favoured = _trainer(tiny_llama, tmp_path, max_completion_length=8, generation_kwargs={"sequence_bias": [[[7], 9]]})
    completions = favoured.sample([rows[:1], rows[1:]])[0].completion_ids
    assert (completions == 7).float().mean() > 0.5


def test_one_sampling_of_two_steps_splits_back_with_the_sampling_policy_s_log_probs(tiny_llama, tmp_path):
    """steps_per_generation 4 (gradient_accumulation 2): both steps' prompts sampled in one generate call; each step
    gets its own micro-batches back, with TRL's token count (the sampling's per step); the second step's batches
    carry their completions' log-probs under the sampling policy (p_old: the policy moves before they train), the
    first's none (trained at once, p_old is p)."""
    from tunelab.data.prompts import PromptRow

    trainer = _trainer(tiny_llama, tmp_path, steps_per_generation=4, max_completion_length=5)
    assert (trainer.together, trainer.cycle) == (2, 2)
    tokenizer = trainer.processing_class
    texts = ["Hi", "What is two plus two, in words?", "Name a colour", "Say yes"]
    rows = [PromptRow(t, tokenizer(t)["input_ids"], {"answer": "4"}, f"line {i}") for i, t in enumerate(texts)]
    model = trainer.accelerator.unwrap_model(trainer.model)
    generate, calls = model.generate, []
    model.generate = lambda *args, **kwargs: calls.append(kwargs["input_ids"].shape[0]) or generate(*args, **kwargs)
    rolled = trainer.roll_out([[rows[:1], rows[1:2]], [rows[2:3], rows[3:]]], torch.device("cpu"))
    assert calls == [4]  # the 4 prompts of both steps in one call (4 completions each)
    assert [len(batches) for batches, _ in rolled] == [2, 2]
    tokens = sum(int(b["completion_mask"].sum()) for batches, _ in rolled for b in batches)
    assert [t for _, t in rolled] == [tokens / 2, tokens / 2]
    assert all("old_logps" not in b for b in rolled[0][0])
    for batch in rolled[1][0]:
        with torch.no_grad():
            torch.testing.assert_close(batch["old_logps"], trainer.completion_logps(trainer.model, batch))


def test_built_in_answer_rewards_read_the_answer_forms():
    from tunelab.rewards import answer_reward

    completions = ["so #### 1,000", "the answer is \\boxed{42}", "<answer> 7 </answer>", "3 then 4.0"]
    for extractor, expected in (("hash", "1000"), ("boxed", "42"), ("tag", "7"), ("last_number", "4")):
        scores = answer_reward(extractor, "answer")(completions, answer=[expected] * 4)
        assert scores.count(1.0) == 1, (extractor, scores)
    chat = [[{"role": "assistant", "content": "<answer>5</answer>"}]]
    assert answer_reward("tag", "answer")(chat, answer=["5"]) == [1.0]


def test_format_think_rewards_reasoning_then_an_answer():
    """DeepSeek-R1's form: a closed think block, with reasoning in it and an answer after it; its opening may be
    the chat template's (R1's generation prompt ends with <think>)."""
    from tunelab.rewards import think_reward

    scored = {
        "<think>\nTwo and two.\n</think>\n\n4": 1.0,
        "Two and two.</think>4": 1.0,  # the template opened the block
        "<think></think>4": 0.0,  # no reasoning
        "<think>Two and two.</think>  ": 0.0,  # no answer
        "<think>Two and two.": 0.0,  # never closed
        "4": 0.0,
        "Sure. <think>Two and two.</think>4": 0.0,  # text before the block
        "<think>a</think><think>b</think>4": 0.0,  # two blocks
    }
    assert think_reward(list(scored)) == list(scored.values())
    assert think_reward([[{"role": "assistant", "content": "<think>a</think>b"}]]) == [1.0]


def test_sigkill_then_resume_samples_and_trains_as_the_uninterrupted_run(tiny_llama, tmp_path):
    """Generation is seeded by the step: a run killed after its step-2 checkpoint, resumed, logs the same rewards
    and losses at every step as one that was never stopped. With use_adaptive_entropy, whose coefficient each step
    moves (and whose bonus is in the loss): the checkpoint keeps the controller, so the resumed steps' losses are
    the uninterrupted run's too."""
    import signal

    from tests.test_resume import _run_child

    def args(project: str) -> list[str]:
        base = grpo_args(tmp_path, tiny_llama, "format_tag,answer_last_number,length_penalty")
        base[base.index("--project-name") + 1] = str(tmp_path / project)
        base[base.index("--max-steps") + 1] = "4"
        adaptive = ["--use-adaptive-entropy", "true", "--entropy-coef", "0.1", "--entropy-target", "100"]
        return [*base, "--save-steps", "2", "--lora-dropout", "0.1", *adaptive, "--entropy-coef-delta", "0.2"]

    assert _run_child(args("straight")).returncode == 0
    killed = _run_child(args("resumed"), kill_at=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # As if the kill had come during step 3: its samples written, its checkpoint not. They are written again.
    samples = tmp_path / ".resumed.partial" / "completions.jsonl"
    samples.write_text(samples.read_text() + json.dumps({"step": 3, "completion": "lost"}) + "\n")
    again = _run_child(args("resumed"))
    assert again.returncode == 0 and "resuming from" in again.stderr, again.stderr

    def logged(project: str) -> dict[int, tuple[float, float]]:
        return {r["step"]: (r["loss"], r["reward"]) for r in read_metrics(tmp_path / project) if "loss" in r}

    expected, got = logged("straight"), logged("resumed")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    coefficients = [r["entropy_coef"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert coefficients == pytest.approx([0.3, 0.5, 0.7, 0.9])  # raised each step: the entropy is below 100

    def sampled(project: str) -> list[tuple[int, str]]:
        lines = (tmp_path / project / "completions.jsonl").read_text().splitlines()
        return [(r["step"], r["completion"]) for r in map(json.loads, lines)]

    assert sampled("resumed") == sampled("straight")  # each step's samples once, the same as uninterrupted


def test_an_autotrain_style_config_names_the_task_llm_grpo(tmp_path):
    from tunelab.config import load_config

    config = tmp_path / "grpo.yml"
    config.write_text(
        "task: llm-grpo\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nproject_name: my-grpo\n"
        "data:\n  path: prompts.jsonl\n  column_mapping:\n    prompt_text_column: question\n"
        "params:\n  peft: true\n  reward_functions: answer_tag,format_tag\n  reward_weights: 1,0.5\n"
        "  num_generations: 4\n  loss_type: grpo\n  beta: 0.04\n"
    )
    params = load_config(config)
    assert (params.trainer, params.prompt_text_column, params.num_generations) == ("grpo", "question", 4)
    assert (params.loss_type, params.beta, params.reward_weights) == ("grpo", 0.04, "1,0.5")
    # YAML lists for the comma-separated fields
    listed = config.read_text().replace("reward_weights: 1,0.5", "reward_weights: [1, 0.5]")
    config.write_text(
        listed.replace("reward_functions: answer_tag,format_tag", "reward_functions: [answer_tag, format_tag]")
    )
    params = load_config(config)
    assert (params.reward_functions, params.reward_weights) == ("answer_tag,format_tag", "1,0.5")


def test_a_grpo_config_without_rewards_is_refused_before_anything_loads():
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="grpo needs reward_functions"):
        LLMParams(trainer="grpo")
    with pytest.raises(ConfigError, match="num_generations must be at least 2"):
        LLMParams(trainer="grpo", reward_functions="format_tag", num_generations=1)


def test_evaluation_scores_the_validation_prompts_apart(tiny_llama, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    args = grpo_args(tmp_path, tiny_llama, "answer_last_number,format_tag")
    args[args.index("--data-path") + 1] = str(folder)
    from transformers import GenerationMixin

    generate, sampled = GenerationMixin.generate, []

    def counting(self, *a, **kw):  # completions per prompt of each generate call
        sampled.append(kw["generation_config"].num_return_sequences)
        return generate(self, *a, **kw)

    GenerationMixin.generate = counting
    try:
        assert main([*args, "--valid-split", "test", "--eval-strategy", "steps", "--num-generations-eval", "3"]) == 0
    finally:
        GenerationMixin.generate = generate
    records = read_metrics(tmp_path / "run")
    evals = [r for r in records if "eval_loss" in r]
    trains = [r for r in records if "loss" in r]
    assert evals and "eval_reward" in evals[0] and "eval_rewards/format_tag/mean" in evals[0]
    assert all(not any(k.startswith("eval_") for k in r) for r in trains)  # training figures stay apart
    assert set(sampled) == {2, 3}  # num_generations 2 in training, num_generations_eval 3 in evaluation


def test_a_reward_file_imports_as_a_module_does(tmp_path):
    """A dataclass in the file (dataclasses look the module up in sys.modules) and a helper module beside it."""
    from tunelab.rewards import call_reward, load_rewards

    (tmp_path / "reward_helpers.py").write_text("def bonus():\n    return 0.5\n")
    (tmp_path / "dc_rewards.py").write_text(
        "from dataclasses import dataclass\nfrom reward_helpers import bonus\n\n"
        "@dataclass\nclass Rule:\n    word: str\n\n"
        "RULE = Rule('sea')\n\n"
        "def mentions(completions, **kwargs):\n    return [float(RULE.word in c) + bonus() for c in completions]\n"
    )
    params = LLMParams(trainer="grpo", reward_functions=f"{tmp_path / 'dc_rewards.py'}:mentions")
    (reward,) = load_rewards(params, 16)
    scores = call_reward(reward, ["p", "p"], ["the sea", "a hill"], [[1], [2]], {}, ["row 1", "row 2"])
    assert scores == [1.5, 0.5]


TRL_REWARDS = """
import asyncio


def by_step(completions, trainer_state, log_metric, log_extra, **kwargs):
    log_metric("my/length", sum(len(c) for c in completions) / len(completions))
    log_extra("judged", [f"step {trainer_state.global_step}"] * len(completions))
    return [float(trainer_state.global_step)] * len(completions)


async def later(completions, **kwargs):
    await asyncio.sleep(0)
    return [1.0 if "a" in c else 0.0 for c in completions]


LOOPS = []


async def one_loop(completions, **kwargs):  # (a client or a rate limiter made in one call works in the next)
    LOOPS.append(asyncio.get_running_loop())
    return [float(len(set(map(id, LOOPS))) == 1)] * len(completions)


async def broken(completions, answer, **kwargs):
    if "2" in answer:
        raise ValueError("no")
    return [0.0] * len(completions)
"""


def test_rewards_get_what_trl_hands_them_and_may_be_async(tiny_llama, tmp_path):
    """TRL's reward extras: trainer_state (a reward by step, a curriculum), log_metric (a figure of its own in the
    log) and log_extra (a column beside the samples in completions.jsonl); `async def` rewards are run, and one that
    raises is named with its row."""
    from types import SimpleNamespace

    from tunelab.rewards import RewardError, call_reward, load_rewards

    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS)
    spec = ",".join(f"{tmp_path / 'trl_rewards.py'}:{name}" for name in ("later", "broken", "one_loop"))
    later, broken, one_loop = load_rewards(LLMParams(trainer="grpo", reward_functions=spec), 16)
    assert call_reward(later, ["p", "p"], ["a sea", "hill"], [[1], [2]], {}, ["row 1", "row 2"]) == [1.0, 0.0]
    for _ in range(2):  # every call awaited on the same event loop
        assert call_reward(one_loop, ["p"], ["x"], [[1]], {}, ["row 1"]) == [1.0]
    logged = []
    extras = {"trainer_state": SimpleNamespace(global_step=3), "log_metric": lambda *a: logged.append(a)}
    with pytest.raises(RewardError, match=r"reward .*:broken raised ValueError: no \(row 2\)"):
        call_reward(broken, ["p", "p"], ["x", "y"], [[1], [2]], {"answer": ["1", "2"]}, ["row 1", "row 2"], extras)

    rewards = f"{tmp_path / 'trl_rewards.py'}:by_step"
    assert main(grpo_args(tmp_path, tiny_llama, rewards)) == 0
    run = tmp_path / "run"
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["rewards/by_step/mean"] for r in records] == [0.0, 1.0]  # the step the completions were sampled at
    assert all(r["my/length"] > 0 for r in records)
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert {s["step"]: s["extra"]["judged"] for s in samples} == {1: "step 0", 2: "step 1"}


def test_completions_end_at_the_turn_end_of_a_template_the_tokenizer_did_not_carry(tiny_gpt2, tmp_path, monkeypatch):
    """A base tokenizer without a chat template, trained with tunelab's ChatML: the rollouts must stop at
    `<|im_end|>` (what the run teaches to end an answer), not only at GPT-2's EOS, so the template has to be on the
    tokenizer before the trainer reads its turn end."""
    from transformers import AutoTokenizer

    from tunelab.methods import grpo

    end_ids: list[list[int]] = []
    build = grpo.GRPOTrainer.__init__

    def recording(self, *args, **kwargs) -> None:
        build(self, *args, **kwargs)
        end_ids.append(list(self.end_ids))

    monkeypatch.setattr(grpo.GRPOTrainer, "__init__", recording)
    assert main(grpo_args(tmp_path, tiny_gpt2, "format_tag", "--chat-template", "chatml")) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert tokenizer.chat_template is None
    assert end_ids == [[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]]


def test_a_resumed_cycle_writes_each_due_step_s_samples_once(tiny_llama, tmp_path):
    """completions_every with a sampling serving 4 steps (steps_per_generation 2 steps x num_iterations 2): a
    cycle's first rollout stands for all 4; a run resumed inside the cycle samples each of its parts afresh, each
    for its own steps left, so a due step's samples are written by one rollout only."""
    trainer = _trainer(tiny_llama, tmp_path, steps_per_generation=4, num_iterations=2, completions_every=3)
    assert (trainer.together, trainer.cycle) == (2, 4)

    def writes(step: int) -> bool:
        trainer.state.global_step = step
        return trainer._writes_samples()

    # resumed at step 1: part 1 is sampled for steps 1 and 3 (3 is due), part 0 at step 2 for step 2 alone
    assert (writes(1), writes(2)) == (True, False)
    # resumed at step 5: part 1 for steps 5 and 7, part 0 at step 6 for step 6 (due)
    assert (writes(5), writes(6)) == (False, True)
    trainer.params.completions_every = 6  # the cycles' first rollouts: steps 0-3 hold 0, 4-7 6, 8-11 none
    assert [writes(step) for step in (0, 4, 8, 12)] == [True, True, False, True]


def test_the_python_api_takes_reward_functions_as_trl_does(tiny_llama, tmp_path, monkeypatch):
    """`reward_functions=[...]` from Python: the very functions handed over are called (a closure's state moves), a
    package's function beside a built-in's name; each is logged under its own name, and the run's parameters keep
    names a config, a resume or a launched process can read."""
    import tunelab

    package = tmp_path / "code" / "scoring"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text("def short(completions, **kwargs):\n    return [-len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    from scoring.rules import short

    seen: list[str] = []

    def counted(completions, answer, **kwargs):
        seen.extend(completions)
        return [float(a in c) for a, c in zip(answer, completions, strict=True)]

    folder = tunelab.train(
        model=str(tiny_llama), data_path=str(_data(tmp_path)), project_name=str(tmp_path / "run"), trainer="grpo",
        reward_functions=[counted, short, "format_tag"], reward_weights="1,0.1,1", num_generations=2, batch_size=2,
        gradient_accumulation=1, max_completion_length=6, max_steps=2, peft=True, logging_steps=1,
    )  # fmt: skip
    assert len(seen) == 2 * 2 * 2  # 2 steps of 2 prompts x 2 completions, scored by the function handed over
    records = [r for r in read_metrics(folder) if "loss" in r]
    assert all("rewards/counted/mean" in r and r["rewards/short/mean"] < 0 for r in records)
    saved = json.loads((folder / "training_params.json").read_text())["reward_functions"]
    assert saved == "<python>:counted,scoring.rules.short,format_tag"


def test_reward_and_tool_functions_are_named_by_what_imports_them(tmp_path, monkeypatch):
    """A module's top-level function is module.function (TRL's CLI form, which the CLI takes too), the running
    script's /ABSOLUTE/script.py:function, anything else (a lambda, a closure, a partial) `<python>:name`, which no
    other process can resolve; the objects handed over are the ones called; what cannot be a reward or a tool is
    refused in one line."""
    import functools

    import tunelab
    from tunelab import user_code
    from tunelab.errors import ConfigError
    from tunelab.rewards import RewardError, load_rewards
    from tunelab.tools import load_tools
    from tunelab.user_code import user_function

    monkeypatch.setattr(user_code, "_GIVEN", {})
    (tmp_path / "loose_rewards.py").write_text(
        "def add(a: int, b: int) -> int:\n    '''Add.\n\n    Args:\n        a: one\n        b: two\n    '''\n"
        "    return a + b\n\n\ndef long(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import loose_rewards

    first, second = (lambda completions, **k: [1.0] * len(completions)), (lambda completions, **k: [2.0])
    given = [loose_rewards.long, first, second, functools.partial(loose_rewards.long), "format_tag"]
    params = tunelab.load_config({"trainer": "grpo", "reward_functions": given}, tools=loose_rewards.add)
    specs = "loose_rewards.long,<python>:<lambda>,<python>:<lambda>#2,<python>:long,format_tag"
    assert params.reward_functions == specs
    assert params.tools == "loose_rewards.add"
    rewards = load_rewards(params, 16)
    assert [r.function for r in rewards[:4]] == given[:4]  # the very objects handed over
    assert [r.name for r in rewards[:4]] == ["loose_rewards.long", "<lambda>", "<lambda>#2", "long"]
    # logged by their names, as TRL logs them; two of one name (the function and its partial) by what they were given
    assert [r.label for r in rewards] == ["loose_rewards.long", "<lambda>", "<lambda>#2", "long", "format_tag"]
    assert load_tools(params.tools) == [loose_rewards.add]
    assert tunelab.load_config(params).reward_functions == specs  # a parameter object round trip
    direct = LLMParams(trainer="grpo", reward_functions=[first, "format_tag"], tools=[loose_rewards.add])
    assert (direct.reward_functions, direct.tools) == ("<python>:<lambda>,format_tag", "loose_rewards.add")
    assert LLMParams(trainer="grpo", reward_functions=["format_tag", "answer_tag"]).reward_functions == (
        "format_tag,answer_tag"
    )
    # what only this process can call: refused by the dry run of a launched run as by its train, before anything
    launched = {"trainer": "grpo", "reward_functions": [first], "num_processes": 2, "data_path": "unread.jsonl"}
    with pytest.raises(
        ConfigError, match=r"with several processes: <lambda> \(a lambda\) exists in this process only"
    ):
        tunelab.plan(launched)

    (tmp_path / "cli_pkg").mkdir()
    (tmp_path / "cli_pkg" / "__init__.py").write_text("from loose_rewards import long\n")
    (tmp_path / "cli_pkg" / "needs.py").write_text("import not_installed_here\n")
    (dotted,) = load_rewards(LLMParams(trainer="grpo", reward_functions="cli_pkg.long"), 16)
    assert dotted.function is loose_rewards.long  # TRL's --reward_funcs my_lib.rewards.func, from the CLI too
    for spec, message in [
        ("cli_pkg.nothing", r"reward cli_pkg\.nothing: module cli_pkg has no function 'nothing'"),
        ("nowhere.f", r"reward nowhere\.f: no module named 'nowhere' \(nor a file\.py:function, a folder\)"),
        ("cli_pkg.needs.f", r"module cli_pkg\.needs does not import: No module named 'not_installed_here'"),
    ]:
        with pytest.raises(RewardError, match=message):
            load_rewards(LLMParams(trainer="grpo", reward_functions=spec), 16)
    with pytest.raises(RewardError, match=r"reward gone: a function handed to the Python API in another process"):
        user_function("<python>:gone", "reward", RewardError)

    for value, message in [
        ([loose_rewards.long, 3], r"reward_functions: expected names or functions, got int 3"),
        (torch.nn.Linear(2, 1), None),
    ]:
        if message is None:  # an nn.Module is callable but not a reward: a model needs its folder (and a config)
            value.config = {}
            message = r"reward_functions: a model object: save it"
        with pytest.raises(ConfigError, match=message):
            tunelab.load_config({"trainer": "grpo", "reward_functions": value})
    with pytest.raises(ConfigError, match=r"tools: expected functions, got partial"):
        tunelab.load_config({"trainer": "grpo", "reward_functions": "format_tag"}, tools=functools.partial(max))
    with pytest.raises(ConfigError, match=r"tools: expected file.py:function or package.module.function"):
        tunelab.load_config({"trainer": "grpo", "reward_functions": "format_tag", "tools": "loose_rewards.py"})


def test_a_script_s_functions_go_by_its_file_and_its_training_must_sit_under_a_main_guard(tmp_path):
    """A script's own function is /ABSOLUTE/script.py:function; a process that imports the script for it (each
    launched one) refuses a tunelab.train the import reaches (the guard is what keeps it out), and the parent says
    before launching when the script has no `if __name__ == "__main__":` (a `!=` test is not one)."""
    import os
    import subprocess
    import sys

    from tunelab.rewards import RewardError
    from tunelab.user_code import _guarded, user_function

    script = tmp_path / "train.py"
    script.write_text(
        "import tunelab\n\n\ndef short(completions, **kwargs):\n    return [0.0] * len(completions)\n\n\n"
        "params = tunelab.load_config({'trainer': 'grpo', 'reward_functions': [short]})\n"
        "print(params.reward_functions)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.stdout.strip() == f"{script.resolve()}:short", done.stderr[-2000:]

    # run as python -m: named by its module, and the very function is called (importing the module would run the
    # script a second time)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__init__.py").write_text("")
    (tmp_path / "jobs" / "train.py").write_text(
        "import tunelab\nfrom tunelab.user_code import user_function\n\n\n"
        "def short(completions, **kwargs):\n    return [0.0] * len(completions)\n\n\n"
        "params = tunelab.load_config({'trainer': 'grpo', 'reward_functions': [short]})\n"
        "print(params.reward_functions, user_function(params.reward_functions, 'reward') is short)\n"
    )
    done = subprocess.run([sys.executable, "-m", "jobs.train"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.stdout.split() == ["jobs.train.short", "True"], done.stderr[-2000:]

    # what a launched process does with that spec: import the script, whose unguarded training is then refused
    script.write_text(script.read_text() + "tunelab.train(params)\n")
    with pytest.raises(
        RewardError, match=r"train\.py:10 does not import: ConfigError: tunelab\.train was called while"
    ):
        user_function(f"{script}:short", "reward", RewardError)
    assert _guarded(script) is False
    script.write_text("if __name__ != '__main__':\n    pass\n")
    assert _guarded(script) is False
    script.write_text("import sys\nif '__main__' == __name__:\n    sys.exit()\n")
    assert _guarded(script) is True


def test_an_edited_tool_s_schema_prepares_its_prompts_again(tmp_path, monkeypatch):
    """The prompts show the tools' schemas: the prepared data's key follows them, whatever names the tool (a file,
    a module, a function handed over)."""
    from tunelab import user_code
    from tunelab.data.cache import tool_files

    monkeypatch.setattr(user_code, "_GIVEN", {})
    tool = tmp_path / "my_tools.py"
    source = "def add(a: int, b: int) -> int:\n    '''Add {}.\n\n    Args:\n        a: one\n        b: two\n"
    source += "    '''\n    return a\n"
    keys = []
    for words in ("two numbers", "two whole numbers"):
        tool.write_text(source.format(words))
        keys.append(tool_files(LLMParams(trainer="grpo", reward_functions="format_tag", tools=f"{tool}:add")))

    def add(a: int, b: int) -> int:
        """Add two whole numbers.

        Args:
            a: one
            b: two
        """
        return a + b

    keys.append(tool_files(LLMParams(trainer="grpo", reward_functions="format_tag", tools=[add])))
    assert keys[0] != keys[1] and keys[1] == keys[2]


def test_reward_labels_are_trl_s_short_names_and_never_merge_two_rewards():
    """rewards/LABEL/mean: a function by its name, a reward model by its folder's or hub id's last part; two that
    would share one keep apart (file name and function, a hub id without its slashes, then #2), never with a '/'
    that nests the charts, never merged into one column."""
    from tunelab.rewards import reward_labels

    assert reward_labels(["/a/my_rewards.py:correct", "lib.rewards.short", "<python>:<lambda>", "format_tag"]) == [
        "correct", "short", "<lambda>", "format_tag",
    ]  # fmt: skip
    assert reward_labels(["/a/x.py:correct", "/b/y.py:correct", "org1/rm", "org2/rm"]) == [
        "x.py:correct", "y.py:correct", "org1__rm", "org2__rm",
    ]  # fmt: skip
    assert reward_labels(["format_tag", "<python>:format_tag", "format_tag"]) == [
        "format_tag", "format_tag#2", "format_tag#3",
    ]  # fmt: skip
