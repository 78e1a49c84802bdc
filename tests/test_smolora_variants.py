"""DoRA, SMoLoRA's ablation and its task-identity (official) routing, the sentence encoder, Places365 few-shot."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel, BertTokenizer

import data
import smolora
from conftest import make_micro
from test_adapters import HPARAMS, logits, randomize_B, tiny_batch, tiny_llava
from test_run import exits_interrupted, exits_with_2, interrupt

TASKS = "scienceqa,grounding"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """An untrained tiny LLaVA checkpoint, synthetic data of two tasks and Places365, and a tiny random BERT."""
    root = make_micro(tmp_path_factory.mktemp("variants"), TASKS.split(",") + ["places365"], n_train=24,
                      n_test=4)
    words = sorted({w for t in data.TASKS.values() for s in (t.instruction, t.question, *t.paraphrases)
                    for w in s.lower().replace(".", " ").replace("?", " ").split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    BertTokenizer(vocab=vocab).save_pretrained(root / "bert")
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(root / "bert")
    return root


def run_args(micro, out, *extra):
    return ["--tasks", TASKS, "--model", str(micro / "model"), "--data", str(micro / "data"), "--out", str(out),
            "--epochs", "1", "--batch-size", "4", "--grad-accum", "1", "--r", "8", "--alpha", "16", "--experts", "4",
            "--lr", "1e-2", "--max-train", "8", "--cache", str(micro / "cache"), *extra]


def results(out):
    return json.loads((out / "results.json").read_text())


# ---- DoRA ------------------------------------------------------------------------------------------------

def naive_dora(layer, x, dropped):
    """W0 x + b + (m/n - 1) W0 d(x) + (m/n) s B A d(x), n = ||W0 + s B A|| per row, one output row at a time."""
    W0, s = layer.base.weight.detach(), layer.scaling
    out = torch.empty(*x.shape[:-1], W0.shape[0])
    for o in range(W0.shape[0]):
        row = W0[o] + s * layer.lora_B[o] @ layer.lora_A
        n = torch.sqrt((row.detach() ** 2).sum())
        scale = layer.magnitude[o] / n
        out[..., o] = (x @ W0[o] + layer.base.bias[o] + (scale - 1) * dropped @ W0[o]
                       + scale * s * dropped @ layer.lora_A.T @ layer.lora_B[o])
    return out


def dora_layer(dropout=0.0):
    torch.manual_seed(0)
    layer = smolora.DoRALinear(nn.Linear(6, 5), r=2, alpha=6, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(torch.linspace(0.5, 1.5, 5))
    return layer


def test_dora_is_the_base_at_init_and_the_formula_once_trained():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(smolora.DoRALinear(base, r=2, alpha=6)(x), base(x))
    layer = dora_layer()
    # no dropout: the layer is W' x + b, W' = m (W0 + s B A) / ||W0 + s B A|| (DoRA eq. 5)
    W = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    W_dora = layer.magnitude[:, None] * W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ W_dora.T + layer.base.bias)
    torch.testing.assert_close(layer(x), naive_dora(layer, x, x))


def test_dora_dropout_as_peft_and_the_norm_a_constant_in_backward():
    layer, x = dora_layer(dropout=0.5), torch.randn(3, 4, 6)
    layer.train()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    expected = naive_dora(layer, x, F.dropout(x, 0.5, training=True))
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), [layer.lora_A, layer.lora_B, layer.magnitude])
    naive = torch.autograd.grad(expected.sum(), [layer.lora_A, layer.lora_B, layer.magnitude])
    for g, n in zip(grads, naive):
        torch.testing.assert_close(g, n)
    # the norm not detached would give B another gradient: the test tells the two apart
    W = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    undetached = (layer.magnitude / W.norm(dim=1) * (x @ W.T)).sum()
    assert not torch.allclose(torch.autograd.grad(undetached, layer.lora_B)[0], grads[1])


def test_dora_merge_equals_the_unmerged_forward_and_unmerge_restores_w0():
    layer, x = dora_layer(), torch.randn(3, 4, 6)
    w0, before = layer.base.weight.detach().clone(), layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0)
    torch.testing.assert_close(layer(x), before)


def test_dora_goes_where_lora_goes_and_its_magnitude_is_saved():
    model, batch = tiny_llava(), tiny_batch()
    before = logits(model, batch)
    names = smolora.add_adapters(model, "dora", r=4, alpha=8)
    assert sorted(names) == sorted(smolora.add_adapters(tiny_llava(), "lora", r=4, alpha=8))
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=1e-5)
    randomize_B(model)
    state = smolora.adapter_state_dict(model)
    assert len([k for k in state if k.endswith(".magnitude")]) == len(names)
    target = tiny_llava()
    smolora.add_adapters(target, "dora", r=4, alpha=8)
    smolora.load_adapter_state_dict(target, state)
    torch.testing.assert_close(logits(target, batch), logits(model, batch))
    assert (logits(model, batch) - before).abs().max() > 1e-3


# ---- SMoLoRA's ablation ------------------------------------------------------------------------------------

def naive_parts(layer, x, ins, parts):
    """The SMoLoRA paper's ablation, top-1, one sample and one token at a time, no mask."""
    pool, s = layer.num_experts // 2, layer.scaling
    out = torch.empty(x.shape[0], x.shape[1], layer.base.out_features)
    for b in range(x.shape[0]):
        vu = int((layer.vu_router.weight @ x[b].mean(0)).argmax())
        iff = pool + int((layer.if_router.weight @ ins[b]).argmax())
        for t in range(x.shape[1]):
            xt = x[b, t]
            x_vu = s * layer.lora_B[vu] @ (layer.lora_A[vu] @ xt)         # G = 1 with top-1
            x_if = s * layer.lora_B[iff] @ (layer.lora_A[iff] @ xt)
            if parts == ("vu",):
                delta = x_vu
            elif parts == ("if",):
                delta = x_if
            elif parts == ("vu", "if"):
                delta = x_vu + x_if
            else:
                alpha, beta = torch.softmax(torch.stack([layer.fuse_vu.weight[0] @ x_vu,
                                                         layer.fuse_if.weight[0] @ x_if]), 0)
                delta = alpha * x_vu + beta * x_if
            out[b, t] = layer.base(xt) + delta
    return out


