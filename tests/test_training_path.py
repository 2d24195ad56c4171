"""The hot path on a tiny model: labels and masks, packing isolation, and the fast loss against the plain one."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab import LLMParams
from tunelab.data import load_data
from tunelab.data.packing import PackedRowsCollator, pack
from tunelab.data.tokenize import IGNORE, Encoded
from tunelab.methods import METHODS
from tunelab.models import load_tokenizer, resolve_model
from tunelab.speed.loss import causal_lm_loss_sum, output_head_returns_hidden, token_logprobs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


CHATS = [
    {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Green."},
        ]
    },
]


def encoded_chats(tmp_path, tiny_llama, **kw):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    params = LLMParams(
        model=str(tiny_llama),
        data_path=str(data),
        text_column="messages",
        trainer="sft",
        chat_template="chatml",
        block_size=128,
        model_max_length=256,
        **kw,
    )
    tokenizer = load_tokenizer(resolve_model(params.model))
    return load_data(params, tokenizer), tokenizer, params


def test_chat_sft_labels_cover_assistant_tokens_only(tmp_path, tiny_llama):
    data, tokenizer, _ = encoded_chats(tmp_path, tiny_llama)
    second = data.train[1]
    trained = tokenizer.decode(
        [t for t, label in zip(second.input_ids, second.labels, strict=True) if label != IGNORE]
    )
    untrained = tokenizer.decode(
        [t for t, label in zip(second.input_ids, second.labels, strict=True) if label == IGNORE]
    )
    assert trained == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    for prompt_part in ("Be brief.", "Name a colour.", "Another?", "<|im_start|>assistant\n", "<|im_start|>user"):
        assert prompt_part in untrained
    assert "Blue." not in untrained and "Green." not in untrained


def test_completion_only_loss_off_trains_the_prompt_too(tmp_path, tiny_llama):
    data, _, params = encoded_chats(tmp_path, tiny_llama, completion_only_loss=False)
    rows, _ = METHODS["sft"].build_rows(data.train, params)
    assert all(label != IGNORE for row in rows for label in row.labels[1:])


def test_default_trainer_trains_every_token_in_full_blocks(tmp_path, tiny_llama):
    rows = [{"text": f"Document number {i} says hello to the world."} for i in range(40)]
    data_path = write_jsonl(tmp_path / "docs.jsonl", rows)
    params = LLMParams(model=str(tiny_llama), data_path=str(data_path), block_size=32, model_max_length=64)
    data = load_data(params, load_tokenizer(resolve_model(params.model)))
    blocks, stats = METHODS["default"].build_rows(data.train, params)
    assert len(blocks) > 3 and all(len(b) == 32 for b in blocks)
    assert all(label != IGNORE for b in blocks for label in b.labels[1:])
    stream = [t for e in data.train for t in e.input_ids]
    assert blocks[1].input_ids == stream[32:64]


def _inputs(batch):
    # As in training: no KV cache (transformers only reads packed position ids when there is none).
    return {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False}


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "padded-rows"])
def test_packing_keeps_examples_apart(tiny_llama, flat):
    """Each example's logits inside a packed batch equal its logits when run alone, in both batch layouts
    (one flat sequence for flash attention; padded rows, the padding a pseudo-example, for SDPA/eager)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    lengths = [7, 12, 5, 9, 3]
    examples = [Encoded(torch.randint(5, 500, (n,)).tolist(), [IGNORE] * n) for n in lengths]
    rows = pack(examples, block_size=20)
    assert len(rows) < len(examples)  # something was actually packed
    batch = PackedRowsCollator(0, flat=flat)(rows)
    if flat:
        assert batch["input_ids"].shape == (1, sum(lengths))
    else:
        assert batch["input_ids"].shape == (len(rows), 24)  # longest row (20) rounded up to a multiple of 8
    with torch.no_grad():
        logits = model(**_inputs(batch)).logits
        for r, row in enumerate(rows):
            start = sum(len(e) for e in [e for row_ in rows[:r] for e in row_]) if flat else 0
            for example in row:
                alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
                got = logits[0 if flat else r, start : start + len(example)]
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)
                start += len(example)


def _plain_loss(model, batch):
    logits = model(**_inputs(batch)).logits.float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
    )


def _fast_loss(model, batch):
    with output_head_returns_hidden(model) as head:
        hidden = model(**_inputs(batch)).logits
    total, count = causal_lm_loss_sum(hidden, head, batch["labels"])
    return total / count


