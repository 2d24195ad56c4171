"""Vision-language models: sft on chats that show images (data/images.py, models/vision.py), on tiny Qwen2-VL and
LLaVA models built here (tests/vision_models.py), with real images made by PIL."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.test_bad_input import assert_nothing_written, cli_args, error_line, run_bad, write_jsonl
from tests.vision_models import build_tiny_llava, build_tiny_qwen2_vl
from tunelab.cli import main

COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}
BUILDERS = {"qwen2_vl": build_tiny_qwen2_vl, "llava": build_tiny_llava}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


def color_images(folder):
    """One image per color, of two sizes (Qwen2-VL's tokens per image follow the size)."""
    for number, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (60 + 40 * (number % 2), 40), rgb).save(folder / f"{name}.png")


def turn(image, answer, question="What color is this?"):
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": f"It is {answer}."},
        ]
    }


def color_rows(count=24):
    names = list(COLORS)
    return [turn(f"{names[i % 3]}.png", names[i % 3]) for i in range(count)]


def train(capsys, model, data, project, *extra):
    code = main(cli_args(model, data, project, *extra))
    out, err = capsys.readouterr()
    assert code == 0, f"exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


def generate(capsys, model, image, prompt="What color is this?"):
    code = main(["generate", "--model", str(model), "--image", str(image), prompt, "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip()


LEARN = ("--peft", "--lr", "1e-2", "--max-steps", "60", "--batch-size", "6", "--gradient-accumulation", "1")
LEARN_LORA = ("--lora-r", "16", "--lora-alpha", "32", "--block-size", "128")


def test_sft_learns_to_read_the_images(capsys, tmp_path, vlm):
    """The only thing telling the answers apart is the image: once trained, the run (reloaded from its folder)
    names the color of each image it is shown, and its adapter is on the language model alone."""
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows())
    run = tmp_path / "run"
    train(capsys, vlm, data, run, *LEARN, *LEARN_LORA)
    assert (run / "processor_config.json").is_file()
    targets = json.loads((run / "adapter_config.json").read_text())["target_modules"]
    assert targets.startswith("model\\.language_model\\."), targets
    from safetensors import safe_open

    with safe_open(run / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and all(".language_model." in name for name in names), names[:5]
    for name in COLORS:
        assert generate(capsys, run, tmp_path / f"{name}.png").startswith(f"It is {name}"), name


def test_prepared_tokens_are_the_processors(tmp_path, vlm):
    """Each example's tokens are what the model's processor makes of its whole text and images (the placeholder
    replaced by the image's own tokens), and only the answer is trained."""
    from transformers import AutoProcessor

    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    color_images(tmp_path)
    rows = color_rows(3)
    rows[1]["messages"][0]["content"].append({"type": "image", "image": "blue.png"})  # two images in one turn
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    params = LLMParams(trainer="sft", model=str(vlm), data_path=str(data), project_name=str(tmp_path / "r"), peft=True)
    prep = prepare(params)
    processor = AutoProcessor.from_pretrained(vlm)
    table = prep.data.train
    for index, row in enumerate(rows):
        shown = [  # as TRL hands a multimodal chat to the template: every content a list of parts
            {"role": m["role"], "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
            if isinstance(m["content"], list)
            else {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
            for m in row["messages"]
        ]
        text = processor.apply_chat_template(shown, tokenize=False)
        assert "It is" in text  # (LLaVA's template writes list contents only)
        names = [p["image"] for m in row["messages"] if isinstance(m["content"], list) for p in m["content"]
                 if p["type"] == "image"]  # fmt: skip
        images = [Image.open(tmp_path / name).convert("RGB") for name in names]
        expected = processor(text=[text], images=[images], add_special_tokens=False)["input_ids"][0]
        example = table.example(index)
        assert example.input_ids == list(expected)
        assert [span.ref for span in example.images] == [str((tmp_path / name).resolve()) for name in names]
        labelled = zip(example.input_ids, example.labels, strict=True)
        trained = prep.tokenizer.decode([t for t, label in labelled if label != -100])
        assert trained.startswith(f"It is {row['messages'][1]['content'][6:-1]}."), trained


def test_images_column_and_image_tags_and_bytes(tmp_path, llava):
    """TRL's bare image parts with an `images` column, LLaMA-Factory's `<image>` in the text, a data: URI and a
    Parquet image column's bytes all prepare to the same tokens as a file named in the part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    color_images(tmp_path)
    red = (tmp_path / "red.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(red).decode()
    question = [{"type": "text", "text": "What color is this?"}]
    answer = {"role": "assistant", "content": "It is red."}
    forms = {
        "part": [turn("red.png", "red")] * 2,
        "bare": [
            {"messages": [{"role": "user", "content": [{"type": "image"}, *question]}, answer], "images": ["red.png"]}
        ]
        * 2,  # fmt: skip
        "tag": [
            {"messages": [{"role": "user", "content": "<image>What color is this?"}, answer], "images": ["red.png"]}
        ]
        * 2,  # fmt: skip
        "uri": [turn(uri, "red")] * 2,
        "openai": [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "red.png"}}, *question]},
                    answer,
                ]
            }
        ]
        * 2,  # fmt: skip
    }
    tokens = {}
    for name, rows in forms.items():
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        params = LLMParams(trainer="sft", model=str(llava), data_path=str(data), project_name=str(tmp_path / name))
        tokens[name] = prepare(params).data.train.example(0).input_ids
    parquet = tmp_path / "bytes.parquet"
    messages = json.dumps([{"role": "user", "content": [{"type": "image"}, *question]}, answer])
    table = pa.table({"messages": [messages] * 2, "images": [[{"bytes": red, "path": "red.png"}]] * 2})
    pq.write_table(table, parquet)
    params = LLMParams(trainer="sft", model=str(llava), data_path=str(parquet), project_name=str(tmp_path / "pq"))
    prep = prepare(params)
    tokens["parquet"] = prep.data.train.example(0).input_ids
    assert len({tuple(ids) for ids in tokens.values()}) == 1, tokens
    # the Parquet file's bytes are kept as a file beside the prepared data, and read back as the same image
    ref = prep.data.train.example(0).images[0].ref
    assert ref.startswith("/") and open(ref, "rb").read() == red


def test_full_fine_tune_leaves_the_vision_tower_frozen(capsys, tmp_path, llava):
    from safetensors.torch import load_file

    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows(8))
    run = tmp_path / "run"
    _, err = train(capsys, llava, data, run, "--lr", "1e-3", "--max-steps", "3", "--batch-size", "4",
                   "--gradient-accumulation", "1", "--block-size", "128")  # fmt: skip
    assert "the vision tower and projector stay frozen" in err
    before, after = load_file(llava / "model.safetensors"), load_file(run / "model.safetensors")
    tower = [k for k in before if k.startswith(("vision_tower.", "multi_modal_projector."))]
    language = [k for k in before if "layers.0.self_attn.q_proj" in k and k.startswith("language_model.")]
    assert tower and language
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in tower)
    assert not all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in language)


def test_merged_run_generates_with_images_and_export_refuses(capsys, tmp_path, llava):
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows())
    run = tmp_path / "run"
    train(capsys, llava, data, run, *LEARN, *LEARN_LORA)
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(run), "--output", str(merged)]) == 0
    capsys.readouterr()
    assert generate(capsys, merged, tmp_path / "green.png").startswith("It is green")
    for model in (run, merged):
        code = main(["export", "--model", str(model), "--output", str(tmp_path / "m.gguf")])
        line = error_line(capsys, code)
        assert "is a vision-language model (llava): llama.cpp reads its vision tower from a separate mmproj" in line
    assert not (tmp_path / "m.gguf").exists()


def bad_image_rows(tmp_path):
    color_images(tmp_path)
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    rows = color_rows(8)
    rows[1] = turn("missing.png", "red")
    rows[2] = turn("https://example.com/cat.png", "red")
    rows[3]["messages"][1]["content"] = [{"type": "image", "image": "red.png"}]
    ask = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}
    rows[4] = {"messages": [ask, {"role": "assistant", "content": "Hello."}], "images": ["red.png", "blue.png"]}
    rows[5] = turn("notes.png", "red")
    rows[6]["messages"][0]["content"][1]["text"] = "What <image> is this?"  # the placeholder, typed as text
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_bad_image_rows_are_named(capsys, tmp_path, llava):
    data = bad_image_rows(tmp_path)
    line = run_bad(capsys, llava, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: 6 bad row(s) in {data}: "), line
    missing = tmp_path / "missing.png"
    assert f"{data} line 2, column 'messages': message 1: image 'missing.png' not found (looked for {missing})" in line
    assert f"{data} line 3, column 'messages': message 1: image 'https://example.com/cat.png' is a URL" in line
    assert f"{data} line 4, column 'messages': message 2 (assistant) has an image part: only user and system" in line
    counted = "1 image place(s) in the messages for 2 image(s) in column 'images'"
    assert f"{data} line 5, column 'messages': {counted}" in line
    assert f"{data} line 6, column 'messages': message 1: image 'notes.png' is not an image PIL can read" in line
    # (the sixth, the typed placeholder, is found once the text is tokenized: listed after the first five)
    out, err = train(capsys, llava, data, tmp_path / "run", "--dry-run", "--bad-rows", "skip")
    assert f"{data}: skipped 6 bad row(s) (bad_rows=skip)" in err
    assert "train (" in out and "2 examples" in out


def test_images_for_a_text_model_or_template(capsys, tmp_path, tiny_llama, llava):
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows(4))
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run")
    assert (
        f"{data} line 1, column 'messages': message 1 has an image part, but the model reads text only: train a "
        "vision-language model on it, or drop the image parts" in line
    )
    line = run_bad(capsys, llava, data, tmp_path / "run", "--chat-template", "zephyr")
    assert "message 1 has an image part, but the chat template cannot write an image part (" in line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--packing",), "packing: the data shows images, and rows with images are not packed yet: leave it off"),
        (("--streaming", "--max-steps", "2", "--packing"), "packing: rows with images are not packed yet"),
        (("--trainer", "default"), "the data shows images, but trainer default takes no images yet (trainers sft"),
    ],
)
def test_settings_a_vision_run_cannot_take(capsys, tmp_path, llava, extra, expected):
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows(4))
    line = run_bad(capsys, llava, data, tmp_path / "run", *extra)
    assert expected.format(model=llava) in line, line


def test_an_image_changed_since_preparing_is_prepared_again(capsys, tmp_path):
    """The prepared data names images by path: one changed since (another size: other tokens for Qwen2-VL) must
    not be trained on with the token count of the old one."""
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    qwen = build_tiny_qwen2_vl(tmp_path / "qwen")
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows(3))
    params = LLMParams(trainer="sft", model=str(qwen), data_path=str(data), project_name=str(tmp_path / "r"))
    first = prepare(params).data.train.example(0)
    assert prepare(params).prepared.hit
    Image.new("RGB", (112, 112), COLORS["red"]).save(tmp_path / "red.png")
    again = prepare(params)
    assert not again.prepared.hit
    assert again.data.train.example(0).images[0].count > first.images[0].count


def test_a_cut_never_splits_an_image():
    from tunelab.data.images import ImageSpan
    from tunelab.data.store import TokenTable
    from tunelab.data.tokenize import Encoded

    ids = list(range(20))
    example = Encoded(ids, ids, [ImageSpan("/a.png", 2, 4), ImageSpan("/b.png", 8, 6)])
    table = TokenTable.from_examples([example], 64)
    assert [s.ref for s in table.example(0).images] == ["/a.png", "/b.png"]
    cut = table.example(0, limit=10)  # inside the second image: cut before it, the image left out
    assert cut.input_ids == ids[:8] and [s.ref for s in cut.images] == ["/a.png"]
    assert table.example(0, limit=3).images is None and len(table.example(0, limit=3)) == 2


def test_generate_image_problems(capsys, tmp_path, tiny_llama, llava):
    color_images(tmp_path)
    code = main(["generate", "--model", str(llava), "--image", str(tmp_path / "nope.png"), "Hi"])
    assert error_line(capsys, code) == (
        f"tunelab: error: --image: image '{tmp_path / 'nope.png'}' not found (looked for {tmp_path / 'nope.png'})"
    )
    code = main(["generate", "--model", str(tiny_llama), "--image", str(tmp_path / "red.png"), "Hi"])
    assert error_line(capsys, code).endswith("reads text only: images are for a vision-language model")


def test_image_bytes_of_a_jsonl_data_uri_open(tmp_path):
    from tunelab.data.images import ImageProblem, checked_ref, open_image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert open_image(checked_ref(uri, None)).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageProblem, match="base64 does not decode"):
        checked_ref("data:image/png;base64,@@@", None)
    assert_nothing_written(tmp_path / "none")


def test_autotrain_vlm_task_columns_train_as_chats(capsys, tmp_path, llava):
    """AutoTrain's vlm task (`tunelab vlm --trainer vqa|captioning`, or a config's task vlm:vqa) reads an image
    column beside the question and answer (or the caption): the same examples as the chats that show them."""
    import csv

    import yaml

    from tunelab.config import load_config
    from tunelab.tasks.llm import prepare

    color_images(tmp_path)
    with open(tmp_path / "vqa.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt", "text"])
        writer.writerows([[f"{name}.png", "What color is this?", f"It is {name}."] for name in COLORS])
    chats = write_jsonl(tmp_path / "chats.jsonl", [turn(f"{name}.png", name) for name in COLORS])
    common = {"model": str(llava), "trainer": "sft", "block_size": 128}
    expected = prepare(load_config({**common, "data_path": str(chats), "project_name": str(tmp_path / "a")}))
    config = {
        "task": "vlm:vqa",
        "base_model": str(llava),
        "project_name": str(tmp_path / "b"),
        "data": {"path": str(tmp_path / "vqa.csv"), "column_mapping": {"image_column": "image"}},
        "params": {"block_size": 128},
    }
    (tmp_path / "vqa.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    params = load_config(str(tmp_path / "vqa.yml"))
    assert (params.trainer, params.image_column, params.prompt_text_column) == ("sft", "image", "prompt")
    got = prepare(params)
    for index in range(len(COLORS)):
        assert got.data.train.example(index).input_ids == expected.data.train.example(index).input_ids
        assert got.data.train.example(index).labels == expected.data.train.example(index).labels

    # captioning from the command line: the image alone in the user turn, the caption its answer
    with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["image", "text"], *[[f"{name}.png", f"A {name} square."] for name in COLORS]])
    args = ["vlm", "--trainer", "captioning", "--model", str(llava), "--data-path", str(tmp_path / "captions.csv")]
    code = main([*args, "--project-name", str(tmp_path / "c"), "--block-size", "128", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "train (" in out and "3 examples" in out and "A red square." in out
    code = main([*args[:2], "vqa", *args[3:], "--project-name", str(tmp_path / "c")])
    assert "column 'prompt' not found" in error_line(capsys, code)
    bad = main(["vlm", "--trainer", "detection", "--model", str(llava), "--data-path", str(tmp_path / "captions.csv")])
    assert "trainer 'detection' is not one of AutoTrain's vlm trainers (vqa, captioning)" in error_line(capsys, bad)


def test_more_rows_the_data_step_names(capsys, tmp_path, llava):
    """A cut-short JPEG (PIL's verify() passes it), and a row without images whose text writes the image token."""
    color_images(tmp_path)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    rows = color_rows(6)
    rows[1] = turn("cut.jpg", "red")
    rows[2] = {
        "messages": [{"role": "user", "content": "What is <image> here?"}, {"role": "assistant", "content": "x"}]
    }
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    line = run_bad(capsys, llava, data, tmp_path / "run")
    assert f"{data} line 2, column 'messages': message 1: image 'cut.jpg' is not an image PIL can read" in line
    assert f"{data} line 3, column 'messages': its text holds 1 image place(s) ('<image>') for 0 image(s)" in line


def test_images_column_without_places_and_text_models(tmp_path, llava, tiny_llama):
    """A chat row's `images` column with no place for them in its messages: at the start of its first user turn,
    as TRL places them, for a model that reads images; a text model's run ignores the column, as it always has."""
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    color_images(tmp_path)
    question = {"role": "user", "content": "What color is this?"}
    rows = [{"messages": [question, {"role": "assistant", "content": "It is red."}], "images": ["red.png"]}] * 2
    data = write_jsonl(tmp_path / "trl.jsonl", rows)
    explicit = write_jsonl(tmp_path / "parts.jsonl", [turn("red.png", "red")] * 2)
    tokens = []
    for path in (data, explicit):
        params = LLMParams(trainer="sft", model=str(llava), data_path=str(path), project_name=str(tmp_path / "r"))
        tokens.append(prepare(params).data.train.example(0).input_ids)
    assert tokens[0] == tokens[1]
    params = LLMParams(trainer="sft", model=str(tiny_llama), data_path=str(data), project_name=str(tmp_path / "t"))
    assert prepare(params).data.train.images is None


def test_whole_rows_keep_their_images_untrained(tmp_path, llava):
    """completion_only_loss off trains every text token; an image's tokens are the image, never predicted."""
    from tunelab.config.llm import LLMParams
    from tunelab.data.tokenize import IGNORE
    from tunelab.tasks.llm import prepare

    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows(3))
    params = LLMParams(
        trainer="sft",
        model=str(llava),
        data_path=str(data),
        project_name=str(tmp_path / "r"),
        completion_only_loss=False,
        block_size=128,
    )
    row = prepare(params).train_rows[0]
    assert row.images and len(row.images) == 1
    span = row.images[0]
    assert row.labels[span.start : span.start + span.count] == [IGNORE] * span.count
    assert row.labels[span.start + span.count :] == row.input_ids[span.start + span.count :]


def test_dry_run_counts_the_vision_tower(capsys, tmp_path, llava):
    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows(4))
    out, _ = train(capsys, llava, data, tmp_path / "run", "--dry-run", "--block-size", "128")
    assert "the vision tower and projector (frozen): " in out
    assert "<image> x4" in out  # an image's tokens shown once, with their count


def test_evaluate_scores_image_rows_with_their_images(capsys, tmp_path, llava):
    """`tunelab evaluate` on a vision-language run: each row's loss with its pixels, as trained (the figure equals
    the model's own on the processor's inputs), the base beside it, and sample answers asked with the images."""
    from transformers import AutoProcessor

    from tunelab.inference.evaluate import mean_loss
    from tunelab.inference.generate import load_run

    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows())
    run = tmp_path / "run"
    train(capsys, llava, data, run, *LEARN, *LEARN_LORA)
    code = main(["evaluate", "--model", str(run), "--data-path", str(data), "--compare-base", "--samples", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((run / "evaluation" / "results.json").read_text())
    assert results["eval_loss"] < results["base_eval_loss"] - 0.5, results
    for sample in results["samples"]:
        assert sample["tuned"].startswith(sample["reference"][:9]), sample
        assert sample["prompt"][0]["content"][0] == {"type": "image"}, sample  # (no path or bytes in the report)
    assert "[image]What color is this?" in (run / "evaluation" / "report.md").read_text()

    model, tokenizer = load_run(run)
    processor = AutoProcessor.from_pretrained(run)
    row = color_rows(1)[0]["messages"]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row[0]["content"][1]["text"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": row[1]["content"]}]}]  # fmt: skip
    inputs = processor(
        text=[processor.apply_chat_template(chat, tokenize=False)],
        images=[[Image.open(tmp_path / "red.png").convert("RGB")]],
        add_special_tokens=False,
        return_tensors="pt",
    )
    from tunelab.config.llm import LLMParams
    from tunelab.data import image_codec
    from tunelab.tasks.llm import prepare

    params = LLMParams(trainer="sft", model=str(llava), data_path=str(data), project_name=str(tmp_path / "p"))
    prep = prepare(params)
    codec, _ = image_codec(prep.processor, prep.data.template_source, prep.tokenizer)
    example = prep.data.train.example(0)
    assert example.input_ids == inputs["input_ids"][0].tolist()
    import torch

    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1].float()
    labels = torch.tensor(example.labels[1:])
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    assert mean_loss(model, [example], codec) == pytest.approx(float(expected), rel=1e-4)


def test_served_run_reads_images_sent_as_data_uris(capsys, tmp_path, llava):
    """`tunelab serve` on a vision-language run: the official openai client sends a local image as an image_url
    part holding a data: URI, as for OpenAI's own vision models; URLs are refused, not fetched."""
    openai = pytest.importorskip("openai")
    from tests.test_serve import running
    from tunelab.inference.generate import load_processor_of, load_run
    from tunelab.inference.openai_api import create_app

    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows())
    run = tmp_path / "run"
    train(capsys, llava, data, run, *LEARN, *LEARN_LORA)
    model, tokenizer = load_run(run)
    app = create_app(model, tokenizer, "vlm", processor=load_processor_of(run))
    with running(app) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        for name in COLORS:
            uri = "data:image/png;base64," + base64.b64encode((tmp_path / f"{name}.png").read_bytes()).decode()
            content = [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": "What color is this?"},
            ]
            answer = client.chat.completions.create(
                model="vlm", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0
            )
            assert answer.choices[0].message.content.startswith(f"It is {name}"), answer
        url = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
        with pytest.raises(openai.BadRequestError, match="URLs and files are not fetched"):
            client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": url}], max_tokens=2)


def test_a_template_that_skips_plain_strings_is_taught_them(capsys, tmp_path, llava):
    """LLaVA's own template writes nothing for a plain string content: the run's template takes one as a text part,
    so a text-only prompt (generate, chat, serve) reaches the model, and the turn end is found."""
    from tunelab.inference.generate import format_prompt, load_run
    from tunelab.models.turns import turn_end_marker

    color_images(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", color_rows(4))
    run = tmp_path / "run"
    train(capsys, llava, data, run, "--peft", "--max-steps", "1", "--block-size", "128")
    _, tokenizer = load_run(run)
    assert "Describe a cat." in format_prompt("Describe a cat.", tokenizer)
    assert turn_end_marker(tokenizer) == "<|im_end|>"


def test_images_in_the_valid_split_alone(capsys, tmp_path, llava):
    color_images(tmp_path)
    text_only = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}] * 4
    write_jsonl(tmp_path / "train.jsonl", text_only)
    write_jsonl(tmp_path / "valid.jsonl", color_rows(3))
    run = tmp_path / "run"
    train(capsys, llava, tmp_path / "train.jsonl", run, "--peft", "--valid-split", "valid", "--block-size", "128")
    assert "eval_loss" in json.loads((run / "metrics.json").read_text())


def test_vlm_command_with_an_autotrain_config(capsys, tmp_path, llava):
    """`tunelab vlm --config` with AutoTrain's own vlm config: its column_mapping stands, not the defaults."""
    import csv

    import yaml

    color_images(tmp_path)
    with open(tmp_path / "vqa.csv", "w", newline="", encoding="utf-8") as f:
        rows = [[f"{name}.png", "What color is this?", f"It is {name}."] for name in COLORS]
        csv.writer(f).writerows([["picture", "question", "answer"], *rows])
    config = {
        "task": "vlm:vqa",
        "base_model": str(llava),
        "project_name": str(tmp_path / "run"),
        "data": {
            "path": str(tmp_path / "vqa.csv"),
            "column_mapping": {"image_column": "picture", "prompt_text_column": "question", "text_column": "answer"},
        },
        "params": {"block_size": 128, "trainer": "vqa"},
    }
    (tmp_path / "vqa.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    code = main(["vlm", "--config", str(tmp_path / "vqa.yml"), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "3 examples" in out and "It is red." in out


def test_vlm_command_with_a_flat_config(capsys, tmp_path, llava):
    """A flat config naming its image column, given to `tunelab vlm`: trained by sft with the config's columns."""
    import yaml

    color_images(tmp_path)
    rows = [{"picture": f"{name}.png", "caption": f"A {name} square."} for name in COLORS]
    write_jsonl(tmp_path / "captions.jsonl", rows)
    config = {
        "model": str(llava),
        "data_path": str(tmp_path / "captions.jsonl"),
        "project_name": str(tmp_path / "run"),
        "image_column": "picture",
        "text_column": "caption",
        "block_size": 128,
    }
    (tmp_path / "flat.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    code = main(["vlm", "--config", str(tmp_path / "flat.yml"), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "3 examples" in out and "A red square." in out and "sft" in out


def test_a_base_model_s_template_takes_plain_strings_at_inference(tmp_path, llava):
    """A model never trained here (its own LLaVA-style template, lists only): a system message given as a string
    still reaches the prompt."""
    from tunelab.inference.generate import Prompting, format_prompt, image_prompt, load_run

    _, tokenizer = load_run(llava)
    text = format_prompt(image_prompt("What is it?", ["cat.png"]), tokenizer, Prompting(system="Be brief."))
    assert "Be brief." in text and "What is it?" in text and "<image>" in text


def test_plain_text_rows_that_write_the_image_token(capsys, tmp_path, llava):
    rows = [{"text": f"Row {i} of plain text."} for i in range(6)]
    rows[3]["text"] = "A <image> typed into plain text."
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    line = run_bad(capsys, llava, data, tmp_path / "run")
    assert f"{data} line 4, column 'text': its text holds 1 image place(s) ('<image>') for 0 image(s)" in line


def test_other_methods_on_a_lists_only_template_write_their_turns(tmp_path, llava):
    """dpo on text pairs with a vision-language model whose template writes nothing for a plain string: its prompt
    and answers are written (the template taught to take them as text parts, for every method)."""
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    pairs = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."} for i in range(4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    params = LLMParams(
        trainer="dpo", model=str(llava), data_path=str(data), project_name=str(tmp_path / "r"), peft=True
    )
    prep = prepare(params)
    pair = prep.data.train[0]
    assert "Question 0?" in prep.tokenizer.decode(pair.prompt_ids)
    assert "Good answer 0." in prep.tokenizer.decode(pair.chosen_ids)


def test_image_pixel_budget_is_set_on_the_processor_and_saved(capsys, tmp_path, llava, tiny_llama):
    """image_max_pixels (LLaMA-Factory's): Qwen2-VL's images scaled down to the budget before their tokens are counted
    (a 112x112 image: 16 tokens by default, 4 within 56x56 pixels), another prepared-data entry, and the run's saved
    processor sizes a later prompt's image the same way; a processor that sizes images otherwise, and a text model,
    refuse it."""
    from transformers import AutoProcessor

    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    qwen = build_tiny_qwen2_vl(tmp_path / "qwen")
    color_images(tmp_path)
    Image.new("RGB", (112, 112), COLORS["green"]).save(tmp_path / "big.png")
    data = write_jsonl(tmp_path / "train.jsonl", [turn("big.png", "green"), *color_rows(5)])
    common = dict(trainer="sft", model=str(qwen), data_path=str(data), peft=True)
    default = prepare(LLMParams(**common, project_name=str(tmp_path / "a")))
    fitted = prepare(LLMParams(**common, project_name=str(tmp_path / "b"), image_max_pixels=56 * 56))
    assert not fitted.prepared.hit and fitted.prepared.key != default.prepared.key
    assert default.data.train.example(0).images[0].count == 16
    assert fitted.data.train.example(0).images[0].count == 4
    run = tmp_path / "run"
    train(capsys, qwen, data, run, "--peft", "--max-steps", "1", "--block-size", "128", "--image-max-pixels", "3136")
    saved = AutoProcessor.from_pretrained(run)
    grid = saved.image_processor(images=[Image.open(tmp_path / "big.png")], return_tensors="np")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]  # 16 patches, 4 tokens once merged
    assert generate(capsys, run, tmp_path / "big.png")  # a prompt's image goes through the saved budget
    for model, extra, expected in (
        (llava, (), "sizes images its own way (a fixed size, or tiles), not by a pixel budget"),
        (tiny_llama, (), "reads text only"),
        (qwen, ("--trainer", "default"), "trainer default takes no images yet"),
    ):
        line = run_bad(capsys, model, data, tmp_path / "bad", "--image-max-pixels", "3136", *extra)
        assert expected in line, line


def test_streamed_rows_show_their_images(capsys, tmp_path, monkeypatch, vlm):
    """streaming: true on a vision-language model: each block's rows are read with their images as training reaches
    them (here the first blocks are text alone, the images come later), and the run learns to read them."""
    import tunelab.data

    monkeypatch.setattr(tunelab.data, "IMAGE_BLOCK_BYTES", 512)  # blocks of a few rows
    color_images(tmp_path)
    chat = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": chat}] * 4 + color_rows())
    run = tmp_path / "run"
    out, err = train(capsys, vlm, data, run, *LEARN, *LEARN_LORA, "--streaming")
    assert "streaming" in out + err
    for name in COLORS:
        assert generate(capsys, run, tmp_path / f"{name}.png").startswith(f"It is {name}"), name
