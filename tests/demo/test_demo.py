"""`tunelab demo`: offline, on CPU, the loss falls and the tuned model answers >= 80% of the training
questions exactly; its last line is the score."""

import re

from tunelab.cli import main


def test_demo_meets_its_bar(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    score = re.fullmatch(r"score: (\d+)%", out[-1])
    assert score and int(score.group(1)) >= 80, out[-3:]
    curves = [line for line in out if " loss: " in line]
    for line in curves:
        values = [float(x) for x in line.split("loss: ")[1].split(" -> ")]
        assert values[-1] < values[0], line
    assert (tmp_path / "demo" / "lora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "demo" / "full" / "model.safetensors").exists()
