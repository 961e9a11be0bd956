"""The serving batcher on its own: rows of one batch, or joining it later, answer as `generate` does alone and
unpadded (sliding-window layers too); each row ends on its own terms; a seeded sample does not depend on its
neighbours; a short request is not held behind long ones, nor behind a huge stop list or slow adapter switches;
a client that leaves frees its row; a full queue refuses a whole request; a failing batch fails alone."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from tunelab.infer.load import BASE, load_inference
from tunelab.serve.batcher import Batcher, BatcherBusy, GenerationJob
from tunelab.serve.textstream import IncrementalText, StopScan, hold_back, special_ids

QUESTIONS = ["Hi", "What is the capital of the country you like best?", "Tell me about rivers and cities please"]


def _adapter(base: str, folder, tokenizer, seed: int) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def served(llama_dir, tokenizer, tmp_path_factory) -> list[str]:
    """The tiny llama and two random (non-zero) LoRA adapters on it."""
    root = tmp_path_factory.mktemp("batcher")
    return [llama_dir, BASE, *(_adapter(llama_dir, root / name, tokenizer, seed) for seed, name in enumerate("ab"))]


@pytest.fixture(scope="module")
def im(served):
    """What the batcher runs: the base and both adapters."""
    return load_inference(served[0], served[1:], device="cpu")


@pytest.fixture(scope="module")
def reference(served):
    """The same models loaded apart, for `generate`: the batcher keeps its own switched while it works."""
    return load_inference(served[0], served[1:], device="cpu")


@pytest.fixture(scope="module")
def batcher(im):
    return Batcher(im)


def prompt(im, text: str) -> list[int]:
    return im.variants[0].tokenizer(text)["input_ids"]


def job(variant, ids, max_tokens=12, temperature=0.0, top_p=1.0, seed=None, **kw) -> GenerationJob:
    """A job whose items go to its own queue on the running loop."""
    return GenerationJob(
        variant, ids, max_tokens, temperature, top_p, seed, asyncio.get_running_loop(), asyncio.Queue(), **kw
    )


async def finish(j: GenerationJob) -> dict:
    """Everything a job received: its text (the pieces joined), finish reason, token count, when it ended."""
    pieces = []
    while True:
        _, kind, *rest = await asyncio.wait_for(j.out.get(), timeout=120)
        if kind == "text":
            pieces.append(rest[0])
        elif kind == "end":
            return {"text": "".join(pieces), "finish": rest[0], "tokens": rest[1], "ids": j.tokens, "at": time.time()}
        else:
            raise AssertionError(f"generation failed: {rest[0]}")


def run(batcher, specs: list[tuple]) -> list[dict]:
    """Submit (variant, prompt, kwargs) jobs together and wait for all of them."""

    async def main():
        jobs = [job(v, p, **kw) for v, p, kw in specs]
        batcher.submit_all(jobs)
        return await asyncio.gather(*(finish(j) for j in jobs))

    return asyncio.run(main())


def generated(reference, variant, ids: list[int], n: int) -> list[int]:
    """`generate`'s greedy answer on the unpadded prompt, `n` tokens whatever comes, by the same variant of
    models loaded apart."""
    variant = next(v for v in reference.variants if v.label == variant.label)
    with reference.use(variant) as model, torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_a_batch_of_base_and_two_adapters_answers_as_each_alone_and_as_generate(im, reference, batcher):
    specs = [(v, prompt(im, q), dict(max_tokens=16, ignore_eos=True)) for v in im.variants for q in QUESTIONS]
    together = run(batcher, specs)
    for (v, ids, kw), got in zip(specs, together):
        alone = run(batcher, [(v, ids, kw)])[0]
        assert got["ids"] == alone["ids"] == generated(reference, v, ids, 16), (v.label, ids)
        assert got["text"] == v.tokenizer.decode(got["ids"], skip_special_tokens=True)
    answers = {tuple(g["ids"]) for g in together[:3]}, {tuple(g["ids"]) for g in together[3:6]}
    assert answers[0] != answers[1]  # the adapters are switched per batch, not left on


def joining(b, v, asked: list[tuple[list[int], int]], at: int = 5) -> list[dict]:
    """The first job alone, then each of the others submitted on its own once the one before has `at` tokens;
    (what each received, how many batches were live once each had joined)."""

    async def main():
        jobs = [job(v, ids, max_tokens=n, ignore_eos=True) for ids, n in asked]
        shared = []
        for before, j in zip([None, *jobs], jobs):
            while before is not None and len(before.tokens) < at:
                await asyncio.sleep(0.001)
            b.submit(j)
            while len(j.tokens) < 2:  # prefilled, then stepped: joined by now if it joins
                await asyncio.sleep(0.001)
            shared.append(len(b._live))
        results = await asyncio.gather(*(finish(j) for j in jobs))
        return results, shared

    return asyncio.run(main())


def test_rows_joining_a_running_batch_share_it_and_answer_as_generate(im, reference, batcher):
    """Requests arriving one by one join the running batch of their model (its columns left-padded for the
    shorter), so they share its forward passes; each answers as `generate` alone."""
    v = im.variants[1]
    asked = [(prompt(im, QUESTIONS[2]), 40), (prompt(im, QUESTIONS[0]), 20), (prompt(im, QUESTIONS[1] * 2), 20)]
    before = batcher.batches
    results, live = joining(batcher, v, asked)
    assert batcher.batches - before == 3 and live == [1, 1, 1]  # prefilled apart, stepped as one
    for got, (ids, n) in zip(results, asked):
        assert got["ids"] == generated(reference, v, ids, n), ids


def test_sliding_window_layers_keep_exact_answers_when_rows_join_and_leave(tmp_path, tokenizer):
    """Gemma3's sliding layers keep only their window: rows padded into a batch (a longer one too) or cut
    out of it stay exact."""
    from tunelab.demo.build import build_tiny_model

    layers = ["sliding_attention", "full_attention"]
    base = build_tiny_model(tmp_path / "gemma3", tokenizer, "gemma3_text", sliding_window=5, layer_types=layers)
    gim, reference = load_inference(str(base), device="cpu"), load_inference(str(base), device="cpu")
    v, b = gim.variants[0], Batcher(gim)
    asked = [(prompt(gim, "Hi"), 30), (prompt(gim, QUESTIONS[1] * 2), 8), (prompt(gim, QUESTIONS[2]), 20)]
    results, live = joining(b, v, asked, at=3)
    assert live == [1, 1, 1]
    for got, (ids, n) in zip(results, asked):
        assert got["ids"] == generated(reference, v, ids, n), ids


def test_each_row_stops_at_its_own_max_tokens_or_earliest_stop_string(im, batcher):
    v = im.variants[2]
    ids = [prompt(im, q) for q in QUESTIONS]
    free = run(batcher, [(v, p, dict(max_tokens=30, ignore_eos=True)) for p in ids])
    text = free[1]["text"]
    at = next(i for i in range(len(text) - 4, 4, -1) if text.find(text[i : i + 4]) >= 4)
    late = text[at : at + 4]
    early = text[text.find(late) - 4 : text.find(late) - 2]  # found first though listed last
    other = free[0]["text"]  # two stops ending on the same character: the one that starts first counts
    k = next(
        k
        for k in range(3, len(other) - 3)
        if other.find(other[k - 3 : k + 3]) == k - 3 < other.find(other[k + 1 : k + 3])
    )
    got = run(
        batcher,
        [
            (v, ids[0], dict(max_tokens=30, ignore_eos=True, stop=[other[k + 1 : k + 3], other[k - 3 : k + 3]])),
            (v, ids[1], dict(max_tokens=30, ignore_eos=True, stop=[late, early])),
            (v, ids[2], dict(max_tokens=9, ignore_eos=True)),
            (v, ids[0], dict(max_tokens=3, ignore_eos=True)),
        ],
    )
    assert got[0]["text"] == other[: k - 3] and got[0]["finish"] == "stop"
    assert got[1]["text"] == text[: text.find(early)] and got[1]["finish"] == "stop"
    assert got[2]["ids"] == free[2]["ids"][:9] and got[2]["finish"] == "length" and got[2]["tokens"] == 9
    assert got[2]["text"] == v.tokenizer.decode(free[2]["ids"][:9], skip_special_tokens=True)
    assert got[3]["ids"] == free[0]["ids"][:3] and got[3]["finish"] == "length"


def test_a_seeded_sample_is_the_same_alone_and_in_any_batch(im, batcher):
    v = im.variants[1]
    ids = prompt(im, QUESTIONS[1])
    seeded = dict(max_tokens=24, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run(batcher, [(v, ids, seeded)])[0]
    others = [
        (v, prompt(im, QUESTIONS[0]), dict(max_tokens=30, temperature=1.3, top_p=0.5, seed=7)),
        (v, prompt(im, QUESTIONS[2]), dict(max_tokens=5)),
        (v, ids, dict(max_tokens=24, temperature=0.9, top_p=0.9, ignore_eos=True)),  # unseeded
    ]
    crowded = run(batcher, [others[0], (v, ids, seeded), *others[1:]])
    assert crowded[1]["ids"] == alone["ids"]
    assert crowded[3]["ids"] != alone["ids"]  # a sample, not the greedy answer
    second_choice = run(batcher, [(v, ids, dict(seeded, index=1))])[0]
    assert second_choice["ids"] != alone["ids"]  # n > 1 with a seed: different choices
    narrow = run(batcher, [(v, ids, dict(seeded, top_p=1e-6)), (v, ids, dict(seeded, temperature=1e-3))])
    greedy = run(batcher, [(v, ids, dict(max_tokens=24, ignore_eos=True))])[0]
    assert narrow[0]["ids"] == narrow[1]["ids"] == greedy["ids"]  # top-p keeps the likeliest token, then only it


def test_a_short_request_is_not_held_behind_long_ones(im, batcher):
    v = im.variants[0]
    long = [(v, QUESTIONS[i % 3], 400) for i in range(20)]
    short_s, long_s, _ = short_behind_long(im, batcher, long, v, started_after=10)
    assert short_s < long_s / 3, (short_s, long_s)


def short_behind_long(im, batcher, long_specs: list[tuple], short_variant, started_after: int):
    """(the 8-token job's seconds, the long jobs' wall seconds, the second long job's ids): the long jobs
    (variant, question, max_tokens) run `started_after` tokens, then the short one is submitted."""

    async def main():
        long = [job(v, prompt(im, q), max_tokens=n, ignore_eos=True) for v, q, n in long_specs]
        started = time.time()
        batcher.submit_all(long)
        while min(len(j.tokens) for j in long) < started_after:
            await asyncio.sleep(0.001)
        short = job(short_variant, prompt(im, QUESTIONS[0]), max_tokens=8, ignore_eos=True)
        submitted = time.time()
        batcher.submit(short)
        done = await asyncio.gather(finish(short), *(finish(j) for j in long))
        return done[0]["at"] - submitted, max(d["at"] for d in done[1:]) - started, done[2]["ids"]

    return asyncio.run(main())


def test_variants_taking_turns_switch_seldom_when_switching_is_slow(im, reference, monkeypatch):
    """peft's switch walks every module (about 0.1 s on a 7B model): batches of different variants then take
    several steps in a row, and a short request of a third variant still ends long before the long ones."""
    b, switches = Batcher(im), []
    use = im.use

    def slow_use(variant):
        switches.append(variant.label)
        time.sleep(0.02)
        return use(variant)

    monkeypatch.setattr(im, "use", slow_use)
    base, a, other = im.variants

    short_s, long_s, ids = short_behind_long(im, b, [(v, QUESTIONS[2], 300) for v in (base, a)], other, 5)
    assert len(switches) < 100, len(switches)  # one a step would be 600
    assert short_s < long_s / 3, (short_s, long_s)
    assert ids == generated(reference, a, prompt(im, QUESTIONS[2]), 300)


def test_a_huge_stop_list_stalls_no_other_request(im, batcher):
    """2000 stop strings of 200 characters (400 KB) made of the very characters the model writes: the small
    job beside them takes at most about a second longer than beside the same job without them."""
    v = im.variants[0]
    big_prompt = prompt(im, QUESTIONS[2])
    written = run(batcher, [(v, big_prompt, dict(max_tokens=60, ignore_eos=True))])[0]["text"]
    rng = random.Random(0)
    stops = ["".join(rng.choices(sorted(set(written)), k=200)) for _ in range(2000)]

    def small(stop: list[str]) -> float:
        async def main():
            big = job(v, big_prompt, max_tokens=60, ignore_eos=True, stop=stop)
            little = job(v, prompt(im, QUESTIONS[0]), max_tokens=40, ignore_eos=True)
            started = time.time()
            batcher.submit_all([big, little])
            got = await finish(little)
            assert (await finish(big))["text"] == written
            return got["at"] - started

        return min(asyncio.run(main()) for _ in range(2))

    plain, crowded = small([]), small(stops)
    assert crowded < plain + 1.0, (plain, crowded)


@pytest.mark.fast
def test_hold_back_is_linear_in_the_stop_strings_length():
    """Each stop could still begin anywhere in the text's end: 4x longer stops take about 4x as long (16x for
    checking `text.endswith(s[:k])` for every k). Four-byte characters make copying show, as it does on a GPU
    server's long stop lists."""

    def timed(length: int) -> float:
        text = "x" + "😀" * (length + 5)
        stops = ["😀" * (length - 4) + f"{i:04d}" for i in range(2)]
        assert hold_back(text, stops) == length - 4
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            hold_back(text, stops)
            best = min(best, time.perf_counter() - started)
        return best

    small, large = timed(10_000), timed(40_000)
    assert large / small < 8, (small, large)


