"""The README cannot promise code that is not there: every function it names exists, its commands parse."""
import importlib
import re
import shlex
from pathlib import Path

import pytest
import torch

import smolora

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MODULES = ("smolora", "data", "eval")
REFERENCE = re.compile(r"`((?:%s)(?:\.[A-Za-z_]\w*)+)`" % "|".join(MODULES))   # `smolora.SMoLoRALinear.forward`


def section(text, heading):
    """The text under a '## heading', up to the next '## '."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if match is None:
        raise ValueError(f"no section '## {heading}'")
    return match.group(1)


def equation_map(text):
    """[(equation, [code references])] from the table of the 'Equations in the code' section."""
    rows = [line for line in section(text, "Equations in the code").splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]      # after header and rule
    return [(row[0], REFERENCE.findall(row[-1])) for row in cells]


def missing(references):
    """The references that do not resolve: the module imported, then getattr along the dots."""
    lost = []
    for reference in references:
        module, *path = reference.split(".")
        obj = importlib.import_module(module)
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                lost.append(reference)
                break
    return lost


def test_the_checker_finds_a_name_that_is_not_there():
    table = ("## Equations in the code\n\n| equation | DESIGN.md | code |\n|---|---|---|\n"
             "| h = W0 x | 2.1 | `smolora.LoRALinear.forward`, `smolora.LoRALinear.fold` |\n"
             "| AP | 6 | `eval.continual_metrics` and `eval.average_precision` |\n\n## Next\n| x | `eval.gone` |\n")
    rows = equation_map(table)
    assert rows == [("h = W0 x", ["smolora.LoRALinear.forward", "smolora.LoRALinear.fold"]),
                    ("AP", ["eval.continual_metrics", "eval.average_precision"])]
    assert missing([r for _, refs in rows for r in refs]) == ["smolora.LoRALinear.fold", "eval.average_precision"]
    assert missing(["data.TASKS", "data.load_records", "data.Collator.__call__"]) == []


def test_every_equation_in_the_map_names_code_that_exists():
    rows = equation_map(README)
    assert len(rows) >= 20 and all(refs for _, refs in rows), [eq for eq, refs in rows if not refs]
    named = [r for _, refs in rows for r in refs]
    assert missing(named) == []
    # the heart of both papers has a home in the map
    for core in ("smolora.LoRALinear.forward", "smolora.MoELoRALinear.forward", "smolora.SMoLoRALinear.route",
                 "smolora.SMoLoRALinear.forward", "smolora.instruction_embedding", "eval.continual_metrics",
                 "eval.follows_instruction"):
        assert core in named


def test_every_code_name_anywhere_in_the_readme_exists():
    names = [r for r in REFERENCE.findall(README) if not (ROOT / r).exists()]   # `smolora.py` is a file
    assert len(names) >= 20
    assert missing(names) == []


def readme_commands():
    """Every `python smolora.py ...` command in the README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line)[2:] for line in lines if line.strip().startswith("python smolora.py")]


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_readme_commands_parse(argv, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)        # the GPU command parses on any machine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    config = smolora.make_config(smolora.parse_args(argv))
    assert config["tasks"]


def test_readme_shows_the_default_command_and_the_gpu_command():
    commands = readme_commands()
    assert ["--tasks", "scienceqa,textvqa"] in commands
    assert any({"--model", "--data", "--device", "--dtype", "--grad-checkpointing"} <= set(c) for c in commands)