@pytest.mark.parametrize("parts", smolora.SMOLORA_PARTS)
def test_each_smolora_ablation_equals_its_formula_and_leaves_the_other_pool_untrained(parts):
    torch.manual_seed(0)
    layer = smolora.SMoLoRALinear(nn.Linear(6, 5), r=12, alpha=6, num_experts=6, ins_dim=7, dropout=0.0, parts=parts)
    layer.lora_B.data.normal_()
    x, ins = torch.randn(3, 4, 6), torch.randn(3, 7)
    out = layer(x, torch.ones(3, 4), ins)
    torch.testing.assert_close(out, naive_parts(layer, x, ins, parts))
    assert hasattr(layer, "fuse_vu") == ("fusion" in parts)
    out.square().sum().backward()
    trained = layer.lora_B.grad.flatten(1).abs().sum(1) > 0                # per expert
    assert bool(trained[:3].any()) == ("vu" in parts) and bool(trained[3:].any()) == ("if" in parts)


@pytest.mark.parametrize("parts", smolora.SMOLORA_PARTS)
def test_each_smolora_ablation_round_trips_through_the_adapter_state_dict(parts):
    source, target, batch = tiny_llava(0), tiny_llava(0), tiny_batch()
    smolora.add_adapters(source, "smolora", parts=parts, **HPARAMS["smolora"])
    randomize_B(source)
    torch.manual_seed(5)
    smolora.add_adapters(target, "smolora", parts=parts, **HPARAMS["smolora"])
    state = smolora.adapter_state_dict(source)
    assert any("fuse_" in k for k in state) == ("fusion" in parts)
    smolora.load_adapter_state_dict(target, state)
    torch.testing.assert_close(logits(target, batch), logits(source, batch))
    other = tiny_llava(0)
    smolora.add_adapters(other, "smolora", parts=("vu", "if") if "fusion" in parts else ("vu", "if", "fusion"),
                         **HPARAMS["smolora"])
    with pytest.raises(ValueError, match="does not fit"):
        smolora.load_adapter_state_dict(other, state)


