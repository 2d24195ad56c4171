"""`--trainer rloo`: its advantages are TRL's RLOOTrainer's (leave-one-out, the KL penalty in the reward), its loss
and gradients equal TRL's on the same batch, and a tiny run trains end to end, writing its completions."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tests.conftest import read_metrics
from tests.test_grpo import grpo_args, rollout_batch
from tunelab.cli import main
from tunelab.config.llm import LLMParams
from tunelab.errors import ConfigError
from tunelab.methods.rloo import leave_one_out, zero_unscored


def _trl_advantages(rewards: torch.Tensor, group: int, normalize: bool) -> torch.Tensor:
    """TRL's RLOOTrainer._generate_and_score_completions, its advantage lines, for the rewards given."""
    from trl.trainer.utils import nanstd as trl_nanstd

    grouped = rewards.view(-1, group)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped, dim=1, keepdim=True)
    advantages = rewards - ((grouped_sum - grouped) / (scorable - 1)).view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (trl_nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, math.nan, 1.0, 3.0, -1.0, math.nan, math.nan, 4.0, 0.0])


def test_advantages_are_trls_leave_one_out():
    raw, _ = leave_one_out(REWARDS, 4)
    advantages = zero_unscored(raw)
    torch.testing.assert_close(advantages, _trl_advantages(REWARDS, 4, normalize=False))
    assert advantages[0].item() == pytest.approx(1.0 - (0.0 + 0.5 + 2.0) / 3)  # against its group's others
    assert advantages[4].item() == 0.0  # unscored: no advantage, and in no baseline
    assert advantages[5].item() == pytest.approx(1.0 - (3.0 - 1.0) / 2)


