"""`--trainer distill`: a model learns a teacher's next-token distributions on the data's answers.

The loss and its gradients equal TRL's GKDTrainer.generalized_jsd_loss computed on the full logits, for forward
KL, reverse KL and the JSD between, at any temperature; a student distilled from a teacher that learned an answer
by heart writes that answer; a teacher that cannot be compared token by token is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import build_tiny_llama, learn_by_heart, read_metrics, resized_copy, train_losses
from tests.test_bad_input import assert_nothing_written, cli_args, error_line
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.config.llm import LLMParams
from tunelab.errors import ConfigError
from tunelab.inference.generate import GenerationParams, generate, load_run
from tunelab.speed.divergence import divergence_sum, divergence_sum_plain

CASES = [(0.0, 1.0, 0.0), (1.0, 1.0, 0.0), (0.5, 2.0, 0.0), (0.1, 0.7, 0.5)]  # beta, temperature, ce_weight


def _trl_loss(student_logits, teacher_logits, target, beta, temperature, ce_weight):
    """TRL's generalized JSD over the rows (its "batchmean": the mean over positions), summed back, plus the
    cross-entropy term written out."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="trl is a test tool (scripts/install.sh)")
    labels = target[None]
    mean = gkd.GKDTrainer.generalized_jsd_loss(
        student_logits[None], teacher_logits[None], labels=labels, beta=beta, temperature=temperature
    )
    ce = torch.nn.functional.cross_entropy(student_logits, target, reduction="sum")
    return mean * len(target) + ce_weight * ce


