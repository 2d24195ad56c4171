"""How the sampling methods (grpo, rloo, online_dpo; distill's on-policy answers read sampling_config) sample their
completions: CompletionSampler, which SamplingTrainer is made of.

A sampling's prompts go to generate in as few calls as prompts_per_generation allows, num_generations completions
each, seeded by the step, the call and the process (a resumed run samples what the uninterrupted one did), with
the run's sampling settings and generation_kwargs and none of the model's own defaults. With tools, each
completion is carried on through its calls (tools.call_tools: one generate call a round, every process in step).
The calls' completions are joined, padded, and split back into micro-batches, each trimmed to its own widest
prompt and longest completion (Sampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from tunelab.config.llm import LLMParams
from tunelab.data.prompts import PromptRow
from tunelab.errors import ConfigError
from tunelab.tools import call_tools
from tunelab.training.trainer import eval_mode


@dataclass
class Sampled:
    """Completions as sampled, num_generations rows a prompt: the prompts left-padded, the completions right-padded.
    With tools: `tool_mask` (0 on the tool turns), where each completion's last stretch of the model's writing
    starts (`last_start`), and each completion's messages. A vision-language run's: each row's prompt images."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    tool_mask: torch.Tensor | None = None
    last_start: torch.Tensor | None = None
    messages: list[list[dict[str, Any]]] | None = None
    images: list[list[Any]] | None = None

    def rows(self, where: slice) -> Sampled:
        tool_mask, last_start = self.tool_mask, self.last_start
        return Sampled(
            self.prompt_ids[where], self.prompt_mask[where], self.completion_ids[where],
            None if tool_mask is None else tool_mask[where], None if last_start is None else last_start[where],
            None if self.messages is None else self.messages[where],
            None if self.images is None else self.images[where],
        )  # fmt: skip

    def trimmed(self, first: int, length: int) -> Sampled:
        """The prompts from column `first` on, the completions' first `length` columns."""
        return Sampled(
            self.prompt_ids[:, first:], self.prompt_mask[:, first:], self.completion_ids[:, :length],
            None if self.tool_mask is None else self.tool_mask[:, :length], self.last_start, self.messages,
            self.images,
        )  # fmt: skip


def completion_length(params: LLMParams) -> int:
    """Tokens a completion may have: max_completion_length, or 256 when unset."""
    return params.max_completion_length or 256


def sampling_config(
    temperature: float,
    max_new_tokens: int,
    pad_id: int,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> GenerationConfig:
    """How completions are sampled for training (grpo, rloo, online_dpo, distill): plain sampling at `temperature`
    (top-k off, as TRL's) unless the run asks for top_p, top_k, min_p or a repetition penalty, and none of the
    model's own generation defaults (a top-k of 50, a repetition penalty, min-p): the loss scores the samples under
    the policy itself, so they must come from it, filtered only as the user chose."""
    # (generate fills what is left unset, None, from the model's generation config: every sampling switch is set)
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p or 0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        use_cache=True,
    )


