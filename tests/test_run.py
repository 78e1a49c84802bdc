"""The whole run on a micro configuration: an untrained tiny model, two tasks, a handful of records."""
import functools
import json
import os
import shutil
import signal

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import data
import smolora
from conftest import make_micro

TASKS = "scienceqa,grounding"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """An untrained tiny LLaVA checkpoint and a synthetic data root of two tasks."""
    return make_micro(tmp_path_factory.mktemp("micro"), TASKS.split(","), n_train=8, n_test=4)


def run_args(micro, out, method="smolora", *extra):
    return ["--tasks", TASKS, "--method", method, "--model", str(micro / "model"), "--data", str(micro / "data"),
            "--out", str(out), "--epochs", "1", "--batch-size", "4", "--grad-accum", "1", "--r", "8", "--alpha", "16",
            "--experts", "4", "--cache", str(micro / "cache"), *extra]


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


def exits_interrupted(args, capsys):
    """main on a Ctrl-C: status 130 and one line, no traceback; returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        smolora.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def same_run(a, b):
    assert results(a)["matrix"] == results(b)["matrix"]
    for stage in (1, 2):
        x, y = (smolora.safetensors.torch.load_file(run / "adapters" / f"stage{stage}.safetensors") for run in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# stage 1 has 2 steps: call 3 is stage 2's first, call 4 its second (after a periodic checkpoint when every is 0)
@pytest.mark.parametrize("at_call, every, step", [(3, 300, 0), (4, 0, 1), (4, 300, 1)])
def test_resume_gives_the_matrix_of_an_uninterrupted_run(micro, tmp_path, monkeypatch, capsys, at_call, every, step):
    smolora.main(run_args(micro, tmp_path / "whole", "smolora", "--max-train", "8"))
    monkeypatch.setattr(smolora, "CHECKPOINT_SECONDS", every)
    with monkeypatch.context() as m:
        interrupt(m, at_call)
        line = exits_interrupted(run_args(micro, tmp_path / "cut", "smolora", "--max-train", "8"), capsys)
    assert line == f"interrupted at stage 2 step {step}; continue with --resume"
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == step
    smolora.main(run_args(micro, tmp_path / "cut", "smolora", "--max-train", "8", "--resume"))
    same_run(tmp_path / "cut", tmp_path / "whole")


def test_an_interrupt_inside_an_accumulated_step_drops_that_step_whole(micro, tmp_path, monkeypatch, capsys):
    """Micro-batch 4 of 4 a stage (2 steps of 2): the step's first micro-batch and its dropout draws are undone."""
    args = run_args(micro, tmp_path / "whole", "smolora", "--max-train", "8", "--batch-size", "2", "--grad-accum", "2")
    smolora.main(args)
    real, calls = smolora.answer_loss, []

    def loss(*a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a)
    cut = [str(tmp_path / "cut") if a == str(tmp_path / "whole") else a for a in args]
    with monkeypatch.context() as m:
        m.setattr(smolora, "answer_loss", loss)
        assert exits_interrupted(cut, capsys) == "interrupted at stage 1 step 1; continue with --resume"
    smolora.main(cut + ["--resume"])
    same_run(tmp_path / "cut", tmp_path / "whole")


def test_ctrl_c_during_the_optimizer_update_waits_for_it(micro, tmp_path, monkeypatch, capsys):
    """A real SIGINT in the middle of AdamW's update: the update completes, the step counts, resume is exact."""
    smolora.main(run_args(micro, tmp_path / "whole", "lora", "--max-train", "8"))
    real, calls, handler = torch.optim.AdamW.step, [], signal.getsignal(signal.SIGINT)   # SIG_IGN in a background job

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", step)
        line = exits_interrupted(run_args(micro, tmp_path / "cut", "lora", "--max-train", "8"), capsys)
    assert line == "interrupted at stage 2 step 1; continue with --resume"
    assert signal.getsignal(signal.SIGINT) is handler                          # given back as it was
    smolora.main(run_args(micro, tmp_path / "cut", "lora", "--max-train", "8", "--resume"))
    same_run(tmp_path / "cut", tmp_path / "whole")


def test_an_interrupt_in_evaluation_keeps_the_predictions_saved(micro, tmp_path, monkeypatch, capsys):
    real, calls = smolora.eval.generate_predictions, []

    def generate(*a, **k):
        calls.append(1)
        if len(calls) == 4:                         # stage 1's second task
            raise KeyboardInterrupt
        return real(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(smolora.eval, "generate_predictions", generate)
        line = exits_interrupted(run_args(micro, tmp_path, "lora", "--max-train", "8"), capsys)
    assert "continue with --resume" in line
    kept = tmp_path / "predictions" / "stage1" / "scienceqa.jsonl"
    before = kept.read_text()
    smolora.main(run_args(micro, tmp_path, "lora", "--max-train", "8", "--resume"))
    assert kept.read_text() == before and len(calls) == 4     # reused, not generated again


def test_a_checkpoint_that_would_run_code_is_refused(micro, tmp_path, monkeypatch, capsys):
    """checkpoint.pt is read with weights_only=True: a pickled callable is refused, and never called."""
    monkeypatch.setattr(smolora, "CHECKPOINT_SECONDS", 0)
    with monkeypatch.context() as m:
        interrupt(m, 2)
        exits_interrupted(run_args(micro, tmp_path, "lora", "--max-train", "8"), capsys)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)      # what we save loads this way
    state["stage"] = Payload()
    torch.save(state, tmp_path / "checkpoint.pt")
    message = exits_with_2(run_args(micro, tmp_path, "lora", "--max-train", "8", "--resume"), capsys)
    assert "checkpoint.pt" in message and "refused" in message and not RAN


