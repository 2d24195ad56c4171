"""grpo on a vision-language model: prompts that show images (data/prompts.py with data/images.py), sampled and
scored with their pixels (methods/completions.py, methods/sampling.py), on the tiny models of
tests/vision_models.py."""

from __future__ import annotations

import json

import pytest

from tests.test_bad_input import run_bad, write_jsonl
from tests.test_vision import BUILDERS, COLORS, color_images

NAMES = list(COLORS)
REWARDS = """
def prompts_seen(prompts, images, **kwargs):
    import json
    with open(__file__ + ".seen.json", "w") as out:
        json.dump([prompts[0], images[0]], out)
    return [float(len(prompts[0])) for _ in prompts]
"""


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def prompts(repeats=4):
    """TRL's vision prompt rows: a message prompt with a bare image part, the image in the `images` column."""
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which color?"}]}]
    return [{"prompt": question, "images": [f"{c}.png"], "color": c} for _ in range(repeats) for c in NAMES]


def test_completions_are_sampled_and_scored_with_their_images(tmp_path, vlm):
    """Each completion is sampled from its prompt's pixels (its image tokens never written) and scored with them: the
    log-probs the trainer takes from its left-padded batch are the model's own on the row alone with its image's
    pixels, and not those without them."""
    import torch

    from tunelab.config.llm import LLMParams
    from tunelab.data import image_codec
    from tunelab.models import load_model
    from tunelab.tasks.llm import prepare
    from tunelab.training.trainer import build_trainer

    color_images(tmp_path)
    rows = json.loads(json.dumps(prompts(1)))  # (each row's own prompt)
    rows[1]["prompt"][0]["content"][1]["text"] = "Which color is shown in this picture, please?"  # another width
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    params = LLMParams(
        trainer="grpo", model=str(vlm), data_path=str(data), project_name=str(tmp_path / "run"), peft=True,
        reward_functions=f"{tmp_path / 'my_rewards.py'}:prompts_seen", num_generations=2, batch_size=3,
        max_completion_length=4, max_steps=1,
    )  # fmt: skip
    prep = prepare(params)
    assert [row.images for row in prep.train_rows] == [[str((tmp_path / f"{c}.png").resolve())] for c in NAMES]
    model = load_model(prep.source, prep.params, "causal_lm", prep.tokenizer)
    codec = image_codec(prep.processor, prep.data.template_source, prep.tokenizer)[0]
    out = str(tmp_path / "out")
    trainer = build_trainer(
        model, prep.tokenizer, prep.params, prep.train_rows, None, out, [], prep.method.trainer_class, images=codec
    )
    samples = trainer.sample([prep.train_rows])[0]
    batch = trainer._rollout(prep.train_rows, samples)
    assert not torch.isin(batch["completion_ids"], torch.tensor(codec.placeholder_ids)).any()
    logps = trainer.completion_logps(trainer.model, batch)
    width = batch["prompt_ids"].size(1)
    for i in range(batch["completion_ids"].size(0)):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
        kept = batch["completion_mask"][i].bool()
        ids = torch.cat([prompt, batch["completion_ids"][i][kept]])[None]
        shown = codec.batch_inputs([prep.train_rows[i // 2].images], ids)
        with torch.no_grad():
            for pixels, same in ((shown, True), ({}, False)):
                logits = trainer.model(input_ids=ids, **pixels).logits[0, len(prompt) - 1 : -1].float()
                own = logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
                close = torch.allclose(logps[i][kept], own, atol=1e-4)
                assert close == same, (i, logps[i][kept], own)
    assert width == batch["prompt_ids"].size(1)
    seen = json.loads((tmp_path / "my_rewards.py.seen.json").read_text())
    # the prompt as the rewards get it, and its images column as the images found (paths to open)
    assert seen == [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which color?"}]}],
                    [str((tmp_path / "red.png").resolve())]]  # fmt: skip


def test_held_out_prompts_are_told_apart_by_their_images(tmp_path, vlm):
    """valid_size holds a prompt's rows out together: the same question of another image is another prompt."""
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    color_images(tmp_path)
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts(4))
    params = LLMParams(
        trainer="grpo", model=str(vlm), data_path=str(data), project_name=str(tmp_path / "run"), peft=True,
        reward_functions="format_tag", valid_size=0.3,
    )  # fmt: skip
    prep = prepare(params)
    held = {row.images[0] for row in prep.valid_rows}
    assert len(held) == 1 and not held & {row.images[0] for row in prep.train_rows}
    assert len(prep.valid_rows) == 4


def test_a_reward_model_reads_each_image_as_a_mark():
    from tunelab.rewards import _messages, _prompt_text

    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which color?"}]}]
    assert _prompt_text(prompt) == "[image]Which color?"
    assert _messages(prompt) == [{"role": "user", "content": "[image]Which color?"}]


def test_an_image_prompt_that_cannot_be_read_is_named(capsys, tmp_path, vlm):
    color_images(tmp_path)
    rows = prompts(1)
    rows[1]["images"] = ["missing.png"]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    line = run_bad(capsys, vlm, data, tmp_path / "run", "--trainer", "grpo", "--reward-functions", "format_tag")
    assert "prompts.jsonl line 2" in line and "column 'images'" in line and "'missing.png' not found" in line, line