def _prompt_and_answer_examples() -> list[Encoded]:
    """Four seeded examples, each a masked prompt followed by a trained answer."""
    torch.manual_seed(0)
    examples = []
    for n in (9, 14, 6, 11):
        ids = torch.randint(5, 500, (n,)).tolist()
        examples.append(Encoded(ids, [IGNORE] * (n // 2) + ids[n // 2 :]))
    return examples


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "padded-rows"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("peft", [False, True])
def test_fast_loss_and_gradients_equal_the_plain_path(tiny_llama, packed, peft, flat):
    examples = _prompt_and_answer_examples()
    rows = pack(examples, 24) if packed else examples
    batch = PackedRowsCollator(0, flat=flat)(rows)

    def grads(loss_fn):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        if peft:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(1)
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = grads(_plain_loss)
    fast_loss, fast_grads = grads(_fast_loss)
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == fast_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _under_mixed_precision(loss_fn):
    """loss_fn with the model's forward run as accelerate runs it under bf16 mixed precision: inside autocast,
    its outputs handed back in float32."""

    def run(model, batch):
        forward = model.forward

        def autocast_forward(*args, **kwargs):
            with torch.autocast("cpu", torch.bfloat16):
                out = forward(*args, **kwargs)
            out.logits = out.logits.float()
            return out

        model.forward = autocast_forward
        try:
            return loss_fn(model, batch)
        finally:
            del model.forward

    return run


def _token_logprob_loss(model, batch):
    with output_head_returns_hidden(model) as head:
        hidden = model(**_inputs(batch)).logits
    labels = batch["labels"]
    return -token_logprobs(hidden, head, labels).sum() / (labels[:, 1:] != IGNORE).sum()


@pytest.mark.parametrize("fast_loss", [_fast_loss, _token_logprob_loss], ids=["cross-entropy", "token-logprobs"])
@pytest.mark.parametrize("peft", [True, False], ids=["lora-bf16-weights", "full-fp32-weights"])
def test_fast_loss_under_bf16_mixed_precision_equals_the_plain_path(tiny_llama, peft, fast_loss):
    """Under mixed precision the head meets float32 hidden states (accelerate up-casts the outputs) and, with
    LoRA, bf16 weights: the projection runs in bf16 as the head's own forward would have, and the loss and the
    trained gradients equal the plain path's (bf16 logits, up-cast)."""
    batch = PackedRowsCollator(0)(_prompt_and_answer_examples())

    def grads(loss_fn):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16 if peft else torch.float32)
        if peft:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(1)
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        loss = _under_mixed_precision(loss_fn)(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = grads(_plain_loss)
    fast_loss_value, fast_grads = grads(fast_loss)
    assert fast_loss_value.dtype == torch.float32
    torch.testing.assert_close(fast_loss_value, plain_loss, atol=2e-3, rtol=2e-3)
    assert plain_grads.keys() == fast_grads.keys() and plain_grads
    for name, grad in plain_grads.items():  # bf16 rounds differently in each order of operations: compare as wholes
        assert (fast_grads[name] - grad).norm() <= 3e-2 * grad.norm() + 1e-6, name


@pytest.mark.parametrize("fused", [False, True], ids=["peft-dropout", "fused-dropout"])
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("fast_loss", [_fast_loss, _token_logprob_loss], ids=["cross-entropy", "token-logprobs"])
def test_a_lora_adapter_on_the_output_head_is_trained_by_the_fast_loss(tiny_llama, fast_loss, mixed, fused):
    """target_modules naming lm_head: the head's rank-r term (dropout and all) enters the chunked loss, so its
    loss and every gradient equal the plain path's, lm_head's lora_B included (it had none: the loss projected
    with the base weight alone). With the adapter off (a reference pass) the term is left out again."""
    from peft import LoraConfig, get_peft_model

    from tunelab.speed.lora_dropout import fuse_lora_dropout

    batch = PackedRowsCollator(0)(_prompt_and_answer_examples())

    def grads(loss_fn):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.1)
        model = get_peft_model(model, config)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # LoRA starts with B = 0: give every term something to say
                torch.nn.init.normal_(param, std=0.05)
        if fused:
            fuse_lora_dropout(model)
        model.train()
        names, head = [n for n, _ in model.named_parameters()], model.get_output_embeddings()
        own_forward = head.__dict__.get("forward")  # fused_ops' LoRA forward
        torch.manual_seed(2)  # the same dropout draws in both paths
        loss = (_under_mixed_precision(loss_fn) if mixed else loss_fn)(model, batch)
        loss.backward()
        # The head's B rides along without becoming one of the head's parameters, and its own forward stays.
        assert [n for n, _ in model.named_parameters()] == names and len(model.state_dict()) == len(names) + 1
        assert head.__dict__.get("forward") is own_forward and (own_forward is not None) == fused
        with torch.no_grad(), model.disable_adapter():
            off = loss_fn(model, batch)
        return loss.detach(), off, {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_off, plain_grads = grads(_plain_loss)
    fast_loss_value, fast_off, fast_grads = grads(fast_loss)
    tolerance = dict(atol=2e-3, rtol=2e-3) if mixed else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_loss_value, plain_loss, **tolerance)
    torch.testing.assert_close(fast_off, plain_off, atol=1e-5, rtol=1e-5)
    assert (fast_off - fast_loss_value).abs() > 1e-3  # the adapter's term counted with it on, not with it off
    head_b = "base_model.model.lm_head.lora_B.default.weight"
    assert plain_grads.keys() == fast_grads.keys() and head_b in fast_grads
    assert fast_grads[head_b].norm() > 0
    for name, grad in plain_grads.items():
        assert (fast_grads[name] - grad).norm() <= (3e-2 if mixed else 1e-4) * grad.norm() + 1e-6, name


@pytest.mark.parametrize("used", ["both", "entropy", "logprobs"])
@pytest.mark.parametrize("head_adapter", [False, True], ids=["plain-head", "lora-head"])
def test_chunked_entropies_and_their_gradients_equal_the_full_logits(tiny_llama, monkeypatch, head_adapter, used):
    """grpo's entropies come from the log-probs' own projection, a few rows at a time: the values and every
    trained gradient (through the entropy, the log-probs or both) equal those of the full logits."""
    from peft import LoraConfig, get_peft_model

    import tunelab.speed.loss as chunked

    monkeypatch.setattr(chunked, "CHUNK_BYTES", 16 * 4 * 512)  # chunks of 16 rows: several per batch
    batch = PackedRowsCollator(0)(_prompt_and_answer_examples())
    labels = batch["labels"]
    weights = torch.randn(labels[:, 1:].shape, generator=torch.Generator().manual_seed(0))

    def run(fast):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        targets = ["q_proj", "v_proj", "lm_head"] if head_adapter else ["q_proj", "v_proj"]
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        if fast:
            with output_head_returns_hidden(model) as head:
                hidden = model(**_inputs(batch)).logits
            logps, entropies = chunked.token_logprobs_and_entropies(hidden, head, labels)
        else:
            logits = model(**_inputs(batch)).logits
            logps, entropies = chunked.logits_token_logprobs(logits, labels), chunked.logits_entropies(logits, labels)
            with torch.no_grad():  # without gradient: a chunk of positions at a time, the same values
                torch.testing.assert_close(chunked.logits_entropies(logits, labels), entropies.detach())
        loss = {"both": (logps + 3 * entropies), "entropy": entropies, "logprobs": logps}[used]
        (loss * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logps.detach(), entropies.detach(), grads

    plain, fast = run(False), run(True)
    torch.testing.assert_close(fast[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], plain[1], atol=1e-5, rtol=1e-5)
    scored = labels[:, 1:] != IGNORE
    assert torch.all(fast[1][scored] > 0) and torch.all(fast[1][~scored] == 0)
    assert plain[2].keys() == fast[2].keys()
    for name, grad in plain[2].items():
        assert grad.norm() > 0, name
        torch.testing.assert_close(fast[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_an_output_head_adapter_the_loss_cannot_split_takes_the_plain_path(tiny_llama):
    """DoRA on lm_head scales each output row by its own norm: no rank-r term to add, so the plain path."""
    from peft import LoraConfig, get_peft_model

    from tunelab.speed.loss import fast_loss_supported

    def supported(**config):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        return fast_loss_supported(get_peft_model(model, LoraConfig(r=4, **config)))

    assert supported(target_modules=["q_proj", "lm_head"])
    assert supported(target_modules=["q_proj"], use_dora=True)  # DoRA elsewhere: the head is plain
    assert not supported(target_modules=["q_proj", "lm_head"], use_dora=True)


def test_an_all_masked_batch_gives_every_trained_tensor_a_zero_gradient():
    """No trained position in a micro-batch: the loss is 0 and the head's weights (and a LoRA head's B) still get a
    gradient, as DDP expects each step (find_unused_parameters off)."""
    from tunelab.speed.loss import linear_cross_entropy_sum

    hidden = torch.randn(0, 8, requires_grad=True)
    weight, low_weight = torch.randn(32, 8, requires_grad=True), torch.randn(32, 2, requires_grad=True)
    loss = linear_cross_entropy_sum(
        hidden, weight, None, torch.zeros(0, dtype=torch.long), None, hidden[:, :2], low_weight
    )
    loss.backward()
    assert loss.item() == 0.0
    assert all(t.grad is not None and not t.grad.any() for t in (hidden, weight, low_weight))


def test_an_output_head_sharded_by_deepspeed_zero3_takes_the_plain_loss(tiny_llama):
    """ZeRO-3 gathers a module's weights only around its own forward; the chunked loss reads the head's after it.
    (No DeepSpeed here: its mark on a partitioned parameter, ds_id, stands in; issue 20's GPU run uses the real one.)
    FSDP2 needs no such rule: tests/test_distributed.py runs the fast loss under it."""
    from tunelab.speed.loss import fast_loss_supported

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert fast_loss_supported(model)
    model.get_output_embeddings().weight.ds_id = 7
    assert not fast_loss_supported(model)


def test_preformatted_text_is_used_as_is(tmp_path, tiny_llama):
    """Mistral-style `<s>[INST] ... [/INST] ... </s>` rows: no template, no second BOS, no second EOS."""
    text = "<s>[INST] Say hi [/INST] Hi!</s>"
    data_path = write_jsonl(tmp_path / "mistral.jsonl", [{"text": text}] * 3)
    params = LLMParams(
        model=str(tiny_llama), data_path=str(data_path), trainer="sft", block_size=64, model_max_length=128
    )
    tokenizer = load_tokenizer(resolve_model(params.model))
    data = load_data(params, tokenizer)
    assert data.template is None and data.row_format.kind == "text"
    ids = data.train[0].input_ids
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 1


def test_best_fit_packing_keeps_every_example_once_and_fills_rows():
    import random

    rng = random.Random(0)
    examples = [Encoded([1] * n, [1] * n) for n in (rng.randint(1, 100) for _ in range(500))]
    rows = pack(examples, block_size=128)
    packed = [e for row in rows for e in row]
    assert sorted(map(id, packed)) == sorted(map(id, examples))
    assert all(sum(len(e) for e in row) <= 128 for row in rows)
    lower_bound = -(-sum(map(len, examples)) // 128)
    assert len(rows) <= lower_bound * 1.03  # nearly full rows


def test_unpacked_padded_rows_use_plain_causal_attention(tiny_llama):
    """Unpacked rows carry no position ids (fused causal kernel); right padding changes no real token's logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    examples = [Encoded(torch.randint(5, 500, (n,)).tolist(), [IGNORE] * n) for n in (5, 13, 9)]
    batch = PackedRowsCollator(0)(examples)
    assert "position_ids" not in batch and batch["input_ids"].shape == (3, 16)
    with torch.no_grad():
        logits = model(**_inputs(batch)).logits
        for r, example in enumerate(examples):
            alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            torch.testing.assert_close(logits[r, : len(example)], alone, atol=1e-5, rtol=1e-4)


def test_rows_are_padded_to_a_multiple_of_8_on_a_gpu_only(monkeypatch):
    """On a CPU a pad token costs what a real one does: the batch is as wide as its longest row. Tensor cores want
    multiples of 8."""
    from tunelab.speed import pad_multiple

    examples = [Encoded(list(range(1, n + 1)), [IGNORE] * n) for n in (5, 13, 9)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert PackedRowsCollator(0, pad_to_multiple_of=pad_multiple())(examples)["input_ids"].shape == (3, 13)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert PackedRowsCollator(0, pad_to_multiple_of=pad_multiple())(examples)["input_ids"].shape == (3, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True, "entropies"], ids=["cross-entropy", "token-logprobs", "entropies"])
def test_the_chunked_loss_keeps_one_chunk_of_logits_alive(dtype, per_token):
    """The loss runs when every saved activation is alive, so what its chunks hold adds to the run's peak: one
    chunk of float32 logits at a time (and, in a half dtype, its half copy), never the previous chunk beside it.
    With entropies (grpo), the chunk's probabilities beside its logits: two chunks, never three."""
    from tunelab.memory import measure_peak
    from tunelab.speed.loss import ChunkedLinearCrossEntropy, ChunkedTokenLogprobs

    vocab, width, rows, chunk = 4096, 16, 64, 16
    torch.manual_seed(0)
    hidden = torch.randn(rows, width).to(dtype).float().requires_grad_()  # half values, handed back in float32
    weight = torch.randn(vocab, width, dtype=dtype)
    target = torch.randint(0, vocab, (rows,))

    def step():
        if per_token == "entropies":
            logps, entropies = ChunkedTokenLogprobs.apply(hidden, weight, None, target, chunk, dtype, None, None, True)
            (logps.sum() + entropies.sum()).backward()
        elif per_token:
            ChunkedTokenLogprobs.apply(hidden, weight, None, target, chunk, dtype).sum().backward()
        else:
            ChunkedLinearCrossEntropy.apply(hidden, weight, None, target, chunk, dtype).backward()

    peak = measure_peak(step)
    one_chunk = chunk * vocab * (4 + (2 if dtype == torch.bfloat16 else 0))
    if per_token == "entropies":
        one_chunk = chunk * vocab * 8  # (a half copy is made once the probabilities are freed)
    assert one_chunk <= peak <= 1.2 * one_chunk, (peak, one_chunk)
