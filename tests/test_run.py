"""The whole run on a micro configuration: an untrained tiny model, two tasks, a handful of records."""
import functools
import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import data
import smolora

TASKS = "scienceqa,grounding"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """An untrained tiny LLaVA checkpoint and a synthetic data root of two tasks."""
    root = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    processor = data.build_processor()
    smolora.save_checkpoint(smolora.build_tiny_model(processor), processor, root / "model")
    data.make_synthetic(root / "data", TASKS.split(","), n_train=8, n_test=4, seed=0, progress=False)
    return root


def run_args(micro, out, method="smolora", *extra):
    return ["--tasks", TASKS, "--method", method, "--model", str(micro / "model"), "--data", str(micro / "data"),
            "--out", str(out), "--epochs", "1", "--batch-size", "4", "--r", "8", "--alpha", "16", "--experts", "4",
            "--cache", str(micro / "cache"), *extra]


def results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", ["lora", "moelora", "smolora"])
def test_each_method_runs_end_to_end(micro, tmp_path, method):
    smolora.main(run_args(micro, tmp_path, method))
    saved = results(tmp_path)
    assert saved["method"] == method and saved["tasks"] == TASKS.split(",")
    assert len(saved["matrix"]) == 3 and all(v is not None for row in saved["matrix"] + saved["mif"] for v in row)
    assert saved["config"]["r"] == 8 and saved["metrics"]["AP"] is not None
    for stage in range(3):
        for task in TASKS.split(","):
            lines = (tmp_path / "predictions" / f"stage{stage}" / f"{task}.jsonl").read_text().splitlines()
            assert len(lines) == 4
    assert (tmp_path / "adapters" / "stage2.safetensors").exists()
    assert (tmp_path / "matrix.md").exists() and (tmp_path / "matrix.png").exists()


def interrupt(monkeypatch, at_call):
    """Make the at_call-th training step raise, as a kill would."""
    real, calls = smolora.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(smolora, "train_step", step)


@pytest.mark.parametrize("at_call, every", [(3, 300), (4, 0)])   # at a stage boundary; mid-stage from a checkpoint
def test_resume_gives_the_matrix_of_an_uninterrupted_run(micro, tmp_path, monkeypatch, at_call, every):
    smolora.main(run_args(micro, tmp_path / "whole", "smolora", "--max-train", "8"))
    monkeypatch.setattr(smolora, "CHECKPOINT_SECONDS", every)
    with monkeypatch.context() as m:
        interrupt(m, at_call)             # stage 1 has 2 steps: call 3 is stage 2's first, call 4 its second
        with pytest.raises(KeyboardInterrupt):
            smolora.main(run_args(micro, tmp_path / "cut", "smolora", "--max-train", "8"))
    assert (tmp_path / "cut" / "checkpoint.pt").exists() == (every == 0)
    smolora.main(run_args(micro, tmp_path / "cut", "smolora", "--max-train", "8", "--resume"))
    assert results(tmp_path / "cut")["matrix"] == results(tmp_path / "whole")["matrix"]
    whole = smolora.safetensors.torch.load_file(tmp_path / "whole" / "adapters" / "stage2.safetensors")
    cut = smolora.safetensors.torch.load_file(tmp_path / "cut" / "adapters" / "stage2.safetensors")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def exits_with_2(args, capsys):
    capsys.readouterr()                  # what earlier runs printed
    with pytest.raises(SystemExit) as exit_:
        smolora.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]          # after the progress bars, if any
    assert message.startswith("smolora.py: error: ") and "Traceback" not in err
    return message


def test_bad_input_exits_with_status_2(micro, tmp_path, capsys):
    assert "'qlora'" in exits_with_2(run_args(micro, tmp_path / "a", "qlora"), capsys)
    assert "'scienceqa,chess'" in exits_with_2(["--tasks", "scienceqa,chess"], capsys)
    (tmp_path / "notllava").mkdir()
    args = run_args(micro, tmp_path / "b")
    args[args.index("--model") + 1] = str(tmp_path / "notllava")
    assert "not a LLaVA checkpoint" in exits_with_2(args, capsys)
    args = run_args(micro, tmp_path / "c")
    args[args.index("--tasks") + 1] = "scienceqa,textvqa"     # the data root has no textvqa
    assert "textvqa" in exits_with_2(args, capsys)


def test_out_folder_of_another_run_is_refused(micro, tmp_path, capsys):
    out = tmp_path / "run"
    smolora.main(run_args(micro, out, "lora"))
    before = (out / "results.json").read_text()
    message = exits_with_2(run_args(micro, out, "smolora"), capsys)
    assert "different run" in message and "method='lora'" in message
    exits_with_2(run_args(micro, out, "smolora", "--resume"), capsys)
    assert (out / "results.json").read_text() == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(micro, tmp_path, monkeypatch, capsys):
    real, calls = LlavaForConditionalGeneration.forward, []

    @functools.wraps(real)      # generate checks its arguments against forward's signature
    def forward(self, *args, **kwargs):
        output = real(self, *args, **kwargs)
        if kwargs.get("labels") is not None:
            calls.append(1)
            if len(calls) == 3:            # stage 2's first step
                output.loss = output.loss * float("nan")
        return output
    monkeypatch.setattr(LlavaForConditionalGeneration, "forward", forward)
    message = exits_with_2(run_args(micro, tmp_path, "lora", "--max-train", "8"), capsys)
    assert "nan" in message and "stage 2" in message and "stage1.safetensors" in message
    assert (tmp_path / "adapters" / "stage1.safetensors").exists()
    assert results(tmp_path)["matrix"][1][0] is not None


def test_smolora_routes_a_record_alike_in_training_and_in_generation(micro):
    """Avg(x) over the prompt in both: the experts that train a record are the experts that answer it."""
    model, processor = smolora.load_model(micro / "model")
    torch.manual_seed(0)
    smolora.add_adapters(model, "smolora", r=8, alpha=16, num_experts=4)
    layers = [m for m in model.modules() if isinstance(m, smolora.SMoLoRALinear)]
    records = [r for task in TASKS.split(",") for r in data.load_records(micro / "data", task, "train")]

    def experts(batch):
        smolora.route_batch(model, batch)
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"])
        return torch.stack([m.routing[0] for m in layers], dim=1)     # (B, layers, 2, k)
    trained = experts(data.Collator(processor, train=True)(records))  # answers and EOS in the batch, right-padded
    answered = experts(data.Collator(processor, train=False)(records[::-1])).flip(0)   # prompts, left-padded
    assert torch.equal(trained, answered)
