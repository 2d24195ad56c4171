"""Benchmark preparing chats that show images: rows/s of tunelab's data step for a vision-language model.

Writes N chat rows (--rows, default 2000), each showing one of 50 random-noise PNGs (--size px square, default
224), and prepares them for a tiny Qwen2-VL (built from a config, its real image processor: min_pixels 56x56,
max_pixels 112x112) through `tasks.llm.prepare` with an empty prepared-data cache, once per worker count (--workers,
default 1,2). Each image is opened and decoded, written into the text as the processor writes it, and tokenized;
the model's size does not enter (no weights load). Run from the repository root on an idle machine:

    PYTHONPATH=src .venv/bin/python bench/bench_images.py --rows 2000 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/vision_models.py builds the tiny model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224, help="Side of each square image, in pixels.")
    parser.add_argument("--workers", default="1,2", help="Worker counts to time (dataset_num_proc).")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from tests.vision_models import build_tiny_qwen2_vl
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    folder = Path(tempfile.mkdtemp(prefix="tunelab-bench-images-"))
    model = build_tiny_qwen2_vl(folder / "model")
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    for i in range(50):
        pixels = rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
    rows = []
    for i in range(args.rows):
        question = [{"type": "image", "image": f"images/{i % 50}.png"}, {"type": "text", "text": f"Describe {i}."}]
        answer = {"role": "assistant", "content": f"Noise, number {i}."}
        rows.append({"messages": [{"role": "user", "content": question}, answer]})
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"{args.rows} rows, {args.size}x{args.size} PNG images, {data.stat().st_size / 1024:.0f} KiB of JSONL")
    for workers in (int(w) for w in args.workers.split(",")):
        os.environ["TUNELAB_DATA_CACHE"] = tempfile.mkdtemp(prefix="tunelab-bench-cache-")
        params = LLMParams(
            trainer="sft",
            model=str(model),
            data_path=str(data),
            project_name=str(folder / "run"),
            peft=True,
            block_size=256,
            dataset_num_proc=workers,
        )
        started = time.perf_counter()
        prep = prepare(params)
        seconds = time.perf_counter() - started
        examples = len(prep.data.train)
        print(f"workers={workers}: {examples} examples in {seconds:.1f} s, {examples / seconds:.0f} rows/s")


if __name__ == "__main__":
    main()
