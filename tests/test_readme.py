"""The README cannot promise code that is not there: every function it names exists, its commands parse, and its
equations table is numbered and says where each formula is in the papers."""
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
EQUATIONS_HEADER = ["#", "equation", "in the papers", "code"]

# The papers the table may cite, and the sections of each that were read and found to hold the formula cited:
# a section not listed here is one nobody checked. Add it with the place it was read.
PAPERS = ("LoRA (Hu et al. 2021)", "DoRA (Liu et al. 2024)", "O-LoRA (Wang et al. 2023)",
          "EWC (Kirkpatrick et al. 2017)", "online EWC (Schwarz et al. 2018)", "CoIN", "SMoLoRA")
SECTIONS = {"LoRA (Hu et al. 2021)": {"4.1", "4.2"},          # arXiv 2106.09685: 4 Our Method, 4.1, 4.2
            "DoRA (Liu et al. 2024)": {"4.1", "4.2", "4.3"}}  # arXiv 2402.09353: 4 Method, 4.1 to 4.3
CITATION = re.compile(r"(?P<paper>%s)(?P<sections>(?: §[\d.]+,?)*)(?: Eq\. \d+,?)?(?: \(.*\)|, .*)?"
                      % "|".join(re.escape(p) for p in sorted(PAPERS, key=len, reverse=True)))


