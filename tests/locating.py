"""Why the tiny base does not locate: where, in its two stages, the knowledge of place is missing.

    python tests/locating.py      # into docs/results/locating.json (resumable), then docs/testbed.md's table

DirLoRA learns four tasks to less than 80% of their ceiling (tests/base_profile.py), and the four ask where
things are: Grounding's box, GQA's left-of and above, VQAv2's counts and colours among several small shapes,
Flickr30k's sentences that place two things. Two experiments, each on those four tasks:
1. The language model alone, as stage 0 leaves it, reading each test scene as text (its description, written
   where the image will stand, as stage 0 trains) and asked the task's question as anyone asks it: is its
   answer's content right (eval.knowledge)? After the base's stage-0 steps, and after 3 and 8 times as many.
   GQA's questions of a relation (chance 50%) are counted apart from those of a shape or a colour.
2. DirLoRA on each task alone at lr 1e-3 (tests/base_profile.py's recipe), from the base and from a base built
   with its language model trained in stage 1 too, not frozen: both on this machine, as every run's bits are
   its CPU's.
If the language model cannot answer from the text, the place is missing before any image is seen; if
unfreezing it in stage 1 does not let DirLoRA learn, the frozen language model is not what stops it.
"""
import inspect
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import base_profile   # noqa: E402
import data   # noqa: E402
import eval   # noqa: E402
import smolora   # noqa: E402

RESULT = ROOT / "docs" / "results" / "locating.json"
WORK = ROOT / "runs" / "locating"
TASKS = ("grounding", "gqa", "vqav2", "flickr30k")
STAGE0 = inspect.signature(smolora.pretrain_tiny_model).parameters["steps"].default[0]
TEST = 100      # test scenes per task


def scenes_as_text(task, n=TEST):
    """The first n test scenes of the task, each as stage 0 reads a scene: its description, then
    the question as anyone asks it."""
    return [{"id": f"{task}-{i}", "image": None, "text": f"{s.description}\n{s.plain}",
             "instruction": "", "answer": s.answer,
             "relation": task == "gqa" and s.answer in data.RELATIONS}
            for i, s in enumerate(base_profile.test_samples(task, n))]


def text_model_knows(steps):
    """Per task, the share of scenes read as text that the stage-0 language model answers right."""
    path = WORK / f"stage0-{steps}"
    if not (path / "config.json").exists():
        smolora.pretrain_tiny_model(path, steps=(steps, 0))
    model, processor = smolora.load_model(path)
    known = {}
    for task in TASKS:
        records = scenes_as_text(task)
        # a caption task's length: the longest sentence the language model may say
        predictions = eval.generate_predictions(model, processor, records, task="flickr30k",
                                                batch_size=50, progress=False)
        right = [eval.knowledge(task, p["text"], p["answer"]) for p in predictions]
        if task == "gqa":
            for name, relation in (("gqa, a relation", True), ("gqa, a shape or colour", False)):
                asked = [k for k, r in zip(right, records) if r["relation"] == relation]
                known[name] = 100.0 * sum(asked) / len(asked)
        else:
            known[task] = 100.0 * sum(right) / len(right)
    return known


def dirlora_on(path):
    """DirLoRA's score on each task alone, at lr 1e-3, from the base at path."""
    smolora.ensure_synthetic(smolora.Config(tasks=list(TASKS)))
    scores = {}
    for task in TASKS:
        out = WORK / f"dirlora-{path.name}-{task}"
        shutil.rmtree(out, ignore_errors=True)     # a crashed run's: afresh
        scores[task] = base_profile.dirlora_alone(path, task, 1e-3, out)
    return scores


def unfrozen_base():
    path = WORK / "base-llm-trained-in-stage1"
    if not (path / "config.json").exists():
        smolora.pretrain_tiny_model(path, stage1_trains_llm=True)
    return path


def locating_table(result):
    """docs/testbed.md's two tables, from the JSON."""
    steps = list(result["text_model"])
    lines = ["| asked of the scene written as text | " + " | ".join(
        f"stage 0 after {s} steps" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for name in result["text_model"][steps[0]]:
        lines.append(f"| {name} | " + " | ".join(
            f"{result['text_model'][s][name]:.0f}%" for s in steps) + " |")
    lines += ["", "| DirLoRA alone, lr 1e-3 | the base (language model frozen in stage 1) "
              "| language model trained in stage 1 |", "|---|---:|---:|"]
    lines += [f"| {task} | {result['dirlora']['frozen'][task]:.1f} | "
              f"{result['dirlora']['trained'][task]:.1f} |" for task in TASKS]
    return "\n".join(lines)


def main():
    result = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    if (result.get("model"), result.get("synthetic")) != (smolora.TINY_MODEL, data.SYNTHETIC_VERSION):
        result = {"model": smolora.TINY_MODEL, "synthetic": data.SYNTHETIC_VERSION, "text_model": {}}
    for steps in (STAGE0, 3 * STAGE0, 8 * STAGE0):     # resumable: what the file holds is not run again
        if str(steps) not in result["text_model"]:
            result["text_model"][str(steps)] = text_model_knows(steps)
            base_profile.write(result, RESULT)
    bases = {"frozen": lambda: smolora.ensure_tiny_model(smolora.CACHE), "trained": unfrozen_base}
    for name, base in bases.items():
        if name not in result.setdefault("dirlora", {}):
            result["dirlora"][name] = dirlora_on(base())
            base_profile.write(result, RESULT)
    print(locating_table(result))


if __name__ == "__main__":
    main()
