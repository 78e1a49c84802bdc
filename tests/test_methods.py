"""Every baseline of the papers' tables, the comparison, unseen tasks, diverse instructions, dual forgetting."""
import json

import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import eval
import smolora
from conftest import make_micro
from test_run import interrupt

TASKS = ["scienceqa", "grounding"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """An untrained tiny LLaVA checkpoint, a synthetic data root of three tasks, and one comparison of every
    method on two of them (the third unseen), evaluated with the paraphrased instructions."""
    root = make_micro(tmp_path_factory.mktemp("micro"), TASKS + ["gqa"], n_train=8, n_test=4)
    smolora.main(run_args(root, root / "compare", "all"))
    return root


def run_args(root, out, method, *extra):
    # lr 1e-2: big enough that one task's tuning changes the untrained model's answers to another's
    return ["--tasks", ",".join(TASKS), "--method", method, "--model", str(root / "model"), "--data",
            str(root / "data"), "--out", str(out), "--epochs", "1", "--batch-size", "4", "--grad-accum", "1",
            "--r", "8", "--alpha", "16", "--experts", "4", "--lr", "1e-2", "--unseen", "gqa", "--instructions",
            "diverse", "--cache", str(root / "cache"), *extra]


def results(out):
    return json.loads((out / "results.json").read_text())


def texts(run, stage, task):
    return [p["text"] for p in eval.load_predictions(run / "predictions" / f"stage{stage}" / f"{task}.jsonl")]


@pytest.mark.parametrize("method", list(smolora.METHODS))
def test_each_method_runs_end_to_end(micro, method):
    run = micro / "compare" / method
    saved = results(run)
    stages = {"zeroshot": 0, "multitask": 1}.get(method, len(TASKS))
    assert saved["method"] == method and saved["notes"] == smolora.METHODS[method].notes
    for table in (saved, saved["unseen"]):
        assert len(table["matrix"]) == len(table["mif"]) == stages + 1
        assert all(v is not None for row in table["matrix"] + table["mif"] for v in row)
    assert saved["unseen"]["tasks"] == ["gqa"] and (run / "predictions" / f"stage{stages}" / "gqa.jsonl").exists()
    final = saved["matrix"][stages]
    assert saved["metrics"]["AP"] == pytest.approx(sum(final) / len(TASKS))      # the unseen task is not in AP
    assert (saved["metrics"]["BWT"] is None) == (stages != len(TASKS))
    assert sorted(p.name for p in (run / "adapters").glob("*")) == [f"stage{t}.safetensors"
                                                                     for t in range(1, stages + 1)]


def test_on_the_first_task_replay_ewc_and_dirlora_train_as_seqlora_does(micro):
    """What lets the benchmark's learning gate share one run among them (benchmark.FIRST_STAGE_AS_LORA)."""
    import benchmark
    def first_stage(method):
        return smolora.safetensors.torch.load_file(micro / "compare" / method / "adapters" / "stage1.safetensors")
    lora = first_stage("lora")
    for method in ("replay", "ewc", "dirlora"):
        assert first_stage(method).keys() == lora.keys()
        assert all(torch.equal(first_stage(method)[n], lora[n]) for n in lora), method
    assert set(benchmark.FIRST_STAGE_AS_LORA) == {"lora", "replay", "ewc", "dirlora"}


@pytest.mark.parametrize("method", ["replay", "ewc", "dirlora"])
def test_what_a_method_adds_to_seqlora_acts_from_the_second_task(micro, method):
    """Same init, data and seed: stage 1 is SeqLoRA's exactly (no memory, no penalty, the first LoRA), stage 2 not."""
    def adapters(run, stage):
        return smolora.safetensors.torch.load_file(micro / "compare" / run / "adapters" / f"stage{stage}.safetensors")
    first, second = adapters(method, 1), adapters(method, 2)
    assert all(torch.equal(first[k], adapters("lora", 1)[k]) for k in first)
    assert not all(torch.equal(second[k], adapters("lora", 2)[k]) for k in second)


def test_evaluation_uses_the_paraphrased_instructions(micro):
    prompts = [p["prompt"] for p in eval.load_predictions(micro / "compare" / "lora" / "predictions" / "stage2" /
                                                          "scienceqa.jsonl")]
    task = data.TASKS["scienceqa"]
    assert all(task.instruction not in p and any(q in p for q in task.paraphrases) for p in prompts)


def test_dirlora_answers_each_task_with_its_own_lora(micro):
    run = micro / "compare" / "dirlora"
    saved = results(run)
    assert saved["metrics"]["BWT"] == 0 and saved["matrix"][2][0] == saved["matrix"][1][0]
    assert texts(run, 2, "scienceqa") == texts(run, 1, "scienceqa")
    assert saved["dual_forgetting"] == {"scienceqa": dict.fromkeys(("drop", *eval.SPLIT), 0.0)}
    # the witness: the second task's LoRA, which a sequential method would answer with, answers differently
    model, processor = smolora.load_model(micro / "model")
    smolora.add_adapters(model, "lora", r=8, alpha=16)
    smolora.load_adapter_state_dict(model, smolora.safetensors.torch.load_file(run / "adapters" / "stage2.safetensors"))
    records = data.load_records(micro / "data", "scienceqa", "test", "diverse")
    other = eval.generate_predictions(model, processor, records, "scienceqa", batch_size=4)
    assert [p["text"] for p in other] != texts(run, 2, "scienceqa")


def test_comparison_files(micro):
    md = (micro / "compare" / "compare.md").read_text()
    for method in smolora.METHODS:
        assert f"| {method} | " in md and f"**{method}**" in md
    lora = results(micro / "compare" / "lora")
    dual = lora["dual_forgetting"]["scienceqa"]
    row = [line for line in md.splitlines() if line.startswith("| lora | ")][0].split(" | ")
    assert row[1] == f"{lora['metrics']['AP']:.2f}" and row[7:10] == [f"{dual[k]:.2f}" for k in eval.SPLIT]
    assert "| zeroshot | " + f"{results(micro / 'compare' / 'zeroshot')['metrics']['AP']:.2f} | – | – |" in md
    with Image.open(micro / "compare" / "compare.png") as png:
        png.load()
        assert png.format == "PNG" and png.width > 600


def test_smolora_reports_where_its_routers_send_each_task(micro):
    assert [m for m in smolora.METHODS if (micro / "compare" / m / "routing.md").exists()] == ["smolora"]
    model, processor = smolora.load_model(micro / "model")
    smolora.add_adapters(model, "smolora", r=8, alpha=16, num_experts=4)
    smolora.load_adapter_state_dict(model, smolora.safetensors.torch.load_file(
        micro / "compare" / "smolora" / "adapters" / "stage2.safetensors"))
    records = data.load_records(micro / "data", "gqa", "test", "diverse")
    picks = smolora.routing_picks(model, processor, records, batch_size=4)
    # by hand, one record at a time: each layer's input x, argmax R_vu . mean_t x_t and argmax R_if . f(X_ins)
    layers = [m for m in model.modules() if isinstance(m, smolora.SMoLoRALinear)]
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for m in layers]
    for record, expected in zip(records, picks):
        inputs.clear()
        batch = data.Collator(processor, train=False)([record])
        ins = smolora.instruction_embedding(model, batch["input_ids"], batch["ins_mask"])[0]
        smolora.route_batch(model, batch)
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"])
            assert expected == [[int(m.vu_router(x[0].mean(dim=0)).argmax()), int(m.if_router(ins).argmax())]
                                for m, x in zip(layers, inputs)]
    for hook in hooks:
        hook.remove()
    saved = (micro / "compare" / "smolora" / "routing.md").read_text()
    assert "| gqa | " in saved and "8 SMoLoRA layers" in saved


