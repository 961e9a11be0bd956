"""The config is one flat YAML mapping, overridable by `key=value`, validated once with every problem reported."""

from pathlib import Path

import pytest

from tunelab.config import (
    DATA_KEYS,
    FIELDS,
    GROUPS,
    RESUME_MAY_CHANGE,
    Config,
    dump_config,
    from_dict,
    keys_help,
    keys_markdown,
    load_config,
    parse_overrides,
)
from tunelab.errors import TunelabError

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it

BASE = "model: org/base-model\ndataset: /data/train.jsonl\noutput_dir: /runs/out\n"


@pytest.fixture()
def yaml_file(tmp_path):
    """yaml_file(text, name='run.yaml') -> path of a YAML file written under tmp_path."""

    def write(text: str, name: str = "run.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write


def error_of(path=None, overrides=None) -> str:
    with pytest.raises(TunelabError) as info:
        load_config(path, overrides)
    return str(info.value)


# --- reading and overriding -------------------------------------------------------------------------------


def test_yaml_values_fill_the_config_and_unset_keys_keep_their_defaults(yaml_file):
    cfg = load_config(yaml_file(BASE + "lora_r: 32\nnum_train_epochs: 2\n"))
    assert isinstance(cfg, Config)
    assert (cfg.model, cfg.dataset, cfg.output_dir) == ("org/base-model", "/data/train.jsonl", "/runs/out")
    assert cfg.lora_r == 32
    assert cfg.num_train_epochs == 2.0 and isinstance(cfg.num_train_epochs, float), "an int is accepted as a float"
    assert cfg.lora_alpha == 16 and cfg.learning_rate == 1e-4 and cfg.finetuning_type == "lora"


def test_overrides_win_over_the_yaml_file(yaml_file):
    cfg = load_config(
        yaml_file(BASE + "lora_r: 8\nlearning_rate: 0.001\n"),
        ["lora_r=16", "learning_rate=1e-4", "output_dir=/runs/other"],
    )
    assert cfg.lora_r == 16
    assert cfg.learning_rate == 1e-4
    assert cfg.output_dir == "/runs/other"


def test_override_values_are_parsed_as_yaml():
    """lora_r=16 is an int, bf16=true a bool, learning_rate=1e-4 a float (YAML 1.1 alone would give a string)."""
    assert parse_overrides(
        ["lora_r=16", "bf16=true", "learning_rate=1e-4", "system=Be brief.", "max_samples=null"]
    ) == {"lora_r": 16, "bf16": True, "learning_rate": "1e-4", "system": "Be brief.", "max_samples": None}
    cfg = load_config(
        overrides=["model=m", "dataset=d.jsonl", "output_dir=o", "lora_r=16", "bf16=true", "learning_rate=1e-4"]
    )
    assert cfg.lora_r == 16 and type(cfg.lora_r) is int
    assert cfg.bf16 is True
    assert cfg.learning_rate == 1e-4 and type(cfg.learning_rate) is float


def test_an_override_value_may_itself_contain_an_equals_sign():
    assert parse_overrides(["system=a=b"]) == {"system": "a=b"}


def test_an_override_without_equals_sign_is_an_error():
    with pytest.raises(TunelabError, match=r"override 'lora_r': expected key=value"):
        parse_overrides(["lora_r"])


def test_overrides_may_be_given_as_a_dict(yaml_file):
    cfg = load_config(yaml_file(BASE), {"lora_r": 4, "template": "chatml"})
    assert (cfg.lora_r, cfg.template) == (4, "chatml")


def test_scientific_notation_in_the_yaml_file_is_a_float(yaml_file):
    """PyYAML (YAML 1.1) reads `2e-5` as the string '2e-5'; float keys still get the number."""
    cfg = load_config(yaml_file(BASE + "learning_rate: 2e-5\nweight_decay: 1e-2\n"))
    assert cfg.learning_rate == 2e-5 and type(cfg.learning_rate) is float
    assert cfg.weight_decay == 0.01


def test_dataset_may_be_a_list(yaml_file):
    cfg = load_config(yaml_file("model: m\noutput_dir: o\ndataset: [/d/a.jsonl, /d/b.json]\n"))
    assert cfg.datasets == ["/d/a.jsonl", "/d/b.json"]
    assert cfg.eval_datasets == []


# --- paths --------------------------------------------------------------------------------------------------


def test_relative_dataset_paths_are_resolved_against_the_yaml_folder(tmp_path, yaml_file):
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "train.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "cfg" / "data" / "eval.jsonl").write_text("", encoding="utf-8")
    path = yaml_file(
        "model: m\noutput_dir: o\ndataset: data/train.jsonl\neval_dataset: [data/eval.jsonl]\n", name="cfg/run.yaml"
    )
    cfg = load_config(path)
    assert cfg.dataset == str(tmp_path / "cfg" / "data" / "train.jsonl")
    assert cfg.eval_dataset == [str(tmp_path / "cfg" / "data" / "eval.jsonl")]


def test_output_dir_is_relative_to_the_yaml_and_an_override_to_where_the_command_runs(tmp_path, yaml_file):
    path = yaml_file("model: m\ndataset: /d.jsonl\noutput_dir: ../outputs/run\n", name="cfg/run.yaml")
    assert load_config(path).output_dir == str(tmp_path / "cfg" / ".." / "outputs" / "run")
    assert load_config(path, ["output_dir=here"]).output_dir == "here"
    absolute = yaml_file(f"model: m\ndataset: /d.jsonl\noutput_dir: {tmp_path / 'abs'}\n", name="cfg/abs.yaml")
    assert load_config(absolute).output_dir == str(tmp_path / "abs")


def test_a_dataset_name_that_is_no_file_next_to_the_yaml_is_kept_as_written(yaml_file):
    cfg = load_config(yaml_file("model: m\noutput_dir: o\ndataset: someone/hub-dataset\n"))
    assert cfg.dataset == "someone/hub-dataset"


# --- errors -------------------------------------------------------------------------------------------------


def test_an_unknown_key_names_the_closest_valid_key(yaml_file):
    msg = error_of(yaml_file(BASE + "learnig_rate: 0.001\n"))
    assert "unknown key 'learnig_rate'; did you mean 'learning_rate'?" in msg


def test_an_unknown_override_key_names_the_closest_valid_key(yaml_file):
    msg = error_of(yaml_file(BASE), ["lora_alpah=32"])
    assert "unknown key 'lora_alpah'; did you mean 'lora_alpha'?" in msg


def test_an_unknown_key_with_no_close_match_gets_no_suggestion(yaml_file):
    msg = error_of(yaml_file(BASE + "zzz: 1\n"))
    assert "unknown key 'zzz'" in msg
    assert "did you mean" not in msg


def test_a_bad_choice_names_the_key_the_value_and_the_allowed_values(yaml_file):
    msg = error_of(yaml_file(BASE + "finetuning_type: qlora\n"))
    assert "finetuning_type: 'qlora' is not one of lora, full; QLoRA is finetuning_type: lora with load_in_4bit" in msg


def test_a_wrong_type_names_the_key_the_value_and_the_expected_type(yaml_file):
    assert "lora_r: 'big' is not valid, expected an integer" in error_of(yaml_file(BASE + "lora_r: big\n"))
    assert "bf16: 'yes please' is not valid, expected true/false or null" in error_of(
        yaml_file(BASE + "bf16: yes please\n")
    )
    assert "learning_rate: True is not valid, expected a number" in error_of(yaml_file(BASE + "learning_rate: true\n"))


def test_ranges_are_checked(yaml_file):
    assert "lora_r: 0 must be greater than 0" in error_of(yaml_file(BASE + "lora_r: 0\n"))
    assert "lora_dropout: 1.5 must be in [0, 1)" in error_of(yaml_file(BASE + "lora_dropout: 1.5\n"))


def test_every_problem_in_one_file_is_reported_in_one_error(yaml_file):
    path = yaml_file(BASE + "learnig_rate: 0.001\nfinetuning_type: qlora\nlora_r: 0\nseed: abc\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}: ")
    for part in (
        "unknown key 'learnig_rate'; did you mean 'learning_rate'?",
        "finetuning_type: 'qlora' is not one of lora, full",
        "lora_r: 0 must be greater than 0",
        "seed: 'abc' is not valid, expected an integer",
    ):
        assert part in msg
    assert msg.count("; ") >= 4


def test_missing_required_keys_are_all_named(yaml_file):
    msg = error_of(yaml_file("lora_r: 8\n"))
    for key in ("model", "dataset", "output_dir"):
        assert f"{key}: missing; it is required" in msg


def test_an_empty_yaml_file_reports_the_required_keys(yaml_file):
    msg = error_of(yaml_file(""))
    assert "model: missing" in msg and "dataset: missing" in msg and "output_dir: missing" in msg


def test_combination_rules(yaml_file):
    assert "bf16 and fp16: both true; choose one" in error_of(yaml_file(BASE + "bf16: true\nfp16: true\n"))
    assert "val_size: 1.5 must be a fraction in [0, 1) or a whole count of records" in error_of(
        yaml_file(BASE + "val_size: 1.5\n")
    )
    assert "learning_rate: 0.0 must be greater than 0" in error_of(yaml_file(BASE + "learning_rate: 0\n"))


def test_val_size_may_be_a_fraction_or_a_whole_count(yaml_file):
    assert load_config(yaml_file(BASE + "val_size: 0.1\n")).val_size == 0.1
    assert load_config(yaml_file(BASE + "val_size: 50\n")).val_size == 50.0


def test_invalid_yaml_names_the_file_and_the_line(yaml_file):
    path = yaml_file("model: m\ndataset: [a.jsonl\noutput_dir: o\n")
    msg = error_of(path)
    assert msg.startswith(f"{path} line 3: not valid YAML")


def test_a_yaml_file_that_is_not_a_mapping_is_an_error(yaml_file):
    path = yaml_file("- model\n- dataset\n")
    assert error_of(path) == f"{path}: expected a mapping of keys to values at the top level"


def test_a_missing_config_file_is_an_error(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"{path}: config file not found"


def test_from_dict_reports_with_its_source_name():
    with pytest.raises(TunelabError, match=r"^my-source: model: missing; it is required$"):
        from_dict({"dataset": "d", "output_dir": "o"}, source="my-source")


# --- dump ---------------------------------------------------------------------------------------------------


def test_dump_config_round_trips_through_load_config(tmp_path, yaml_file):
    cfg = load_config(
        yaml_file(
            BASE + "learning_rate: 2e-5\nlora_target: [q_proj, v_proj]\n"
            "columns: {instruction: question, output: answer}\nsystem: Be brief.\n"
            "bf16: true\nval_size: 0.05\nmax_samples: 100\n"
        )
    )
    out = tmp_path / "dumped.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.columns == {"instruction": "question", "output": "answer"}
    assert again.lora_target == ["q_proj", "v_proj"]


# --- the facts each key carries -------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- keys:start -->\n", "<!-- keys:end -->"
REQUIRED_KEYS = {"model": "org/base-model", "dataset": "/data/train.jsonl", "output_dir": "/runs/out"}


def test_the_readme_key_tables_are_generated_from_the_config():
    text = README.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, f"README.md needs one {START.strip()} ... {END} block"
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block == keys_markdown(), (
        "README.md's config key tables differ from the field metadata in src/tunelab/config.py; "
        "regenerate them with: python scripts/readme_keys.py"
    )


def test_every_key_says_what_it_is_for_and_where_it_belongs():
    for name, f in FIELDS.items():
        assert f.metadata.get("help", "").strip(), f"{name}: no help text"
        assert f.metadata.get("group") in GROUPS, f"{name}: group {f.metadata.get('group')!r} not in {GROUPS}"
        assert name in keys_help()


def test_the_cache_and_resume_key_sets_are_the_specified_ones_and_disjoint():
    assert set(DATA_KEYS) == {
        "dataset",
        "eval_dataset",
        "dataset_format",
        "columns",
        "template",
        "system",
        "cutoff_len",
        "max_samples",
        "val_size",
        "train_on",
        "tools",
        "reasoning",
        "expand_turns",
        "bad_records",
        "seed",
        "model_hub",
        "stage",
    }
    assert list(DATA_KEYS) == [name for name in FIELDS if name in DATA_KEYS]
    assert RESUME_MAY_CHANGE == {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "report_to",
        "run_name",
        "num_train_epochs",
        "max_steps",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "per_device_eval_batch_size",
        "on_bad_loss",
        "loss_spike_factor",
        "node_rank",
        "master_addr",
        "master_port",
        "ddp_timeout",
        "preprocessing_num_workers",
    }
    assert not set(DATA_KEYS) & RESUME_MAY_CHANGE


@pytest.mark.parametrize("name", [name for name, f in FIELDS.items() if f.metadata["choices"]])
def test_a_key_with_choices_rejects_another_value_naming_the_allowed_ones(name):
    choices = FIELDS[name].metadata["choices"]
    bad = 99 if all(isinstance(c, int) for c in choices) else "no-such-choice"
    with pytest.raises(TunelabError) as info:
        from_dict({**REQUIRED_KEYS, name: bad})
    allowed = ", ".join(map(str, choices))
    assert f"{name}: {bad!r} is not one of {allowed}" in str(info.value)
    from_dict({**REQUIRED_KEYS, name: FIELDS[name].metadata["choices"][-1]})
