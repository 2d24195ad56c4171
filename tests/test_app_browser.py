"""The web app end to end in a real browser (Playwright driving Debian's chromium, headless).

An LLM project: the shared Alpaca sample uploaded, column mapping and the examples as trained, a parameter error
shown on its field, Start Training on a tiny model, the loss chart growing while it trains, completion, evaluation,
an answer in the chat box, base beside tuned, a GGUF exported and downloaded; "run again" at another learning
rate, the two runs compared (both curves, the `lr` difference); the app restarted with a job queued, found queued
and run. A text-classification project on the shared tweets: label counts, training, accuracy and the confusion
matrix, a typed text predicted. A screenshot of every page is kept in test-artifacts/app/."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA
from tests.test_app_api import running_app

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "app"
ALPACA = SHARED_DATA / "alpaca" / "train.jsonl"
TWEETS = SHARED_DATA / "sentiment"
ROWS = 300  # of the shared sample's 1,500: enough for a real run, quick to plan and upload
STEPS = 20  # long enough (a few seconds even on a fast machine) for the page to see the chart grow


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()
PlaywrightError: type[Exception] = Exception  # playwright's own, once it is imported
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"),
    pytest.mark.skipif(not ALPACA.is_file(), reason="../shared/data/alpaca/train.jsonl is not beside the clone"),
    pytest.mark.skipif(not TWEETS.is_dir(), reason="../shared/data/sentiment is not beside the clone"),
]


@pytest.fixture
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    # Chromium refuses its sandbox to root (CI containers); the page is our own app on loopback.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield browser
        browser.close()


def test_new_project_to_chat(browser, tiny_llama, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(ALPACA.read_text(encoding="utf-8").splitlines(keepends=True)[:ROWS]), encoding="utf-8")

    data_dir = tmp_path / "appdata"
    with running_app(data_dir, allowed_paths=[tiny_llama]) as client:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        shot = lambda name: page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # noqa: E731

        page.goto(client.base + "/")
        shot("1-runs-empty")
        page.click("text=New project")
        page.fill("#name", "browser-test")
        page.select_option("#trainer", "sft")
        page.fill("#model", str(tiny_llama))
        page.set_input_files("#data_file", str(data))
        shot("2-new-project")
        page.click("#create")

        page.wait_for_url("**/projects/*/data")
        assert page.locator("#rows tbody tr").count() == 5
        page.select_option("#prompt_text_column", "instruction")
        page.select_option("#text_column", "output")
        page.click("#preview")
        example = page.locator("pre.example").first
        assert example.locator("mark").count() >= 1  # the trained tokens, marked
        assert "<|im_start|>user" in example.inner_text()
        assert f"{ROWS} examples" in page.locator("#plan").inner_text()
        shot("3-data-preview")
        page.click("#next")

        page.wait_for_url("**/projects/*/params")
        page.fill("#lr", "fast")
        page.click("#check")
        assert "expected a number" in page.locator('.error[data-field="lr"]').inner_text()
        shot("4-params-error")
        settings = {"lr": "0.002", "max_steps": str(STEPS), "logging_steps": "1", "block_size": "256"}
        settings |= {"batch_size": "4", "gradient_accumulation": "2"}
        for name, value in settings.items():
            page.fill(f"#{name}", value)
        page.click("#check")
        assert f"{STEPS} in all" in page.locator("#plan").inner_text()
        shot("5-params-checked")
        page.click("#start")

        page.wait_for_url("**/jobs/*")
        # Watch the chart while the job runs: it must be redrawn with more points as steps are logged.
        seen: list[int] = []
        deadline = time.time() + 180
        while page.locator("#chat-form").count() == 0:  # the page reloads itself when the job completes
            assert time.time() < deadline, f"the job did not complete; chart sizes seen: {seen}"
            try:
                status = page.locator("#status").inner_text(timeout=2000)
                points = int(page.locator("#chart").get_attribute("data-points", timeout=2000) or 0)
            except PlaywrightError:  # the page is reloading
                continue
            if status == "running" and points and points not in seen:
                seen.append(points)
                if len(seen) == 1:
                    shot("6-job-running")
            time.sleep(0.2)
        assert len(seen) >= 2, f"the loss chart was not updated while the job ran (sizes seen: {seen})"
        assert page.locator("#status").inner_text() == "completed"
        # Every logged step drawn (by the completed page's first poll, so wait for it).
        page.wait_for_function(f"document.querySelectorAll('#chart circle.train').length === {STEPS}")
        assert "Evaluation" in page.locator("#evaluation").inner_text()
        assert page.locator("#metrics").inner_text().count("training loss") == 1
        assert "total_flos" not in page.locator("#metrics").inner_text()
        # The charts beyond the loss, drawn from the run's metrics.jsonl
        page.locator('#charts [data-chart="lr"] polyline').wait_for()
        assert page.locator('#charts [data-chart="memory"] polyline').count() == 1
        assert page.locator(".sample pre.base").count() >= 1  # the evaluation's samples, base beside tuned
        shot("7-job-completed")

        page.fill("#chat-input", "Give me three tips for staying healthy.")
        page.click("#chat-send")
        answer = page.locator(".turn.assistant:not(.pending)")
        answer.wait_for(timeout=60_000)
        assert answer.inner_text().strip() not in ("", "(an empty answer)")
        shot("8-chat")

        # A reasoning model's answer (here the app's answer replaced on its way to the page): its reasoning folded
        # away above the answer, and the whole text kept in the history sent with the next message.
        thought = "<think>\nTwo and two make four.\n</think>\n\n4"
        opened_by_the_template, cut_off = "Three and three.</think>6", "<think>Four and four make"
        answers = [thought, thought, opened_by_the_template, cut_off]
        sent: list[dict] = []

        def reasoned(route):
            sent.append(route.request.post_data_json)
            answer = answers[len(sent) - 1]
            route.fulfill(status=200, content_type="application/json", body=json.dumps({"answer": answer}))

        page.route("**/chat", reasoned)
        for i, question in enumerate(("What is 2+2?", "And 3+3?", "And 3+3?", "And 4+4?")):
            page.fill("#chat-input", question)
            page.click("#chat-send")
            page.locator(".turn.assistant:not(.pending) details.reasoning").nth(i).wait_for()
        page.unroute("**/chat")
        turns = page.locator(".turn.assistant")
        assert turns.nth(-2).inner_text().strip().endswith("6") and "</think>" not in turns.nth(-2).inner_text()
        assert "(no answer: the reasoning was cut off" in turns.nth(-1).inner_text()
        last = turns.nth(-3)
        assert last.locator("details.reasoning").inner_text().strip() == "reasoning"  # folded: the summary only
        last.locator("details.reasoning summary").click()
        assert "Two and two make four." in last.locator("details.reasoning").inner_text()
        assert last.inner_text().strip().endswith("4") and "<think>" not in last.inner_text()
        assert sent[1]["history"][-1] == {"role": "assistant", "content": thought}
        assert sent[3]["history"][-1] == {"role": "assistant", "content": opened_by_the_template}
        shot("8c-chat-reasoning")

        page.fill("#side-input", "What is the capital of France?")
        page.click("#side-send")
        page.wait_for_function("!document.getElementById('side-form').querySelector('button').disabled")
        base, tuned = page.locator("#side-base").inner_text(), page.locator("#side-tuned").inner_text()
        assert base.strip() and tuned.strip() and "…" not in (base, tuned)
        shot("8a-base-beside-tuned")

        # One button exports the finished job for Ollama: the Modelfile and the GGUF file to download.
        page.select_option("#export-dtype", "f16")
        page.click("#export")
        page.locator("#export-result a", has_text="Modelfile").wait_for(timeout=120_000)
        assert "ollama create NAME -f" in page.locator("#export-result").inner_text()
        gguf_link = page.locator("#export-result a", has_text="model.gguf").get_attribute("href")
        assert client.request("GET", gguf_link)[2][:4] == b"GGUF"
        shot("8b-export")

        first_job = page.url.rsplit("/", 1)[1]

        # Run again at another learning rate: the form comes filled with this job's parameters.
        page.click("#run-again")
        page.wait_for_url("**/params?from_job=*")
        assert page.locator("#max_steps").input_value() == str(STEPS)
        page.fill("#lr", "0.0005")
        page.click("#start")
        page.wait_for_url("**/jobs/*")
        second_job = page.url.rsplit("/", 1)[1]
        page.wait_for_selector("#chat-form", timeout=180_000)  # the page reloads itself when the job completes

        # Both runs compared: two loss curves, and lr is the one parameter that differs.
        page.goto(client.base + "/")
        assert page.locator("#jobs").inner_text().count("completed") == 2
        shot("9-runs")
        for job_id in (first_job, second_job):
            page.check(f'#jobs input[value="{job_id}"]')
        page.click("#compare")
        page.wait_for_url("**/compare?*")
        page.locator("#charts[data-loaded]").wait_for()
        assert page.locator('[data-chart="loss"] polyline').count() == 2
        assert [row.get_attribute("data-param") for row in page.locator("#param-diff tr[data-param]").all()] == ["lr"]
        assert "0.0005" in page.locator('#param-diff tr[data-param="lr"]').inner_text()
        shot("10-compare")
        assert page.locator("#machine[data-loaded]").count() == 1  # the machine panel, on every page
        assert "disk free" in page.locator("#machine").inner_text()

    # A job queued while no worker runs, then the app restarted: the job is still there, queued, and runs.
    with running_app(data_dir, allowed_paths=[tiny_llama], start_worker=False) as client:
        page.goto(f"{client.base}/jobs/{second_job}")
        page.click("#run-again")
        page.click("#start")
        page.wait_for_url("**/jobs/*")
        queued_job = page.url.rsplit("/", 1)[1]
        assert page.locator("#status").inner_text() == "queued"
    with running_app(data_dir, allowed_paths=[tiny_llama]) as client:
        page.goto(f"{client.base}/jobs/{queued_job}")
        shot("11-queued-after-restart")
        page.wait_for_selector("#chat-form", timeout=180_000)
        assert page.locator("#status").inner_text() == "completed"


def test_text_classification_from_the_tweets(browser, tiny_llama, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", 240), ("valid", 60)):
        lines = (TWEETS / f"{split}.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        (tmp_path / f"{split}.csv").write_text("".join(lines[: rows + 1]), encoding="utf-8")

    with running_app(tmp_path / "appdata", allowed_paths=[tiny_llama]) as client:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        shot = lambda name: page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # noqa: E731
        page.goto(client.base + "/projects/new")
        page.fill("#name", "tweets")
        page.select_option("#trainer", "text_classification")
        page.fill("#model", str(tiny_llama))
        page.set_input_files("#data_file", str(tmp_path / "train.csv"))
        page.set_input_files("#valid_file", str(tmp_path / "valid.csv"))
        page.click("#create")

        page.wait_for_url("**/projects/*/data")
        assert page.locator("#target_column").input_value() == "label"
        counts = page.locator("#label-counts").inner_text()
        assert all(label in counts for label in ("negative", "neutral", "positive"))
        shot("c1-classification-data")
        page.click("#next")

        page.wait_for_url("**/projects/*/params")
        for name, value in {"max_steps": "8", "batch_size": "8", "max_seq_length": "64", "lr": "0.001"}.items():
            page.fill(f"#{name}", value)
        page.fill("#logging_steps", "1")
        page.click("#start")
        page.wait_for_url("**/jobs/*")
        page.wait_for_selector("#predict-form", timeout=180_000)
        scores = page.locator("#classifier-scores").inner_text()
        assert "accuracy" in scores and "macro F1" in scores
        cells = [int(td.inner_text()) for td in page.locator("#confusion td").all()]
        assert len(cells) == 9 and sum(cells) == 60
        page.locator('#charts [data-chart="accuracy"] polyline').first.wait_for(state="attached")
        shot("c2-classification-job")

        page.fill("#predict-input", "What a wonderful day, I love it!")
        page.click("#predict")
        page.locator("#predicted-label").wait_for()
        assert page.locator("#predicted-label").inner_text() in ("negative", "neutral", "positive")
        assert page.locator("#prediction .probability").count() == 3
        shot("c3-classification-predict")
    assert len(list(ARTIFACTS.glob("*.png"))) >= 15