# ---- the IF router's f(X_ins): the task's identity, a sentence encoder --------------------------------------

def test_canonical_instructions_are_the_official_strings():
    assert data.canonical_instruction("scienceqa") == "Answer with the option's letter from the given choices directly."
    assert data.canonical_instruction("gqa") == "Answer the question using a single word or phrase."
    assert data.canonical_instruction("flickr30k") == ("What is happening in the presented picture?\n"
                                                          "Please describe it in one complete sentence.")
    assert data.canonical_instruction("places365") == ("What is the background of the image?\n"
                                                          "Answer the question using a single word or phrase.")


def test_task_routing_sends_every_wording_of_a_task_to_one_if_expert(micro):
    model, processor = smolora.load_model(micro / "model")
    torch.manual_seed(0)
    smolora.add_adapters(model, "smolora", r=8, alpha=16, num_experts=4)
    embed = lambda strings: smolora.embed_instructions(model, processor, strings)     # noqa: E731
    cfg = smolora.Config(tasks="scienceqa", if_routing="task")
    picks = {}
    for task in ("scienceqa", "grounding", "places365"):
        records = data.load_records(micro / "data", task, "test", "diverse")
        assert len({r["instruction"] for r in records}) > 1                          # reworded, several ways
        tagged = smolora.with_instruction_embeddings(records, task, cfg, embed)
        canonical = embed([data.canonical_instruction(task)])[0]
        assert all(torch.equal(r["ins_embedding"], canonical) for r in tagged)
        picks[task] = smolora.routing_picks(model, processor, tagged, batch_size=4)  # (N, layers, 2)
        assert all(p[layer][1] == picks[task][0][layer][1] for p in picks[task] for layer in range(8))
    # by sample (the default) the routers read each record's own prompt, and no embedding is attached
    assert smolora.with_instruction_embeddings(records, "places365", smolora.Config(tasks="scienceqa"),
                                               embed) is records


def test_task_routing_trained_on_paraphrases_reads_the_mean_of_the_five_training_wordings(micro):
    """The official multi-type setting: one vector per task, the mean of its 5 paraphrases' embeddings."""
    model, processor = smolora.load_model(micro / "model")
    embed = lambda strings: smolora.embed_instructions(model, processor, strings)     # noqa: E731
    cfg = smolora.Config(tasks="scienceqa", if_routing="task", train_instructions="paraphrased")
    records = data.load_records(micro / "data", "places365", "test", "diverse")
    tagged = smolora.with_instruction_embeddings(records, "places365", cfg, embed)
    wordings = [f"What is the background of the image?\n{p}" for p in data.PHRASE_TRAINING]
    mean = sum(embed([w])[0] for w in wordings) / 5
    assert all(torch.allclose(r["ins_embedding"], mean, atol=1e-6) for r in tagged)
    assert smolora.parse_configs(["--tasks", "gqa", "--train-instructions", "paraphrased"])[0].out == \
        "runs/smolora-paraphrased-gqa"


def test_the_sentence_encoder_is_mean_pooled_over_its_tokens(micro):
    model, processor = smolora.load_model(micro / "model")
    encoder = smolora.load_encoder(micro / "bert")
    strings = [data.TASKS["scienceqa"].instruction, data.TASKS["gqa"].paraphrases[0]]
    got = smolora.embed_instructions(model, processor, strings, encoder)
    bert, tokenizer = BertModel.from_pretrained(micro / "bert"), BertTokenizer.from_pretrained(micro / "bert")
    for row, string in zip(got, strings):             # one string at a time: no padding to mask
        with torch.no_grad():
            hidden = bert(**tokenizer(string, return_tensors="pt")).last_hidden_state[0]
        torch.testing.assert_close(row, hidden.mean(0))
    assert got.shape == (2, 16) and not torch.allclose(got[0], got[1])