def test_normalize_advantages_takes_the_whole_step(tiny_llama, tmp_path):
    """normalize_advantages: over every micro-batch of the step at once (TRL's generation batch), not each apart;
    the unscored left out of the mean and std, then 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.methods.rloo import RLOOTrainer
    from tunelab.training.trainer import training_arguments

    params = LLMParams(
        model=str(tiny_llama), project_name=str(tmp_path), trainer="rloo", reward_functions="format_tag",
        num_generations=4, normalize_advantages=True,
    )  # fmt: skip
    trainer = RLOOTrainer(
        params=params, model=AutoModelForCausalLM.from_pretrained(tiny_llama), processing_class=
        AutoTokenizer.from_pretrained(tiny_llama), args=training_arguments(params, str(tmp_path), 1, False),
        train_dataset=[1],
    )  # fmt: skip
    raw = [trainer.advantages_of(part, {})[0] for part in REWARDS.split(8)]  # two micro-batches: 8 and 4
    batches = [{"advantages": advantages} for advantages in raw]
    trainer.finish_advantages(batches)
    got = torch.cat([batch["advantages"] for batch in batches])
    torch.testing.assert_close(got, _trl_advantages(REWARDS, 4, normalize=True))


@pytest.mark.parametrize(
    ("peft", "clip"), [(False, None), (True, None), (True, (0.2, 1.0))], ids=["full", "lora", "clip"]
)
def test_loss_gradients_and_kl_penalty_equal_trls(tiny_llama, tmp_path, peft, clip):
    """The same batch through TRL's RLOOTrainer and tunelab's: the rewards less the KL penalty (beta 0.05, the
    reference the frozen start or the adapter-less base), their leave-one-out advantages, then the loss of each
    completion's summed log-probability at temperature 0.7, and its gradients."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig
    from trl import RLOOTrainer as TRLRLOOTrainer

    from tunelab.methods.rloo import RLOOTrainer
    from tunelab.training.trainer import training_arguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.manual_seed(1)
    if peft:
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        base = get_peft_model(base, lora)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    reference = None if peft else copy.deepcopy(base)
    if reference is not None:
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.02 * torch.randn_like(p))
    settings = dict(beta=0.05, temperature=0.7, max_completion_length=7, epsilon=0.2)
    batch = rollout_batch(tokenizer)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])

    params = LLMParams(
        model=str(tiny_llama), project_name=str(tmp_path / "ours"), trainer="rloo", reward_functions="format_tag",
        num_generations=2, batch_size=2, gradient_accumulation=1, peft=peft, reward_clip_range=clip, **settings,
    )  # fmt: skip
    args = training_arguments(params, str(tmp_path / "ours"), 1, False)
    ours = RLOOTrainer(
        params=params, model=copy.deepcopy(base), args=args, processing_class=tokenizer, train_dataset=[1],
        ref_model=copy.deepcopy(reference) if reference is not None else None,
    )  # fmt: skip
    ours.current_gradient_accumulation_steps = 1
    ours.model.train()
    our_batch = {**batch, "ref_logps": ours.reference_logps(batch)}
    advantages, _ = ours.advantages_of(rewards.clone(), our_batch)
    our_batch["advantages"] = advantages
    loss = ours.compute_loss(ours.model, our_batch)

    config = RLOOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        save_strategy="no", per_device_train_batch_size=4, num_generations=2, **settings,
    )  # fmt: skip
    trl = TRLRLOOTrainer(
        model=copy.deepcopy(base),
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=config,
        train_dataset=Dataset.from_list([{"prompt": "What is 2 + 3?"}] * 4),
        processing_class=tokenizer,
    )
    if reference is not None:
        from trl.trainer.utils import add_fused_lm_head

        trl.ref_model = copy.deepcopy(reference)
        add_fused_lm_head(trl.ref_model, temperature=config.temperature)  # as TRL's own reference gets it
    trl.model.train()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    completion_mask = batch["completion_mask"]
    with torch.no_grad():  # TRL's rollout: the sampling policy's and the reference's per-token log-probs
        old, _, _ = trl._get_per_token_logps_and_entropies(trl.model, ids, mask, 7)
        if reference is not None:
            ref, _, _ = trl._get_per_token_logps_and_entropies(trl.ref_model, ids, mask, 7)
        else:
            with trl.model.disable_adapter():
                ref, _, _ = trl._get_per_token_logps_and_entropies(trl.model, ids, mask, 7)
    kl = ((old - ref) * completion_mask).sum(-1)
    clipped = rewards.clamp(*clip) if clip else rewards  # TRL clips the rewards before the penalty
    trl_advantages = _trl_advantages(clipped - config.beta * kl, 2, normalize=False)
    old_logps = (old * completion_mask).sum(1)
    trl_loss = trl._compute_loss(trl.model, {**batch, "advantages": trl_advantages, "old_logps": old_logps})

    torch.testing.assert_close(advantages, trl_advantages, atol=1e-5, rtol=1e-4)
    assert (kl.abs() > 1e-4).all()  # the penalty is there to compare
    kl_per_token = ((old - ref) * completion_mask).sum() / completion_mask.sum()
    assert ours._metrics["kl"][0] == pytest.approx(kl_per_token.item(), abs=1e-5)
    # On-policy the ratio is 1 and a group's leave-one-out advantages sum to 0: the loss is 0, its gradient not.
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    loss.backward()
    trl_loss.backward()
    ours_grads = [p.grad for p in ours.model.parameters() if p.requires_grad]
    trl_grads = [p.grad for p in trl.model.parameters() if p.requires_grad]
    assert max(g.abs().max().item() for g in ours_grads) > 1e-3
    for a, b in zip(ours_grads, trl_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_a_tiny_run_trains_and_writes_its_completions(tiny_llama, tmp_path):
    rewards = f"{tmp_path / 'my_rewards.py'}:correct,{tmp_path / 'my_rewards.py'}:short"
    args = grpo_args(tmp_path, tiny_llama, rewards, "--beta", "0.05", "--normalize-advantages", "true")
    args[args.index("grpo")] = "rloo"
    assert main(args) == 0
    run = tmp_path / "run"
    records = [r for r in read_metrics(run) if "loss" in r]
    assert len(records) == 2
    for key in ("reward", "reward_std", "kl", "completions/mean_length", "clip_ratio/region_mean"):
        assert key in records[0], key
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    assert json.loads((run / "tunelab_run.json").read_text())["trainer"] == "rloo"


def test_a_full_run_with_a_synced_reference_trains(tiny_llama, tmp_path, caplog):
    """sync_ref_model on rloo (full fine-tuning, the KL penalty's reference a frozen copy moved every step, 0.9 of
    the way to the policy): the run trains, and its second step's KL is far below that of the same run whose
    reference stayed where it started."""
    (tmp_path / "parity.py").write_text(
        "def parity(completion_ids, **kwargs):\n    return [float(ids[0] % 2) for ids in completion_ids]\n"
    )  # a reward that differs within a group, so that the first step moves the policy
    rewards = f"{tmp_path / 'parity.py'}:parity"

    def kl(project: str, *extra: str) -> list[float]:
        args = grpo_args(
            tmp_path, tiny_llama, rewards, "--beta", "0.05", "--lr", "2e-2", "--warmup-ratio", "0", *extra
        )
        args[args.index("grpo")] = "rloo"
        args[args.index("--project-name") + 1] = str(tmp_path / project)
        args.remove("--peft")
        assert main(args) == 0
        return [r["kl"] for r in read_metrics(tmp_path / project) if "loss" in r]

    synced = ("--sync-ref-model", "true", "--ref-model-sync-steps", "1", "--ref-model-mixup-alpha", "0.9")
    moving, still = kl("synced", *synced), kl("still")
    assert moving[0] == still[0] == 0  # the first step samples with the policy the reference is a copy of
    assert 0 < moving[1] < 0.3 * still[1]


def test_each_methods_own_settings_are_refused_on_the_other():
    common = dict(reward_functions="format_tag")
    for bad, said in [
        (dict(trainer="rloo", loss_type="grpo"), "loss_type is read by trainer grpo, not rloo"),
        (dict(trainer="rloo", scale_rewards="none"), "scale_rewards is read by trainer grpo, not rloo"),
        (dict(trainer="grpo", normalize_advantages=True), "normalize_advantages is read by trainer rloo, not grpo"),
        (dict(trainer="grpo", reward_clip_range="-1,1"), "reward_clip_range is read by trainer rloo, not grpo"),
        (dict(trainer="rloo", reward_clip_range="1,-1"), "reward_clip_range: the min .1. must be below the max"),
        (dict(trainer="rloo", reward_clip_range="low,high"), "reward_clip_range: expected two numbers"),
        (dict(trainer="rloo", reward_functions=None), "rloo needs reward_functions"),
        (dict(trainer="rloo", importance_sampling_level="sequence"), "importance_sampling_level is read by trainer"),
        (dict(trainer="sft", num_iterations=2), "num_iterations is read by trainers grpo and rloo, not sft"),
        (dict(trainer="grpo", num_iterations=0), "num_iterations must be at least 1"),
        (dict(trainer="grpo", delta=1.1, epsilon_high=0.28), r"must be above 1 \+ epsilon_high \(1.28\)"),
        (dict(trainer="grpo", loss_type="cispo"), "loss_type cispo caps each token's weight at epsilon_high"),
        (dict(trainer="grpo", sapo_temperature_neg=2.0), "sapo_temperature_neg is read by loss_type sapo only"),
        (dict(trainer="grpo", loss_type="cispo", epsilon_high=5, delta=6), "loss_type cispo has no such ratio"),
        # the rewards and the sampling are read by these two alone: given elsewhere they would do nothing
        (
            dict(trainer="sft", reward_functions="format_tag"),
            "reward_functions is read by trainers grpo, rloo and online_dpo",
        ),
        (dict(trainer="dpo", beta=0.1), r"beta is read by trainers grpo and rloo, not dpo: leave it out \(dpo's"),
        (dict(trainer="kto", temperature=0.7), "temperature is read by trainers grpo, rloo and online_dpo, not kto"),
        (dict(trainer="rloo", top_entropy_quantile=0.2), "top_entropy_quantile is read by trainer grpo, not rloo"),
        (dict(trainer="grpo", top_k=-1), "top_k must be a whole number, 0 .off. or more"),
        (dict(trainer="rloo", num_generations_eval=0), "num_generations_eval must be a whole number, 1 or more"),
        (dict(trainer="rloo", min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(trainer="grpo", repetition_penalty=0), "repetition_penalty must be above 0"),
        (dict(trainer="grpo", vespo_k_pos=1.0), "vespo_k_pos is read by loss_type vespo only"),
        (dict(trainer="grpo", loss_type="vespo", vespo_lambda_neg=0), "vespo_lambda_neg must be above 0"),
        (dict(trainer="grpo", loss_type="vespo", delta=2.0), "loss_type vespo has no such ratio"),
        (dict(trainer="grpo", loss_type="sapo", epsilon_high=0.28), "loss_type sapo clips no ratio"),
        (dict(trainer="grpo", loss_type="cispo", epsilon_high=5, epsilon=0.1), "epsilon is a clip range"),
        (
            dict(trainer="grpo", multi_objective_aggregation="normalize_then_sum", scale_rewards="none"),
            "scale_rewards with multi_objective_aggregation normalize_then_sum",
        ),
        (dict(trainer="grpo", top_entropy_quantile=1.2), r"top_entropy_quantile must be in \[0, 1\]"),
        (dict(trainer="grpo", entropy_target=1.0), "entropy_target is read with use_adaptive_entropy only"),
        (
            dict(trainer="grpo", use_adaptive_entropy=True, entropy_coef=2.0),
            r"entropy_coef \(2\), which must lie between entropy_coef_min \(0\) and entropy_coef_max \(1\)",
        ),
        (dict(trainer="grpo", use_adaptive_entropy=True, entropy_coef_delta=0), "entropy_coef_delta must be above 0"),
        (dict(trainer="grpo", off_policy_mask_threshold=0.5), "each batch is trained once, right after sampling"),
        (dict(trainer="sft", sync_ref_model=True), "sync_ref_model is read by trainers dpo, grpo and rloo, not sft"),
        (dict(trainer="grpo", sync_ref_model=True, peft=False), "with beta 0 there is none: give beta"),
        (dict(trainer="rloo", sync_ref_model=True, beta=0.05, peft=True), "sync_ref_model: with LoRA the model is"),
        (dict(trainer="grpo", num_iterations=2, off_policy_mask_threshold=-1), "off_policy_mask_threshold must be"),
        (dict(trainer="rloo", steps_per_generation=0), "steps_per_generation must be a whole number, 1 or more"),
        (
            dict(trainer="grpo", gradient_accumulation=2, steps_per_generation=3),
            "steps_per_generation 3 must be a multiple of gradient_accumulation 2",
        ),
        (dict(trainer="sft", steps_per_generation=2), "steps_per_generation is read by trainers grpo and rloo"),
        (dict(trainer="grpo", generation_kwargs={"temperature": 0.7}), "temperature has a setting of its own"),
        (dict(trainer="rloo", generation_kwargs='{"max_new_tokens": 9}'), "of its own, max_completion_length"),
        (dict(trainer="grpo", generation_kwargs='{"do_sample": false}'), "do_sample is not one tunelab passes"),
        (dict(trainer="grpo", generation_kwargs={"num_beams": 4}), "num_beams is not one tunelab passes"),
        (dict(trainer="grpo", generation_kwargs={"stop_strings": ["\n"]}), "stop_strings is not one tunelab"),
        (dict(trainer="grpo", generation_kwargs={"forced_eos_token_id": 2}), "forced_eos_token_id is not one"),
        (dict(trainer="grpo", generation_kwargs={"num_return_sequences": 3}), "num_return_sequences is not one"),
        (dict(trainer="grpo", generation_kwargs={"no_such": 1}), "no_such is not one tunelab passes to generate"),
        (dict(trainer="grpo", generation_kwargs={"suppress_tokens": 13}), "suppress_tokens must be a list of token"),
        (dict(trainer="grpo", generation_kwargs={"bad_words_ids": [[]]}), "bad_words_ids must be a list of token id"),
        (dict(trainer="grpo", generation_kwargs={"sequence_bias": {"a": 1}}), "sequence_bias must be a list of"),
        (dict(trainer="grpo", generation_kwargs={"typical_p": 2.0}), r"typical_p must be a number in \(0, 1\]"),
        (
            dict(trainer="grpo", generation_kwargs={"exponential_decay_length_penalty": [5, "1.5"]}),
            r"exponential_decay_length_penalty must be \[start index, factor of 1 or more\]",
        ),
        (
            dict(trainer="grpo", max_completion_length=16, generation_kwargs={"min_new_tokens": 16}),
            "min_new_tokens 16 leaves no completion room to end before max_completion_length \\(16\\)",
        ),
        (dict(trainer="grpo", generation_kwargs="{no"), "generation_kwargs: not a JSON object"),
        (dict(trainer="grpo", generation_kwargs="[3]"), "generation_kwargs must be an object of generate settings"),
        (
            dict(trainer="sft", generation_kwargs={"top_a": 1}),
            "generation_kwargs is read by trainers grpo, rloo and online_dpo",
        ),
    ]:
        sampled = bad["trainer"] in ("grpo", "rloo")
        with pytest.raises(ConfigError, match=said):
            LLMParams(**{**(common if sampled else {}), **bad})
    assert LLMParams(**common, trainer="rloo", reward_clip_range=[-1, 2]).reward_clip_values == (-1.0, 2.0)
    # the steps of an epoch as Trainer runs them: whole samplings only (120 prompts, 8 a step, 4 steps a sampling)
    from tunelab.training.steps import epoch_steps

    k = dict(batch_size=2, gradient_accumulation=4)
    assert epoch_steps(120, LLMParams(**common, trainer="grpo", steps_per_generation=16, **k)) == 12
    assert epoch_steps(120, LLMParams(**common, trainer="grpo", steps_per_generation=16, num_iterations=2, **k)) == 24
    assert epoch_steps(120, LLMParams(**common, trainer="grpo", **k)) == 15
    given = LLMParams(**common, trainer="rloo", generation_kwargs='{"no_repeat_ngram_size": 3}').generation_kwargs
    assert given == {"no_repeat_ngram_size": 3}
    given = {"do_sample": True, "num_beams": 1, "sequence_bias": [[[5, 6], -2]]}  # (tunelab's own, as they are)
    assert LLMParams(**common, trainer="grpo", generation_kwargs=given).generation_kwargs == {
        "sequence_bias": [[[5, 6], -2.0]]
    }
    assert LLMParams(**common, trainer="grpo", generation_kwargs="  ").generation_kwargs is None
    later = LLMParams(**common, trainer="grpo", steps_per_generation=4, gradient_accumulation=2, batch_size=3)
    assert (later.steps_sampled_together, later.prompts_sampled_at_once) == (2, 12)
    assert LLMParams(**common, trainer="grpo", steps_per_generation=8, off_policy_mask_threshold=0.5)
    assert LLMParams(**common, trainer="rloo", sync_ref_model=True, beta=0.05, peft=False).ref_model_sync_steps == 512
