"""data.py: the task table, the synthetic mini-CoIN, the loader, the tiny processor and the
collator."""
import json
import os
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import data

ALL = list(data.TASKS)


def samples(task, n=40, seed=0):
    rng = random.Random(seed)
    return [data.GENERATORS[task](rng) for _ in range(n)]


def files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    data.make_synthetic(root, ALL, n_train=4, n_test=3, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def processor():
    return data.build_processor()


# ---------------------------------------------------------------- task table

def test_task_table_has_the_papers_tasks_and_instructions():
    phrase = "Answer the question using a single word or phrase."
    assert list(data.TASKS) == ["scienceqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding",
                                "vqav2", "ocrvqa", "flickr30k", "places365", "textcaps"]
    assert data.TASKS["scienceqa"].instruction \
        == "Answer with the option's letter from the given choices directly."
    assert data.TASKS["vizwiz"].instruction == (
        "When the provided information is insufficient, respond with 'Unanswerable'.\n" + phrase)
    assert data.TASKS["grounding"].instruction == (
        "Please provide the bounding box coordinate of the region this sentence describes:")
    assert data.TASKS["flickr30k"].instruction == "Please describe it in one complete sentence."
    assert data.TASKS["places365"].question == "What is the background of the image?"
    assert {t.answer_kind for t in data.TASKS.values()} == {"letter", "phrase", "bbox", "caption"}
    for task in data.TASKS.values():
        assert len(set(task.paraphrases)) == 5 and task.instruction not in task.paraphrases


# ---------------------------------------------------------------- generation on disk

def test_same_seed_gives_byte_identical_files(synthetic, tmp_path):
    data.make_synthetic(str(tmp_path / "again"), ALL, n_train=4, n_test=3, seed=0, progress=False)
    assert files(synthetic) == files(tmp_path / "again")
    data.make_synthetic(str(tmp_path / "other"), ["grounding"], n_train=4, n_test=3, seed=1,
                        progress=False)
    assert files(tmp_path / "other")["grounding/train.json"] \
        != files(synthetic)["grounding/train.json"]


def test_an_interrupted_generation_leaves_no_finished_looking_task(tmp_path, monkeypatch):
    real, calls = data.GENERATORS["textvqa"], []

    def fails_on_the_third(rng):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(rng)

    monkeypatch.setitem(data.GENERATORS, "textvqa", fails_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        data.make_synthetic(str(tmp_path), ["textvqa"], n_train=4, n_test=2, progress=False)
    assert not os.path.exists(tmp_path / "textvqa")
    monkeypatch.undo()
    data.make_synthetic(str(tmp_path), ["textvqa"], n_train=4, n_test=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["textvqa"]
    assert len(data.load_records(str(tmp_path), "textvqa", "train")) == 4


def test_two_writers_of_the_same_task_at_once_both_succeed(tmp_path, monkeypatch):
    # a second run writes the task while the first is still writing it: both finish, one copy is
    # kept, no leftovers
    real, nested = data.write_json, []

    def another_run_finishes_first(path, content):
        if path.endswith("synthetic.json") and not nested:
            nested.append(1)
            data.make_synthetic(str(tmp_path), ["textvqa"], n_train=4, n_test=2, progress=False)
        real(path, content)

    monkeypatch.setattr(data, "write_json", another_run_finishes_first)
    data.make_synthetic(str(tmp_path), ["textvqa"], n_train=4, n_test=2, progress=False)
    assert nested and sorted(os.listdir(tmp_path)) == ["textvqa"]
    assert len(data.load_records(str(tmp_path), "textvqa", "train")) == 4


def test_other_settings_regenerate_and_foreign_data_is_left_alone(tmp_path, monkeypatch):
    data.make_synthetic(str(tmp_path), ["gqa"], n_train=2, n_test=1, progress=False)
    data.make_synthetic(str(tmp_path), ["gqa"], n_train=3, n_test=1, progress=False)
    assert len(data.load_records(str(tmp_path), "gqa", "train")) == 3
    monkeypatch.setattr(data, "SYNTHETIC_VERSION", data.SYNTHETIC_VERSION + 1)
    data.make_synthetic(str(tmp_path), ["gqa"], n_train=3, n_test=1, progress=False)
    settings = json.load(open(tmp_path / "gqa" / "synthetic.json"))
    assert settings["version"] == data.SYNTHETIC_VERSION and sorted(os.listdir(tmp_path)) == ["gqa"]
    os.makedirs(tmp_path / "vqav2")
    with pytest.raises(ValueError, match="vqav2 holds data make_synthetic did not write"):
        data.make_synthetic(str(tmp_path), ["vqav2"], n_train=2, n_test=1, progress=False)


def test_every_task_loads_back(synthetic):
    for name in ALL:
        task = data.TASKS[name]
        train = data.load_records(synthetic, name, "train")
        test = data.load_records(synthetic, name, "test")
        assert len(train) == 4 and len(test) == 3
        for record in train + test:
            assert set(record) == {"id", "image", "text", "instruction", "answer"}
            assert os.path.isabs(record["image"]) and Image.open(record["image"]).size == (64, 64)
            assert record["instruction"] == task.instruction and "<image>" not in record["text"]
            if task.answer_kind != "bbox":
                assert record["text"].endswith("\n" + task.instruction)
        assert all(isinstance(r["answer"], str) and r["answer"] for r in train)
        for record in test:
            if name == "grounding":
                assert (len(record["answer"]) == 4
                        and all(isinstance(v, float) for v in record["answer"]))
            elif name in ("textvqa", "vqav2"):
                assert (len(record["answer"]) == 10
                        and all(isinstance(a, str) for a in record["answer"]))
            else:
                assert isinstance(record["answer"], str)


def test_diverse_instructions_swap_only_the_instruction(synthetic):
    for name in ("scienceqa", "vizwiz", "grounding", "flickr30k"):
        task = data.TASKS[name]
        for plain, diverse in zip(
                data.load_records(synthetic, name, "test"),
                data.load_records(synthetic, name, "test", instructions="diverse")):
            assert diverse["instruction"] in task.paraphrases
            assert (diverse["text"].replace(diverse["instruction"], task.instruction)
                    == plain["text"])
            assert diverse["answer"] == plain["answer"]


def test_training_paraphrases_are_five_new_wordings_read_as_whole_words(synthetic):
    vocabulary = set(data.vocabulary_words())
    for name, task in data.TASKS.items():
        trained = task.training_paraphrases
        assert len(set(trained)) == 5 and not set(trained) & {task.instruction, *task.paraphrases}, name
        # no word the tokenizer would spell by character: the base built from it is unchanged
        assert {w for p in trained for w in re.findall(r"[A-Za-z]+", p)} <= vocabulary, name
    for name in ("scienceqa", "vizwiz", "grounding", "flickr30k"):
        task = data.TASKS[name]
        for plain, trained in zip(data.load_records(synthetic, name, "train"),
                                  data.load_records(synthetic, name, "train", instructions="paraphrased")):
            assert trained["instruction"] in task.training_paraphrases
            assert trained["text"].replace(trained["instruction"], task.instruction) == plain["text"]
        used = {r["instruction"] for r in data.load_records(synthetic, name, "train", instructions="paraphrased")}
        assert len(used) > 1
    assert data.training_wordings("imagenet")[0] == ("What is the object in the image?\n"
                                                     "Answer with one word or a short phrase only.")


# ---------------------------------------------------------------- answers vs scenes

def pixels(image):
    return np.asarray(image).astype(int)


def components(mask):
    """Number of 4-connected regions of True."""
    seen, count = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count, stack = count + 1, [(y, x)]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return count


def test_a_grounding_box_contains_its_object():
    for sample in samples("grounding", 60):
        x1, y1, x2, y2 = [float(v) for v in re.fullmatch(
            r"\[([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+)\]", sample.answer).groups()]
        target = sample.items[0]
        assert sample.question == f"the {target.color} {target.name}."
        assert [(i.color, i.name) for i in sample.items].count((target.color, target.name)) == 1
        alone, draw = data.canvas()
        data.draw_item(draw, target)
        drawn = (pixels(alone) != data.BACKGROUND).any(-1)
        ys, xs = np.nonzero(drawn)
        assert (x1 * 64 <= xs.min() and xs.max() + 1 <= x2 * 64
                and y1 * 64 <= ys.min() and ys.max() + 1 <= y2 * 64)
        assert (pixels(sample.image)[drawn] == pixels(alone)[drawn]).all()  # and nothing covers it


def test_a_count_equals_the_objects_drawn():
    singular = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star"}
    counted = 0
    for sample in samples("vqav2", 80):
        shown = (pixels(sample.image) != data.BACKGROUND).any(-1)
        assert components(shown) == len(sample.items)
        asked = re.fullmatch(r"How many (\w+) are there\?", sample.question)
        if asked:
            counted += 1
            assert int(sample.answer) \
                == [i.name for i in sample.items].count(singular[asked.group(1)])
        elif sample.question.startswith("Is there a "):
            present = sample.question[len("Is there a "):-1] in [i.name for i in sample.items]
            assert sample.answer == ("yes" if present else "no")
        else:
            shape = sample.question[len("What color is the "):-1]
            assert [i.name for i in sample.items].count(shape) == 1
            assert sample.answer == next(i.color for i in sample.items if i.name == shape)
    assert counted > 10


def test_other_answers_agree_with_their_scene():
    for s in samples("scienceqa"):
        option = dict(line.split(". ") for line in s.question.split("\n")[2:])[s.answer]
        assert option \
            == (s.items[0].name if s.question.startswith("Which shape") else s.items[0].color)
    for s in samples("textvqa") + samples("ocrvqa"):
        assert (s.answer == s.items[0].text and s.answer in data.READ_WORDS
                and s.answer not in s.question)
    for s in samples("ocrvqa"):
        title, author = re.fullmatch(r"\w+ book (\w+) by (\w+)", s.description).groups()
        assert s.answer == (title if "title" in s.question else author)
    for s in samples("gqa"):
        (a, b), centre = s.items, lambda item, axis: item.box[axis] + item.box[axis + 2]
        relation = {"left": centre(a, 0) < centre(b, 0) - 40,
                    "right": centre(a, 0) > centre(b, 0) + 40,
                    "above": centre(a, 1) < centre(b, 1) - 40,
                    "below": centre(a, 1) > centre(b, 1) + 40}
        if s.answer in relation:
            assert relation[s.answer] and f"{a.color} {a.name}" in s.question
        else:
            assert s.answer in (a.name, a.color) and f"{b.color} {b.name}" in s.question
    for s in samples("vizwiz", 60):
        image = pixels(s.image)
        if s.answer == "unanswerable":
            assert image.max() < 25 or image.std(axis=(0, 1)).min() > 50     # dark, or noise
        else:
            assert image.max() == 245 and s.answer in (s.items[0].name, s.items[0].color)
    for s in samples("imagenet"):
        assert s.answer == s.items[0].name in data.OBJECTS
    for s in samples("places365"):
        assert s.answer == s.items[0].name in data.PATTERNS
    for s in samples("flickr30k"):
        a, b = s.items
        assert (s.answer.startswith(f"A {a.color} {a.name} is ")
                and s.answer.endswith(f" a {b.color} {b.name}."))
    for s in samples("textcaps"):
        assert s.answer == f"A {s.items[1].color} sign that says {s.items[0].text}."


def test_base_corpora_are_deterministic_and_hold_no_task_format():
    """Stage 0 is text where the image will stand, stage 1 the image and its description; neither
    holds a task's instruction, a paraphrase of one, an option list or a held-out scene."""
    instructions = [i for t in data.TASKS.values() for i in (t.instruction, *t.paraphrases)]
    for stage in (0, 1):
        corpus = data.base_corpus(60, seed=3, stage=stage)
        again = data.base_corpus(60, seed=3, stage=stage)
        assert [(r["text"], r["answer"]) for r in corpus] == [(r["text"], r["answer"]) for r in again]
        assert [r["answer"] for r in corpus] != \
            [r["answer"] for r in data.base_corpus(60, seed=4, stage=stage)]
        for r in corpus:
            assert r["instruction"] == "" and (r["image"] is None) == (stage == 0)
            assert not any(i in r["text"] + r["answer"] for i in instructions)
            assert "Options:" not in r["text"]
    text = data.base_corpus(200, seed=0, stage=0)
    assert any(data.ASK_REPEAT in r["text"] for r in text)
    assert any(r["answer"].startswith("There are ") for r in text)     # a question, in a sentence
    assert any(any(a in r["text"] for a in data.ASK_BRIEF) for r in text)
    images = data.base_corpus(60, seed=0, stage=1)
    assert {r["image"].size for r in images} == {(64, 64)}
    assert any(" sign " in r["answer"] for r in images) and any(" book " in r["answer"] for r in images)


def test_test_scenes_never_occur_in_training_at_the_benchmark_sizes():
    """As make_synthetic draws them, at the sizes runs use (smolora.SYNTHETIC): no test image, and no
    test question with its image, occurs in the training records; the test's combinations are held
    out; training still shows every colour, shape, object, word and pattern."""
    import smolora
    sizes = {"train": smolora.SYNTHETIC["n_train"], "test": smolora.SYNTHETIC["n_test"]}
    for name in data.TASKS:
        drawn = {}
        for split, n in sizes.items():
            rng = random.Random(f"0/{name}/{split}")
            drawn[split] = [data.draw(name, rng, split) for _ in range(n)]
        images = {split: {s.image.tobytes() for s in samples} for split, samples in drawn.items()}
        keys = {split: {s.key for s in samples} for split, samples in drawn.items()}
        assert not images["train"] & images["test"], name
        assert not keys["train"] & keys["test"], name
        assert all(data.held_out(name, key) for key in keys["test"]), name
        assert len(keys["test"]) > 1, name
        seen = {v for s in drawn["train"] for i in s.items for v in (i.name, i.color, i.text)}
        assert {v for s in drawn["test"] for i in s.items
                for v in (i.name, i.color, i.text)} <= seen, name


# ---------------------------------------------------------------- tokenizer, processor

def test_decode_gives_back_every_answer(processor):
    tokenizer = processor.tokenizer
    answers = ["[0.12, 0.34, 0.56, 0.78]", "[0.00, 0.50, 1.00, 0.88]", "unanswerable", "A", "B",
               "C", "3", "SUN", "A pink boat is to the left of a green tree."]
    answers += [s.answer for task in ALL for s in samples(task, 30)]
    for answer in answers:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == answer


def test_read_words_are_spelled_and_other_words_are_whole_tokens(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) < 700
    for word in data.READ_WORDS:
        assert tokenizer.tokenize(" " + word) \
            == [data.SPACE + word[0], "##" + word[1], "##" + word[2]]
    texts = [t for task in ALL for s in samples(task, 30)
             for t in (s.question, s.answer, s.description)]
    texts += [t for task in data.TASKS.values() for t in (task.instruction, *task.paraphrases)]
    for word in ({w for text in texts for w in re.findall(r"[A-Za-z]+", text)}
                 - set(data.READ_WORDS)):
        assert len(tokenizer.tokenize(word)) == 1 and len(tokenizer.tokenize(" " + word)) == 1, word


def test_processor_saves_and_reloads_without_warnings(processor, tmp_path, capfd, recwarn):
    processor.save_pretrained(tmp_path)
    capfd.readouterr()
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert capfd.readouterr().err == "" and len(recwarn) == 0
    assert (type(reloaded) is type(processor)
            and type(reloaded.image_processor) is type(processor.image_processor))
    prompt = data.prompt_text(reloaded, "What is this?\nAnswer now.")
    assert prompt == "USER: <image>\nWhat is this?\nAnswer now. ASSISTANT:"
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    a, b = (p(images=[image], text=[prompt], return_tensors="pt") for p in (processor, reloaded))
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert ((a["input_ids"] == reloaded.image_token_id).sum() == 16
            and b["pixel_values"].shape == (1, 3, 64, 64))
    assert reloaded.tokenizer.decode(b["input_ids"][0]) \
        == "<s>" + prompt.replace("<image>", "<image>" * 16)


# ---------------------------------------------------------------- collator

def test_train_labels_cover_exactly_the_answer_and_eos(processor, synthetic):
    tokenizer = processor.tokenizer
    records = [data.load_records(synthetic, t, "train", instructions="diverse")[0]
               for t in ("grounding", "scienceqa", "textcaps", "vizwiz", "textvqa")]
    batch = data.Collator(processor, train=True)(records)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "ins_mask", "labels"}
    assert batch["pixel_values"].shape == (5, 3, 64, 64) and batch["ins_mask"].dtype == torch.bool
    for b, record in enumerate(records):
        ids, mask, labels = batch["input_ids"][b], batch["attention_mask"][b], batch["labels"][b]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        answer = tokenizer(" " + record["answer"], add_special_tokens=False)["input_ids"] \
            + [tokenizer.eos_token_id]
        assert labels[length - len(answer):length].tolist() == answer
        assert (labels[:length - len(answer)] == -100).all() and (labels[length:] == -100).all()
        assert tokenizer.decode(ids[batch["ins_mask"][b]]) == record["instruction"]
        assert (ids == processor.image_token_id).sum() == 16


def test_a_caption_in_memory_with_no_instruction_has_an_empty_instruction_mask(processor):
    [record] = data.base_corpus(1, seed=0, stage=1)
    record["text"], caption = "", record["answer"]
    batch = data.Collator(processor, train=True)([record])
    assert not batch["ins_mask"].any() and batch["pixel_values"].shape == (1, 3, 64, 64)
    labels = batch["labels"][0]
    assert processor.tokenizer.decode(labels[labels != -100]) == " " + caption + "</s>"


def test_eval_inputs_are_the_prompt_alone_left_padded(processor, synthetic):
    tokenizer = processor.tokenizer
    records = [data.load_records(synthetic, t, "test")[0] for t in ("vqav2", "ocrvqa", "scienceqa")]
    batch = data.Collator(processor, train=False)(records)
    assert "labels" not in batch
    for b, record in enumerate(records):
        mask = batch["attention_mask"][b]
        start = len(mask) - int(mask.sum())
        assert not mask[:start].any() and mask[start:].all()  # left padding
        prompt = "USER: " + "<image>" * 16 + "\n" + record["text"] + " ASSISTANT:"
        assert tokenizer.decode(batch["input_ids"][b][start:]) == "<s>" + prompt
        assert tokenizer.decode(batch["input_ids"][b][batch["ins_mask"][b]]) \
            == record["instruction"]


def test_max_length_cuts_training_and_refuses_a_long_prompt(processor, synthetic):
    records = data.load_records(synthetic, "scienceqa", "train")[:2]
    batch = data.Collator(processor, train=True, max_length=40)(records)
    assert batch["input_ids"].shape[1] == 40
    with pytest.raises(ValueError, match="longer than max_length=40"):
        data.Collator(processor, train=False, max_length=40)(records)


def processor_batch(processor, records, train, max_length):
    """What the collator gave before it kept records: the processor run on the whole batch, padded
    by it; the masks found on the padded batch."""
    tokenizer = processor.tokenizer
    prompts = [data.prompt_text(processor, r["text"]) for r in records]
    texts = [p + " " + r["answer"] + tokenizer.eos_token for p, r in zip(prompts, records)] \
        if train else prompts
    images = [data.expand_to_square(data.load_image(r), processor) for r in records]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt",
                      padding_side="right" if train else "left", return_offsets_mapping=True,
                      return_text_replacement_offsets=True,
                      truncation=train and max_length is not None,
                      max_length=max_length if train else None)
    ids = batch["input_ids"]
    if max_length is not None and not train and ids.shape[1] > max_length:
        raise ValueError(f"a prompt of {ids.shape[1]} tokens is longer than "
                         f"max_length={max_length}")
    start, end = batch["offset_mapping"].unbind(-1)
    real = batch["attention_mask"].bool() & (end > start)
    ins_mask, labels = torch.zeros_like(real), torch.full_like(ids, -100)
    for b, (prompt, record) in enumerate(zip(prompts, records)):
        shift = sum(r["new_span"][1] - r["new_span"][0] - (r["span"][1] - r["span"][0])
                    for r in batch["text_replacement_offsets"][b])
        if record["instruction"]:
            ins_start = (prompt.index(record["text"]) + shift
                         + record["text"].rfind(record["instruction"]))
            ins_end = ins_start + len(record["instruction"])
            ins_mask[b] = real[b] & (start[b] < ins_end) & (end[b] > ins_start)
        labels[b] = torch.where(real[b] & (start[b] >= len(prompt) + shift), ids[b], labels[b])
    out = {"input_ids": ids, "attention_mask": batch["attention_mask"],
           "pixel_values": batch["pixel_values"], "ins_mask": ins_mask}
    if train:
        out["labels"] = labels
    if "ins_embedding" in records[0]:
        out["ins_embedding"] = torch.stack([r["ins_embedding"] for r in records])
    return out


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("max_length", [None, 50])
@pytest.mark.parametrize("cache_bytes", [data.CACHE_BYTES, 0, 200_000])  # all, none, a few kept
@pytest.mark.parametrize("embedded", [False, True])
def test_kept_records_collate_to_the_processors_bits(processor, synthetic, train, max_length,
                                                     cache_bytes, embedded):
    """Whatever the batch and whatever is kept: the processor's own batched output, bit for bit.
    The records: every task's, of 39 to 65 tokens (some cut at 50 in training, some refused at
    test), the same ids with paraphrased instructions, and a caption with its image in memory."""
    split = "train" if train else "test"
    records = [r for t in ALL for r in data.load_records(synthetic, t, split)]
    records += data.load_records(synthetic, "scienceqa", split, instructions="diverse")
    records += data.base_corpus(1, seed=0, stage=1)
    if embedded:
        records = [{**r, "ins_embedding": torch.randn(8)} for r in records]
    rng, collate = random.Random(0), data.Collator(processor, train, max_length, cache_bytes)
    compared = 0
    for _ in range(20):
        batch = rng.choices(records, k=rng.randint(1, 6))    # repeats: kept ones come back
        try:
            expected = processor_batch(processor, batch, train, max_length)
        except ValueError as error:                          # a prompt over max_length
            with pytest.raises(ValueError, match=re.escape(str(error))):
                collate(batch)
            continue
        got = collate(batch)
        assert list(got) == list(expected)
        for name in expected:
            assert got[name].dtype == expected[name].dtype and torch.equal(got[name],
                                                                           expected[name]), name
        for tensor in got.values():    # a caller changing a batch in place changes nothing kept
            tensor.zero_()
        compared += 1
    assert compared > 0 and collate.cached_bytes <= cache_bytes
    assert len(collate.cache) == 0 if cache_bytes == 0 else len(collate.cache) > 0


# ---------------------------------------------------------------- real CoIN layout

def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))