@pytest.mark.parametrize(("beta", "temperature", "ce_weight"), CASES)
def test_the_loss_and_its_gradients_equal_trls(beta, temperature, ce_weight):
    """Chunked from hidden states (with a head bias, and rows over several chunks), or from full logits: the
    summed loss and the gradients of the hidden states and the head equal TRL's on the full logits."""
    torch.manual_seed(0)
    rows, width, vocab = 300, 24, 500
    hidden = torch.randn(rows, width, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(width, vocab, dtype=torch.float64)
    teacher_hidden = torch.randn(rows, 16, dtype=torch.float64)
    teacher_head = torch.nn.Linear(16, vocab, bias=False, dtype=torch.float64)
    target = torch.randint(vocab, (rows,))
    settings = (beta, temperature, ce_weight)

    expected = _trl_loss(head(hidden), teacher_head(teacher_hidden).detach(), target, *settings)
    expected_grads = torch.autograd.grad(expected, (hidden, head.weight, head.bias))
    import tunelab.speed.divergence as divergence

    chunked_rows = divergence.chunk_rows
    divergence.chunk_rows = lambda vocab_size: 64 * 4  # chunks of 64 rows: five of them, the last one short
    try:
        got = divergence_sum(
            hidden, head, teacher_hidden, teacher_head, target, *settings, torch.float64, torch.float64
        )  # fmt: skip
    finally:
        divergence.chunk_rows = chunked_rows
    got_grads = torch.autograd.grad(got, (hidden, head.weight, head.bias))
    plain = divergence_sum_plain(head(hidden), teacher_head(teacher_hidden).detach(), target, *settings)
    plain_grads = torch.autograd.grad(plain, (hidden, head.weight, head.bias))
    # the chunks' logits are float32 whatever the inputs (as the cross-entropy's): float32's rounding
    for value, grads in ((got, got_grads), (plain, plain_grads)):
        assert torch.allclose(value, expected.to(value.dtype), rtol=1e-6), (float(value), float(expected))
        for grad, want in zip(grads, expected_grads, strict=True):
            assert (grad - want).abs().max() < 1e-6 * want.abs().max()


def test_a_student_distilled_from_a_teacher_writes_the_teachers_answer(reasoner, tiny_llama, tmp_path):
    """The teacher learned to reason before it answers (the `reasoner` run); a fresh student, trained only on the
    teacher's distributions (no cross-entropy), answers as the teacher does. The loss is the divergence: it falls
    towards 0, and no perplexity is made of it."""
    data = reasoner.parent / "reasoning.jsonl"
    run = tmp_path / "student"
    code = main(
        [
            "llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "distill",
            "--teacher-model", str(reasoner), "--chat-template", "chatml", "--lr", "3e-3", "--epochs", "40",
            "--batch-size", "8", "--gradient-accumulation", "1", "--block-size", "128", "--project-name", str(run),
            "--disable-gradient-checkpointing", "--logging-steps", "10",
        ]
    )  # fmt: skip
    assert code == 0
    losses = train_losses(run)
    assert losses[-1] < 0.05 * losses[0]
    assert not any("perplexity" in key for record in read_metrics(run) for key in record)
    assert json.loads((run / "tunelab_run.json").read_text())["teacher_model"] == str(reasoner)
    teacher, tokenizer = load_run(reasoner)
    student, _ = load_run(run)
    params = GenerationParams(max_new_tokens=40)
    for prompt in ("What is 2+2?",):
        assert generate(student, tokenizer, prompt, params) == generate(teacher, tokenizer, prompt, params)


def test_a_lora_student_learns_alike_through_the_chunks_and_the_full_logits(reasoner, tiny_llama, tmp_path, capsys):
    """With LoRA, reverse KL: the loss falls, the same step by step whether the heads are projected in chunks
    (fast_loss) or as full logits; the dry run counts the teacher's weights."""
    data = reasoner.parent / "reasoning.jsonl"
    common = [
        "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "distill", "--teacher-model",
        str(reasoner), "--chat-template", "chatml", "--block-size", "128", "--distill-beta", "1",
    ]  # fmt: skip
    assert main(["llm", "--dry-run", *common, "--project-name", str(tmp_path / "plan")]) == 0
    assert "the teacher's weights: 0.00 GiB" in capsys.readouterr().out
    flags = ["--peft", "--lr", "2e-2", "--epochs", "10", "--batch-size", "8", "--gradient-accumulation", "1"]
    runs = {}
    for fast in ("true", "false"):
        runs[fast] = tmp_path / f"fast-{fast}"
        args = [*common, *flags, "--fast-loss", fast, "--logging-steps", "5", "--project-name", str(runs[fast])]
        assert main(["llm", "--train", *args]) == 0
    chunked, full = train_losses(runs["true"]), train_losses(runs["false"])
    assert chunked[-1] < chunked[0]
    assert torch.allclose(torch.tensor(chunked), torch.tensor(full), rtol=1e-4)


def test_on_policy_distillation_corrects_the_models_own_answer(reasoner, tiny_llama, tmp_path):
    """distill_lmbda 1: every answer trained on is one the model writes itself from the row's prompt, the teacher's
    distributions learned at its tokens (GKD's on-policy setting, its default JSD). A student that learned a wrong
    answer by heart ("five") is corrected where it goes wrong ("four"), having never read the right answer."""
    import tunelab
    from tunelab.methods.distill import DistillTrainer

    chat = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "5", "reasoning_content": "Two and two make five."},
    ]
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text((json.dumps({"messages": chat}) + "\n") * 16)
    student = learn_by_heart(tiny_llama, wrong, tmp_path / "wrong", "chatml", block_size=128)
    teacher, tokenizer = load_run(reasoner)
    generation = GenerationParams(max_new_tokens=40)
    said = generate(load_run(student)[0], tokenizer, "What is 2+2?", generation)[0]
    assert said.startswith("<think>\nTwo and two make five.")

    seen = []
    answered_by = DistillTrainer.answered_by

    def watched(self, writer, batch, index):
        new = answered_by(self, writer, batch, index)
        seen.append((batch, new, writer is self.teacher))
        return new

    params = LLMParams(
        model=str(student), data_path=str(reasoner.parent / "reasoning.jsonl"), trainer="distill",
        teacher_model=str(reasoner), chat_template="chatml", lr=2e-3, epochs=40, batch_size=8,
        gradient_accumulation=1, block_size=128, project_name=str(tmp_path / "student"),
        disable_gradient_checkpointing=True, logging_steps=10, distill_lmbda=1.0, distill_beta=0.5,
        max_completion_length=32,
    )  # fmt: skip
    DistillTrainer.answered_by = watched
    try:
        run = tunelab.train(params)
    finally:
        DistillTrainer.answered_by = answered_by
    assert len(seen) == 80 and not any(by_teacher for *_, by_teacher in seen)  # every micro-batch, by the model
    data_batch, sampled, _ = seen[0]
    trained = sampled["labels"][0] != -100
    first = int(trained.nonzero()[0])
    # the row's prompt kept (up to the data's answer), the answer the model's own: its wrong one, not the data's
    assert sampled["input_ids"][0, :first].tolist() == data_batch["input_ids"][0, :first].tolist()
    assert (data_batch["labels"][0, :first] == -100).all() and data_batch["labels"][0, first] != -100
    rows = zip(sampled["input_ids"], sampled["labels"], strict=True)
    answers = [tokenizer.decode(ids[labels != -100]) for ids, labels in rows]
    assert any("make five" in answer for answer in answers), answers  # (sampled at temperature 1: not all)
    losses = train_losses(run)
    assert losses[-1] < 0.5 * losses[0]
    corrected = generate(load_run(run)[0], tokenizer, "What is 2+2?", generation)[0]
    assert corrected.startswith("<think>\nTwo and two make four"), corrected


