"""A trained LoRA is applied on every inference path: chat, generate, eval and export.

Why: an adapter that is loaded but switched off (e.g. `InferenceModel.use()` entering
`disable_adapter()` where it should `set_adapter()`) makes every command silently answer like the
base model. Nothing crashes and the outputs look plausible, so only a comparison with the base and
with the trained model itself catches it.

How: one short LoRA run (trained once per module) memorises answers the random tiny base never
gives. The fixture checks that, in process, the adapter changes every greedy answer, and fails
loudly otherwise, so no test here can pass vacuously. Then each path must answer like the
in-process adapted model and unlike the base:

- `ChatSession.load(run)` (a LoRA run folder on its own),
- `load_inference(base, [run, "none"])` + `run_generate`: the adapter column differs from the base
  column and equals the in-process answers,
- `evaluate`: the adapter's eval_loss on its own training data differs from, and is lower than, the base's,
- `export_merged`: the merged folder reloaded with plain transformers answers like the adapter.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tunelab.config import from_dict
from tunelab.data.conversation import Conversation, Message
from tunelab.data.encode import Encoder
from tunelab.eval.evaluate import evaluate
from tunelab.export.merge import export_merged
from tunelab.infer.chat import ChatSession
from tunelab.infer.generate import read_cases, run_generate
from tunelab.infer.load import BASE, load_inference
from tunelab.train.run import train

QA = [
    ("Capital of France?", "Paris is the capital."),
    ("Colour of the sky?", "The sky is blue."),
    ("Two plus two?", "Four."),
]
NEW_TOKENS = 16


def _greedy(model, tokenizer, question: str) -> str:
    """Greedy answer of `model` to `question`, rendered and stopped as training did; no tunelab inference code."""
    encoder = Encoder(tokenizer)
    ids = torch.tensor([encoder.prompt_ids(Conversation([Message("user", question)], source="probe"))])
    stops = encoder.eot_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
    new = out[0, ids.shape[1] :].tolist()
    cut = next((k for k, t in enumerate(new) if t in stops), None)
    return tokenizer.decode(new[:cut], skip_special_tokens=True)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, llama_dir):
    """The LoRA run, proven in process to change every greedy answer of the base to the one it was taught."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("adapter_applied")
    data = root / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in QA
        )
    )
    result = train(
        from_dict(
            dict(
                model=llama_dir,
                dataset=str(data),
                output_dir=str(root / "lora"),
                max_steps=60,
                learning_rate=5e-3,
                lr_scheduler_type="constant",
                per_device_train_batch_size=3,
                lora_dropout=0.0,
                logging_steps=20,
                save_steps=1000,
            )
        )
    )
    tok = AutoTokenizer.from_pretrained(result.output_dir)
    lora = [_greedy(result.model.eval(), tok, q) for q, _ in QA]
    base = [_greedy(AutoModelForCausalLM.from_pretrained(llama_dir).eval(), tok, q) for q, _ in QA]
    if lora != [a for _, a in QA] or any(x == y for x, y in zip(lora, base)):
        pytest.fail(
            f"fixture too weak: the adapter must learn every answer and change every base answer; "
            f"adapter {lora}, base {base}, wanted {[a for _, a in QA]}"
        )
    return SimpleNamespace(
        run=str(result.output_dir), data=str(data), lora=lora, base=base, model=result.model, tokenizer=tok
    )


def _own_loss(model, tokenizer, data: str) -> float:
    """Mean cross-entropy per trained token of `model` over `data`, one sample at a time, by the model's own loss."""
    encoder, total, n = Encoder(tokenizer), 0.0, 0
    with torch.no_grad():
        for case in read_cases(data):
            s = encoder.encode(case.conversation)
            k = sum(1 for x in s.labels[1:] if x != -100)
            out = model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels]))
            total, n = total + float(out.loss) * k, n + k
    return total / n


def test_chat_session_on_a_run_folder_answers_like_the_adapter(adapted):
    session = ChatSession.load(adapted.run)
    got = [session.ask(q, max_new_tokens=NEW_TOKENS) for q, _ in QA]
    assert got == adapted.lora
    assert all(g != b for g, b in zip(got, adapted.base))


def test_chat_session_with_explicit_adapter_answers_like_the_adapter(adapted, llama_dir):
    session = ChatSession.load(llama_dir, adapter=adapted.run)
    assert [session.ask(q, max_new_tokens=NEW_TOKENS) for q, _ in QA] == adapted.lora


def test_generate_gives_the_adapter_column_the_adapter_answers(adapted, llama_dir):
    im = load_inference(llama_dir, [adapted.run, BASE])
    adapter_label, base_label = (v.label for v in im.variants)
    assert base_label == "base"
    cases = run_generate(im, read_cases(adapted.data), max_new_tokens=NEW_TOKENS, batch_size=2, progress=False)
    assert [c.predictions[adapter_label] for c in cases] == adapted.lora
    assert [c.predictions[base_label] for c in cases] == adapted.base
    assert all(c.predictions[adapter_label] != c.predictions[base_label] for c in cases)


def test_generate_on_the_run_folder_alone_answers_like_the_adapter(adapted):
    im = load_inference(adapted.run)
    (label,) = (v.label for v in im.variants)
    cases = run_generate(im, read_cases(adapted.data), max_new_tokens=NEW_TOKENS, progress=False)
    assert [c.predictions[label] for c in cases] == adapted.lora


def test_eval_loss_of_the_adapter_is_its_own_and_lower_than_the_base(adapted, llama_dir):
    from transformers import AutoModelForCausalLM

    im = load_inference(llama_dir, [BASE, adapted.run])
    rows = {r["model"]: r for r in evaluate(im, read_cases(adapted.data), max_new_tokens=NEW_TOKENS, progress=False)}
    adapter_row, base_row = rows[im.variants[1].label], rows["base"]
    base_model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    assert adapter_row["eval_loss"] == pytest.approx(
        _own_loss(adapted.model, adapted.tokenizer, adapted.data), rel=1e-4
    )
    assert base_row["eval_loss"] == pytest.approx(_own_loss(base_model, adapted.tokenizer, adapted.data), rel=1e-4)
    assert adapter_row["eval_loss"] < base_row["eval_loss"] - 0.5, (adapter_row, base_row)
    assert adapter_row["exact_match"] == 100.0 and base_row["exact_match"] == 0.0


def test_exported_merge_answers_like_the_adapter_not_the_base(adapted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert export_merged(adapted.run, None, str(out), dtype="fp32").verified
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    got = [_greedy(merged, AutoTokenizer.from_pretrained(out), q) for q, _ in QA]
    assert got == adapted.lora
    assert all(g != b for g, b in zip(got, adapted.base))
