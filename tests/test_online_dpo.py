"""`--trainer online_dpo`: each prompt's two sampled completions ranked by the rewards as TRL's OnlineDPOTrainer
ranks them, the loss equal to TRL's on the same batch, a tiny run end to end, and its settings refused elsewhere."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import read_metrics
from tunelab.cli import main
from tunelab.config.llm import LLMParams
from tunelab.errors import ConfigError

PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (4, 1), (6, 2), (1, 1)]]
PARITY = "def parity(completion_ids, **kwargs):\n    return [float(ids[0] % 2) for ids in completion_ids]\n"


def _data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


def test_each_prompt_s_two_completions_make_a_pair_ranked_by_their_rewards():
    """The higher reward is chosen; an unscored one loses to a scored one; a prompt neither of whose completions
    was scored has no pair, nor by default a tie (it says nothing of which is better); keep_tied_pairs keeps it,
    the first as chosen (TRL's first_half >= second_half)."""
    from tunelab.methods.online_dpo import online_pairs

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, float("nan"), 3.0, float("nan"), float("nan")])
    chosen, rejected = online_pairs(rewards)
    assert chosen.tolist() == [0, 3, 7] and rejected.tolist() == [1, 2, 6]
    chosen, rejected = online_pairs(rewards, keep_ties=True)
    assert chosen.tolist() == [0, 3, 4, 7] and rejected.tolist() == [1, 2, 5, 6]