def test_sequence_level_kd_trains_on_the_teachers_answers_beside_the_models(reasoner, tiny_llama, tmp_path):
    """distill_lmbda 0.5 with distill_seq_kd: each micro-batch is answered by the model or, otherwise, by the
    teacher (the teacher's answer is its own: it says four), drawn again the same way in a second run."""
    import tunelab
    from tunelab.methods.distill import DistillTrainer

    writers = []
    answered_by = DistillTrainer.answered_by

    def watched(self, writer, batch, index):
        new = answered_by(self, writer, batch, index)
        answers = [ids[labels != -100] for ids, labels in zip(new["input_ids"], new["labels"], strict=True)]
        writers.append((writer is self.teacher, [self.processing_class.decode(a) for a in answers]))
        return new

    DistillTrainer.answered_by = watched
    try:
        for name in ("first", "again"):
            params = LLMParams(
                model=str(tiny_llama), data_path=str(reasoner.parent / "reasoning.jsonl"), trainer="distill",
                teacher_model=str(reasoner), chat_template="chatml", epochs=4, batch_size=4,
                gradient_accumulation=1, block_size=128, project_name=str(tmp_path / name),
                disable_gradient_checkpointing=True, distill_lmbda=0.5, distill_seq_kd=True, max_completion_length=24,
            )  # fmt: skip
            tunelab.train(params)
    finally:
        DistillTrainer.answered_by = answered_by
    first, again = writers[:16], writers[16:]
    assert [by for by, _ in first] == [by for by, _ in again]  # the same draws from the same seed
    assert {by for by, _ in first} == {True, False}
    teachers = [answer for by, answers in first if by for answer in answers]
    assert any("four" in answer for answer in teachers), teachers


def test_distill_settings_are_checked_before_anything_loads():
    for bad, said in [
        (dict(trainer="distill"), "trainer distill needs teacher_model"),
        (dict(trainer="sft", teacher_model="x"), "teacher_model is read by trainer distill, not sft"),
        (dict(trainer="distill", teacher_model="x", distill_beta=1.5), "distill_beta must be in [0, 1]"),
        (dict(trainer="distill", teacher_model="x", distill_temperature=0), "distill_temperature must be positive"),
        (dict(trainer="distill", teacher_model="x", add_tokens="<a>"), "the teacher has no rows for tokens"),
        (dict(trainer="distill", teacher_model="x", distill_lmbda=2), "distill_lmbda is a share of micro-batches"),
        (dict(trainer="distill", teacher_model="x", distill_lmbda=0.5, packing=True), "with packing a row holds"),
        (dict(trainer="distill", teacher_model="x", distill_seq_kd=True, completion_only_loss=False), "leaves"),
        (dict(trainer="distill", teacher_model="x", distill_lmbda=1, distill_ce_weight=1), "its own samples"),
        (dict(trainer="sft", distill_lmbda=0.5), "distill_lmbda is read by trainer distill, not sft"),
    ]:
        with pytest.raises(ConfigError, match=said.replace("[", r"\[").replace("]", r"\]")):
            LLMParams(**bad)
    trl_spelling = load_config({"trainer": "distill", "teacher_model_name_or_path": "t"})
    assert trl_spelling.teacher_model == "t"