# stage 1 has 2 steps: call 3 is stage 2's first (killed between stages), call 4 its second (after a checkpoint)
@pytest.mark.parametrize("method, at_call", [("replay", 4), ("ewc", 3), ("ewc", 4), ("olora", 3), ("olora", 4),
                                             ("dirlora", 3)])
def test_resume_gives_the_uninterrupted_run(micro, tmp_path, monkeypatch, method, at_call):
    """Killed in stage 2, resumed: the same adapters and matrix as the comparison's uninterrupted run."""
    monkeypatch.setattr(smolora, "CHECKPOINT_SECONDS", 0)
    with monkeypatch.context() as m:
        interrupt(m, at_call)
        with pytest.raises(SystemExit) as exit_:
            smolora.main(run_args(micro, tmp_path, method))
    assert exit_.value.code == 130
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == at_call - 3
    smolora.main(run_args(micro, tmp_path, method, "--resume"))
    whole = micro / "compare" / method
    assert results(tmp_path)["matrix"] == results(whole)["matrix"]
    for stage in (1, 2):
        a, b = (smolora.safetensors.torch.load_file(run / "adapters" / f"stage{stage}.safetensors")
                for run in (whole, tmp_path))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replay_memory_holds_only_earlier_tasks_at_the_configured_share():
    train = {t: [{"id": f"{t}-{i}"} for i in range(n)] for t, n in (("a", 20), ("b", 30), ("c", 40))}
    tasks = ["a", "b", "c"]
    assert smolora.replay_mix(train, tasks, 1, 0.1, seed=0) == train["a"]          # nothing before the first task
    mix = smolora.replay_mix(train, tasks, 3, 0.1, seed=0)
    assert mix[:40] == train["c"] and len(mix) == 44                                # + round(0.1 * 40)
    memories = {t: smolora.replay_memory(train[t], t, 0.1, seed=0) for t in ("a", "b")}
    assert [len(memories["a"]), len(memories["b"])] == [2, 3]                       # round(0.1 * n) of each
    replayed = mix[40:]
    assert sum(r in memories["a"] for r in replayed) == 2 and sum(r in memories["b"] for r in replayed) == 2
    assert smolora.replay_mix(train, tasks, 3, 0.1, seed=0) == mix                  # the same draws on resume
    # more wanted than a memory holds: only the memory is replayed (0.5 * 30 = 15 wanted, 10 kept of a)
    mix, memory = smolora.replay_mix(train, tasks, 2, 0.5, seed=0), smolora.replay_memory(train["a"], "a", 0.5, 0)
    assert len(mix) == 40 and sorted(r["id"] for r in mix[30:]) == sorted(r["id"] for r in memory)


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away():
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.bias.fill_(0.5)
    fisher = {"weight": torch.tensor([[4.0, 1.0]]), "bias": torch.tensor([2.0])}
    anchor = {name: p.detach().clone() for name, p in layer.named_parameters()}
    assert smolora.ewc_penalty(layer, fisher, anchor, lam=10.0).item() == 0.0
    with torch.no_grad():
        layer.weight += torch.tensor([[0.5, -1.0]])
        layer.bias -= 1.0
    # (10/2) * (4 * 0.5^2 + 1 * 1^2 + 2 * 1^2) = 5 * 4 = 20
    assert smolora.ewc_penalty(layer, fisher, anchor, lam=10.0).item() == pytest.approx(20.0)
    with torch.no_grad():
        layer.weight += torch.tensor([[0.5, -1.0]])
    # (10/2) * (4 * 1^2 + 1 * 2^2 + 2 * 1^2) = 50
    assert smolora.ewc_penalty(layer, fisher, anchor, lam=10.0).item() == pytest.approx(50.0)