def _trainer(tiny_llama, tmp_path, peft, **settings):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.methods.online_dpo import OnlineDPOTrainer
    from tunelab.training.trainer import training_arguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.eos_token
    params = LLMParams(
        model=str(tiny_llama), project_name=str(tmp_path / "parts"), trainer="online_dpo", batch_size=2,
        gradient_accumulation=1, peft=peft, reward_functions="format_tag", **settings,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if peft:
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, config)
        torch.manual_seed(3)
        with torch.no_grad():  # an adapter that moves the policy away from the reference
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0, 0.05)
    args = training_arguments(params, str(tmp_path / "parts"), 1, False)
    return OnlineDPOTrainer(params=params, model=model, args=args, processing_class=tokenizer, train_dataset=[1])


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_the_loss_is_trl_s_online_dpo_loss_on_the_same_batch(tiny_llama, tmp_path, peft):
    """The log-probs are those of TRL's OnlineDPOTrainer._forward (the model's own, no temperature, prompt left
    padded), the reference's the base with the adapter off (LoRA) or the starting model (full), and the sigmoid
    loss, the pairs ranked by the rewards (a tie kept, keep_tied_pairs: TRL's rule), equals TRL's formula."""
    from trl.experimental.online_dpo import OnlineDPOTrainer as TRLOnlineDPO

    trainer = _trainer(tiny_llama, tmp_path, peft, temperature=0.7, dpo_beta=0.3, keep_tied_pairs=True)
    model = trainer.model
    if not peft:  # a policy that differs from its frozen starting copy
        torch.manual_seed(4)
        with torch.no_grad():
            for weight in model.parameters():
                weight.add_(0.02 * torch.randn_like(weight))
    batch = {
        "prompt_ids": torch.tensor([[0, 0, 5, 6], [0, 0, 5, 6], [7, 8, 9, 10], [7, 8, 9, 10]]),
        "prompt_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]),
        "completion_ids": torch.tensor([[11, 12, 13], [14, 2, 0], [15, 16, 2], [17, 18, 19]]),
        "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]),
    }
    batch["ref_logps"] = trainer.reference_logps(batch)
    batch["advantages"] = torch.tensor([0.2, 0.5, 1.0, 1.0])  # prompt 1: the second wins; prompt 2: a tie
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # (Trainer's loop sets it)
    loss = trainer.compute_loss(model, batch)

    trl = SimpleNamespace(max_length=10**6)
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    logprobs = TRLOnlineDPO._forward(trl, model, *args)
    with torch.no_grad():
        if peft:
            with model.disable_adapter():
                ref_logprobs = TRLOnlineDPO._forward(trl, model, *args)
        else:
            ref_logprobs = TRLOnlineDPO._forward(trl, trainer.ref_model, *args)
    # TRL's layout: every prompt's first completion, then every second one; its ranking and loss, as in training_step
    order = torch.tensor([0, 2, 1, 3])
    logprobs, ref_logprobs, mask = logprobs[order], ref_logprobs[order], batch["completion_mask"][order].bool()
    rewards = batch["advantages"][order]
    first_half, second_half = rewards.split(2)
    wins = first_half >= second_half
    rows = torch.arange(2)
    cr = torch.cat((rows + (~wins * 2), rows + (wins * 2)))
    sums, ref_sums = (logprobs[cr] * mask[cr]).sum(1), (ref_logprobs[cr] * mask[cr]).sum(1)
    chosen, rejected = sums.split(2)
    ref_chosen, ref_rejected = ref_sums.split(2)
    expected = -F.logsigmoid(0.3 * ((chosen - rejected) - (ref_chosen - ref_rejected))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(expected)) > 1e-3

    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    trl_grads = torch.autograd.grad(expected, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    for ours, theirs in zip(grads, trl_grads, strict=True):
        if ours is not None or theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert trainer._metrics["rewards/margins"] and trainer._metrics["objective/scores_margin"] == [pytest.approx(0.15)]


def test_missing_eos_penalty_lowers_a_cut_completion_s_reward(tiny_llama, tmp_path):
    """missing_eos_penalty (TRL's): a completion with no end token (cut at max_completion_length) has its reward
    lowered before the two are compared."""
    trainer = _trainer(tiny_llama, tmp_path, True, missing_eos_penalty=1.5, max_completion_length=3)
    end = trainer.end_ids[0]
    completions = torch.tensor([[11, 12, 13], [14, end, 0]])
    batch = {"completion_ids": completions, "truncated": trainer.completion_ends(completions)[1]}
    rewards, std = trainer.advantages_of(torch.tensor([1.0, 0.0]), batch)
    assert rewards.tolist() == [-0.5, 0.0] and std is None


def test_a_tiny_online_dpo_run_trains_and_reports(tiny_llama, tmp_path, capsys):
    """A LoRA run: the dry run says two completions a prompt and counts the reference; training logs dpo's
    figures and the reward margin of the pairs, writes completions.jsonl and a model that loads."""
    (tmp_path / "parity.py").write_text(PARITY)
    args = [
        "llm", "--train", "--trainer", "online_dpo", "--model", str(tiny_llama), "--data-path", str(_data(tmp_path)),
        "--project-name", str(tmp_path / "run"), "--reward-functions", f"{tmp_path / 'parity.py'}:parity",
        "--batch-size", "2", "--gradient-accumulation", "1", "--max-completion-length", "6", "--max-steps", "2",
        "--lr", "1e-3", "--peft", "--logging-steps", "1", "--completions-every", "1", "--missing-eos-penalty", "0.5",
    ]  # fmt: skip
    dry = [*args, "--dry-run"]
    dry.remove("--train")
    assert main(dry) == 0
    out = capsys.readouterr().out
    assert "2 prompts x 2 completions x up to 6 tokens" in out
    assert main(args) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for name in ("rewards/margins", "rewards/accuracies", "logps/chosen", "objective/kl", "reward"):
        assert name in records[0], (name, records[0])
    samples = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 2  # 2 prompts x their 2 completions, at each of the 2 steps
    from tunelab.inference.generate import generate, load_run

    model, tokenizer = load_run(tmp_path / "run")  # the adapter on its base, as chat and serve load it
    assert isinstance(generate(model, tokenizer, "What is 2 + 2?")[0], str)


def test_online_dpo_settings_are_its_own(tiny_llama, tmp_path):
    common = dict(trainer="online_dpo", reward_functions="format_tag")
    for bad, said in [
        (dict(common, num_generations=4), "num_generations is read by trainers grpo and rloo, not online_dpo"),
        (dict(common, beta=0.1), "beta is read by trainers grpo and rloo"),
        (dict(common, precompute_ref_log_probs=True), "precompute_ref_log_probs"),
        (dict(common, missing_eos_penalty=-1), "missing_eos_penalty must be"),
        (
            dict(trainer="grpo", reward_functions="format_tag", missing_eos_penalty=1),
            "read by trainer online_dpo, not grpo",
        ),
        (dict(common, dpo_loss_type="exo_pair"), "exo_pair needs label_smoothing"),
        (dict(trainer="online_dpo"), "online_dpo needs reward_functions"),
        (dict(trainer="grpo", reward_functions="format_tag", keep_tied_pairs=True), "read by trainer online_dpo"),
    ]:
        with pytest.raises(ConfigError, match=said):
            LLMParams(**bad)
    params = LLMParams(**common, dpo_loss_type="ipo,sft", dpo_loss_weights="1,0.5")
    assert (params.completions_per_prompt, params.dpo_loss_types) == (2, ("ipo", "sft"))
    assert LLMParams(**common, dpo_loss_type="exo_pair", label_smoothing=1e-3).label_smoothing == 1e-3
