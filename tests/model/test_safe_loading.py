"""Safe defaults: safetensors only unless pickle is allowed, and no network for local or offline models."""

import shutil
import socket

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.train.run import train


@pytest.fixture()
def pickle_only(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    shutil.copytree(llama_dir, folder)
    state = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return str(folder)


def test_pickle_weights_are_refused_by_default(pickle_only, run_config):
    with pytest.raises(TunelabError, match=r"only pickle-based weights \(pytorch_model.bin\).*allow_pickle: true"):
        train(run_config(model=pickle_only, max_steps=1, per_device_train_batch_size=2))


def test_pickle_weights_load_when_allowed(pickle_only, run_config):
    cfg = run_config(model=pickle_only, max_steps=1, per_device_train_batch_size=2, allow_pickle=True)
    assert train(cfg).summary["global_step"] == 1


@pytest.fixture()
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_a_local_folder_never_touches_the_network(llama_dir, run_config, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert train(run_config(model=llama_dir, max_steps=1, per_device_train_batch_size=2)).summary["global_step"] == 1
    assert no_network == []


def test_offline_hub_id_fails_in_one_line_without_trying_the_network(run_config, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunelabError, match=r"model: 'some-org/some-model' is not a local folder"):
        train(run_config(model="some-org/some-model", max_steps=1, per_device_train_batch_size=2))
    assert no_network == []