def test_diagonal_fisher_is_the_mean_squared_gradient(micro):
    model, processor = smolora.load_model(micro / "model")
    torch.manual_seed(0)
    smolora.add_adapters(model, "lora", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)         # B = 0 would give A no gradient
    records = data.load_records(micro / "data", "scienceqa", "train")[:2]
    fisher = smolora.diagonal_fisher(model, processor, records)
    collate, expected = data.Collator(processor, train=True), {}
    for record in records:
        model.zero_grad()
        smolora.answer_loss(model, collate([record])).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                expected[name] = expected.get(name, 0) + p.grad ** 2 / 2
    assert fisher.keys() == expected.keys() and all(fisher[k].abs().sum() > 0 for k in fisher)
    assert all(torch.allclose(fisher[k], expected[k], rtol=1e-4, atol=1e-12) for k in fisher)


def test_olora_penalty_is_zero_for_orthogonal_A_and_frozen_loras_keep_acting():
    torch.manual_seed(0)
    layer = smolora.OLoRALinear(nn.Linear(4, 3), r=4, alpha=4, num_tasks=2)   # rank 2 a task
    assert (layer.lora_A.shape, layer.past_A.shape, layer.scaling) == ((2, 4), (4, 4), 1.0)
    eye = torch.eye(4)
    with torch.no_grad():
        layer.lora_A.copy_(eye[:2])                              # task 1's A: rows e1, e2
        layer.lora_B.normal_()
    x = torch.randn(5, 4)
    before = layer(x)
    layer.start_new_lora(done=1)
    assert torch.allclose(layer(x), before, atol=1e-6)           # the new B = 0; task 1's LoRA still acts, frozen
    assert torch.equal(layer.past_A, torch.cat([eye[:2], torch.zeros(2, 4)]))
    with torch.no_grad():
        layer.lora_A.copy_(eye[2:])                              # task 2's A: e3, e4, orthogonal to task 1's
    assert layer.orthogonality().item() == 0.0
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0, 1, 0], [0, -2.0, 0, 1]]))
    # A_1 A_2^T = [[1, 0], [0, -2]]: sum of absolute values 3
    assert layer.orthogonality().item() == pytest.approx(3.0)
    model = nn.Sequential(layer, smolora.OLoRALinear(nn.Linear(3, 3), r=4, num_tasks=2))
    assert smolora.orthogonality_penalty(model, lam=0.5).item() == pytest.approx(1.5)   # the other has no past


