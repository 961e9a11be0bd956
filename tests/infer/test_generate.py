"""`generate` writes one line per record, renders with the saved template, and batches without changing answers."""

import json

import pytest

from tunelab.cli import main
from tunelab.data.encode import Encoder
from tunelab.infer.generate import generate_cases, read_cases, run_generate
from tunelab.infer.load import load_inference


@pytest.fixture(scope="module")
def full(memorised):
    return load_inference(str(memorised / "full"))


def test_every_record_gets_its_prediction_and_stops(pairs, full, memorised):
    cases = run_generate(full, read_cases(str(memorised / "qa.jsonl")), max_new_tokens=30, progress=False)
    label = full.variants[0].label
    assert [(c.prompt.messages[-1].content, c.reference) for c in cases] == pairs
    assert [c.predictions[label] for c in cases] == [a for _, a in pairs]
    assert all(c.stopped[label] for c in cases)


def test_left_padded_batches_answer_like_one_at_a_time(full, memorised):
    label = full.variants[0].label
    one, three = read_cases(str(memorised / "qa.jsonl")), read_cases(str(memorised / "qa.jsonl"))
    generate_cases(full, full.variants[0], one, max_new_tokens=12, batch_size=1, progress=False)
    generate_cases(full, full.variants[0], three, max_new_tokens=12, batch_size=3, progress=False)
    assert [c.predictions[label] for c in one] == [c.predictions[label] for c in three]


def test_prompt_is_what_training_rendered(full, memorised):
    variant = full.variants[0]
    case = read_cases(str(memorised / "qa.jsonl"))[0]
    encoder = Encoder(variant.tokenizer)
    trained = encoder.encode(case.conversation)
    answer_start = next(i for i, x in enumerate(trained.labels) if x != -100)
    assert encoder.prompt_ids(case.prompt) == trained.input_ids[:answer_start]


def test_cli_writes_one_line_per_record_and_one_column_per_adapter(pairs, memorised, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    code = main(
        [
            "generate",
            "--model",
            str(memorised / "full"),
            "--adapter",
            "none",
            "--adapter",
            str(memorised / "lora"),
            "--dataset",
            str(memorised / "qa.jsonl"),
            "--output",
            str(out),
            "--max-new-tokens",
            "20",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(pairs)
    assert set(rows[0]["predictions"]) == {"base", "lora"}
    assert rows[0]["prompt"][-1] == {"role": "user", "content": pairs[0][0]}
    assert rows[0]["reference"] == pairs[0][1]
    assert rows[0]["predictions"]["base"] == pairs[0][1]  # the base here is the memorising full fine-tune


def test_single_model_lines_hold_prediction_and_stopped(memorised, tmp_path):
    out = tmp_path / "pred.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(memorised / "lora"),
                "--dataset",
                str(memorised / "qa.jsonl"),
                "--output",
                str(out),
                "--max-new-tokens",
                "20",
            ]
        )
        == 0
    )
    row = json.loads(out.read_text().splitlines()[0])
    assert set(row) == {"source", "prompt", "reference", "prediction", "stopped"}


@pytest.mark.parametrize("case", ["missing_model", "missing_adapter", "other_base", "empty", "batch"])
def test_bad_input_is_one_line_and_exit_2(case, memorised, qwen2_dir, tmp_path, capsys):
    data = str(memorised / "qa.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = {
        "missing_model": ["--model", str(tmp_path / "nope"), "--dataset", data],
        "missing_adapter": ["--model", str(memorised / "full"), "--adapter", str(tmp_path / "nope"), "--dataset", data],
        "other_base": ["--model", qwen2_dir, "--adapter", str(memorised / "lora"), "--dataset", data],
        "empty": ["--model", str(memorised / "full"), "--dataset", str(empty)],
        "batch": ["--model", str(memorised / "full"), "--dataset", data, "--batch-size", "0"],
    }[case]
    assert main(["generate", *args, "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunelab: error:") and "\n" not in err and "Traceback" not in err