def test_encoder_task_routing_ablation_and_fewshot_run_end_to_end(micro, tmp_path):
    out = tmp_path / "run"
    smolora.main(run_args(micro, out, "--if-routing", "task", "--ins-encoder", str(micro / "bert"),
                          "--smolora-parts", "vu,if", "--unseen", "places365", "--fewshot", "places365:1,2"))
    saved = results(out)
    assert saved["config"]["if_routing"] == "task" and "oracle" in saved["notes"] and "parts vu,if" in saved["notes"]
    assert "oracle" in (out / "routing.md").read_text()
    state = smolora.safetensors.torch.load_file(out / "adapters" / "stage2.safetensors")
    routers = [v for k, v in state.items() if k.endswith("if_router.weight")]
    assert routers and all(v.shape == (2, 16) for v in routers)         # R_if reads the encoder's 16-d embedding
    assert not any("fuse_" in k for k in state)
    assert set(saved["fewshot"]["places365"]) == {"1", "2"} and "## Few-shot" in (out / "matrix.md").read_text()
    test = [r["answer"] for r in data.load_records(micro / "data", "places365", "test")]
    for k in ("1", "2"):
        row = saved["fewshot"]["places365"][k]
        for folder, keys in ((f"fewshot-{k}", ("score", "mif")), (f"fewshot-{k}-fresh", ("fresh_score", "fresh_mif"))):
            preds = smolora.eval.load_predictions(out / "predictions" / folder / "places365.jsonl")
            assert (row[keys[0]], row[keys[1]]) == smolora.eval.score_predictions("places365", preds)
        assert row["majority"] == smolora.eval.majority_score("places365", test)
    one, two = (smolora.safetensors.torch.load_file(out / "adapters" / f"fewshot-places365-{k}.safetensors")
                for k in (1, 2))
    assert one.keys() == two.keys() == state.keys()                     # each k tunes the final adapters on
    assert not all(torch.equal(one[n], two[n]) for n in one) and not all(torch.equal(state[n], one[n]) for n in one)


def test_fewshot_from_fresh_adapters_is_what_a_tuning_from_initialisation_gives(micro, tmp_path):
    """A trained task may be relearned (its savings): from fresh adapters the tasks trained before do not matter,
    from the final ones they do."""
    shots = ["--method", "lora", "--fewshot", "scienceqa:1"]
    smolora.main(run_args(micro, tmp_path / "ab", *shots))
    smolora.main(run_args(micro, tmp_path / "ba", *shots, "--tasks", "grounding,scienceqa"))

    def tuned(run, name):
        return smolora.safetensors.torch.load_file(tmp_path / run / "adapters" / f"fewshot-scienceqa-{name}.safetensors")
    fresh, final = (tuned("ab", n) for n in ("1-fresh", "1"))
    assert all(torch.equal(fresh[n], tuned("ba", "1-fresh")[n]) for n in fresh)
    assert not all(torch.equal(final[n], tuned("ba", "1")[n]) for n in final)
    assert not all(torch.equal(final[n], fresh[n]) for n in final)


@pytest.mark.parametrize("records", [1, 3, 4, 5, 25, 50, 79, 80, 81, 400])
def test_fewshot_tunes_the_fewest_whole_epochs_that_make_20_steps(records):
    cfg = smolora.Config(tasks="scienceqa", batch_size=4, grad_accum=1)
    epochs = smolora.fewshot_epochs(records, cfg)
    steps = lambda e: -(-e * records // 4)      # train_stage's count: ceil(epochs x records / 4)
    assert epochs == int(epochs) >= 1 and steps(epochs) >= 20 and (epochs == 1 or steps(epochs - 1) < 20)


def test_lora_on_smolora_layers_adapts_the_mlp_and_the_projector_alone(micro, tmp_path):
    smolora.main(run_args(micro, tmp_path / "run", "--method", "lora", "--layers", "smolora"))
    state = smolora.safetensors.torch.load_file(tmp_path / "run" / "adapters" / "stage1.safetensors")
    adapted = {name.rsplit(".", 1)[0] for name in state}
    assert adapted == {f"model.language_model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")} \
        | {f"model.multi_modal_projector.linear_{i}" for i in (1, 2)}
    assert smolora.parse_configs(["--tasks", "gqa", "--method", "lora", "--layers", "smolora"])[0].out == \
        "runs/lora-smolora-layers-gqa"


