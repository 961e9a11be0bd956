"""`eval`: loss on the trained tokens, generation metrics, the does-it-stop share, one row per model."""

import json
import math

import pytest
import torch

from tunelab.cli import main
from tunelab.data.encode import Encoder
from tunelab.eval.evaluate import eval_loss, evaluate
from tunelab.infer.generate import read_cases
from tunelab.infer.load import load_inference


def test_memorised_model_scores_perfectly_and_always_stops(memorised):
    im = load_inference(str(memorised / "full"))
    (row,) = evaluate(im, read_cases(str(memorised / "qa.jsonl")), max_new_tokens=30, progress=False)
    assert row["exact_match"] == row["bleu-4"] == row["rouge-l"] == 100.0
    assert row["stopped_pct"] == 100.0
    assert row["perplexity"] == pytest.approx(math.exp(row["eval_loss"]))
    assert row["eval_loss"] < 0.5


def test_loss_is_mean_over_trained_tokens_only(memorised):
    im = load_inference(str(memorised / "full"))
    variant, cases = im.variants[0], read_cases(str(memorised / "qa.jsonl"))
    loss, count = eval_loss(im, variant, cases, batch_size=2, progress=False)
    total, n = 0.0, 0
    encoder = Encoder(variant.tokenizer)
    for case in cases:  # one sample at a time, the model's own loss: no padding involved
        s = encoder.encode(case.conversation)
        out = im.model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels]))
        k = sum(1 for x in s.labels[1:] if x != -100)
        total, n = total + float(out.loss) * k, n + k
    assert count == n
    assert loss == pytest.approx(total / n, rel=1e-4)


def test_random_model_never_stops(qwen2_dir, memorised):
    im = load_inference(qwen2_dir)
    (row,) = evaluate(im, read_cases(str(memorised / "qa.jsonl")), max_new_tokens=4, progress=False)
    assert row["stopped_pct"] < 100.0
    assert row["exact_match"] == 0.0


def test_cli_compares_base_and_adapter_in_one_table(pairs, memorised, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                str(memorised / "full"),
                "--adapter",
                "none",
                "--adapter",
                str(memorised / "lora"),
                "--dataset",
                str(memorised / "qa.jsonl"),
                "--max-new-tokens",
                "20",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| model | samples | eval_loss | perplexity | exact_match")
    assert "| base |" in table and "| lora |" in table
    assert "exact_match, bleu-4, rouge-1/2/l: percent (0-100)" in table  # the units, under the table and in eval.md
    assert "percent (0-100)" in (out / "eval.md").read_text()
    rows = json.loads((out / "eval.json").read_text())
    assert [r["model"] for r in rows] == ["base", "lora"]
    assert (out / "eval.csv").read_text().count("\n") == 3
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(pairs)


def test_eval_loss_is_trainings_chunked_loss_and_builds_no_full_logits(memorised, monkeypatch):
    """batch x length x vocabulary logits never exist in eval: the head runs at trained positions only."""
    im = load_inference(str(memorised / "full"))
    variant, cases = im.variants[0], read_cases(str(memorised / "qa.jsonl"))
    encoder = Encoder(variant.tokenizer)
    total, n = 0.0, 0
    with torch.no_grad():
        for case in cases:
            s = encoder.encode(case.conversation)
            out = im.model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels]))
            k = sum(1 for x in s.labels[1:] if x != -100)
            total, n = total + float(out.loss) * k, n + k
    head = im.model.get_output_embeddings()

    def refuse(*args, **kwargs):
        raise AssertionError("lm_head ran over every position")

    monkeypatch.setattr(head, "forward", refuse)
    loss, count = eval_loss(im, variant, cases, batch_size=3, progress=False)
    assert count == n and loss == pytest.approx(total / n, rel=1e-5)