def test_reads_a_handwritten_coin_folder(tmp_path):
    images, instructions = tmp_path / "cl_dataset", tmp_path / "Instructions"
    os.makedirs(images / "COCO2014")
    Image.new("RGB", (640, 480), "gray").save(images / "COCO2014" / "a.jpg")
    ground = "Please provide the bounding box coordinate of the region this sentence describes:"
    write(str(instructions / "Grounding" / "train.json"), [
        {"id": 17, "image": "COCO2014/a.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{ground} man on the left."},
            {"from": "gpt", "value": "[0.1, 0.2, 0.3, 0.4]"}]}])
    write(str(instructions / "Grounding" / "test.json"), [
        {"question_id": 5, "image": "COCO2014/a.jpg", "text": f"{ground} dog.",
         "answer_bbox": "[0.11, 0.22, 0.33, 0.44]", "size": [640, 480]}])
    write(str(instructions / "TextVQA" / "test.json"), [
        {"question_id": "q1", "image": "COCO2014/a.jpg",
         "text": "what is it?\nAnswer the question using a single word or phrase.",
         "answer": ["stop"] * 9 + ["stop sign"]},
        {"question_id": "q2", "image": "COCO2014/a.jpg", "text": "what is it?\nSay it.",
         "answer": "go"}])
    root, image = str(instructions), str(images / "COCO2014" / "a.jpg")
    [train] = data.load_records(root, "grounding", "train", image_root=str(images))
    assert train == {"id": "17", "image": image, "text": f"{ground} man on the left.",
                     "instruction": ground, "answer": "[0.1, 0.2, 0.3, 0.4]"}
    [test] = data.load_records(root, "grounding", "test", image_root=str(images))
    assert test == {"id": "5", "image": image, "text": f"{ground} dog.", "instruction": ground,
                    "answer": [0.11, 0.22, 0.33, 0.44]}
    known, unknown = data.load_records(root, "textvqa", "test", image_root=str(images))
    assert known["answer"] == ["stop"] * 9 + ["stop sign"]
    assert known["instruction"] == "Answer the question using a single word or phrase."
    # an unknown template: the last line
    assert unknown["instruction"] == "Say it." and unknown["answer"] == "go"


