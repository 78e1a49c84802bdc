"""The adapters' total rank r, chosen by a rule on learning alone, before any forgetting is looked at.

    python tests/rank_rule.py    # every method, every r of RANKS, each CoIN task alone: docs/results/rank-rule.json

The rule (smolora.Config's r says it in one line): the smallest r of RANKS at which every method, trained on
each task alone, reaches 90% of DirLoRA's score at that r (DirLoRA alone is LoRA alone: a fresh LoRA per task).
The methods keep the official ratios: 8 experts of rank r/8 each, alpha/r = 2, the official expert init.
O-LoRA is left out: by design it gives each of T tasks r/T, so alone on one task it is LoRA. Each run: the
default recipe on the first RECORDS training records of the task, scored on its first TEST records.
On the previous base (tiny-llava-v3) r = 64 was begun for LoRA and DoRA, and stopped when LoRA alone stopped
learning there at the default learning rate (ScienceQA 17, GQA 27): a share of its score no longer measures
capacity there.
"""
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import base_profile   # noqa: E402
import data   # noqa: E402
import smolora   # noqa: E402

RESULT = ROOT / "docs" / "results" / "rank-rule.json"
RANKS = (8, 16, 32)
METHODS = ("lora", "dora", "moelora", "smolora")
RECORDS, TEST = 300, 100
SHARE = 0.9


def learned_alone(method, task, r, out):
    cfg = smolora.Config(method=method, tasks=[task], r=r, alpha=2 * r, max_train=RECORDS,
                         max_test=TEST, out=str(out))
    smolora.run(cfg, progress=False)
    return json.loads((Path(out) / "results.json").read_text())["matrix"][1][0]


def chosen(scores):
    """The smallest r at which every method reaches SHARE of LoRA's score on every task, else None."""
    for r in RANKS:
        at = scores[str(r)]
        if all(at[m][t] >= SHARE * at["lora"][t] for m in METHODS for t in at["lora"]):
            return r
    return None


def rule_table(result):
    """docs/testbed.md's table: at each r, each method's lowest share of LoRA's score over the tasks, and
    the task where it is lowest."""
    lines = ["| r | LoRA's mean score | " + " | ".join(METHODS[1:]) + " |",
             "|---:|---:|" + "---:|" * (len(METHODS) - 1)]
    for r in map(str, RANKS):
        at, cells = result["scores"][r], []
        for method in METHODS[1:]:
            share, task = min((at[method][t] / at["lora"][t], t) for t in at["lora"])
            cells.append(f"{100 * share:.0f}% ({task})")
        mean = sum(at["lora"].values()) / len(at["lora"])
        lines.append(f"| {r} | {mean:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    before = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    scores = before["scores"] if before.get("model") == smolora.TINY_MODEL else {}   # this base's runs only
    smolora.ensure_synthetic(smolora.Config(tasks=list(data.COIN_TASKS)))
    with tempfile.TemporaryDirectory() as runs:
        for r in RANKS:
            for method in METHODS:
                for task in data.COIN_TASKS:
                    row = scores.setdefault(str(r), {}).setdefault(method, {})
                    if task not in row:     # resumable: what is in the file is not run again
                        row[task] = learned_alone(method, task, r, Path(runs) / f"{method}-{task}-{r}")
                        print(r, method, task, row[task], flush=True)
                        base_profile.write({"model": smolora.TINY_MODEL, "scores": scores}, RESULT)
    result = {"model": smolora.TINY_MODEL, "scores": scores, "chosen": chosen(scores)}
    base_profile.write(result, RESULT)
    print("chosen r:", result["chosen"])


if __name__ == "__main__":
    main()
