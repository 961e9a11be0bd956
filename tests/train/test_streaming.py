"""A streamed run trains for max_steps pass after pass, and a kill mid-save resumes it exactly: the
checkpoint says where the next step's data starts, and the resumed stream skips the chunks before it
without encoding them."""

import json
import signal

from tunelab.config import from_dict
from tunelab.data import pool, readers
from tunelab.data.stream import STATE_FILE, Position
from tunelab.train.run import train

from .test_resume import assert_same_run, child, losses

STEPS = 12


def test_a_streamed_run_killed_mid_save_resumes_from_its_data_position_to_the_same_result(
    llama_dir, tmp_path, monkeypatch
):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"It is {2 * i}, and {i} times two is the same."},
                    ]
                }
            )
            + "\n"
            for i in range(36)
        )
    )
    cfg = dict(
        model=llama_dir,
        dataset=str(data),
        output_dir=str(tmp_path / "run"),
        streaming=True,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_ratio=0.2,
        lora_dropout=0.1,
        logging_steps=1,
        save_steps=2,
        save_total_limit=2,
        seed=3,
        preprocessing_num_workers=2,
    )
    monkeypatch.setattr(readers, "CHUNK_RECORDS", 5)
    reference = train(from_dict({**cfg, "output_dir": str(tmp_path / "reference")}))
    assert reference.summary["global_step"] == STEPS and reference.summary["train_samples"] is None
    assert sorted(losses(tmp_path / "reference")) == list(range(1, STEPS + 1)), "96 samples: 2.7 passes of 36"

    proc = child(cfg, KILL_DURING_SAVE_AT="8", CHUNK_RECORDS="5")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    saved = Position.load(tmp_path / "run" / "checkpoint-6")
    assert saved == Position(passes=1, chunk=2, sample=2, chunk_records=5, served=48)  # 48 = 36 + 12
    assert (tmp_path / "reference" / "checkpoint-12" / STATE_FILE).is_file()

    encoded = []
    run = pool.EncodeJob.run

    def counted(self, chunk, fmt):
        encoded.append(chunk.first_line)
        return run(self, chunk, fmt)

    monkeypatch.setattr(pool.EncodeJob, "run", counted)
    monkeypatch.setattr(readers, "CHUNK_RECORDS", 1024)  # the checkpoint's chunk size rules, not this one
    train(from_dict({**cfg, "resume_from_checkpoint": "auto", "preprocessing_num_workers": 1}))
    assert_same_run(tmp_path / "run", tmp_path / "reference")
    # 48 more samples: records 12-35 of pass 1 from the checkpoint's chunk (lines 11-15) on, the chunks before
    # it never encoded, then pass 2 from its start (and the loader's look ahead)
    assert encoded[:7] == [11, 16, 21, 26, 31, 36, 1] and len(encoded) <= 12, encoded
