"""Run by tests/test_distributed.py under `torch.distributed.run` (2 CPU processes, gloo): tunelab's hot path (the
fused layers and LoRA forward, the chunked loss) on a model sharded by accelerate's FSDP2 preparation (each decoder
layer; the final norm and the output head as one group kept gathered after the forward; the root), against the plain
model's loss from full logits.
Rank 0 writes both losses and the largest gradient difference.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py MODEL_FOLDER OUT.json
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM

from tunelab.speed.fused_layers import fuse_layers
from tunelab.speed.lora_dropout import fuse_lora_dropout
from tunelab.speed.loss import causal_lm_loss_sum, output_head_returns_hidden


def shard_as_accelerate_does(model: torch.nn.Module) -> torch.nn.Module:
    """accelerate's own FSDP2 preparation (fsdp.yaml's settings) on this CPU process group: each decoder layer, the
    final norm with the output head (and a tied embedding) kept gathered after the forward, then the root."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
    )
    # Accelerator(...) on a CPU runs DDP whatever the plugin says: hand the preparation what it reads.
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        is_main_process=dist.get_rank() == 0,
        mixed_precision="no",
        device=torch.device("cpu"),
    )
    model = fsdp2_prepare_model(accelerator, model)
    assert isinstance(model, FSDPModule)
    return model


FUSED: list[int] = []  # how many layers and LoRA modules took the fused forwards


def loss_and_grads(folder: str, fast: bool, lora: bool) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if lora:  # LoRA on the head too: its rank-r term rides along with the hidden states
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
        model = get_peft_model(model, config)
    if fast:
        FUSED.extend(fuse_layers(model))
        if lora:
            FUSED.append(fuse_lora_dropout(model))
    model = shard_as_accelerate_does(model)
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    labels = ids.clone()
    labels[:, :5] = -100
    if fast:
        with output_head_returns_hidden(model) as head:
            hidden = model(input_ids=ids, use_cache=False).logits
        total, count = causal_lm_loss_sum(hidden, head, labels)
        loss = total / count
    else:
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def main(folder: str, out: str) -> None:
    dist.init_process_group("gloo")
    results = {}
    for lora in (False, True):
        plain, plain_grads = loss_and_grads(folder, fast=False, lora=lora)
        fast, fast_grads = loss_and_grads(folder, fast=True, lora=lora)
        worst = max((fast_grads[k] - g).abs().max().item() for k, g in plain_grads.items())
        results["lora" if lora else "full"] = dict(
            plain=plain, fast=fast, worst_grad_diff=worst, grads=sorted(plain_grads), fast_grads=sorted(fast_grads)
        )
    results["fused"] = FUSED
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