# ---------------------------------------------------------------- bad input

def one_line_error(call, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        call()
    assert "\n" not in str(error.value)


def test_bad_input_gives_a_one_line_error(tmp_path, processor):
    root = str(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    one_line_error(lambda: data.load_records(root, "gqa", "train"),
                   r"gqa/train\.json: no such file")
    write(f"{root}/gqa/train.json", '[\n {"id": "a",\n  }\n]')
    one_line_error(lambda: data.load_records(root, "gqa", "train"),
                   r"gqa/train\.json: invalid JSON at line 3 column 3")
    write(f"{root}/gqa/train.json", {"id": "a"})
    one_line_error(lambda: data.load_records(root, "gqa", "train"),
                   "expected a JSON list of records, found dict")
    write(f"{root}/gqa/train.json", [])   # a run would have nothing to train on
    one_line_error(lambda: data.load_records(root, "gqa", "train"),
                   "list of records, found an empty list")
    write(f"{root}/gqa/train.json", [{"id": "x1", "image": "ok.png"}])
    one_line_error(lambda: data.load_records(root, "gqa", "train"),
                   r"gqa/train\.json: record 0 \(id x1\) has no field 'conversations'")
    write(f"{root}/gqa/test.json", [{"image": "ok.png", "text": "q", "answer": "a"}])
    one_line_error(lambda: data.load_records(root, "gqa", "test"),
                   "record 0 has no field 'question_id'")
    write(f"{root}/gqa/test.json",
          [{"question_id": 3, "image": "nope.png", "text": "q", "answer": "a"}])
    one_line_error(lambda: data.load_records(root, "gqa", "test"),
                   r"record 0 \(id 3\): image .*nope\.png not found")
    with open(tmp_path / "bad.png", "wb") as f:
        f.write(b"not a png")
    write(f"{root}/gqa/test.json",
          [{"question_id": 4, "image": "bad.png", "text": "q\nAnswer.", "answer": "a"}])
    records = data.load_records(root, "gqa", "test")
    one_line_error(lambda: data.Collator(processor, train=False)(records),
                   r"record 4: cannot decode image .*bad\.png")
    write(f"{root}/grounding/test.json",
          [{"question_id": 5, "image": "ok.png", "text": "q", "answer_bbox": "[0.1, x]"}])
    one_line_error(lambda: data.load_records(root, "grounding", "test"),
                   r"record 0 \(id 5\): answer_bbox '\[0.1, x\]' is not a box \[x1, y1, x2, y2\]")
    one_line_error(lambda: data.load_records(root, "cifar", "train"),
                   "unknown task 'cifar'; known tasks: scienceqa, textvqa, imagenet, gqa, vizwiz, "
                   "grounding, vqav2, ocrvqa, flickr30k, places365, textcaps")
    one_line_error(lambda: data.make_synthetic(root, ["cifar"], progress=False),
                   "unknown task 'cifar'")
    one_line_error(lambda: data.load_records(root, "gqa", "val"),
                   "unknown split 'val'; known: train, test")
    one_line_error(lambda: data.load_records(root, "gqa", "test", instructions="many"),
                   "unknown instructions 'many'")
