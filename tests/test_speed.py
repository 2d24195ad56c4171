"""Each speed switch leaves the training itself unchanged: same losses with it on and off."""

from __future__ import annotations

import json

import pytest

import tunelab
from tests.conftest import train_losses


def _run(tiny_llama, tmp_path, name, **switches):
    rows = [{"prompt": f"Spell {w}:", "completion": " " + " ".join(w)} for w in ["cat", "house", "tree", "river"] * 8]
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {
        "model": str(tiny_llama),
        "data_path": str(data),
        "trainer": "sft",
        "max_steps": 6,
        "lr": 1e-3,
        "batch_size": 4,
        "gradient_accumulation": 1,
        "block_size": 64,
        "model_max_length": 128,
        "disable_gradient_checkpointing": True,
        "project_name": str(tmp_path / name),
    }
    folder = tunelab.train(**{**settings, **switches})
    return train_losses(folder)


def test_fast_loss_switch_gives_the_same_training(tiny_llama, tmp_path):
    fast = _run(tiny_llama, tmp_path, "fast", fast_loss=True)
    plain = _run(tiny_llama, tmp_path, "plain", fast_loss=False)
    assert fast == pytest.approx(plain, rel=1e-4)


def test_fused_adamw_on_a_cpu_gives_the_same_training(tiny_llama, tmp_path, monkeypatch):
    """adamw_torch runs as torch's fused AdamW on a CPU too: the same losses as the plain one, step by step."""
    import tunelab.training.trainer as trainer_module
    from tunelab.config import LLMParams
    from tunelab.speed import optimizer_name

    assert optimizer_name(LLMParams(optimizer="adamw_torch")) == "adamw_torch_fused"
    fused = _run(tiny_llama, tmp_path, "fused", peft=True, lora_dropout=0.0)
    monkeypatch.setattr(trainer_module, "optimizer_name", lambda params: params.optimizer)
    plain = _run(tiny_llama, tmp_path, "plain", peft=True, lora_dropout=0.0)
    assert fused == pytest.approx(plain, rel=1e-5)
    assert fused[-1] < fused[0]


@pytest.mark.slow
def test_torch_compile_switch_gives_the_same_training(tiny_llama, tmp_path):
    eager = _run(tiny_llama, tmp_path, "eager")
    compiled = _run(tiny_llama, tmp_path, "compiled", torch_compile=True)
    assert compiled == pytest.approx(eager, rel=1e-3)


def assert_same_loss_and_gradients(plain, fused) -> None:
    """One batch through both models: the same loss, and the same gradient for every parameter (None where the
    batch reaches none, such as experts no token was routed to)."""
    import torch

    ids = torch.randint(0, plain.config.vocab_size, (2, 24))
    losses = []
    for model in (plain, fused):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_fused_rmsnorm_and_swiglu_equal_transformers_modules(tiny_llama):
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.speed.fused_layers import fuse_layers

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    fused = copy.deepcopy(plain)
    assert fuse_layers(fused) == (5, 2)  # 2 layers x 2 norms + the final norm; 2 MLPs
    assert_same_loss_and_gradients(plain, fused)


