"""Vision-language models on preference pairs whose prompts show images (data/preference.py with data/images.py):
dpo, orpo and simpo, on the tiny Qwen2-VL and LLaVA models of tests/vision_models.py, with real images made by PIL."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from tests.test_bad_input import run_bad, write_jsonl
from tests.test_vision import BUILDERS, COLORS, color_images, generate
from tests.vision_models import build_tiny_llava
from tunelab.cli import main

QUESTION = "What color is this?"


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


def trl_pair(shown, chosen, rejected):
    """TRL's vision preference row: the prompt's bare image part filled from the `images` column."""
    return {
        "images": [f"{shown}.png"],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        "chosen": [{"role": "assistant", "content": f"It is {chosen}."}],
        "rejected": [{"role": "assistant", "content": f"It is {rejected}."}],
    }


def color_pairs(repeats=3):
    """Every answer is chosen as often as it is rejected: only the image tells which one a pair prefers, so a model
    that does not read it gets at most half of the pairs right."""
    names = list(COLORS)
    return [trl_pair(c, c, r) for _ in range(repeats) for c in names for r in names if r != c]


def pair_args(model, data, project, trainer, *extra):
    return [
        "llm", "--train", "--model", str(model), "--data-path", str(data), "--project-name", str(project),
        "--trainer", trainer, "--valid-split", str(data), "--block-size", "128", "--model-max-length", "256",
        "--mixed-precision", "none", "--logging-steps", "5", "--eval-strategy", "no", "--batch-size", "6",
        "--gradient-accumulation", "1", "--seed", "0", *extra,
    ]  # fmt: skip


def test_dpo_learns_which_answer_the_image_supports(capsys, tmp_path, vlm):
    """Chosen and rejected differ only in the color they name, and every color is chosen and rejected equally:
    once trained, the run prefers the chosen answer of every pair, which it can only do by reading the images
    (on Qwen2-VL with the reference's log-probs scored before training, on LLaVA with the adapter switched off)."""
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", color_pairs())
    run = tmp_path / "run"
    precompute = ("--precompute-ref-log-probs",) if "qwen" in str(vlm) else ()
    learn = (
        "--peft",
        "--lora-r",
        "16",
        "--lora-alpha",
        "32",
        "--lr",
        "5e-3",
        "--max-steps",
        "40",
        "--dpo-beta",
        "0.5",
    )
    code = main(pair_args(vlm, data, run, "dpo", *learn, *precompute))
    out, err = capsys.readouterr()
    assert code == 0, f"{out}\n{err}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_rewards/accuracies"] == 1.0, metrics
    assert metrics["eval_rewards/margins"] > 0.5, metrics
    # `tunelab evaluate` scores the pairs with their images as training did, and asks the samples with them
    code = main(["evaluate", "--model", str(run), "--data-path", str(data), "--samples", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((run / "evaluation" / "results.json").read_text())
    assert results["rows"] == len(color_pairs()) and results["rewards/accuracies"] == 1.0, results
    assert results["rewards/margins"] == pytest.approx(metrics["eval_rewards/margins"], rel=0.05), results
    assert len(results["samples"]) == 2 and all(isinstance(s["tuned"], str) for s in results["samples"])
    assert (run / "processor_config.json").is_file()
    targets = json.loads((run / "adapter_config.json").read_text())["target_modules"]
    assert targets.startswith("model\\.language_model\\."), targets


def test_orpo_on_images_learns_to_answer_them(capsys, tmp_path, llava):
    """ORPO trains the chosen answers too (its NLL term): the run, reloaded, names the color of the image shown."""
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", color_pairs(2))
    run = tmp_path / "run"
    learn = ("--peft", "--lora-r", "16", "--lora-alpha", "32", "--lr", "1e-2", "--max-steps", "50")
    code = main(pair_args(llava, data, run, "orpo", *learn))
    out, err = capsys.readouterr()
    assert code == 0, f"{out}\n{err}"
    for name in COLORS:
        assert generate(capsys, run, tmp_path / f"{name}.png").startswith(f"It is {name}"), name


def test_pair_log_probs_are_the_models_on_the_processors_inputs(tmp_path, vlm):
    """Each pair's tokens are what the processor makes of the prompt and its images followed by the answer, and
    the summed answer log-probs the trainer scores (collated: both rows show the prompt's pixels) equal those of the
    model run directly on the processor's own inputs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tunelab.config.llm import LLMParams
    from tunelab.methods.preference import PairCollator, answer_logprobs, sequence_sums
    from tunelab.tasks.llm import image_codec, prepare

    color_images(tmp_path)
    rows = [trl_pair("red", "red", "blue"), trl_pair("green", "green", "red")]
    rows[1]["prompt"][0]["content"].insert(1, {"type": "image", "image": "blue.png"})  # two images, two forms
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    params = LLMParams(trainer="dpo", model=str(vlm), data_path=str(data), project_name=str(tmp_path / "r"), peft=True)
    prep = prepare(params)
    processor = AutoProcessor.from_pretrained(vlm)
    model = AutoModelForImageTextToText.from_pretrained(vlm).eval()
    codec, _ = image_codec(prep.processor, prep.data.template_source, prep.tokenizer)
    batch = PairCollator(prep.tokenizer.pad_token_id, codec)(prep.train_rows)
    # where the images' tokens are (ORPO's whole-row NLL leaves them out): exactly the image token, in every row
    image_id = prep.tokenizer.convert_tokens_to_ids(codec.image_token)
    assert torch.equal(batch["image_tokens"], batch["input_ids"] == image_id)
    with torch.no_grad():
        sums = sequence_sums(answer_logprobs(model, model, batch, batch["labels"], fast=True)[0], batch["labels"])[0]
    for index, row in enumerate(rows):
        names = ["red.png", "blue.png"] if index == 0 else ["green.png", "blue.png"]
        images = [Image.open(tmp_path / n).convert("RGB") for n in names[: 1 + index]]
        pair = prep.train_rows[index]
        assert [s.ref for s in pair.images] == [str((tmp_path / n).resolve()) for n in names[: 1 + index]]
        for side, answer in ((0, row["chosen"]), (1, row["rejected"])):
            chat = [
                {"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer[0]["content"]}]},
            ]
            text = processor.apply_chat_template(chat, tokenize=False)
            inputs = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
            ids = pair.prompt_ids + (pair.chosen_ids if side == 0 else pair.rejected_ids)
            assert ids == inputs["input_ids"][0].tolist()
            with torch.no_grad():
                logits = model(**inputs).logits[0, :-1].float()
            logps = logits.log_softmax(-1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]
            expected = logps[len(pair.prompt_ids) - 1 :].sum()
            got = sums[side * len(rows) + index]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_prompt_that_shows_images_is_never_cut(capsys, tmp_path, llava):
    """max_prompt_length cuts a text prompt's beginning, never an image prompt's (its turn header and the image's
    opening token would go with it): such a prompt is kept whole and counted; block_size still bounds the pair, and
    when no pair is left the error says how to make images take fewer tokens."""
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    color_images(tmp_path)
    row = trl_pair("red", "red", "blue")
    row["prompt"].insert(0, {"role": "system", "content": "You name colors. " * 8})
    text = {
        "prompt": "Name a color. " * 8,
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "Blue."}],
    }
    data = write_jsonl(tmp_path / "pairs.jsonl", [row, text])
    common = dict(trainer="dpo", model=str(llava), data_path=str(data), peft=True, block_size=256)
    whole = prepare(LLMParams(**common, project_name=str(tmp_path / "a"))).train_rows
    tight = prepare(LLMParams(**common, project_name=str(tmp_path / "b"), max_prompt_length=8))
    assert tight.train_rows[0] == whole[0] and tight.train_rows[0].images[0].start > 8
    assert tight.train_rows[1].prompt_ids == whole[1].prompt_ids[-8:]  # a text prompt's beginning goes, as before
    assert tight.data.stats.long_image_prompts == 1 and tight.data.stats.prompts_truncated == 1
    only = write_jsonl(tmp_path / "only.jsonl", [row])
    short = len(whole[0].prompt_ids) - 4
    line = run_bad(capsys, llava, only, tmp_path / "run", "--trainer", "dpo", "--max-prompt-length", "16",
                   "--block-size", str(short), "--model-max-length", "256")  # fmt: skip
    assert "prompts that show images are never cut" in line and "max_pixels" in line, line


def test_one_question_of_many_images_is_many_prompts_when_held_out(tmp_path, llava):
    """valid_size holds out whole prompts: pairs asking the same question of different images are different prompts
    (by their tokens alone they are one, and nothing could be held out)."""
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    color_images(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", color_pairs(2))
    params = LLMParams(
        trainer="dpo", model=str(llava), data_path=str(data), project_name=str(tmp_path / "r"), valid_size=0.3
    )
    prep = prepare(params)
    assert prep.valid_rows and prep.train_rows
    shown = {pair.images[0].ref for pair in prep.valid_rows}
    assert len(shown) == 1 and not shown & {pair.images[0].ref for pair in prep.train_rows}


def test_an_image_changed_since_preparing_pairs_is_prepared_again(tmp_path):
    from tests.vision_models import build_tiny_qwen2_vl
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    qwen = build_tiny_qwen2_vl(tmp_path / "qwen")
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", [trl_pair("red", "red", "blue")])
    params = LLMParams(trainer="dpo", model=str(qwen), data_path=str(data), project_name=str(tmp_path / "r"))
    first = prepare(params).train_rows[0]
    assert prepare(params).prepared.hit
    Image.new("RGB", (112, 112), COLORS["red"]).save(tmp_path / "red.png")
    again = prepare(params)
    assert not again.prepared.hit
    assert again.train_rows[0].images[0].count > first.images[0].count


def test_bad_image_pairs_are_named(capsys, tmp_path, llava):
    color_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        trl_pair("red", "red", "blue"),
        {**trl_pair("red", "red", "blue"), "images": ["missing.png"]},
        {**trl_pair("red", "red", "blue"), "images": ["broken.png"]},
        {**trl_pair("red", "red", "blue"), "images": ["red.png", "blue.png"]},
        {  # a shared conversation whose answers go on to show another image
            "chosen": [
                {"role": "user", "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "It is red."},
                {"role": "user", "content": [{"type": "image", "image": "blue.png"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "Blue."},
            ],
            "rejected": [
                {"role": "user", "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "It is blue."},
            ],
        },
        {**trl_pair("red", "red", "blue"), "chosen": [{"role": "assistant", "content": "It is <image>."}]},
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    line = run_bad(capsys, llava, data, tmp_path / "run", "--trainer", "dpo", "--max-prompt-length", "32")
    for expected in (
        "pairs.jsonl line 2",
        "image 'missing.png' not found",
        "pairs.jsonl line 3",
        "not an image PIL can read",
        "pairs.jsonl line 4",
        "1 image place(s) in the messages for 2 image(s) in column 'images'",
        "pairs.jsonl line 5",
        "an image after the prompt",
        "pairs.jsonl line 6",
        "its answer writes the image token '<image>' itself",
    ):
        assert expected in line, (expected, line)
    assert "line 1:" not in line and "line 1 " not in line


def test_methods_that_take_no_images_say_so(capsys, tmp_path, llava, tiny_llama):
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", color_pairs(1))
    for trainer, expected in (
        ("reward", "no AutoModelForSequenceClassification class for model type 'llava'"),
        ("kto", "pairs.jsonl line 1: column 'images' lists images, but trainer kto takes no images yet"),
        ("rloo", "pairs.jsonl line 1: column 'images' lists images, but trainer rloo takes no images yet"),
    ):
        extra = ("--reward-functions", "format_tag") if trainer == "rloo" else ()
        line = run_bad(
            capsys, llava, data, tmp_path / trainer, "--trainer", trainer, "--max-prompt-length", "32", *extra
        )
        assert expected in line, (trainer, line)
    # a reference of another kind than the model would read the images' tokens as text
    line = run_bad(capsys, llava, data, tmp_path / "ref", "--trainer", "dpo", "--max-prompt-length", "32",
                   "--model-ref", str(tiny_llama))  # fmt: skip
    assert "model_ref" in line and "the data shows images, which a reference reads only as the model does" in line


def test_simpo_on_images_prefers_what_the_image_shows(capsys, tmp_path, llava):
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", color_pairs())
    run = tmp_path / "run"
    learn = ("--peft", "--lora-r", "16", "--lora-alpha", "32", "--lr", "5e-3", "--max-steps", "40")
    code = main(pair_args(llava, data, run, "simpo", *learn))
    out, err = capsys.readouterr()
    assert code == 0, f"{out}\n{err}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_rewards/accuracies"] == 1.0, metrics


def test_pairs_image_bytes_are_kept_once_as_files_beside_the_prepared_data(tmp_path, llava):
    """A Parquet file's image column (a hub dataset's, as RLAIF-V ships): each image's bytes written once beside the
    prepared data and named by their file there, in the pairs as prepared and as read back from the cache, so
    neither memory nor the cached pairs hold them; the pairs' tokens are those of the same images given as files."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    color_images(tmp_path)
    files = [trl_pair(c, c, "blue" if c != "blue" else "red") for c in ("red", "green")]
    buffers = {}
    for name in ("red", "green"):
        out = io.BytesIO()
        Image.open(tmp_path / f"{name}.png").save(out, format="PNG")
        buffers[name] = out.getvalue()
    table = pa.table(
        {
            "images": [[{"bytes": buffers[row["images"][0][:-4]], "path": None}] for row in files],
            "prompt": [json.dumps(row["prompt"]) for row in files],
            "chosen": [json.dumps(row["chosen"]) for row in files],
            "rejected": [json.dumps(row["rejected"]) for row in files],
        }
    )
    pq.write_table(table, tmp_path / "pairs.parquet")
    params = LLMParams(trainer="dpo", model=str(llava), data_path=str(tmp_path / "pairs.parquet"), peft=True,
                       project_name=str(tmp_path / "r"), cache_dir=str(tmp_path / "cache"))  # fmt: skip
    prep = prepare(params)
    shutil.move(tmp_path / "cache", tmp_path / "moved")  # a cache moved whole finds its stored images where it is
    params.cache_dir = str(tmp_path / "moved")
    again = prepare(params)
    assert again.prepared.hit and str(again.prepared.folder).startswith(str(tmp_path / "moved"))
    by_file = prepare(LLMParams(trainer="dpo", model=str(llava), peft=True, project_name=str(tmp_path / "f"),
                                data_path=str(write_jsonl(tmp_path / "pairs.jsonl", files))))  # fmt: skip
    for pairs, entry in ((prep.train_rows, prep.prepared), (again.train_rows, again.prepared)):
        for pair, name, twin in zip(pairs, ("red", "green"), by_file.train_rows, strict=True):
            ref = pair.images[0].ref
            assert isinstance(ref, str) and ref.startswith(str(entry.folder)), ref
            if entry is again.prepared:
                assert open(ref, "rb").read() == buffers[name]
            assert pair.prompt_ids == twin.prompt_ids and pair.chosen_ids == twin.chosen_ids


def test_a_vision_model_s_kto_run_on_text_evaluates(capsys, tmp_path, llava):
    """A run of a method that reads no images saved no processor: `tunelab evaluate` measures it on its text data
    (as serve would serve it) without looking for one."""
    rows = [{"prompt": f"Q{i}?", "completion": "Yes." if i % 2 else "No.", "label": bool(i % 2)} for i in range(8)]
    data = write_jsonl(tmp_path / "thumbs.jsonl", rows)
    run = tmp_path / "run"
    code = main(pair_args(llava, data, run, "kto", "--peft", "--max-steps", "2"))
    out, err = capsys.readouterr()
    assert code == 0, f"{out}\n{err}"
    assert not (run / "preprocessor_config.json").exists()
    code = main(["evaluate", "--model", str(run), "--data-path", str(data), "--samples", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((run / "evaluation" / "results.json").read_text())
    assert results["rows"] == 8 and results["method"] == "kto"
