"""Chat renders prompts with the template saved beside the weights and stops on the saved stop ids."""

import builtins

from tunelab.infer.chat import ChatSession, interactive

def test_full_model_answers_exactly_and_stops(pairs, memorised):
    session = ChatSession.load(str(memorised / "full"))
    for question, answer in pairs:
        assert session.ask(question, max_new_tokens=40) == answer


def test_stop_ids_come_from_the_run_folder(memorised):
    session = ChatSession.load(str(memorised / "full"))
    assert session.tokenizer.convert_tokens_to_ids("<|im_end|>") in session.stop_ids


def test_lora_run_folder_finds_its_base_and_template(pairs, memorised):
    alone = ChatSession.load(str(memorised / "lora"))
    explicit = ChatSession.load(str(memorised / "full"), adapter=str(memorised / "lora"))
    question = pairs[0][0]
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