def test_fused_forwards_survive_train_and_eval(tiny_llama):
    """transformers >= 5.25 loads with hub kernels on and re-kernelizes on every train()/eval(), which put each
    RMSNorm's own forward back: the fused forwards must still be there after the mode switches a Trainer makes."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.speed.fused_layers import _mlp_forward, _norm_forward, fuse_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    fuse_layers(model)
    model.train()
    model.eval()
    model.train()
    layer = model.model.layers[0]
    assert layer.input_layernorm.forward.__func__ is _norm_forward
    assert model.model.norm.forward.__func__ is _norm_forward
    assert layer.mlp.forward.__func__ is _mlp_forward


@pytest.mark.parametrize("kind", ["mask", "positions"])
def test_fused_lora_dropout_is_peft_dropout(kind):
    """The dropped input as a 1-byte keep-mask or as the dropped positions: PEFT's product and gradients."""
    import torch

    from tunelab.speed.lora_dropout import _DroppedProjection, dropped_positions, keep_mask

    torch.manual_seed(0)
    x = torch.randn(3, 50, 32, requires_grad=True)
    weight = torch.randn(8, 32, requires_grad=True)
    if kind == "mask":
        drop = keep = keep_mask(x, 0.1)
        assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) == {0, 1}
    else:
        drop = dropped_positions(x.numel(), 0.1)
        keep = torch.ones(x.numel(), dtype=torch.uint8).index_fill_(0, drop, 0).view(x.shape)
    assert 0.85 < keep.float().mean().item() < 0.95
    upstream = torch.randn(3, 50, 8)
    fused = _DroppedProjection.apply(x, drop, weight, 1 / 0.9)
    (fused * upstream).sum().backward()
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    reference = torch.nn.functional.linear(x * keep / 0.9, weight)  # what PEFT computes with this mask
    (reference * upstream).sum().backward()
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.01, 0.05, 0.125])
def test_dropped_positions_are_a_bernoulli_process(p):
    """Each element dropped with probability p, independently of its neighbour: the count within 5 standard
    deviations of n * p, and adjacent pairs both dropped at the rate p^2."""
    import math

    import torch

    from tunelab.speed.lora_dropout import dropped_positions

    torch.manual_seed(0)
    n = 2_000_000
    positions = dropped_positions(n, p)
    assert positions.dtype == torch.int64
    assert positions[0] >= 0 and positions[-1] < n and bool((positions[1:] > positions[:-1]).all())
    assert abs(positions.numel() - n * p) < 5 * math.sqrt(n * p * (1 - p))
    pairs = int((positions[1:] - positions[:-1] == 1).sum())
    assert abs(pairs - n * p * p) < 5 * math.sqrt(n * p * p)


def test_dropped_positions_draw_again_until_every_element_is_covered(monkeypatch):
    """A draw whose gaps fall short of n is followed by more: with every gap 0 all n elements are dropped, once."""
    import torch

    from tunelab.speed.lora_dropout import dropped_positions

    monkeypatch.setattr(torch, "rand", lambda count, device=None: torch.zeros(count))
    assert dropped_positions(1000, 0.05).tolist() == list(range(1000))


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_lora_forward_adds_the_adapter_inside_the_matmul(bf16):
    """A LoRA Linear's fused forward (lora_B's product added in place into the base output, the scaling on the rank-r
    side) gives PEFT's output and gradients; disabled or merged adapters and no-grad calls take PEFT's own path."""
    import contextlib
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.speed.lora_dropout import _lora_forward, fuse_lora_dropout

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False)).to(torch.bfloat16 if bf16 else torch.float32)
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=["0"], init_lora_weights=False)
    reference = copy.deepcopy(base)
    plain = get_peft_model(copy.deepcopy(base), config)
    fused = get_peft_model(base, config)
    fused.load_state_dict(plain.state_dict())
    assert fuse_lora_dropout(fused) == 1
    layer = fused.base_model.model[0]
    assert layer.forward.__func__ is _lora_forward
    autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16 if bf16 else torch.float32)
    outputs, grads = [], []
    for model in (plain, fused):
        with autocast:
            out = model(x)
        (out.float() ** 2).sum().backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-5}
    assert outputs[1].dtype == outputs[0].dtype and outputs[1].shape == (2, 5, 48)
    torch.testing.assert_close(outputs[1], outputs[0], **tolerance)
    for name, grad in grads[0].items():  # bf16 rounds differently in each order of operations: compare as wholes
        assert (grads[1][name] - grad).norm() <= (1e-2 if bf16 else 1e-6) * grad.norm(), name
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), **tolerance)
        with fused.disable_adapter():
            torch.testing.assert_close(fused(x), reference(x))  # PEFT's forward: the base layer alone
    # Under DeepSpeed ZeRO-3 (its parameters carry ds_id) B is only whole inside lora_B's own forward: PEFT's path.
    layer.lora_B["default"].weight.ds_id = 0
    calls = []
    layer.lora_B["default"].register_forward_hook(lambda *_: calls.append(1))
    with autocast:
        fused(x)
    assert calls == [1]