def section(text, heading):
    """The text under a '## heading', up to the next '## '."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if match is None:
        raise ValueError(f"no section '## {heading}'")
    return match.group(1)


def cells(line):
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]   # \| inside a cell is text


def equation_table(text):
    """[{'#', 'equation', 'in the papers', 'code'}] from the table of the 'Equations in the code' section; raises
    when the table is not laid out as EQUATIONS_HEADER says."""
    rows = [line for line in section(text, "Equations in the code").splitlines() if line.startswith("|")]
    if not rows or cells(rows[0]) != EQUATIONS_HEADER:
        raise ValueError(f"the equations table's header is {cells(rows[0]) if rows else None}, "
                         f"not {EQUATIONS_HEADER}")
    table = [cells(row) for row in rows[2:]]                                        # after header and rule
    wrong = [row for row in table if len(row) != len(EQUATIONS_HEADER)]
    if wrong:
        raise ValueError(f"rows without {len(EQUATIONS_HEADER)} cells: {wrong}")
    return [dict(zip(EQUATIONS_HEADER, row)) for row in table]


def citation_problems(cited):
    """What is wrong with an 'in the papers' cell: each ';'-separated part names a paper of PAPERS, then maybe its
    sections (§4.1, §4.3), an equation (Eq. 3) and a remark; a section must be one of SECTIONS."""
    problems = []
    for part in (p.strip() for p in re.split(r";(?![^(]*\))", cited)):           # not a ; inside (...)
        match = CITATION.fullmatch(part)
        if match is None:
            problems.append(f"{part!r} names no paper of {PAPERS}")
            continue
        for number in re.findall(r"§(\d+(?:\.\d+)*)", match["sections"]):
            if number not in SECTIONS.get(match["paper"], ()):
                problems.append(f"{part!r}: §{number} of {match['paper']} is not among the sections checked")
    return problems


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


def test_the_checker_finds_what_is_wrong():
    table = ("## Equations in the code\n\n| # | equation | in the papers | code |\n|---|---|---|---|\n"
             "| 1 | h = W0 x | LoRA (Hu et al. 2021) §4.1 | `smolora.LoRALinear.forward`, `smolora.LoRALinear.fold` |\n"
             "| 2 | \\|\\|W\\|\\| | DoRA (Liu et al. 2024) §9.9 | `smolora.DoRALinear` |\n"
             "| 3 | AP | CoIN; Smith 2020 | `eval.continual_metrics` and `eval.average_precision` |\n\n"
             "## Next\n| x | `eval.gone` |\n")
    rows = equation_table(table)
    assert [r["#"] for r in rows] == ["1", "2", "3"] and rows[1]["equation"] == "\\|\\|W\\|\\|"
    named = [ref for r in rows for ref in REFERENCE.findall(r["code"])]
    assert named == ["smolora.LoRALinear.forward", "smolora.LoRALinear.fold", "smolora.DoRALinear",
                     "eval.continual_metrics", "eval.average_precision"]
    assert missing(named) == ["smolora.LoRALinear.fold", "eval.average_precision"]
    assert missing(["data.TASKS", "data.load_records", "data.Collator.__call__"]) == []
    assert citation_problems(rows[0]["in the papers"]) == []
    assert citation_problems("online EWC (Schwarz et al. 2018) Eq. 9, gamma = 1") == []
    assert citation_problems("DoRA (Liu et al. 2024) §4.1, §4.3") == []
    assert citation_problems("SMoLoRA (its ablation); CoIN (its judge; the rules ours)") == []
    assert "§9.9" in citation_problems(rows[1]["in the papers"])[0]
    assert citation_problems(rows[2]["in the papers"]) == [f"'Smith 2020' names no paper of {PAPERS}"]
    with pytest.raises(ValueError, match="header"):          # the old layout, with a column for a missing file
        equation_table("## Equations in the code\n\n| equation | notes | code |\n|---|---|---|\n| a | 2.1 | b |\n")


def test_the_equations_are_numbered_and_cite_the_papers():
    rows = equation_table(README)
    assert len(rows) >= 30
    assert [r["#"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)], "number the rows 1, 2, 3, ..."
    assert [p for r in rows for p in citation_problems(r["in the papers"])] == []
    cited = " ".join(r["in the papers"] for r in rows)
    for paper in PAPERS:                                      # every paper of the methods has its formulas here
        assert paper in cited, paper


def test_every_equation_names_code_that_exists():
    rows = equation_table(README)
    assert all(REFERENCE.findall(r["code"]) for r in rows), [r["#"] for r in rows if not REFERENCE.findall(r["code"])]
    named = [ref for r in rows for ref in REFERENCE.findall(r["code"])]
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
    for page in ("real-checkpoint.md", "testbed.md"):                         # the pages it links to
        text = (ROOT / "docs" / page).read_text()
        assert f"(docs/{page})" in README and missing(REFERENCE.findall(text)) == [], page


def test_the_readme_reads_in_one_sitting():
    """No design notes outside the repository, lines a reader can read, and every table in docs/results."""
    assert "DESIGN" not in README, "the README cites a file that is not in the repository"
    long = [n for n, line in enumerate(README.splitlines(), 1) if len(line) > 200 and not line.startswith("|")]
    assert long == [], f"lines over 200 characters outside tables: {long}"
    assert "(docs/results/README.md)" in README and (ROOT / "docs" / "results" / "README.md").exists()


def readme_commands():
    """The flags of every `python smolora.py ...` and `torchrun ... smolora.py -- ...` command in the
    README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for words in (shlex.split(line, comments=True) for line in lines):
        if words[:2] == ["python", "smolora.py"]:
            commands.append(words[2:])
        elif words[:1] == ["torchrun"]:     # torchrun's flags, smolora.py, --, smolora's flags
            assert words[words.index("smolora.py") + 1] == "--", " ".join(words)
            commands.append(words[words.index("smolora.py") + 2:])
    return commands


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_readme_commands_parse(argv, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)        # the GPU command parses on any machine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert all(config.tasks for config in smolora.parse_configs(argv))


def test_readme_shows_the_default_command_and_the_gpu_command():
    commands = readme_commands()
    assert ["--tasks", "scienceqa,textvqa"] in commands
    assert any({"--model", "--data", "--device", "--dtype", "--grad-checkpointing"} <= set(c) for c in commands)
    assert sum("--nproc_per_node" in line for line in README.splitlines() if line.startswith("torchrun")) == 2