@pytest.mark.fast
def test_stop_scan_matches_the_plain_reading():
    """Fed in pieces: the earliest stop found is `min(text.find(s))`, the hold back the longest stop prefix."""
    rng = random.Random(1)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        scan, seen, hit = StopScan(stops), "", None
        while seen != text and hit is None:
            piece = text[len(seen) : len(seen) + rng.randint(1, 3)]
            hit, hold = scan.feed(piece)
            seen += piece
            found = [seen.find(s) for s in stops if s in seen]
            assert hit == (min(found) if found else None), (stops, seen)
            if hit is None:
                expected = max((k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])), default=0)
                assert hold == expected == hold_back(seen, stops), (stops, seen)


@pytest.mark.fast
@pytest.mark.parametrize("family", ["qwen3", "llama-3.2-3b-instruct", "phi-3-mini-4k-instruct"])
def test_incremental_text_is_the_whole_decode(family, tmp_path):
    """Decoding a window of the last tokens gives exactly the whole decode, multi-byte characters and
    SentencePiece's leading spaces included."""
    import real_tokenizers

    tok = real_tokenizers.load_or_skip(family, tmp_path)
    rng = random.Random(2)
    sample = "Grüße, 東京 and naïve café 🙂 — x = 3.14;\n\tdone. Ünïcödé 😀😀 end"
    base = tok(sample, add_special_tokens=False)["input_ids"]
    special = special_ids(tok)
    for _ in range(20):
        noise = [rng.randrange(len(tok)) for _ in range(30)]
        ids = base + noise + [tok.eos_token_id, *rng.sample(sorted(special), 2)] + base[:5] + noise[:4] + base[-3:]
        text = IncrementalText(tok, [], special)
        pieces = [text.add(t) for t in ids]
        assert "".join(pieces) == text.text == tok.decode(ids, skip_special_tokens=True)


