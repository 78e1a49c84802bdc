"""The tiny base's zero-shot profile: what it knows and does before any task is tuned.

    python tests/base_profile.py                # the profile, into docs/results/base-profile.json
    python tests/base_profile.py --dirlora      # and each task learned alone by a fresh LoRA

The papers' starting model (Vicuna-7B-v1.5 with LLaVA-1.5's stage-1 projector) knows the world and
answers questions in free sentences, but not in each task's asked form. So should the tiny base:
- GK, the knowledge in its answers whatever their form, is well above the task score;
- it answers what is asked: two different questions about one image get two different right contents
  ("asked", the share of such pairs: a shape's shape and colour, a book's title and author);
- the score and MIF are low: the asked formats are not there;
- every task can still be learned: DirLoRA (a fresh LoRA on the task alone, at the default learning
  rate or one below it) reaches at least 80% of the task's ceiling (100; a caption task's: the CIDEr
  of its own reference, 1000 here).
docs/testbed.md's table is made from the JSON (profile_table); tests/test_testbed.py checks it.
"""
import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data   # noqa: E402
import eval   # noqa: E402
import smolora   # noqa: E402

RESULT = ROOT / "docs" / "results" / "base-profile.json"
RATES = (5e-3, 1e-3)        # the default learning rate, and one below it
ASKED_PAIRS = 100
CIDER_CEILING = 1000.0      # a caption that is its task's one reference, scored by eval's CIDEr


def asked_share(model, processor, pairs=ASKED_PAIRS, seed=0):
    """The share of test images on which two different questions, asked as anyone asks them, both get
    their right content, by the knowledge rule: a ScienceQA shape's shape and its colour, an OCR-VQA
    cover's title and its author (as many pairs of each)."""
    rng, records = random.Random(f"{seed}/asked"), []
    for i in range(pairs):
        task = ("scienceqa", "ocrvqa")[i % 2]
        sample = data.draw(task, rng, "test")
        item = sample.items[0]
        if task == "scienceqa":
            asked = ((data.PHRASES["sqa_shape"], item.name), (data.PHRASES["sqa_color"], item.color))
        else:
            title, author = sorted(sample.items[:2], key=lambda i: i.box[1])
            asked = ((data.PHRASES["title"], title.text), (data.PHRASES["author"], author.text))
        records += [{"id": f"{i}-{k}", "image": sample.image, "text": question, "instruction": "",
                     "answer": truth} for k, (question, truth) in enumerate(asked)]
    # "gqa" stands for any one-word-answer task: its answer length and its whole-word knowledge rule
    predictions = eval.generate_predictions(model, processor, records, task="gqa", progress=False)
    right = [eval.knowledge("gqa", p["text"], p["answer"]) == 1.0 for p in predictions]
    both = [right[i] and right[i + 1] and predictions[i]["text"] != predictions[i + 1]["text"]
            for i in range(0, len(right), 2)]
    return 100.0 * sum(both) / len(both), predictions[:4]


def test_samples(task, n):
    """The first n test scenes of a synthetic task, as make_synthetic draws them (the same seed, the
    same order)."""
    rng = random.Random(f"0/{task}/test")
    return [data.draw(task, rng, "test") for _ in range(n)]


def test_records(task, n):
    """The first n test records of a synthetic task, as the run loads them, the images in memory
    (PNG keeps every pixel)."""
    records = []
    for i, sample in enumerate(test_samples(task, n)):
        record = data.coin_record(data.TASKS[task], sample, f"{task}-test-{i:05d}", "", "test")
        records.append({"id": record["question_id"], "image": sample.image, "text": record["text"],
                        "instruction": data.TASKS[task].instruction,
                        "answer": record.get("answer", record.get("answer_bbox"))})
    return records


def zero_shot(model, processor, n):
    """Score, MIF and GK (the rule judge's knowledge) of the untuned base on every task's first n
    test records."""
    profile = {}
    for task in data.TASKS:
        records = test_records(task, n)
        predictions = eval.generate_predictions(model, processor, records, task=task,
                                                batch_size=50, progress=False)
        score, mif = eval.score_predictions(task, predictions)
        known = [eval.knowledge(task, p["text"], p["answer"], p["prompt"]) for p in predictions]
        profile[task] = {"score": score, "MIF": mif, "GK": 100.0 * sum(known) / len(known),
                         "example": predictions[0]["text"]}
    return profile


def dirlora_alone(model_path, task, lr, out):
    """A fresh LoRA tuned on `task` alone, with the default command's recipe at learning rate lr:
    its score (on the task's test records, in the run's matrix)."""
    cfg = smolora.Config(method="lora", tasks=[task], model=str(model_path), out=str(out), lr=lr)
    smolora.run(cfg, progress=False)
    return json.loads((Path(out) / "results.json").read_text())["matrix"][1][0]


def ceiling(task):
    return CIDER_CEILING if data.TASKS[task].scorer == "cider" else 100.0


def profile_table(profile):
    """docs/testbed.md's table, from the profile's JSON."""
    lines = ["| task | score | MIF | GK | DirLoRA alone, at lr " + " / ".join(map(str, RATES))
             + " | its best, of the ceiling |", "|---|---:|---:|---:|---:|---:|"]
    for task, row in profile["tasks"].items():
        scores = [row["dirlora"][str(lr)] for lr in RATES]
        best = max(scores) / ceiling(task)
        alone = " / ".join(f"{v:.1f}" for v in scores) + f" | {100 * best:.0f}%"
        lines.append(f"| {task} | {row['score']:.1f} | {row['MIF']:.1f} | {row['GK']:.1f} | {alone} |")
    lines.append(f"\nAsked two different questions about one image, the base gives both right contents "
                 f"on {profile['asked']:.0f}% of {ASKED_PAIRS} test images.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dirlora", action="store_true", help="also learn each task alone")
    args = parser.parse_args()
    path = smolora.ensure_tiny_model(smolora.CACHE)
    model, processor = smolora.load_model(path)
    tasks = zero_shot(model, processor, smolora.SYNTHETIC["n_test"])
    asked, examples = asked_share(model, processor)
    profile = {"model": smolora.TINY_MODEL, "synthetic": data.SYNTHETIC_VERSION, "asked": asked,
               "asked_examples": [(p["prompt"], p["text"]) for p in examples], "tasks": tasks}
    before = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    if before.get("model") != smolora.TINY_MODEL:      # another base's runs are not this one's
        before = {}
    for task in tasks:      # resumable: DirLoRA runs already in the file are not run again
        tasks[task]["dirlora"] = before.get("tasks", {}).get(task, {}).get("dirlora", {})
    write(profile)
    if args.dirlora:
        smolora.ensure_synthetic(smolora.Config(tasks=list(data.TASKS)))
        with tempfile.TemporaryDirectory() as runs:
            for lr in RATES:
                for task in tasks:
                    if str(lr) not in tasks[task]["dirlora"]:
                        out = Path(runs) / f"{task}-{lr}"
                        tasks[task]["dirlora"][str(lr)] = dirlora_alone(path, task, lr, out)
                        print(task, lr, tasks[task]["dirlora"][str(lr)], flush=True)
                        write(profile)
        print(profile_table(profile))


def write(result, path=RESULT):
    eval.write_atomic(path, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