@pytest.mark.parametrize("kind", ["vocabulary", "tokenizer"])
def test_a_teacher_that_reads_other_tokens_is_refused_in_one_line(capsys, tiny_llama, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    if kind == "vocabulary":  # the same tokenizer, a head 8 rows short of it
        rows = AutoModelForCausalLM.from_pretrained(tiny_llama).get_input_embeddings().weight.shape[0]
        teacher = resized_copy(tiny_llama, tmp_path / "short", rows - 8)
        said = f"teacher_model {teacher} predicts over {rows - 8:,} tokens, fewer than the {rows:,} of model"
    else:  # the same vocabulary size, one token moved
        teacher = build_tiny_llama(tmp_path / "teacher")
        vocab_file = json.loads((teacher / "tokenizer.json").read_text())
        vocab = vocab_file["model"]["vocab"]
        first, second = sorted(vocab, key=vocab.get)[100:102]
        vocab[first], vocab[second] = vocab[second], vocab[first]
        (teacher / "tokenizer.json").write_text(json.dumps(vocab_file))
        said = f"teacher_model {teacher} has another tokenizer than model {tiny_llama}"
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n")
    project = tmp_path / "run"
    capsys.readouterr()  # the setup's own loading bars: only the run's stderr is judged
    line = error_line(
        capsys, main(cli_args(tiny_llama, data, project, "--trainer", "distill", "--teacher-model", str(teacher)))
    )
    assert said in line
    assert_nothing_written(project)


def test_a_teacher_with_a_padded_vocabulary_teaches_the_same(reasoner, tiny_llama, tmp_path):
    """Qwen2.5's small models have 151,936 rows and its large ones 152,064, one tokenizer: the distributions are
    compared over the ids both heads have, so a teacher padded with spare rows gives the very same run."""
    from transformers import AutoModelForCausalLM

    rows = AutoModelForCausalLM.from_pretrained(reasoner).get_input_embeddings().weight.shape[0]
    padded = resized_copy(reasoner, tmp_path / "padded", rows + 64)
    losses = []
    for teacher in (reasoner, padded):
        run = tmp_path / f"from-{teacher.name}"
        code = main(
            [
                "llm", "--train", "--model", str(tiny_llama), "--data-path", str(reasoner.parent / "reasoning.jsonl"),
                "--trainer", "distill", "--teacher-model", str(teacher), "--chat-template", "chatml", "--lr", "3e-3",
                "--max-steps", "4", "--batch-size", "8", "--gradient-accumulation", "1", "--block-size", "128",
                "--project-name", str(run), "--logging-steps", "1", "--distill-beta", "0.5",
            ]
        )  # fmt: skip
        assert code == 0
        losses.append(train_losses(run))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_tokens_the_teacher_rules_out_add_nothing():
    """A teacher logit of -inf (a token it never writes): probability 0, so 0 in the divergence, not 0 x -inf."""
    torch.manual_seed(0)
    hidden = torch.randn(8, 6, requires_grad=True)
    head = torch.nn.Linear(6, 10, bias=False)
    teacher_logits = torch.randn(8, 10)
    teacher_logits[:, 3] = float("-inf")
    target = torch.randint(10, (8,))
    for beta in (0.0, 0.5):
        plain = divergence_sum_plain(head(hidden), teacher_logits, target, beta, 1.0, 0.0)
        finite = teacher_logits.clone()
        finite[:, 3] = -1e4  # as good as ruled out
        assert torch.isfinite(plain) and torch.allclose(
            plain, divergence_sum_plain(head(hidden), finite, target, beta, 1.0, 0.0), rtol=1e-5
        )
        (grad,) = torch.autograd.grad(plain, hidden)
        assert torch.isfinite(grad).all()
