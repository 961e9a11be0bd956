"""`tunelab eval` on preference pairs: pref_accuracy and the log-prob margin per model variant, computed on the
tokens a preference run scores, checked against a hand computation with transformers' own chat template."""

import json

import pytest
import torch

from tunelab.cli import main
from tunelab.eval.preference import evaluate_preferences, is_preference_data, read_pairs
from tunelab.infer.load import load_inference

WRONG = ["Rome is the capital.", "The sky is green.", "Five."]


@pytest.fixture()
def pair_file(tmp_path, pairs):
    rows = [
        {"messages": [{"role": "user", "content": q}], "chosen": a, "rejected": w} for (q, a), w in zip(pairs, WRONG)
    ]
    rows.append({"messages": [{"role": "user", "content": pairs[0][0]}], "chosen": WRONG[0], "rejected": pairs[0][1]})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _by_hand(model, tokenizer, question: str, answer: str) -> float:
    """Summed log-prob of the answer's tokens (and the end-of-turn) after the rendered prompt."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
    )
    ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    eot = full.index(answer) + len(answer)
    end = len(tokenizer(full[:eot], add_special_tokens=False)["input_ids"]) + 1  # the end-of-turn token too
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return float(sum(logps[t - 1, ids[0, t]] for t in range(start, end)))


def test_pref_accuracy_and_margin_equal_a_hand_computation(memorised, pairs, pair_file):
    im = load_inference(str(memorised / "full"))
    (row,) = evaluate_preferences(im, read_pairs(pair_file), progress=False)
    model, tok = im.model, im.variants[0].tokenizer
    questions = [q for q, _ in pairs] + [pairs[0][0]]
    chosen = [a for _, a in pairs] + [WRONG[0]]
    rejected = WRONG + [pairs[0][1]]
    c = [_by_hand(model, tok, q, a) for q, a in zip(questions, chosen)]
    r = [_by_hand(model, tok, q, a) for q, a in zip(questions, rejected)]
    assert row["pairs"] == 4
    assert row["pref_accuracy"] == pytest.approx(sum(x > y for x, y in zip(c, r)) / 4)
    assert row["pref_accuracy"] == 0.75  # the memorised answers win; the swapped last pair loses
    assert row["logp_margin"] == pytest.approx(sum(x - y for x, y in zip(c, r)) / 4, abs=1e-3)
    assert row["logps/chosen"] == pytest.approx(sum(c) / 4, abs=1e-3)


def test_cli_eval_compares_the_base_and_the_adapter_on_pairs(memorised, pair_file, tmp_path, capsys):
    assert is_preference_data(pair_file)
    code = main(
        [
            "eval",
            "--model",
            str(memorised / "full"),
            "--adapter",
            "none",
            "--adapter",
            str(memorised / "lora"),
            "--dataset",
            pair_file,
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "pref_accuracy" in printed
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["pairs"] for r in rows] == [4, 4] and len({r["model"] for r in rows}) == 2
    assert all(r["pref_accuracy"] == 0.75 for r in rows)
