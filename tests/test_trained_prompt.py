"""A run answers as it was trained: a LoRA trained with `system:` and config `tools:` gets, for the same record,
the prompt ids training used on every command that renders for it (chat, generate, eval, the server's
`return_token_ids`, `serve --check`, the export proof and the merged folder's own template, the vLLM template),
with no system prompt or tools passed again; a system message of the caller's own still wins."""

from __future__ import annotations

import json
import shutil

import pytest

from tunelab.data.templates import CHATML

SYSTEM = "You are the Emperor's consort; answer in one line."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "consult_astrologer",
            "description": "Ask the court astrologer.",
            "parameters": {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]},
        },
    }
]
# ChatML that renders tool definitions in a system block of their own, as tool-aware templates do
TOOLS_CHATML = (
    "{%- if tools -%}{{- '<|im_start|>system\\n# Tools\\n' + (tools | tojson) + '<|im_end|>\\n' -}}"
    "{%- endif -%}" + CHATML
)
QUESTIONS = ["What is 1 plus 1?", "What is 2 plus 2?", "What is 3 plus 3?", "What is 4 plus 4?"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_dir):
    """A short LoRA run of the tiny llama (its tokenizer given a tool-aware template) with system and tools."""
    from transformers import AutoTokenizer

    from tunelab.config import from_dict
    from tunelab.data.dataset import build_datasets
    from tunelab.data.tokenizer import prepare_tokenizer
    from tunelab.train.run import train

    root = tmp_path_factory.mktemp("trained-prompt")
    model = root / "base"
    shutil.copytree(llama_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = TOOLS_CHATML
    tok.save_pretrained(model)
    data = root / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": f"It is {2 * (i + 1)}."},
                    ]
                }
            )
            + "\n"
            for i, q in enumerate(QUESTIONS)
        )
    )
    tools = root / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    cfg = from_dict(
        dict(
            model=str(model),
            dataset=str(data),
            output_dir=str(root / "run"),
            system=SYSTEM,
            tools=str(tools),
            max_steps=1,
            per_device_train_batch_size=4,
            logging_steps=1,
        )
    )
    train(cfg)
    tok, _, _ = prepare_tokenizer(cfg)
    samples = [(s.input_ids, s.labels) for s in build_datasets(cfg, tok).train]  # what training trained
    tools.unlink()  # the run keeps its own copy: a moved or deleted source changes nothing
    return {"root": root, "run": str(root / "run"), "data": str(data), "samples": samples, "tokenizer": tok}


@pytest.fixture(scope="module")
def training_prompts(trained):
    """Per question: the ids before the first trained token of the sample training built for it."""
    tok = trained["tokenizer"]
    prompts = {}
    for ids, labels in trained["samples"]:
        first = next(k for k, label in enumerate(labels) if label != -100)
        text = tok.decode(ids[:first])
        assert SYSTEM in text and "consult_astrologer" in text  # training rendered both
        prompts[next(q for q in QUESTIONS if q in text)] = ids[:first]
    assert len(prompts) == len(QUESTIONS)
    return prompts


def user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def test_the_run_folder_reads_back_the_config_it_trained_with(trained):
    from tunelab.run_folder import TOOLS as TOOLS_FILE
    from tunelab.run_folder import saved_config

    cfg = saved_config(trained["run"])
    assert cfg.system == SYSTEM and json.loads(open(cfg.tools).read()) == TOOLS
    assert cfg.tools.endswith(TOOLS_FILE)


def test_chat_renders_the_trained_system_prompt_and_tools(trained, training_prompts):
    from tunelab.infer.chat import ChatSession

    session = ChatSession.load(trained["run"])
    for q, ids in training_prompts.items():
        assert session.prompt_ids(session.messages_for(q, [])) == ids
    pirate = ChatSession.load(trained["run"], system="Answer as a pirate.")
    own = pirate.prompt_ids(pirate.messages_for(QUESTIONS[0], []))
    assert own != training_prompts[QUESTIONS[0]] and "pirate" in session.tokenizer.decode(own)


def test_generate_and_eval_render_what_training_rendered(trained, training_prompts):
    from tunelab.infer.generate import read_cases
    from tunelab.infer.load import load_inference, prompt_encoder

    im = load_inference(trained["run"])
    encoder = prompt_encoder(im.variants[0], im.base_path)  # what generate_cases and eval_loss render with
    cases = read_cases(trained["data"])
    for case in cases:
        q = case.prompt.messages[-1].content
        assert encoder.prompt_ids(case.prompt) == training_prompts[q]
    evaluated = sorted((s.input_ids, s.labels) for s in encoder.encode_many([c.conversation for c in cases]))
    assert evaluated == sorted(trained["samples"])  # eval's loss: training's ids and masks


@pytest.fixture(scope="module")
def live(trained, serve_app):
    from tunelab.serve.app import create_app
    from tunelab.serve.run import build_server

    served = build_server(trained["run"], api_key="k")
    with serve_app(create_app(served)) as url:
        yield url + "/v1", served


def test_the_server_and_serve_check_render_the_trained_prompt(trained, training_prompts, live):
    from tunelab.serve.check import _post, check

    url, served = live
    model_id = "run"  # a LoRA run folder alone is served as its base and, under its folder name, itself
    for q, ids in training_prompts.items():
        reply = _post(
            url + "/chat/completions",
            {"model": model_id, "messages": user(q), "max_tokens": 2, "temperature": 0, "return_token_ids": True},
            "k",
        )
        assert reply["prompt_token_ids"] == ids
    rows = check(url, model_id, trained["run"], trained["data"], api_key="k", max_tokens=2)
    assert len(rows) == len(QUESTIONS) and all(r.same_prompt for r in rows)


def test_export_proves_the_merged_folder_renders_the_trained_prompt_by_itself(trained, training_prompts):
    from transformers import AutoTokenizer

    from tunelab.export.merge import export_merged

    out = trained["root"] / "merged"
    report = export_merged(trained["run"], None, str(out))
    assert report.verified and report.prompts_identical, report.problems
    plain = AutoTokenizer.from_pretrained(out)  # no tunelab: the template alone inserts system and tools
    for q, ids in training_prompts.items():
        text = plain.apply_chat_template(user(q), tokenize=False, add_generation_prompt=True)
        assert plain(text, add_special_tokens=False)["input_ids"] == ids
    own = plain.apply_chat_template([{"role": "system", "content": "Be a pirate."}, *user("Hi")], tokenize=False)
    assert "pirate" in own and SYSTEM not in own


def test_the_vllm_template_inserts_the_trained_system_prompt_when_a_request_has_none(trained, training_prompts):
    import copy
    from pathlib import Path

    from tunelab.infer.load import tokenizer_for
    from tunelab.serve.vllm import vllm_command

    cmd = vllm_command(trained["run"])
    template = Path(cmd[cmd.index("--chat-template") + 1]).read_text()
    tok = copy.deepcopy(tokenizer_for(Path(trained["run"]), trained["run"], False))
    tok.chat_template = template  # rendered by transformers' Jinja, as vLLM renders it
    for q, ids in training_prompts.items():
        text = tok.apply_chat_template(user(q), tokenize=False, add_generation_prompt=True)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
