"""Chat renders prompts with the template saved beside the weights and stops on the saved stop ids."""

import builtins

import pytest

from tunelab.config import from_dict
from tunelab.infer.chat import ChatSession, interactive
from tunelab.train.run import train

PAIRS = [("Capital of France?", "Paris is the capital."), ("Colour of the sky?", "The sky is blue."),
         ("Two plus two?", "Four.")]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, llama_dir):
    """A tiny model fully fine-tuned until it knows three answers, then a LoRA on top."""
    import json

    root = tmp_path_factory.mktemp("chat")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in PAIRS))
    common = dict(dataset=str(data), per_device_train_batch_size=3, logging_steps=10, lr_scheduler_type="constant")
    train(from_dict(dict(model=llama_dir, output_dir=str(root / "full"), finetuning_type="full",
                         max_steps=60, learning_rate=3e-3, **common)))
    train(from_dict(dict(model=str(root / "full"), output_dir=str(root / "lora"), max_steps=5,
                         learning_rate=1e-3, **common)))
    return root


def test_full_model_answers_exactly_and_stops(memorised):
    session = ChatSession.load(str(memorised / "full"))
    for question, answer in PAIRS:
        assert session.ask(question, max_new_tokens=40) == answer


def test_stop_ids_come_from_the_run_folder(memorised):
    session = ChatSession.load(str(memorised / "full"))
    assert session.tokenizer.convert_tokens_to_ids("<|im_end|>") in session.stop_ids


def test_lora_run_folder_finds_its_base_and_template(memorised):
    alone = ChatSession.load(str(memorised / "lora"))
    explicit = ChatSession.load(str(memorised / "full"), adapter=str(memorised / "lora"))
    question = PAIRS[0][0]
    assert alone.ask(question, max_new_tokens=20) == explicit.ask(question, max_new_tokens=20)
    assert alone.prompt_ids([{"role": "user", "content": question}]) == \
        explicit.prompt_ids([{"role": "user", "content": question}])


def test_interactive_session_streams_and_remembers(memorised, monkeypatch, capsys):
    session = ChatSession.load(str(memorised / "full"))
    replies = iter(["Two plus two?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(replies))
    interactive(session, max_new_tokens=20)
    assert "assistant> Four." in capsys.readouterr().out
    assert session.history[-1] == {"role": "assistant", "content": "Four."}
