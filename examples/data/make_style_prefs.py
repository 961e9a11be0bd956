"""Writes the preference demo's data (`tunelab demo --stage dpo`, `make demo-dpo`): style_sft.json,
style_pairs.jsonl and style_pairs_heldout.jsonl, from the table of simple facts below. Deterministic: running it
again rewrites the same bytes (tests/demo/test_demo_dpo.py checks that). Written by hand for tunelab; no text
comes from another data set.

    .venv/bin/python examples/data/make_style_prefs.py

Every prompt asks for a style, one word ("In one word: ...") or a full sentence ("In a full sentence: ..."), then
a question. The SFT file answers each training question four times, both requests times both styles, so after
SFT the model knows each answer in both styles but has learnt that the request changes nothing: a preference
that SFT leaves undecided. The pairs prefer the answer in the requested style. The held-out pairs ask questions
that no training file asks, half of them for each style, so a model that ignores the request scores about 0.5
whichever style it leans to (each question's two pairs have the same answers, swapped), and only a model that
learnt to read the request scores near 1.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
BRIEF = ("In one word:", "One word only:")
FULL = ("In a full sentence:", "Full sentence please:")

# name: colour, legs, food, heat ("-": the question is not asked)
THINGS = """
cow - four grass -|sheep white four grass -|horse brown four grass -|goat - four grass -|rabbit - four grass -|
zebra - four grass -|deer brown four grass -|lion - four meat -|tiger orange four meat -|wolf grey four meat -|
fox orange four meat -|shark grey none meat -|eagle brown two meat -|snake - none meat -|penguin - two fish -|
otter brown four fish -|pelican white two fish -|heron grey two fish -|dolphin grey none fish -|whale - none fish -|
parrot green two seeds -|sparrow brown two seeds -|hen - two seeds -|pigeon grey two seeds -|chick yellow two seeds -|
mouse grey four seeds -|giraffe - four leaves -|koala grey four leaves -|caterpillar green - leaves -|
panda - four leaves -|frog green four insects -|bat black two insects -|swallow - two insects -|
lizard green four insects -|mole black four insects -|spider black eight insects -|flamingo pink two - -|
elephant grey four - -|bear brown four - -|crow black two - -|raven black two - -|swan white two - -|
pig pink four - -|ant black six - -|bee yellow six - -|ladybird red six - -|beetle black six - -|worm pink none - -|
slug - none - -|scorpion - eight - -|tick - eight - -|banana yellow - - -|lemon yellow - - -|tomato red - - -|
strawberry red - - -|cherry red - - -|fire engine red - - -|carrot orange - - -|pumpkin orange - - -|
plum purple - - -|grape purple - - -|violet purple - - -|blueberry blue - - -|cucumber green - - -|
leaf green - - -|cloud white - - -|tooth white - - -|coconut brown - - -|bonfire orange - - hot|
candle flame yellow - - hot|stove black - - hot|radiator white - - hot|oven - - - hot|kettle - - - hot|
toaster - - - hot|volcano - - - hot|campfire - - - hot|iceberg white - - cold|snowman white - - cold|
hailstone white - - cold|fridge white - - cold|freezer white - - cold|glacier - - - cold|icicle - - - cold|
ice cube - - - cold|ice cream - - - cold|snowflake - - - cold"""


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def facts() -> list[dict]:
    """Each fact: its subject, the question, its one-word answer and its full-sentence answer."""
    out = []
    for row in THINGS.replace("\n", "").split("|"):
        *name_words, colour, legs, food, heat = row.split()
        name = _article(" ".join(name_words))
        asked = (
            (colour, f"What colour is {name}?", f"It is {colour}."),
            (legs, f"How many legs does {name} have?", "It has no legs." if legs == "none" else f"It has {legs} legs."),
            (food, f"What does {name} eat?", f"It eats {food}."),
            (heat, f"Is {name} hot or cold?", f"It is {heat}."),
        )
        for value, question, full in asked:
            if value != "-":
                out.append(dict(subject=name, q=question, brief=value.capitalize() + ".", full=full))
    return out


def split(all_facts: list[dict]) -> tuple[list[dict], list[dict]]:
    """About one fact in four is held out: a question no training file asks, about a subject that training
    asks something else about, whose answer training gives elsewhere (in both styles). So a held-out pair is
    new only as a question: a model passes it by reading the request, not by having seen the question."""
    train, held, count = [], [], 0
    asked = {f["subject"]: sum(g["subject"] == f["subject"] for g in all_facts) for f in all_facts}
    kept = dict.fromkeys(asked, 0)
    for fact in all_facts:
        count += asked[fact["subject"]] > 1
        if asked[fact["subject"]] > 1 and count % 3 == 0 and kept[fact["subject"]] < asked[fact["subject"]] - 1:
            held.append(fact)
            kept[fact["subject"]] += 1
        else:
            train.append(fact)
    seen = {f[style] for f in train for style in ("brief", "full")}
    unseen = [f["q"] for f in held if f["brief"] not in seen or f["full"] not in seen]
    assert not unseen, f"held-out answers no training answer uses: {unseen}"
    return train, held


def _prompt(fact: dict, style: str, rng: random.Random) -> str:
    return f"{rng.choice(BRIEF if style == 'brief' else FULL)} {fact['q']}"


def _pair(fact: dict, style: str, rng: random.Random) -> dict:
    other = "full" if style == "brief" else "brief"
    return {
        "messages": [{"role": "user", "content": _prompt(fact, style, rng)}],
        "chosen": {"role": "assistant", "content": fact[style]},
        "rejected": {"role": "assistant", "content": fact[other]},
    }


def build() -> dict[str, list[dict]]:
    rng = random.Random(0)
    train, held = split(facts())
    sft = [
        {
            "messages": [
                {"role": "user", "content": _prompt(fact, asked, rng)},
                {"role": "assistant", "content": fact[given]},
            ]
        }
        for fact in train
        for asked in ("brief", "full")
        for given in ("brief", "full")
    ]
    rng.shuffle(sft)
    pairs = [_pair(fact, style, rng) for fact in train for style in ("brief", "full")]
    rng.shuffle(pairs)
    heldout = [_pair(fact, style, rng) for fact in held for style in ("brief", "full")]
    return {"style_sft.json": sft, "style_pairs.jsonl": pairs, "style_pairs_heldout.jsonl": heldout}


def render(name: str, records: list[dict]) -> str:
    if name.endswith(".jsonl"):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return json.dumps(records, ensure_ascii=False, indent=1) + "\n"


def main() -> None:
    for name, records in build().items():
        (HERE / name).write_text(render(name, records), encoding="utf-8")
        print(f"{name}: {len(records)} records")


if __name__ == "__main__":
    main()