class CompletionSampler:
    """The sampling of a SamplingTrainer (methods/sampling.py), whose state it reads: params, group,
    max_length, end_ids, tool_runner, and Trainer's model, accelerator, state and processing_class."""

    @torch.no_grad()
    def sample(self, micro_batches: list[list[PromptRow]]) -> list[Sampled | None]:
        """Each micro-batch's completions: its prompts left-padded and their num_generations completions each, the
        step's prompts sampled in as few generate calls as prompts_per_generation allows (all at once by default,
        as TRL generates a step: a bigger batch decodes faster). Each micro-batch's part is trimmed back to its own
        widest prompt and longest completion, so it trains as if sampled alone."""
        rows = [row for batch in micro_batches for row in batch]
        if not rows:
            return [None for _ in micro_batches]
        per_call = self.params.prompts_per_generation or len(rows)
        starts = range(0, len(rows), per_call)
        if self.tool_runner is not None:
            self.tool_runner.calls = self.tool_runner.failures = 0
        pieces = [self._generate(rows[start : start + per_call], call) for call, start in enumerate(starts)]
        if self.tool_runner is not None:  # TRL's figures, over every process: calls per completion, failures per call
            figures = [self.tool_runner.calls, self.tool_runner.failures, len(rows) * self.group]
            figures = torch.tensor(figures, dtype=torch.float64, device=self.args.device)
            calls, failures, completions = self.accelerator.reduce(figures, reduction="sum").tolist()
            self.record("tools/call_frequency", calls / completions)
            self.record("tools/failure_frequency", failures / calls if calls else 0.0)
        # each call padded its prompts (on the left) and completions (on the right) to its own widest: to the
        # widest of all before they are joined (a narrower call's completions all ended: padding after them)
        pad = self.processing_class.pad_token_id
        wide, long = max(p.prompt_ids.size(1) for p in pieces), max(p.completion_ids.size(1) for p in pieces)
        joined = Sampled(
            torch.cat([F.pad(p.prompt_ids, (wide - p.prompt_ids.size(1), 0), value=pad) for p in pieces]),
            torch.cat([F.pad(p.prompt_mask, (wide - p.prompt_mask.size(1), 0), value=0) for p in pieces]),
            torch.cat([F.pad(p.completion_ids, (0, long - p.completion_ids.size(1)), value=pad) for p in pieces]),
        )
        if self.tool_runner is not None:
            joined.tool_mask = torch.cat(
                [F.pad(p.tool_mask, (0, long - p.tool_mask.size(1)), value=1) for p in pieces]
            )
            joined.last_start = torch.cat([p.last_start for p in pieces])
            joined.messages = [messages for p in pieces for messages in p.messages]
        if any(p.images is not None for p in pieces):
            joined.images = [shown for p in pieces for shown in p.images or [[]] * p.prompt_ids.size(0)]
        out, start = [], 0
        for batch in micro_batches:
            here = joined.rows(slice(start * self.group, (start + len(batch)) * self.group))
            start += len(batch)
            first = int(here.prompt_mask.any(0).int().argmax())  # the widest prompt's first column
            ends = self.completion_ends(here.completion_ids, here.last_start)[0]
            out.append(here.trimmed(first, int(ends.max()) + 1))
        return out

    def _generate(self, rows: list[PromptRow], call: int) -> Sampled:
        """One generate call: num_generations completions per prompt, prompt after prompt; prompts left-padded to
        the widest, completions padded to the longest. With tools, each completion carried on through its calls."""
        width = max(len(r.input_ids) for r in rows)
        prompt_ids, prompt_mask = self._left_padded([r.input_ids for r in rows], width)
        # The same step samples the same completions, in a resumed run too (and each process its own).
        process = self.accelerator.process_index
        torch.manual_seed(self.params.seed + 1009 * self.state.global_step + 31 * call + 7919 * process)
        if self.images is not None and any(r.images for r in rows):
            # each prompt's rows made before generating (generate's own copies of a batch's pixels assume an image a
            # row), its images' pixels beside them
            shown = [list(r.images or ()) for r in rows for _ in range(self.group)]
            ids, mask = prompt_ids.repeat_interleave(self.group, 0), prompt_mask.repeat_interleave(self.group, 0)
            pixels = self.images.batch_inputs(shown, ids.cpu())
            out = self._sampled(ids, mask, 1, self.max_length, {k: v.to(ids.device) for k, v in pixels.items()})
            return Sampled(ids, mask, out, images=shown)
        out = self._sampled(prompt_ids, prompt_mask, self.group, self.max_length)
        sampled = Sampled(
            prompt_ids.repeat_interleave(self.group, 0), prompt_mask.repeat_interleave(self.group, 0), out
        )
        if self.tool_runner is None:
            return sampled
        prompts = [row.input_ids for row in rows for _ in range(self.group)]
        written = [self._through_end(ids) for ids in out.tolist()]
        completions, masks, last_starts, messages = call_tools(
            self.tool_runner, prompts, written, self.max_length, self.params.max_tool_calling_iterations,
            self._generate_more, self._anyone_calling,
        )  # fmt: skip
        long = max(len(ids) for ids in completions)
        pad = self.processing_class.pad_token_id
        sampled.completion_ids = torch.tensor(
            [ids + [pad] * (long - len(ids)) for ids in completions], device=out.device
        )
        sampled.tool_mask = torch.tensor([mask + [1] * (long - len(mask)) for mask in masks], device=out.device)
        sampled.last_start, sampled.messages = torch.tensor(last_starts, device=out.device), messages
        return sampled

    def _left_padded(self, inputs: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists left-padded to `width` (every input ends where generation starts), with their mask."""
        ids = torch.full((len(inputs), width), self.processing_class.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for i, tokens in enumerate(inputs):
            ids[i, width - len(tokens) :] = torch.tensor(tokens)
            mask[i, width - len(tokens) :] = 1
        return ids.to(self.args.device), mask.to(self.args.device)

    def _sampled(
        self, ids: torch.Tensor, mask: torch.Tensor, returns: int, new_tokens: int, images: dict | None = None
    ) -> torch.Tensor:
        """`returns` completions of each left-padded input, up to `new_tokens` tokens, sampled as the run asks.
        `images`: the inputs' image inputs (pixels, token types); a vision-language run never writes its image
        tokens, with images or without (a micro-batch may hold rows of both)."""
        model = self.accelerator.unwrap_model(self.model)
        params = self.params
        filters = (params.top_p, params.top_k, params.min_p, params.repetition_penalty)
        config = sampling_config(params.temperature, new_tokens, self.processing_class.pad_token_id, *filters)
        config.update(**(params.generation_kwargs or {}))  # (checked: none of the settings above, nor the ends)
        config.num_return_sequences, config.eos_token_id = returns, self.end_ids
        if self.images is not None:  # a written image token would have no image to match it when scored
            config.suppress_tokens = sorted({*(config.suppress_tokens or []), *self.images.placeholder_ids})
        with eval_mode(model):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **(images or {}))
        return out[:, ids.size(1) :]

    def _generate_more(self, inputs: list[list[int]], budgets: list[int]) -> list[list[int]]:
        """tools: one completion of each input (a prompt, what the model wrote and the tool turns), through its end
        token, up to its budget of tokens."""
        ids, mask = self._left_padded(inputs, max(len(tokens) for tokens in inputs))
        out = self._sampled(ids, mask, 1, max(budgets))
        return [self._through_end(row)[:budget] for row, budget in zip(out.tolist(), budgets, strict=True)]

    def _anyone_calling(self, calling: bool) -> bool:
        """tools: whether any process still has calls to answer this round (each generate call of a sharded model
        needs every process)."""
        if self.accelerator.num_processes == 1:
            return calling
        return bool(self.accelerator.gather(torch.tensor([int(calling)], device=self.args.device)).any())

    def _through_end(self, ids: list[int]) -> list[int]:
        """A sampled row's tokens through its first end token (all of them, without one: cut at the length)."""
        ends = [i for i, token in enumerate(ids) if token in self.end_ids]
        return ids[: ends[0] + 1] if ends else ids

    def _check_generation_settings(self, model: Any) -> None:
        """generation_kwargs' token ids against the model (config/generation.py checked their forms): each inside
        the vocabulary (generate would fail at the first step), and no end token suppressed, nor biased as good as
        suppressed (no completion could end)."""
        settings = self.params.generation_kwargs
        weight = model.get_output_embeddings().weight  # (DeepSpeed ZeRO-3 keeps a partitioned one's shape apart)
        vocabulary = getattr(weight, "ds_shape", weight.shape)[0]
        biased = settings.get("sequence_bias") or []
        listed = [*settings.get("suppress_tokens", []), *settings.get("begin_suppress_tokens", [])]
        listed += [i for ids in settings.get("bad_words_ids", []) for i in ids]
        listed += [i for ids, _ in biased for i in ids]
        outside = [i for i in listed if i >= vocabulary]
        if outside:
            raise ConfigError(f"generation_kwargs: token id {outside[0]} is past the model's {vocabulary} tokens")
        barred = set(settings.get("suppress_tokens", []))
        barred |= {ids[0] for ids, bias in biased if len(ids) == 1 and bias <= -100}
        ended = sorted(barred & set(self.end_ids))
        if ended:
            raise ConfigError(
                f"generation_kwargs: end token {ended[0]} suppressed: completions could never end (end tokens: "
                f"{self.end_ids})"
            )

    def completion_ends(
        self, completion_ids: torch.Tensor, last_start: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the position of each completion's end token, or its last position if it has none; whether it has none:
        cut at max_completion_length). With tools, the end token of its last stretch of the model's writing
        (`last_start` on: the turns before it end too)."""
        is_eos = torch.isin(completion_ids, torch.tensor(self.end_ids, device=completion_ids.device))
        if last_start is not None:
            positions = torch.arange(completion_ids.size(1), device=completion_ids.device)
            is_eos &= positions.unsqueeze(0) >= last_start.unsqueeze(1)
        truncated = ~is_eos.any(1)
        return torch.where(truncated, completion_ids.size(1) - 1, is_eos.int().argmax(1)), truncated