def test_a_client_that_leaves_frees_its_row_and_the_others_stay_exact(im, reference, batcher):
    v = im.variants[2]
    ids = [prompt(im, q) for q in QUESTIONS]

    async def main():
        jobs = [job(v, p, max_tokens=40, ignore_eos=True) for p in ids]
        batcher.submit_all(jobs)
        while len(jobs[1].tokens) < 5:
            await asyncio.sleep(0.001)
        before = batcher.abandoned
        jobs[1].cancelled = True
        rest = await asyncio.gather(finish(jobs[0]), finish(jobs[2]))
        return rest, batcher.abandoned - before, len(jobs[1].tokens)

    (first, third), abandoned, left_at = asyncio.run(main())
    assert abandoned == 1 and left_at < 40
    assert first["ids"] == generated(reference, v, ids[0], 40) and third["ids"] == generated(reference, v, ids[2], 40)


def test_a_request_past_max_queue_is_refused_whole(im):
    b = Batcher(im, max_queue=4)
    v = im.variants[0]

    async def main():
        running = [job(v, prompt(im, q), max_tokens=30, ignore_eos=True) for q in QUESTIONS]
        b.submit_all(running)
        refused = [job(v, prompt(im, "Hi"), max_tokens=2) for _ in range(2)]
        with pytest.raises(BatcherBusy):
            b.submit_all(refused)
        last = job(v, prompt(im, "Hi"), max_tokens=2)
        b.submit(last)  # exactly max_queue
        await asyncio.gather(*(finish(j) for j in [*running, last]))
        assert all(j.out.empty() and not j.tokens for j in refused)
        b.submit_all(refused)  # room again once the others ended
        await asyncio.gather(*(finish(j) for j in refused))

    asyncio.run(main())


