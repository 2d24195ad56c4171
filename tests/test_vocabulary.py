"""Tokens a run adds (add_tokens, add_special_tokens): one token each, rows in the embeddings that training
updates (whole in a full fine-tune, as PEFT's trainable tokens beside a LoRA adapter), and a run folder that
loads, merges and generates them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import build_tiny_llama, resized_copy, train_losses
from tunelab.cli import main
from tunelab.inference.generate import GenerationParams, generate, load_run

CALL = "<tool>weather</tool>"


def _chats(folder: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": CALL}]}] * 16
    data = folder / "calls.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def _train(model: Path, data: Path, run: Path, *flags: str, epochs: int = 60) -> int:
    return main(
        [
            "llm", "--train", "--model", str(model), "--data-path", str(data), "--trainer", "sft",
            "--chat-template", "chatml", "--lr", "3e-3", "--epochs", str(epochs), "--batch-size", "8",
            "--gradient-accumulation", "1", "--block-size", "64", "--project-name", str(run),
            "--disable-gradient-checkpointing", "--logging-steps", "10", *flags,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama whose output head has a weight of its own (Llama 3's; the tiny_llama ties them)."""
    return build_tiny_llama(tmp_path_factory.mktemp("untied-llama"), tied=False)


def test_a_full_fine_tune_learns_to_write_the_tokens_it_added(tiny_llama, tmp_path):
    """Each added token is one id of the saved tokenizer, the model grew rows for them, and it learned to write
    them: the answer comes back as trained."""
    run = tmp_path / "run"
    assert _train(tiny_llama, _chats(tmp_path), run, "--add-tokens", "<tool>,</tool>") == 0
    model, tokenizer = load_run(run)
    ids = tokenizer("<tool>weather</tool>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<tool>", "</tool>"]
    assert (
        model.get_input_embeddings().weight.shape[0]
        == len(tokenizer)
        == json.loads((tiny_llama / "config.json").read_text())["vocab_size"] + 2
    )
    assert generate(model, tokenizer, "Weather?", GenerationParams(max_new_tokens=16)) == [CALL]

    # Exported, llama.cpp reads the added tokens as one token each and answers as transformers does.
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/install.sh)")
    gguf = tmp_path / "run.gguf"
    assert main(["export", "--model", str(run), "--output", str(gguf), "--dtype", "f32"]) == 0
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, verbose=False, n_threads=2)
    assert llm.tokenize(CALL.encode(), add_bos=False, special=True) == ids
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Weather?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
    made = [token for token, _ in zip(llm.generate(prompt, temp=0.0), range(len(ids)), strict=False)]
    assert made == ids


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_lora_run_trains_the_rows_of_its_new_tokens_beside_the_adapter(tiny_llama, untied_llama, tied, tmp_path):
    """LoRA: the new tokens' rows (the embedding's, and an untied head's) are trained and saved in the adapter as
    those rows alone; loaded again (the base grown to match), merged, and the merged model says the same."""
    base = tiny_llama if tied else untied_llama
    run = tmp_path / "run"
    # <|im_end|> the tokenizer has: not added again, its rows trained too
    flags = ("--peft", "--lora-r", "8", "--lr", "1e-2", "--add-special-tokens", "<tool>,</tool>,<|im_end|>")
    assert _train(base, _chats(tmp_path), run, *flags, epochs=60) == 0
    losses = train_losses(run)
    assert losses[-1] < 0.8 * losses[0], losses

    config = json.loads((run / "adapter_config.json").read_text())
    tokens = config["trainable_token_indices"]
    assert set(tokens) == ({"embed_tokens"} if tied else {"embed_tokens", "lm_head"})
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as saved:
        rows = {key: saved.get_slice(key).get_shape() for key in saved.keys() if "trainable_tokens" in key}
        assert not [key for key in saved.keys() if key.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert len(rows) == len(tokens) and all(shape == [3, 64] for shape in rows.values())

    model, tokenizer = load_run(run)  # the base grown to the run's rows before the adapter loads
    new = tokenizer.convert_tokens_to_ids(["<tool>", "</tool>"])
    assert len(tokenizer) == 602 and tokens["embed_tokens"] == sorted(
        [*new, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Weather?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    assert int(logits.argmax()) == new[0]  # it learned to open its answer with the token it added

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(run), "--output", str(merged)]) == 0
    plain, _ = load_run(merged)
    with torch.no_grad():
        assert torch.allclose(plain(torch.tensor([prompt])).logits[0, -1], logits, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_rows_of_new_tokens_follow_the_adapter_on_and_off_in_the_fast_loss(tiny_llama, untied_llama, tied):
    """The chunked loss projects with the head's rows as its forward does: the trained rows with the adapter on
    (the plain loss's value and gradient, with no vocabulary-sized gradient made), the base's with it off (a
    reference pass)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.speed.loss import causal_lm_loss_sum, output_head_returns_hidden

    model = AutoModelForCausalLM.from_pretrained(tiny_llama if tied else untied_llama)
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + 2, mean_resizing=False)
    new = [rows, rows + 1]
    indices = {"embed_tokens": new} if tied else {"embed_tokens": new, "lm_head": new}
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=indices))
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.token_adapter.trainable_tokens_delta["default"].normal_()
    ids = torch.tensor([[1, new[0], 5, new[1], 7, new[0]]])

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        plain = model(input_ids=ids, labels=ids).loss
        with output_head_returns_hidden(model) as head:
            hidden = model(input_ids=ids).logits
        total, count = causal_lm_loss_sum(hidden, head, ids)
        return plain, total / count

    plain, fast = losses()
    assert torch.allclose(plain, fast, atol=1e-5)
    head = model.get_output_embeddings()
    assert head.__dict__["_tunelab_base_weight"] is not None  # projected by the frozen weight, the rows beside it
    delta = model.get_output_embeddings().token_adapter.trainable_tokens_delta["default"]
    (plain_grad,) = torch.autograd.grad(plain, delta)
    (fast_grad,) = torch.autograd.grad(losses()[1], delta)
    assert plain_grad.abs().sum() > 0 and torch.allclose(plain_grad, fast_grad, atol=1e-5)
    with model.disable_adapter():
        plain_off, fast_off = losses()
    assert torch.allclose(plain_off, fast_off, atol=1e-5) and not torch.allclose(plain_off, plain, atol=1e-3)

    # Per-token log-probs (DPO, KTO, GRPO): the same values and gradient as from the head's own logits.
    from tunelab.speed.loss import token_logprobs

    logits = model(input_ids=ids).logits
    expected = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)
    with output_head_returns_hidden(model) as head:
        got = token_logprobs(model(input_ids=ids).logits, head, ids)
    assert torch.allclose(got, expected, atol=1e-5)
    weights = torch.arange(got.numel(), dtype=torch.float32).reshape(got.shape)  # each token weighed apart
    (want,) = torch.autograd.grad((expected * weights).sum(), delta)
    (have,) = torch.autograd.grad((got * weights).sum(), delta)
    assert torch.allclose(want, have, atol=1e-4)


@pytest.mark.parametrize(
    "value, message",
    [("<a>,,<b>", "add_tokens: an empty token"), ('["<a>", 3]', "add_tokens must be tokens")],
)
def test_a_bad_token_list_is_one_line(tiny_llama, tmp_path, value, message, capsys):
    config = tmp_path / "config.yaml"
    value = json.loads(value) if value.startswith("[") else value
    config.write_text(json.dumps({"model": str(tiny_llama), "data_path": "x.jsonl", "add_tokens": value}))
    assert main(["llm", "--train", "--config", str(config), "--project-name", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_a_preference_run_adds_tokens_too(tiny_llama, tmp_path):
    """dpo with LoRA: the reference (the adapter switched off) scores the new tokens with the rows they started
    from, and the run saves them trained."""
    rows = [{"prompt": "Weather?", "chosen": CALL, "rejected": "I do not know."}] * 8
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = tmp_path / "run"
    code = main(
        [
            "llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "dpo",
            "--peft", "--chat-template", "chatml", "--max-steps", "3", "--batch-size", "4", "--block-size", "64",
            "--max-prompt-length", "32", "--project-name", str(run), "--add-tokens", "<tool>,</tool>",
            "--disable-gradient-checkpointing",
        ]
    )  # fmt: skip
    assert code == 0
    assert len(json.loads((run / "adapter_config.json").read_text())["trainable_token_indices"]["embed_tokens"]) == 2
    model, tokenizer = load_run(run)
    assert generate(model, tokenizer, "Weather?", GenerationParams(max_new_tokens=4))  # loads and answers


def test_new_rows_start_at_the_mean_in_a_padded_vocabulary_too(tiny_llama):
    """Grown rows, and spare rows of a vocabulary padded past its tokenizer (Qwen's), start at the mean of the
    tokens' rows before them; a model's other rows stay as they were."""
    from transformers import AutoModelForCausalLM

    from tunelab.models.vocabulary import fit_embeddings

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    weight = model.get_input_embeddings().weight
    before, mean = weight.detach().clone(), weight[:598].detach().mean(0)
    fit_embeddings(model, 600, [598, 599])  # the last two rows, as if spare, for two new tokens
    fit_embeddings(model, 602)  # grown by two (a base grown to load an adapter, a reference): the same start
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == 602 and torch.equal(weight[:598], before[:598])
    assert torch.allclose(weight[598:600], mean.expand(2, -1)) and torch.allclose(weight[600:], weight[:600].mean(0))


def test_which_rows_peft_trains_beside_the_adapter(untied_llama, tmp_path):
    """The embedding's and an untied head's, less a module trained whole; a module LoRA adapts, and a head with a
    bias (Phi-2's), refused with one line; the rows a wrapped embedding has, read without rebuilding it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PhiConfig, PhiForCausalLM

    from tunelab.errors import TunelabError
    from tunelab.models.vocabulary import embedding_rows, trainable_tokens

    model = AutoModelForCausalLM.from_pretrained(untied_llama)
    both = {"embed_tokens": [5, 9], "lm_head": [5, 9]}
    assert trainable_tokens(model, [9, 5], [], "all-linear") == both
    assert trainable_tokens(model, [9, 5], ["lm_head"], "all-linear") == {"embed_tokens": [5, 9]}
    assert trainable_tokens(model, [9, 5], ["model.lm_head"], "all-linear") == {"embed_tokens": [5, 9]}
    with pytest.raises(TunelabError, match="add_tokens with LoRA on lm_head"):
        trainable_tokens(model, [9, 5], [], ["q_proj", "lm_head"])
    assert trainable_tokens(model, [], [], "all-linear") is None
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", trainable_token_indices=both))
    assert embedding_rows(wrapped) == 600

    phi = PhiForCausalLM(PhiConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2))  # fmt: skip
    with pytest.raises(TunelabError, match="output head .lm_head. has a bias"):
        trainable_tokens(phi, [5], [], "all-linear")


def test_the_token_lists_read_from_a_config():
    """A YAML list keeps a token holding a comma; Axolotl's `tokens` is add_tokens; LoRA on the head refused."""
    from tunelab.config import load_config
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="add_tokens with LoRA on lm_head .target_modules."):
        load_config(
            {"model": "m", "data_path": "d.jsonl", "peft": True, "add_tokens": "<a>", "target_modules": "lm_head"}
        )
    params = load_config({"model": "m", "data_path": "d.jsonl", "tokens": ["a,b", "<c>", "<c>"]})
    assert params.add_tokens == ["a,b", "<c>"]
    assert load_config(
        {"model": "m", "data_path": "d.jsonl", "add_special_tokens": "<x>, <y>"}
    ).add_special_tokens == [
        "<x>",
        "<y>",
    ]


def test_a_reward_model_and_a_grpo_run_add_tokens_too(tiny_llama, tmp_path, capsys):
    """A reward model (a sequence classifier: no output head to train rows of) scores texts with the added tokens
    after training; GRPO samples, scores and trains with them, its KL reference the adapter switched off."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text((json.dumps({"prompt": "Weather?", "chosen": CALL, "rejected": "No idea."}) + "\n") * 8)
    common = ["--peft", "--max-steps", "2", "--batch-size", "4", "--block-size", "64", "--chat-template", "chatml"]
    reward = tmp_path / "reward"
    args = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(pairs), "--trainer", "reward"]
    assert (
        main(
            [
                *args,
                *common,
                "--max-prompt-length",
                "32",
                "--project-name",
                str(reward),
                "--add-tokens",
                "<tool>,</tool>",
            ]
        )
        == 0
    )
    assert json.loads((reward / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "embed_tokens": [600, 601]
    }
    capsys.readouterr()
    assert main(["score", "--model", str(reward), CALL]) == 0
    assert capsys.readouterr().out.strip().endswith(json.dumps(CALL))

    prompts = tmp_path / "prompts.jsonl"
    row = {"prompt": "What is 2+2? Answer inside <answer></answer> tags.", "answer": "4"}
    prompts.write_text((json.dumps(row) + "\n") * 4)
    grpo = tmp_path / "grpo"
    args = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(prompts), "--trainer", "grpo"]
    flags = ["--reward-functions", "answer_tag,format_tag", "--num-generations", "2", "--batch-size", "2"]
    flags += ["--max-completion-length", "6", "--max-steps", "2", "--peft", "--beta", "0.04"]
    assert main([*args, *flags, "--project-name", str(grpo), "--add-tokens", "<answer>,</answer>"]) == 0
    assert (grpo / "adapter_model.safetensors").is_file()


def test_a_reference_starts_the_new_tokens_spare_rows_as_the_model_does(tiny_llama, tmp_path):
    """In a padded vocabulary (Qwen's) an added token takes a spare row, which the model starts at the mean of the
    others; a model_ref (dpo, kto, grpo) starts that row the same, not at its checkpoint's spare value."""
    from transformers import AutoModelForCausalLM

    from tunelab.config.llm import LLMParams
    from tunelab.models import load_model, load_reference, load_tokenizer, resolve_model
    from tunelab.models.vocabulary import add_tokens

    rows = AutoModelForCausalLM.from_pretrained(tiny_llama).get_input_embeddings().weight.shape[0]
    padded = resized_copy(tiny_llama, tmp_path / "padded", rows + 8, added=5.0)  # spare rows far from any token's

    params = LLMParams(model=str(padded), model_ref=str(padded), trainer="dpo", add_tokens="<x>")
    source = resolve_model(str(padded))
    tokenizer = load_tokenizer(source)
    new_ids = add_tokens(tokenizer, ["<x>"], [])
    assert new_ids == [rows]  # a spare row: nothing grows
    trained = load_model(source, params, tokenizer=tokenizer, new_token_ids=new_ids)
    reference = load_reference(params, like=trained)
    start = trained.get_input_embeddings().weight[rows]
    assert start.abs().max() < 1.0  # the mean of the tokens' rows, not the spare 5.0
    assert torch.equal(reference.get_input_embeddings().weight[rows], start)
    assert torch.equal(reference.get_input_embeddings().weight[rows + 1], torch.full_like(start, 5.0))  # untouched
