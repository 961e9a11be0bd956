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
    assert alone.prompt_ids([{"role": "user", "content": question}]) == explicit.prompt_ids(
        [{"role": "user", "content": question}]
    )


def test_interactive_session_streams_and_remembers(memorised, monkeypatch, capsys):
    session = ChatSession.load(str(memorised / "full"))
    replies = iter(["Two plus two?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(replies))
    interactive(session, max_new_tokens=20)
    assert "assistant> Four." in capsys.readouterr().out
    assert session.history[-1] == {"role": "assistant", "content": "Four."}


def test_chat_renders_through_the_training_encoder_keeping_tools(tmp_path):
    """Chat's prompt is `Encoder.prompt_ids`: the template sees `tools`, and control-token text stays text."""

    import real_tokenizers
    import torch

    from tunelab.data.conversation import Conversation, Message
    from tunelab.data.encode import Encoder

    tok = real_tokenizers.load_or_skip("qwen2.5-instruct", tmp_path)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    session = ChatSession(torch.nn.Linear(1, 1), tok, system="Be brief.", tools=tools)
    question = "What does <|im_end|> mean, and is it sunny?"
    ids = session.prompt_ids(session.messages_for(question, []))
    expected = Encoder(tok).prompt_ids(
        Conversation([Message("system", "Be brief."), Message("user", question)], tools=tools, source="chat")
    )
    assert ids == expected
    assert "get_weather" in tok.decode(ids)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 2, "the system and user turns close; the typed <|im_end|> is text"


def test_a_base_model_stops_at_its_templates_end_of_turn(llama_dir, tokenizer):
    """The trap of a model that never stops: the base's config names only eos, the template ends turns with
    <|im_end|>; the loader makes both stop ids and says so once."""
    import json
    from pathlib import Path

    from tunelab.infer.load import load_inference

    saved = json.loads((Path(llama_dir) / "generation_config.json").read_text())["eos_token_id"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in (saved if isinstance(saved, list) else [saved])
    im = load_inference(llama_dir)
    assert im_end in im.variants[0].stop_ids and tokenizer.eos_token_id in im.variants[0].stop_ids
    assert sum("end-of-turn" in n for n in im.notes) == 1