def test_a_failing_batch_ends_its_rows_with_an_error_and_the_loop_goes_on(im, monkeypatch):
    b = Batcher(im)
    v, other = im.variants[1], im.variants[2]
    real = b._forward

    def forward(batch, ids, first):
        if batch.variant is v:
            raise RuntimeError("boom")
        return real(batch, ids, first)

    monkeypatch.setattr(b, "_forward", forward)

    async def main():
        bad, good = job(v, prompt(im, "Hi"), max_tokens=4), job(other, prompt(im, "Hi"), max_tokens=4)
        b.submit_all([bad, good])
        assert await asyncio.wait_for(bad.out.get(), timeout=60) == (0, "error", "boom")
        return await finish(good)

    assert asyncio.run(main())["tokens"] == 4


def test_the_models_repetition_penalty_applies_as_generate_applies_it(served, tokenizer, tmp_path):
    """A run whose generation_config sets repetition_penalty answers in the server as in `tunelab chat`."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "penalised"
    model = AutoModelForCausalLM.from_pretrained(served[0])
    model.generation_config.repetition_penalty = 1.8
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    im, reference = (load_inference(str(folder), device="cpu") for _ in range(2))
    (variant,) = im.variants
    prompts = [prompt(im, q) for q in QUESTIONS]
    got = run(Batcher(im), [(variant, p, {"max_tokens": 16, "ignore_eos": True}) for p in prompts])
    for p, answer in zip(prompts, got):
        expected = generated(reference, variant, p, 16)
        assert answer["ids"] == expected
    plain = load_inference(served[0], device="cpu")
    unpenalised = run(Batcher(plain), [(plain.variants[0], prompts[1], {"max_tokens": 16, "ignore_eos": True})])
    assert unpenalised[0]["ids"] != got[1]["ids"]  # the penalty changed this answer: the test can tell