def test_fused_ops_keep_the_adapter_files_and_training(tiny_llama, tmp_path):
    """With LoRA dropout off the fused path is the same computation: same losses, same saved adapter keys."""
    from safetensors import safe_open

    fused = _run(tiny_llama, tmp_path, "fused", peft=True, lora_dropout=0.0, fused_ops=True)
    plain = _run(tiny_llama, tmp_path, "plain", peft=True, lora_dropout=0.0, fused_ops=False)
    assert fused == pytest.approx(plain, rel=1e-4)
    keys = []
    for name in ("fused", "plain"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1] and any("lora_A" in k for k in keys[0])
    # With dropout the fused path trains too (its masks differ from PEFT's, so the losses do).
    dropped = _run(tiny_llama, tmp_path, "dropped", peft=True, lora_dropout=0.1, fused_ops=True)
    assert dropped[-1] < dropped[0]


def test_checkpointing_every_other_layer_trains_the_same(tiny_llama, tmp_path):
    on = {"disable_gradient_checkpointing": False, "gradient_checkpointing": "on"}
    every = _run(tiny_llama, tmp_path, "all", **on)
    half = _run(tiny_llama, tmp_path, "half", **on, checkpoint_every=2)
    assert half == pytest.approx(every, rel=1e-4)


def test_checkpoint_every_selects_layers(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.training.trainer import _checkpointing

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    kwargs = _checkpointing(True, 2)
    (prefix,) = [k for k in kwargs if not k.endswith("kwargs")]
    options = dict(kwargs[f"{prefix}_kwargs"])
    every = options.pop("every_n_layers")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, every_n_layers=every)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]


def _lora_step(tiny_llama, *, rebuild: bool, dropout: float, checkpointing: bool = False, bf16: bool = False):
    """One forward and backward pass of a fused LoRA model: (loss, LoRA grads, bytes autograd kept).

    rebuild=None: PEFT's own modules, nothing fused. bf16: bf16 base weights under bf16 autocast, as tunelab
    trains LoRA with mixed_precision bf16 (PEFT keeps the adapter in float32)."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import tunelab.speed.fused_layers as fused_layers
    from tunelab.speed.fused_layers import fuse_layers
    from tunelab.speed.lora_dropout import fuse_lora_dropout

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16 if bf16 else torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(model, config)
    if rebuild is not None:
        fuse_layers(model)
        fuse_lora_dropout(model)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1))
    original = fused_layers._with_rebuild
    if not rebuild:
        fused_layers._with_rebuild = lambda out, fn, *inputs: out
    try:
        torch.manual_seed(2)  # the same dropout masks in both runs
        autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        fused_layers._with_rebuild = original
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, sum(kept.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_rebuilds_fused_outputs_instead_of_keeping_them(tiny_llama, dropout):
    """LoRA projections keep the fused norm's and SwiGLU's inputs, not their outputs: same loss, same gradients,
    less memory kept for the backward pass (per layer: two normed inputs and the SwiGLU product, h + h + m)."""
    import torch

    loss, grads, kept = _lora_step(tiny_llama, rebuild=True, dropout=dropout)
    plain_loss, plain_grads, plain_kept = _lora_step(tiny_llama, rebuild=False, dropout=dropout)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    tokens, hidden, intermediate = 4 * 48, 64, 128
    # The first norm's input (the frozen embedding's output) needs no gradient, so that norm keeps nothing to
    # rebuild its output from, and q/k/v keep the output itself.
    assert plain_kept - kept == tokens * (2 * (2 * hidden + intermediate) - hidden) * 4


def test_lora_rebuild_under_checkpointing_gives_the_same_gradients(tiny_llama):
    import torch

    loss, grads, _ = _lora_step(tiny_llama, rebuild=True, dropout=0.1, checkpointing=True)
    plain_loss, plain_grads, _ = _lora_step(tiny_llama, rebuild=False, dropout=0.1, checkpointing=False)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_lora_keeps_half_precision_inputs_under_bf16(tiny_llama):
    """Under bf16 autocast PEFT casts each LoRA input to the adapter's float32, and autocast casts that back to a
    bf16 copy, which lora_A keeps: one copy per module (three of the same input for q, k and v). The fused path
    computes the same from the input itself, keeping it (or what rebuilds it) once: equal gradients, and per
    layer and token at least 2 * (5h + m) bytes less (q, k, v, gate, up: 5h; down: m; o_proj's input is kept)."""
    import torch

    loss, grads, kept = _lora_step(tiny_llama, rebuild=True, dropout=0.0, bf16=True)
    peft_loss, peft_grads, peft_kept = _lora_step(tiny_llama, rebuild=None, dropout=0.0, bf16=True)
    assert {g.dtype for g in grads.values()} == {torch.float32}
    assert loss == pytest.approx(peft_loss, rel=1e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name], atol=2e-2, rtol=5e-2, msg=name)
    tokens, hidden, intermediate, layers = 4 * 48, 64, 128, 2
    assert peft_kept - kept >= layers * tokens * 2 * (5 * hidden + intermediate)