def test_fewshot_draws_k_records_of_each_class_with_the_seed():
    records = [{"id": i, "answer": "abc"[i % 3]} for i in range(30)]
    shots = data.fewshot_records(records, 4, seed=0, task="places365")
    assert sorted(r["answer"] for r in shots) == sorted("aaaabbbbcccc") and len({r["id"] for r in shots}) == 12
    assert shots == data.fewshot_records(records, 4, seed=0, task="places365")
    assert shots != data.fewshot_records(records, 4, seed=1, task="places365")
    assert len(data.fewshot_records(records[:4], 4, seed=0, task="places365")) == 4    # a class holds fewer


def test_fewshot_resumes_to_the_uninterrupted_result(micro, tmp_path, monkeypatch, capsys):
    args = ["--method", "lora", "--unseen", "places365", "--fewshot", "places365:1,2"]
    smolora.main(run_args(micro, tmp_path / "whole", *args))
    train = data.load_records(micro / "data", "places365", "train")[:8]
    cfg = smolora.Config(tasks=TASKS, batch_size=4, grad_accum=1)
    steps = [-(-smolora.fewshot_epochs(n, cfg) * n // 4)
             for n in (len(data.fewshot_records(train, k, 0, "places365")) for k in (1, 2))]
    with monkeypatch.context() as m:
        # 2 stages of 2 steps, the 1- and 2-shot tunings from the final adapters; then the 1-shot's from fresh ones
        interrupt(m, 4 + steps[0] + steps[1] + 2)
        line = exits_interrupted(run_args(micro, tmp_path / "cut", *args), capsys)
    assert line == "interrupted at stage 5 step 1; continue with --resume"
    assert (tmp_path / "cut" / "adapters" / "fewshot-places365-2.safetensors").exists()
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    smolora.main(run_args(micro, tmp_path / "cut", *args, "--resume"))
    assert results(tmp_path / "cut")["fewshot"] == results(tmp_path / "whole")["fewshot"]
    for k in ("1", "2", "1-fresh", "2-fresh"):
        a, b = (smolora.safetensors.torch.load_file(run / "adapters" / f"fewshot-places365-{k}.safetensors")
                for run in (tmp_path / "whole", tmp_path / "cut"))
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_bad_variant_flags_exit_with_status_2(micro, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for extra, message in [(["--method", "lora", "--smolora-parts", "vu"], "--smolora-parts 'vu'"),
                           (["--smolora-parts", "if,vu"], "'if,vu' (--smolora-parts)"),
                           (["--method", "moelora", "--if-routing", "task"], "--if-routing 'task'"),
                           (["--fewshot", "nosuchtask:5"], "--fewshot 'nosuchtask:5'"),
                           (["--fewshot", "places365:5", "--fewshot", "places365:10"], "--fewshot 'places365:10'"),
                           (["--fewshot", "places365:0"], "--fewshot 'places365:0'"),
                           (["--fewshot", "places365:5,x"], "--fewshot 'places365:5,x'"),
                           (["--ins-encoder", str(tmp_path / "empty")], "is not a transformers encoder")]:
        message_line = exits_with_2(run_args(micro, tmp_path / "out", *extra), capsys)
        assert message in message_line
    assert not (tmp_path / "out").exists()


def test_a_smolora_variant_runs_in_its_own_folder_and_other_methods_carry_no_smolora_knobs():
    def config(*extra):
        return smolora.parse_configs(["--tasks", "scienceqa,gqa", *extra])[0]
    default = config()
    assert (default.out, default.if_routing, default.smolora_parts) == (
        "runs/smolora-scienceqa-gqa", "sample", "vu,if,fusion")
    assert config("--smolora-parts", "vu").out == "runs/smolora-vu-scienceqa-gqa"
    assert config("--if-routing", "task", "--smolora-parts", "vu,if").out == \
        "runs/smolora-vu+if-task-routing-scienceqa-gqa"
    lora = config("--method", "lora,smolora", "--if-routing", "task")
    assert (lora.method, lora.if_routing, lora.smolora_parts, lora.ins_encoder) == ("lora", None, None, None)
    fewshot = config("--fewshot", "places365:5,10", "--fewshot", "vizwiz:1").fewshot
    assert fewshot == {"places365": [5, 10], "vizwiz": [1]}
    assert smolora.Config(tasks="scienceqa,gqa", fewshot={"places365": [5, 10]}).fewshot == {"places365": [5, 10]}
