"""Which models a command line names: a LoRA run folder alone stands for its base plus itself; given as
`--model` beside `--adapter`, it is refused with what to pass instead (not transformers' `model_type` error)."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.infer.load import split_run_folder

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


def test_a_lora_run_folder_stands_for_its_base_alone_and_is_refused_beside_an_adapter(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert split_run_folder(str(run), None) == ("org/base", [str(run)])
    with pytest.raises(TunelabError, match=r"--model: '.*run' is a LoRA run folder, not a model; pass it alone"):
        split_run_folder(str(run), [str(tmp_path / "other")])
    full = tmp_path / "full"  # a full fine-tune's folder holds a model: it is a base for adapters
    full.mkdir()
    (full / "config.json").write_text("{}")
    assert split_run_folder(str(full), ["a"]) == (str(full), ["a"])