RAN = []


def mark():
    RAN.append("ran")


class Payload:
    def __reduce__(self):
        return mark, ()


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


def test_a_run_saved_before_a_knob_existed_resumes_as_if_it_had_the_default(micro, tmp_path, capsys):
    out = tmp_path / "run"
    smolora.main(run_args(micro, out, "lora"))
    saved = json.loads((out / "results.json").read_text())
    del saved["config"]["layers"], saved["config"]["replay_ratio"]     # lora's replay_ratio is None
    (out / "results.json").write_text(json.dumps(saved))
    smolora.main(run_args(micro, out, "lora", "--resume"))
    message = exits_with_2(run_args(micro, out, "lora", "--resume", "--layers", "smolora"), capsys)
    assert "different run" in message and "layers='own'" in message


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


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(micro):
    """--grad-accum: two micro-batches of 2 records take the step one batch of 4 takes (answers of equal token
    counts, so the mean of the micro-batches' means is the batch's mean). SGD at lr 1 shows the gradient."""
    model, processor = smolora.load_model(micro / "model")
    records = data.load_records(micro / "data", "scienceqa", "train")[:4]
    collate = data.Collator(processor, train=True)
    assert len({(collate([r])["labels"] != -100).sum().item() for r in records}) == 1
    torch.manual_seed(0)
    smolora.add_adapters(model, "lora", r=4, alpha=8)
    start = smolora.adapter_state_dict(model)

    def gradient(batches):
        smolora.load_adapter_state_dict(model, start)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        smolora.train_step(model, batches, optimizer, schedule, max_grad_norm=1e9)
        return {k: start[k] - v for k, v in smolora.adapter_state_dict(model).items()}
    whole, accumulated = gradient([collate(records)]), gradient([collate(records[:2]), collate(records[2:])])
    half = gradient([collate(records[:2])])
    assert all(torch.allclose(whole[k], accumulated[k], atol=1e-6) for k in whole)
    assert not all(torch.allclose(whole[k], half[k], atol=1e-6) for k in whole)


def test_device_dtype_and_out_that_cannot_work_exit_with_status_2(micro, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("")
    assert "--out" in exits_with_2(run_args(micro, tmp_path / "a-file"), capsys)
    assert "float64" in exits_with_2(run_args(micro, tmp_path / "b", "lora", "--dtype", "float64"), capsys)
    assert "--device gpu" in exits_with_2(run_args(micro, tmp_path / "b", "lora", "--device", "gpu"), capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA" in exits_with_2(run_args(micro, tmp_path / "b", "lora", "--device", "cuda"), capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)         # a card without bfloat16 (a T4, a V100)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100")
    assert "--dtype bfloat16" in exits_with_2(run_args(micro, tmp_path / "b", "lora", "--device", "cuda"), capsys)
    assert not (tmp_path / "b").exists()


def test_a_checkpoint_asking_for_its_own_code_never_runs_it(micro, tmp_path):
    """load_model never passes trust_remote_code: a processor naming code in the folder is refused, not run."""
    model = tmp_path / "model"
    shutil.copytree(micro / "model", model)
    (model / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n"
                                   "from transformers import LlavaProcessor as EvilProcessor\n")
    config = json.loads((model / "processor_config.json").read_text())
    config["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
    (model / "processor_config.json").write_text(json.dumps(config))
    try:
        smolora.load_model(model)
    except ValueError as e:
        assert "not a LLaVA checkpoint" in str(e) and "\n" not in str(e)
    assert not (tmp_path / "ran").exists()


def test_every_flag_is_a_config_field_with_the_fields_default():
    import argparse
    from dataclasses import MISSING, fields
    flags = {a.dest: a for a in smolora.command_line()._actions if a.dest != "help"}
    knobs = {k.name: k for k in fields(smolora.Config)}
    assert list(flags) == list(knobs)                                  # one flag per field, in its order
    assert all(a.default is argparse.SUPPRESS for a in flags.values())  # no default written twice
    given, = smolora.parse_configs(["--tasks", "scienceqa"])
    assert given == smolora.Config(tasks=["scienceqa"]) and given.r == 32 and given.replay_ratio is None
    for name, knob in knobs.items():
        if knob.default not in (MISSING, None, False):
            assert f"default {knob.default}" in flags[name].help, name
            if not knob.metadata.get("owner"):                          # the flag typed back gives it
                again, = smolora.parse_configs(["--tasks", "scienceqa", f"--{name.replace('_', '-')}",
                                                str(knob.default)])
                assert again == given, name
