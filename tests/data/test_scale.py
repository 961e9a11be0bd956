"""Memory at scale, measured in fresh processes: encoding stays within a stated bound per token, and a
cached run maps its samples instead of copying them into private memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDS = 200_000
# Peak resident memory that encoding may add over the process before it, per token of the data; the
# flat storage is 5 bytes a token (written to the cache as encoded, then mapped and read once here),
# the rest is the chunks in flight and the per-sample columns. As Python
# lists (before flat arrays) the same data took ~77 bytes a token.
PEAK_BYTES_PER_TOKEN = 10

PROBE = """
import json, resource, sys
from pathlib import Path
from tunelab.config import from_dict
from tunelab.data.dataset import SampleDataset, build_datasets
from transformers import AutoTokenizer

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

tok = AutoTokenizer.from_pretrained(sys.argv[2])
cfg = from_dict(dict(model="m", dataset=sys.argv[1], output_dir="o", cutoff_len=256, preprocessing_num_workers=2))
before_peak, before_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, status("RssAnon")
data = build_datasets(cfg, tok)
served = SampleDataset(data.train, tok.pad_token_id)
for i in range(len(served)):  # every sample read once, as an epoch reads them
    served[i]
print(json.dumps({"tokens": int(len(data.train.arrays["ids"])), "samples": len(data.train),
                  "peak_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before_peak,
                  "anon_growth": status("RssAnon") - before_anon,
                  "mapped": type(data.train.arrays["ids"]).__name__ == "memmap"}))
"""


def probe(data: Path, tok: Path, cache: Path) -> dict:
    env = dict(os.environ, TUNELAB_CACHE=str(cache), PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(data), str(tok)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from Linux /proc")
def test_encoding_200k_records_stays_within_the_bound_and_a_second_run_maps_the_cache(tokenizer, tmp_path):
    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for i in range(RECORDS):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Count to {i % 97}, please."},
                            {"role": "assistant", "content": f"One to {i % 89}, done."},
                        ]
                    }
                )
                + "\n"
            )
    tokenizer.save_pretrained(tmp_path / "tok")
    cold = probe(data, tmp_path / "tok", tmp_path / "cache")
    assert cold["samples"] == RECORDS and cold["mapped"]
    assert cold["peak_growth"] <= PEAK_BYTES_PER_TOKEN * cold["tokens"], cold["peak_growth"] / cold["tokens"]

    warm = probe(data, tmp_path / "tok", tmp_path / "cache")
    assert warm["tokens"] == cold["tokens"] and warm["mapped"]
    storage = 5 * warm["tokens"]
    # the samples stay in the page cache, shared; private memory grows by the row index and the
    # per-sample arrays the loader reads, not by the tokens
    assert warm["anon_growth"] < 0.05 * storage, (warm["anon_growth"], storage)
