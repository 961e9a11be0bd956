"""`sweep`: the cross product of the values, one run folder each, one comparison table, resumable."""

import csv
import json

import pytest
import yaml

from tunelab import sweep as sweep_module
from tunelab.cli import main
from tunelab.sweep import parse_grid, run_sweep


@pytest.fixture()
def sweep_config(tmp_path, llama_dir, chat_file):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            dict(
                model=llama_dir,
                dataset=chat_file,
                output_dir=str(tmp_path / "sweep"),
                max_steps=4,
                per_device_train_batch_size=4,
                logging_steps=1,
                learning_rate=1e-3,
                lr_scheduler_type="constant",
            )
        )
    )
    return str(path)


def test_grid_values_are_typed_and_bracket_aware():
    grid = parse_grid(["lora_r=8,16", "learning_rate=1e-4,2e-4", "lora_target=[q_proj,v_proj],all-linear"])
    assert grid == {
        "lora_r": [8, 16],
        "learning_rate": [1e-4, 2e-4],
        "lora_target": [["q_proj", "v_proj"], "all-linear"],
    }


def test_two_by_two_sweep_gives_four_rows_a_plot_and_resumes(sweep_config, chat_file, tmp_path, monkeypatch):
    calls = []
    real_train = sweep_module.train

    def flaky(cfg):
        calls.append(cfg.output_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine went away during the third run
        return real_train(cfg)

    monkeypatch.setattr(sweep_module, "train", flaky)
    grid = ["lora_r=4,8", "learning_rate=1e-3,5e-3"]
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_config, grid, eval_dataset=chat_file, max_new_tokens=8)
    first_two = list(calls)

    calls.clear()
    rows = run_sweep(sweep_config, grid, eval_dataset=chat_file, max_new_tokens=8)
    assert len(calls) == 2 and not set(calls) & set(first_two[:2])  # finished points were not trained again
    assert len(rows) == 4
    assert {(r["lora_r"], r["learning_rate"]) for r in rows} == {(4, 1e-3), (4, 5e-3), (8, 1e-3), (8, 5e-3)}
    assert sum(r["best"] == "*" for r in rows) == 1
    best = next(r for r in rows if r["best"])
    assert best["eval_loss"] == min(r["eval_loss"] for r in rows)
    assert rows[0]["trainable_params"] < rows[2]["trainable_params"]  # rank 4 vs rank 8

    root = tmp_path / "sweep"
    for row in rows:  # each run trained with its own point's values, not the file's
        run = root / row["run"]
        assert json.loads((run / "adapter_config.json").read_text())["r"] == row["lora_r"]
        lrs = {m["lr"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in m}
        assert lrs and max(lrs) == pytest.approx(row["learning_rate"]), (row["run"], lrs)
    with (root / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {
        "run",
        "lora_r",
        "learning_rate",
        "train_loss",
        "eval_loss",
        "bleu-4",
        "rouge-l",
        "exact_match",
        "train_seconds",
        "trainable_params",
        "best",
    } <= set(table[0])
    assert (root / "sweep_loss.png").stat().st_size > 1000
    assert "best: " + best["run"] in (root / "sweep.md").read_text()
    assert all(json.loads((root / r["run"] / "sweep_eval.json").read_text())["row"]["samples"] == 24 for r in rows)


@pytest.mark.parametrize(
    "grid, message",
    [
        (["lora_rank=8,16"], "unknown key 'lora_rank'; did you mean 'lora_r'?"),
        (["lora_r=8,,16"], "lora_r: empty value"),
        (["lora_r=8,abc"], "lora_r: 'abc' is not valid"),
        (["lora_r"], "not key=value"),
        (["output_dir=a,b"], "output_dir cannot be swept"),
    ],
)
def test_bad_grids_fail_before_any_training(grid, message, sweep_config, tmp_path, capsys):
    assert main(["sweep", sweep_config, *grid]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "sweep").exists()


def test_a_finished_run_is_freed_before_the_next_one_trains(sweep_config, monkeypatch):
    """On a GPU the second run would otherwise find the first one's model still holding memory."""
    import weakref

    refs = []
    real_train = sweep_module.train

    def watched(cfg):
        assert all(ref() is None for ref in refs), "the previous run's model is still alive"
        result = real_train(cfg)
        refs.append(weakref.ref(result.model))
        return result

    monkeypatch.setattr(sweep_module, "train", watched)
    run_sweep(sweep_config, ["lora_r=2,4"])
    assert len(refs) == 2


def test_a_preference_sweep_compares_pref_accuracy_on_held_out_pairs(tmp_path, llama_dir, write_data):
    rows = [
        {
            "messages": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": f"A careful, complete answer to question {i}.",
            "rejected": f"no {i}",
        }
        for i in range(12)
    ]
    data, held = write_data("pairs.jsonl", rows[:8]), write_data("held.jsonl", rows[8:])
    path = tmp_path / "dpo.yaml"
    path.write_text(
        yaml.safe_dump(
            dict(
                model=llama_dir,
                dataset=data,
                stage="dpo",
                output_dir=str(tmp_path / "sweep"),
                max_steps=3,
                per_device_train_batch_size=4,
                logging_steps=1,
                lora_dropout=0.0,
            )
        )
    )
    result = run_sweep(str(path), ["learning_rate=1e-4,1e-2"], eval_dataset=held)
    assert len(result) == 2 and all(r["pref_accuracy"] is not None and "logp_margin" in r for r in result)
    best = max(result, key=lambda r: (r["pref_accuracy"], r["logp_margin"]))
    assert [r["best"] for r in result].count("*") == 1 and best["best"] == "*"
    assert best["learning_rate"] == 1e-2  # the larger step moves the held-out margin the most in 3 steps
