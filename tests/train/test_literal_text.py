"""A dataset where a few records mention control tokens trains whole, on real templates, and chat agrees.

1,000 records; every 100th asks about `<|im_end|>` / `<|eot_id|>` / `<end_of_turn>` in both the question
and the answer. None is refused; each sample has exactly the template's end-of-turn ids; the literal
text is trained as the characters it is; chat renders such a prompt to the very tokens training saw.
"""

from __future__ import annotations

import json

import pytest
import real_tokenizers

from tunelab.config import from_dict
from tunelab.constants import IGNORE_INDEX
from tunelab.data.dataset import build_datasets
from tunelab.data.encode import special_tokens
from tunelab.data.tokenizer import prepare_tokenizer
from tunelab.infer.chat import ChatSession
from tunelab.train.run import train

FAMILIES = {"qwen2.5-instruct": "<|im_end|>", "llama-3.2-3b-instruct": "<|eot_id|>", "gemma-3-4b-it": "<end_of_turn>"}
LITERALS = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"]


def records() -> list[dict]:
    rows = []
    for i in range(1000):
        if i % 100 == 0:
            lit = LITERALS[(i // 100) % 3]
            question, answer = f"What does {lit} do in a chat template?", f"{lit} marks the end of a turn."
        else:
            question, answer = f"What is {i} plus {i}?", f"It is {2 * i}."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_records_mentioning_control_tokens_train_as_plain_text(family, tmp_path):
    if not real_tokenizers.available(family):
        pytest.skip(f"../shared/tokenizers/{family} not present")
    from tunelab.demo.build import build_tiny_model

    tok = real_tokenizers.load(family, tmp_path / "tok")
    model = build_tiny_model(tmp_path / "model", tok, "qwen2", hidden=16, layers=1, heads=2)
    data = tmp_path / "data.jsonl"
    rows = records()
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = from_dict(
        dict(
            model=str(model),
            dataset=str(data),
            output_dir=str(tmp_path / "run"),
            max_steps=2,
            per_device_train_batch_size=4,
            logging_steps=1,
            save_steps=1000,
        )
    )

    tokenizer, _, _ = prepare_tokenizer(cfg)
    built = build_datasets(cfg, tokenizer)
    controls = set(special_tokens(tokenizer))
    mentions = [i for i in range(0, 1000, 100) if LITERALS[(i // 100) % 3] in controls]
    assert len(built.train) == 1000 and built.stats.literal_text == len(mentions) >= 3
    eot = tokenizer.convert_tokens_to_ids(FAMILIES[family])
    plain_turns = built.train[1].input_ids.count(eot)  # a record without literal text: the template's own turns
    assert plain_turns >= 2
    for i in range(0, 1000, 100):
        sample = built.train[i]
        assert sample.literal_text == (i in mentions)
        assert sample.input_ids.count(eot) == plain_turns, f"record {i}: control ids come from the template alone"
        trained = tokenizer.decode(
            [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX], skip_special_tokens=False
        )
        assert rows[i]["messages"][1]["content"] in trained, trained

    result = train(cfg)
    assert result.summary["train_samples"] == 1000 and result.summary["global_step"] == 2

    session = ChatSession.load(str(result.output_dir))
    for i in mentions:
        prompt = session.prompt_ids([{"role": "user", "content": rows[i]["messages"][0]["content"]}])
        assert built.train[i].input_ids[: len(prompt)] == prompt, "chat renders the prompt training saw"
        assert prompt.count(eot) == plain_turns - 1, "every turn before the answer, and no more"
