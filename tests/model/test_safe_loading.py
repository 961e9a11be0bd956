"""Safe defaults: safetensors only unless pickle is allowed, and no network for local or offline models."""

import shutil
import socket

import pytest
import torch

from tunelab.config import from_dict
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


def _cfg(tmp_path, model, chat_file, **kw):
    return from_dict(dict(model=model, dataset=chat_file, output_dir=str(tmp_path / "out"), max_steps=1,
                          per_device_train_batch_size=2, **kw))


def test_pickle_weights_are_refused_by_default(tmp_path, pickle_only, chat_file):
    with pytest.raises(TunelabError, match=r"only pickle-based weights \(pytorch_model.bin\).*allow_pickle: true"):
        train(_cfg(tmp_path, pickle_only, chat_file))


def test_pickle_weights_load_when_allowed(tmp_path, pickle_only, chat_file):
    assert train(_cfg(tmp_path, pickle_only, chat_file, allow_pickle=True)).summary["global_step"] == 1


@pytest.fixture()
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_a_local_folder_never_touches_the_network(tmp_path, llama_dir, chat_file, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert train(_cfg(tmp_path, llama_dir, chat_file)).summary["global_step"] == 1
    assert no_network == []


def test_offline_hub_id_fails_in_one_line_without_trying_the_network(tmp_path, chat_file, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunelabError, match=r"model: 'some-org/some-model' is not a local folder"):
        train(_cfg(tmp_path, "some-org/some-model", chat_file))
    assert no_network == []