# The families whose RMSNorm and SwiGLU are Llama's, which the fused forwards of speed/fused_layers.py take.
FUSED_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "smollm3"}
FAMILY_NAMES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "olmo2", "smollm3"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_layers_equal_the_plain_path_in_every_family_they_cover(family, caplog):
    """Each family of the model matrix (tests/model_matrix.py): where fuse_layers finds layers to fuse, the loss and
    every gradient equal the plain model's; where it finds none, the run says its layers run as they are."""
    import copy
    import logging

    import torch
    from transformers import AutoModelForCausalLM

    from tests.model_matrix import family_configs
    from tunelab.config import LLMParams
    from tunelab.speed import fuse_ops
    from tunelab.speed.fused_layers import fuse_layers

    config = family_configs(vocab_size=96, bos=1, eos=2)[family]
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).float()
    fused = copy.deepcopy(plain)
    norms, mlps = fuse_layers(fused)
    covered = family in FUSED_FAMILIES
    assert (norms + mlps > 0) == covered, (family, norms, mlps)
    if not covered:
        with caplog.at_level(logging.INFO, logger="tunelab"):
            fuse_ops(copy.deepcopy(plain), LLMParams())
        assert "no fused RMSNorm/SwiGLU" in caplog.text
        return
    assert_same_loss_and_gradients(plain, fused)


def test_auto_checkpointing_reaches_the_run_and_changes_only_memory(tiny_llama, tmp_path, monkeypatch, caplog):
    import logging

    import tunelab.memory as memory

    caplog.set_level(logging.INFO, logger="tunelab")
    roomy = _run(tiny_llama, tmp_path, "roomy", disable_gradient_checkpointing=False)  # auto, this machine's RAM
    assert "gradient checkpointing: off: the run's estimate without it" in caplog.text
    saved = json.loads((tmp_path / "roomy" / "training_params.json").read_text())
    assert saved["gradient_checkpointing"] == "off" and saved["disable_gradient_checkpointing"] is True

    caplog.clear()
    monkeypatch.setattr(memory, "available_memory", lambda: ("cpu", 1))  # nothing fits: every layer
    tight = _run(tiny_llama, tmp_path, "tight", disable_gradient_checkpointing=False)
    assert "gradient checkpointing: every layer: even so" in caplog.text
    saved = json.loads((tmp_path / "tight" / "training_params.json").read_text())
    assert saved["gradient_checkpointing"] == "on" and saved["checkpoint_every"] == 1
    assert tight == pytest.approx(roomy, rel=1e-4)
