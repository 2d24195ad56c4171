"""Run by tests/test_distributed.py under `torch.distributed.run` (2 CPU processes, gloo): tunelab's hot path (the
fused layers and LoRA forward, the chunked loss) on a model sharded by FSDP2's fully_shard as accelerate shards it
(each decoder layer, then the root, which holds the output head), against the plain model's loss from full logits.
Rank 0 writes both losses and the largest gradient difference.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py MODEL_FOLDER OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from tunelab.speed.fused_layers import fuse_layers
from tunelab.speed.lora_dropout import fuse_lora_dropout
from tunelab.speed.loss import causal_lm_loss_sum, output_head_returns_hidden

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
    for layer in (model.get_base_model() if lora else model).model.layers:
        fully_shard(layer)
    fully_shard(model)
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