def test_dual_forgetting_by_hand():
    answers = ["A", "B", "C", "D"]
    before = [{"question_id": i, "text": a, "answer": a} for i, a in enumerate(answers)]
    after = [{"question_id": i, "text": t, "answer": a}
             for i, (t, a) in enumerate(zip(["A", "the answer is B", "[0.1, 0.2, 0.3, 0.4]", "A"], answers))]
    # 0 kept; 1 still right though out of format (no drop); 2 lost with a broken format; 3 lost in format
    split = eval.dual_forgetting("scienceqa", before, after)
    # 2, out of format, names no option: knowledge lost (tests/test_knowledge.py splits a kept one)
    assert split == {"drop": 50.0, "format_broke_knowledge_kept": 0.0, "format_broke_knowledge_lost": 25.0,
                     "format_held": 25.0}
    assert split["drop"] == eval.task_score("scienceqa", answers, answers) - eval.task_score(
        "scienceqa", [p["text"] for p in after], answers)
    with pytest.raises(ValueError, match="same"):
        eval.dual_forgetting("scienceqa", before, after[:3])


def test_bad_method_flags_exit_with_status_2(micro, tmp_path, capsys):
    for extra, message in [(["--method", "lora,lora"], "'lora,lora'"), (["--method", "lora,qlora"], "'lora,qlora'"),
                           (["--unseen", "grounding"], "--unseen 'grounding'"),
                           (["--replay-ratio", "1.5"], "--replay-ratio 1.5"),
                           (["--ewc-lambda", "0"], "--ewc-lambda 0")]:
        with pytest.raises(SystemExit) as exit_:
            smolora.main(run_args(micro, tmp_path, "lora") + extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_config_of_a_comparison_names_only_each_methods_own_knobs():
    lora, replay, ewc = smolora.parse_configs(["--tasks", "scienceqa,gqa", "--method", "lora,replay,ewc",
                                               "--out", "cmp", "--replay-ratio", "0.2"])
    assert [c.out for c in (lora, replay, ewc)] == ["cmp/lora", "cmp/replay", "cmp/ewc"]
    assert (lora.replay_ratio, replay.replay_ratio, ewc.replay_ratio) == (None, 0.2, None)
    assert (lora.ewc_lambda, ewc.ewc_lambda) == (None, smolora.Config.ewc_lambda)
    single, = smolora.parse_configs(["--tasks", "scienceqa,gqa", "--method", "olora"])
    assert single.out == "runs/olora-scienceqa-gqa" and single.olora_lambda == smolora.Config.olora_lambda
    with pytest.raises(ValueError, match="--ewc-lambda 10.0 is not allowed with --method 'lora'"):
        smolora.parse_configs(["--tasks", "scienceqa", "--method", "lora", "--ewc-lambda", "10"])


def test_ewc_fisher_is_taken_on_a_seeded_sample_of_the_task(monkeypatch):
    seen = []
    monkeypatch.setattr(smolora, "EWC_SAMPLES", 3)
    monkeypatch.setattr(smolora, "diagonal_fisher", lambda model, processor, records: seen.append(records) or {})
    records = [{"id": i} for i in range(20)]          # ordered as a real file ordered by class would be
    for seed in (0, 0, 1):
        smolora.consolidate(nn.Linear(1, 1), None, records, seed)
    assert seen[0] == seen[1] != seen[2]
    assert all(len(s) == 3 and len({r["id"] for r in s}) == 3 for s in seen)
    assert seen[0] != records[:3] or seen[2] != records[:3]


def test_weight_decay_follows_each_paper_on_a_real_checkpoint_and_the_flag_wins():
    def decay(*extra):
        return smolora.parse_configs(["--tasks", "scienceqa,gqa", *extra])[0].weight_decay
    assert decay("--model", "llava", "--method", "smolora") == 0.01     # SMoLoRA's scripts
    assert decay("--model", "llava", "--method", "moelora") == 0.0      # CoIN's
    assert decay("--method", "smolora") == 0.0                          # the tiny base
    assert decay("--method", "lora", "--weight-decay", "0.1") == 0.1
    with pytest.raises(ValueError, match="--weight-decay -1"):
        decay("--weight-decay", "-1")


def test_real_checkpoint_defaults_follow_each_paper_at_a_global_batch_of_64():
    def config(*extra):
        return smolora.parse_configs(["--tasks", "scienceqa,gqa", *extra])[0]
    ours, coins = config("--model", "llava", "--method", "smolora"), config("--model", "llava", "--method", "moelora")
    assert (ours.lr, coins.lr) == (1e-4, 2e-4)                            # SMoLoRA's scripts, CoIN's
    assert ours.batch_size * ours.grad_accum == coins.batch_size * coins.grad_accum == 64
    assert config("--method", "smolora").grad_accum == 1                  # the tiny model: unchanged
    assert config("--model", "llava", "--grad-accum", "2").grad_accum == 2
    assert smolora.Config.paper("moelora", tasks="scienceqa,gqa", model="llava") == coins   # in Python
    with pytest.raises(ValueError, match="--grad-accum 0"):
        config("--grad-accum", "0")
