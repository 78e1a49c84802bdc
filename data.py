"""Tasks and data: the CoIN / SMoLoRA task table, a synthetic mini-CoIN, the CoIN-format loader,
the collator.

Read top to bottom: the task table (CoIN's and SMoLoRA's tasks, with LLaVA-1.5's instructions); the
synthetic scenes, drawn with PIL, and one generator per task whose answer is read off the scene it
drew; the split, which keeps every test scene out of training; writing a task to disk in the CoIN
format (LLaVA's conversations for training, question and answer records for testing); the tiny
base's pretraining corpora; the loader, which reads that format whether the data is synthetic or
real; the tiny model's tokenizer and processor; the collator from records to model inputs.
"""
import functools
import json
import math
import os
import random
import re
import shutil
import string
import tempfile
import zlib
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

# ----------------------------------------------------------------------------------------------
# The task table: CoIN's and SMoLoRA's tasks; the instruction text is exactly LLaVA-1.5's / CoIN's.

PHRASE = "Answer the question using a single word or phrase."
PHRASE_PARAPHRASES = (
    "Reply with one word or a short phrase.",
    "Give your answer as a single word or phrase.",
    "Respond using only a word or a short phrase.",
    "Use a single word or phrase to answer.",
    "Answer briefly with one word or phrase.",
)
CAPTION = "Please describe it in one complete sentence."
CAPTION_PARAPHRASES = (
    "Describe the picture in one full sentence.",
    "Write one complete sentence about what the image shows.",
    "Summarise the scene in a single sentence.",
    "Tell what is in the picture with one whole sentence.",
    "Give a one-sentence description of the image.")
# SMoLoRA's multi-type setting trains on 5 paraphrases per task family: these, none of them one of
# the 5 held out (only words of the other strings, so the tokenizer reads each as whole words)
PHRASE_TRAINING = (
    "Answer with one word or a short phrase only.",
    "Give a short phrase or a single word as your answer.",
    "Reply to the question with a single word or phrase.",
    "Just give one word or a short phrase.",
    "Keep the answer to one word or a short phrase.")
CAPTION_TRAINING = (
    "Write a full sentence that describes the picture.",
    "Describe the image with one complete sentence.",
    "Tell me about the scene in one full sentence.",
    "Please give one whole sentence about the picture.",
    "Use one complete sentence to describe the scene.")


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str          # the instruction appended to the question (LLaVA-1.5's / CoIN's)
    answer_kind: str          # letter | phrase | bbox | caption
    scorer: str               # letter | vqa | exact | contains | iou | cider (eval.py)
    paraphrases: tuple        # 5 instructions of the same meaning and format, never trained on
    training_paraphrases: tuple   # 5 more, trained on in the multi-type setting
    question: str = ""        # a fixed question, if any (imagenet, places365, the captions)
    folder: str = ""          # its folder in the CoIN release: playground/Instructions/<folder>


TASKS = {t.name: t for t in (
    Task("scienceqa", "Answer with the option's letter from the given choices directly.",
         "letter", "letter", (
             "Reply with the letter of the correct option only.",
             "Choose one option and answer with its letter alone.",
             "Give only the letter of the right choice.",
             "Select the correct choice and respond with just its letter.",
             "Answer with a single option letter from the choices."), (
             "Answer with the letter of the correct choice only.",
             "Give just the letter of the correct option.",
             "Select one of the choices and reply with its letter.",
             "Choose the right option and give its letter only.",
             "Respond with the letter of the option that is correct."), folder="ScienceQA"),
    Task("textvqa", PHRASE, "phrase", "vqa", PHRASE_PARAPHRASES, PHRASE_TRAINING, folder="TextVQA"),
    Task("imagenet", PHRASE, "phrase", "contains", PHRASE_PARAPHRASES, PHRASE_TRAINING,
         question="What is the object in the image?", folder="ImageNet"),
    Task("gqa", PHRASE, "phrase", "exact", PHRASE_PARAPHRASES, PHRASE_TRAINING, folder="GQA"),
    Task("vizwiz",
         "When the provided information is insufficient, respond with 'Unanswerable'.\n" + PHRASE,
         "phrase", "exact",
         tuple("If the image does not let you answer, reply 'Unanswerable'.\n" + p
               for p in PHRASE_PARAPHRASES),
         tuple("When the image does not give the answer, reply 'Unanswerable'.\n" + p
               for p in PHRASE_TRAINING),
         folder="VizWiz"),
    Task("grounding",
         "Please provide the bounding box coordinate of the region this sentence describes:",
         "bbox", "iou", (
             "Give the bounding box of the region described by this sentence:",
             "Output the box coordinates of the area this phrase refers to:",
             "Locate the region this sentence describes and give its bounding box:",
             "Return the bounding box coordinates for the region described here:",
             "Find the region matching this description and answer with its box:"), (
             "Give the box coordinates of the region this sentence describes:",
             "Output the bounding box of the area described by this sentence:",
             "Find the area this sentence refers to and give its box:",
             "Locate the region described here and give its bounding box:",
             "Return the box of the region matching this sentence:"),
         folder="Grounding"),
    Task("vqav2", PHRASE, "phrase", "vqa", PHRASE_PARAPHRASES, PHRASE_TRAINING, folder="VQAv2"),
    Task("ocrvqa", PHRASE, "phrase", "exact", PHRASE_PARAPHRASES, PHRASE_TRAINING, folder="OCRVQA"),
    Task("flickr30k", CAPTION, "caption", "cider", CAPTION_PARAPHRASES, CAPTION_TRAINING,
         question="What is happening in the presented picture?", folder="Flickr30k"),
    Task("places365", PHRASE, "phrase", "exact", PHRASE_PARAPHRASES, PHRASE_TRAINING,
         question="What is the background of the image?", folder="Places365"),
    Task("textcaps", CAPTION, "caption", "cider", CAPTION_PARAPHRASES, CAPTION_TRAINING,
         question="What is happening in the presented picture?", folder="TextCaps"),
)}

COIN_TASKS = ("scienceqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding", "vqav2", "ocrvqa")
SMOLORA_TASKS = ("scienceqa", "textvqa", "flickr30k", "imagenet", "gqa", "vqav2")
SMOLORA_UNSEEN = ("vizwiz", "textcaps", "ocrvqa", "places365")


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def compose_text(task, question):
    """The human turn without the image: question then instruction; grounding puts the expression
    after it."""
    if task.answer_kind == "bbox":
        return f"{task.instruction} {question}"
    return f"{question}\n{task.instruction}"


def canonical_instruction(task):
    """The fixed instruction string of a task, which the official SMoLoRA code embeds for its
    instruction router: the task's fixed question, if any, then its instruction, as TASKS has
    them."""
    task = TASKS[task]
    return compose_text(task, task.question) if task.question else task.instruction


def training_wordings(task):
    """canonical_instruction with each of the task's 5 training paraphrases for its instruction:
    the official multi-type code routes a task on the mean of their embeddings."""
    task = TASKS[task]
    return [canonical_instruction(task.name).replace(task.instruction, p)
            for p in task.training_paraphrases]


# ----------------------------------------------------------------------------------------------
# The synthetic world: a few big shapes, objects, signs, book covers and background patterns in
# high contrast, so that a 1M-parameter LLaVA sees them at 64x64 in 16-pixel patches: one patch per
# cell of the scene grid and per letter. (Measured first with 8-pixel patches; 16 gives 16 image
# tokens, not 64, and steps 2.4x faster.)

IMAGE_SIZE = 64
PATCH = 16
BACKGROUND = (245, 245, 245)
INK = (40, 30, 25)          # text, house roofs, wheels, tree trunks
COLORS = {"red": (220, 30, 30), "green": (20, 150, 40), "blue": (30, 70, 230),
          "yellow": (245, 205, 0), "purple": (140, 50, 180), "pink": (240, 100, 170)}
SHAPES = ("circle", "square", "triangle", "star")
SQA_COLORS = ("red", "green", "blue", "yellow")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
NUMBERS = ("zero", "one", "two", "three", "four", "five")   # a count as the base's sentences say it
OBJECTS = ("house", "tree", "car", "fish", "flower", "boat")
PATTERNS = ("stripes", "dots", "grid", "checkers", "waves")
# the relation of the first thing to the second (the answer) -> its phrase in questions, in captions
RELATIONS = {
    "left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
    "above": ("above", "above"), "below": ("below", "below")}
# Text the model reads from pixels. None of these is a token of its own: the tiny tokenizer spells
# them by letter, since whole-word tokens for rendered words do not learn (measured: 12 words, one
# token each, were read right 11% of the time, chance 8%).
WORDS = ("SUN", "MAP", "BOX", "CUP", "HAT", "JAR", "KEY", "PEN", "RUG", "VAN", "FOX", "BUS",
         "ICE", "LOG", "NUT", "EGG")
NAMES = ("ANN", "BOB", "EVE", "IDA", "JON", "KIM", "LEO", "MAX", "NED", "ROY", "SAM", "TOM")
READ_WORDS = WORDS + NAMES

# every fixed text a generator writes; the tiny tokenizer's whole words are read from here
PHRASES = {
    "sqa_shape": "Which shape is in the image?", "sqa_color": "Which color is the shape?",
    "options": "Options:",
    "read": ("What word is written in the image?", "What does the sign say?",
             "What is written on the sign?"),
    "left_right": "Is the {color} {shape} to the left or to the right of the {color2} {shape2}?",
    "above_below": "Is the {color} {shape} above or below the {color2} {shape2}?",
    "which_shape": "Which shape is {relation} the {color2} {shape2}?",
    "which_color": "What color is the shape {relation} the {color2} {shape2}?",
    "what_color": "What color is this?", "what_shape": "What shape is this?",
    "what_object": "What is this?",
    "refer": "the {color} {shape}.", "where": "Where is the {color} {shape}?",
    "count": "How many {shapes} are there?", "color_of": "What color is the {shape}?",
    "is_there": "Is there a {shape}?", "yes_no": "yes no", "unanswerable": "unanswerable",
    "title": "What is the title of this book?", "author": "Who wrote this book?",
    "flickr30k": "A {color} {object} is {relation} a {color2} {object2}.",
    "textcaps": "A {color} sign that says {word}.",
    # plain scene descriptions for the captioning corpus (no instruction, unlike the tasks)
    "item": "{color} {shape}", "placed": "{color} {shape} {box}", "sign": "{color} sign {word}",
    "book": "{color} book {word} by {name}", "pattern": "{pattern}, {item}", "noise": "noise",
    "dark": "dark",
}


@dataclass
class Item:
    """One thing drawn: a shape, an object, a sign, a book, a word or a background pattern;
    box (x1, y1, x2, y2) in pixels, end exclusive."""
    name: str
    color: str
    box: tuple
    text: str = ""


@dataclass
class Sample:
    """One generated scene and its question. items[0] is the thing the question is about, where
    there is one."""
    image: Image.Image
    question: str           # the text before the instruction (grounding: the referring expression)
    answer: str             # what the model must write, in the task's format
    items: list
    description: str        # a plain description of the scene: the base's captions
    key: str                # the combination the test holds out (held_out): what makes the scene
    plain: str = ""         # the question as anyone asks it: no options, no format (the base's)
    sentence: str = ""      # the answer as a chat model says it, in a sentence (the base's)
    brief: str = ""         # the answer's content alone, in a word or a few (the base's)
    choices: tuple = ()     # the answers it is chosen from, where a few (asked so in the base's)
    variants: tuple = ()    # other answers a few of the 10 human annotators give (vqav2, textvqa)


@functools.lru_cache(maxsize=None)
def font(size):
    return ImageFont.load_default(size=size)   # a real TrueType font shipped inside Pillow


def canvas(color=BACKGROUND):
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), color)
    return image, ImageDraw.Draw(image)


def draw_item(draw, item):
    """Draw a shape or an object inside item.box, a pixel off its edges so that neighbours never
    touch."""
    x1, y1 = item.box[0] + 1, item.box[1] + 1
    w, h = item.box[2] - x1 - 2, item.box[3] - y1 - 2      # PIL boxes include their last pixel

    def at(fx, fy):                                         # a point given as fractions of the box
        return x1 + fx * w, y1 + fy * h

    fill = COLORS[item.color]
    if item.name == "circle":
        draw.ellipse((*at(0, 0), *at(1, 1)), fill=fill)
    elif item.name == "square":
        draw.rectangle((*at(0, 0), *at(1, 1)), fill=fill)
    elif item.name == "triangle":
        draw.polygon([at(0, 1), at(0.5, 0), at(1, 1)], fill=fill)
    elif item.name == "star":   # 10 points alternating between the outer radius and 0.45 of it
        radii = [0.5 * (1 if i % 2 == 0 else 0.45) for i in range(10)]
        draw.polygon([at(0.5 + r * math.sin(i * math.pi / 5), 0.5 - r * math.cos(i * math.pi / 5))
                      for i, r in enumerate(radii)], fill=fill)
    elif item.name == "house":
        draw.rectangle((*at(0.15, 0.45), *at(0.85, 1)), fill=fill)
        draw.polygon([at(0, 0.5), at(0.5, 0), at(1, 0.5)], fill=INK)
    elif item.name == "tree":
        draw.rectangle((*at(0.4, 0.6), *at(0.6, 1)), fill=INK)
        draw.ellipse((*at(0, 0), *at(1, 0.7)), fill=fill)
    elif item.name == "car":
        draw.rectangle((*at(0.2, 0.15), *at(0.75, 0.45)), fill=fill)
        draw.rectangle((*at(0, 0.4), *at(1, 0.8)), fill=fill)
        draw.ellipse((*at(0.1, 0.65), *at(0.35, 1)), fill=INK)
        draw.ellipse((*at(0.65, 0.65), *at(0.9, 1)), fill=INK)
    elif item.name == "fish":
        draw.polygon([at(0, 0.15), at(0.4, 0.5), at(0, 0.85)], fill=fill)
        draw.ellipse((*at(0.25, 0.2), *at(1, 0.8)), fill=fill)
        draw.ellipse((*at(0.75, 0.35), *at(0.85, 0.5)), fill=INK)
    elif item.name == "flower":
        draw.rectangle((*at(0.45, 0.5), *at(0.55, 1)), fill=INK)
        for fx, fy in ((0.5, 0), (0.2, 0.25), (0.8, 0.25), (0.5, 0.5)):
            draw.ellipse((*at(fx - 0.2, fy), *at(fx + 0.2, fy + 0.35)), fill=fill)
    elif item.name == "boat":
        draw.polygon([at(0, 0.7), at(1, 0.7), at(0.8, 1), at(0.2, 1)], fill=INK)
        draw.polygon([at(0.5, 0), at(0.5, 0.62), at(0.95, 0.62)], fill=fill)
        draw.polygon([at(0.45, 0.1), at(0.45, 0.62), at(0.1, 0.62)], fill=fill)
    else:
        raise ValueError(f"cannot draw {item.name!r}; known: {', '.join(SHAPES + OBJECTS)}")


def draw_word(draw, word, x, y, size, fill):
    """Write word from (x, y), a patch corner, one bold letter centred in each patch; return the
    word's box. Captioning signs alone for 200 steps, the tiny model read the first letter of 91%
    of fresh words so; with thin letters at chance (11%). (With 8-pixel patches, letters placed
    freely were read 6% of the time, patch-aligned 88%, after 600 steps: measured while designing
    this.)"""
    for k, letter in enumerate(word):
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font(size))
        corner = (x + PATCH * k + (PATCH - right - left) / 2, y + (PATCH - bottom - top) / 2)
        draw.text(corner, letter, font=font(size), fill=fill, stroke_width=1, stroke_fill=fill)
    return x, y, x + PATCH * len(word), y + PATCH


def paint_pattern(draw, pattern, back, fore, step):
    """Fill the whole image with a two-colour pattern repeating every step pixels."""
    n = IMAGE_SIZE
    draw.rectangle((0, 0, n, n), fill=back)
    for a in range(0, n, step):
        if pattern == "stripes":
            draw.rectangle((0, a, n, a + step // 2 - 1), fill=fore)
        elif pattern == "grid":
            draw.rectangle((a, 0, a + 1, n), fill=fore)
            draw.rectangle((0, a, n, a + 1), fill=fore)
        elif pattern == "waves":
            wave = [(x, a + 3 * math.sin(x / 3)) for x in range(0, n + 1, 2)]
            draw.line(wave, fill=fore, width=2)
        for b in range(0, n, step):
            if pattern == "dots":
                cx, cy = a + step // 2, b + step // 2
                draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=fore)
            elif pattern == "checkers" and (a + b) // step % 2:
                draw.rectangle((a, b, a + step - 1, b + step - 1), fill=fore)


# Scenes of several things sit on a 4x4 grid of cells, one patch each; boxes are whole cells, so box
# coordinates are quarters: few enough values for a tiny model to learn to write.
CELL = 16


def place(rng, spans):
    """Boxes spanning the given numbers of cells (1 or 2 each way), on free cells of the grid."""
    cells = IMAGE_SIZE // CELL
    while True:
        boxes = []
        for span in spans:
            fits = range(cells + 1 - span)
            grid = ((CELL * c, CELL * r, CELL * (c + span), CELL * (r + span))
                    for r in fits for c in fits)
            free = [box for box in grid
                    if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                               for b in boxes)]
            if not free:
                break
            boxes.append(rng.choice(free))
        if len(boxes) == len(spans):
            return boxes


def big_box(rng):
    """A box of 2x2 cells on the grid, for a scene of one thing: a shape then covers 4 whole
    patches, as a letter covers one. Captioning single shapes for 200 steps, the tiny model named
    100% of them so, 55% placed freely."""
    return place(rng, [2])[0]


def pair(rng, kinds):
    """Two big things of different kind and colour side by side or one above the other; return them
    and the relation of the first to the second."""
    (kind, kind2), (color, color2) = rng.sample(kinds, 2), rng.sample(list(COLORS), 2)
    first_near, across = rng.random() < 0.5, CELL * rng.randint(0, 2)
    along1, along2 = (0, 2 * CELL) if first_near else (2 * CELL, 0)
    if rng.random() < 0.5:
        relation = "left" if first_near else "right"
        corners = ((along1, across), (along2, across))
    else:
        relation = "above" if first_near else "below"
        corners = ((across, along1), (across, along2))
    items = [Item(k, c, (x, y, x + 2 * CELL, y + 2 * CELL))
             for k, c, (x, y) in zip((kind, kind2), (color, color2), corners)]
    return items, relation


def scene(items, background=BACKGROUND):
    image, draw = canvas(background)
    for item in items:
        draw_item(draw, item)
    return image


def describe(items):
    """One thing by colour and name; several, in reading order, each with its box as grounding
    writes it (one format for every scene on the grid: a format the image does not tell apart would
    only confuse the model)."""
    if len(items) == 1:
        return PHRASES["item"].format(color=items[0].color, shape=items[0].name)
    return ", ".join(PHRASES["placed"].format(color=i.color, shape=i.name,
                                              box=format_box(normalized_box(i.box)))
                     for i in sorted(items, key=lambda i: (i.box[1], i.box[0])))


def normalized_box(box):
    """Pixel box -> [x1, y1, x2, y2] in [0, 1] with 2 decimals, rounded outward so it still
    contains the object."""
    x1, y1, x2, y2 = box
    return [(x1 * 100 // IMAGE_SIZE) / 100, (y1 * 100 // IMAGE_SIZE) / 100,
            -(-x2 * 100 // IMAGE_SIZE) / 100, -(-y2 * 100 // IMAGE_SIZE) / 100]


def format_box(box):
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def together(items):
    """The things a scene shows together, whatever their places: a combination to hold out."""
    return "/".join(sorted(f"{i.color} {i.name}" for i in items))


def human_answers(rng, answer, variants):
    """10 answers as 10 VQA annotators give them: mostly the true one, up to 3 of them something
    else."""
    wrong = rng.randint(0, 3)
    answers = [answer] * (10 - wrong) + [rng.choice(variants) for _ in range(wrong)]
    rng.shuffle(answers)
    return answers


# ----------------------------------------------------------------------------------------------
# One generator per task: rng -> Sample. Same instruction and answer format as the real task; a
# different answer format per task (letter, word, box, sentence), so that instruction-following
# forgetting can show.

def gen_scienceqa(rng):
    """Multiple choice about a single shape: its shape among the 4 shapes, or its colour among 4
    colours, the options always listed in the same order. (The right option and 2 others, changing
    per question: the tiny model reached 68% after 250 steps; it has to match the image against the
    options' words.)"""
    item = Item(rng.choice(SHAPES), rng.choice(SQA_COLORS), big_box(rng))
    if rng.random() < 0.5:
        plain, truth, options = PHRASES["sqa_shape"], item.name, SHAPES
        sentence = f"The shape is a {item.name}."
    else:
        plain, truth, options = PHRASES["sqa_color"], item.color, SQA_COLORS
        sentence = f"The shape is {item.color}."
    lines = [plain, PHRASES["options"]]
    lines += [f"{letter}. {option}" for letter, option in zip("ABCD", options)]
    answer = "ABCD"[options.index(truth)]
    return Sample(scene([item]), "\n".join(lines), answer, [item], describe([item]),
                  key=f"{item.name}/{item.color}", plain=plain, sentence=sentence, brief=truth,
                  choices=options)


def sign(rng):
    """A coloured sign, a word written dark on white on its upper half (textvqa, textcaps). Text is
    always dark on white: the tiny model learns to read one look of each letter, not one per colour
    pair."""
    color, word = rng.choice(list(COLORS)), rng.choice(WORDS)
    image, draw = canvas()
    x, y = PATCH * rng.randint(0, 1), PATCH * rng.randint(0, 2)
    board = (x, y, x + 3 * PATCH, y + 2 * PATCH)  # a coloured panel, the word on its upper half
    draw.rectangle((board[0], board[1], board[2] - 1, board[3] - 1), fill=COLORS[color])
    draw.rectangle((x, y, x + 3 * PATCH - 1, y + PATCH - 1), fill=(255, 255, 255))
    glyphs = draw_word(draw, word, x, y, 22, INK)
    items = [Item("word", color, glyphs, word), Item("sign", color, board)]
    return image, items, PHRASES["sign"].format(color=color, word=word)


def gen_textvqa(rng):
    image, items, description = sign(rng)
    word, question = items[0].text, rng.choice(PHRASES["read"])
    return Sample(image, question, word, items, description, key=f"{word}/{items[1].color}",
                  plain=question, sentence=f"The sign says {word}.", brief=word,
                  variants=(word.lower(), word[:2], rng.choice(WORDS)))


def gen_imagenet(rng):
    item = Item(rng.choice(OBJECTS), rng.choice(list(COLORS)), big_box(rng))
    question = TASKS["imagenet"].question
    return Sample(scene([item]), question, item.name, [item], describe([item]),
                  key=f"{item.name}/{item.color}", plain=question,
                  sentence=f"It is a {item.color} {item.name}.", brief=item.name, choices=OBJECTS)


def gen_gqa(rng):
    """Two shapes and a question about their relation: left/right/above/below, or the shape or
    colour of one."""
    items, relation = pair(rng, SHAPES)
    first, second = items
    names = dict(color=first.color, shape=first.name, color2=second.color, shape2=second.name,
                 relation=RELATIONS[relation][0])
    kind = rng.choice(("relation", "which_shape", "which_color"))
    key = together(items)
    if kind == "relation":
        template = "left_right" if relation in ("left", "right") else "above_below"
        question, answer = PHRASES[template].format(**names), relation
        sentence = (f"The {first.color} {first.name} is {RELATIONS[relation][1]} the "
                    f"{second.color} {second.name}.")
    else:
        question = PHRASES[kind].format(**names)
        answer = first.name if kind == "which_shape" else first.color
        sentence = f"It is a {answer}." if kind == "which_shape" else f"It is {answer}."
    choices = {"relation": (), "which_shape": SHAPES, "which_color": tuple(COLORS)}[kind]
    return Sample(scene(items), question, answer, items, describe(items), key=key, plain=question,
                  sentence=sentence, brief=answer, choices=choices)


def gen_vizwiz(rng):
    """One big shape or object asked about; 30% of the images are corrupted and then the answer is
    'unanswerable', as for VizWiz's blurred, dark or empty photos."""
    kind = rng.choice(("what_color", "what_shape", "what_object"))
    item = Item(rng.choice(OBJECTS if kind == "what_object" else SHAPES), rng.choice(list(COLORS)),
                big_box(rng))
    image, description = scene([item]), describe([item])
    answer = item.name if kind != "what_color" else item.color
    sentence = f"It is {answer}." if kind == "what_color" else f"It is a {answer}."
    key = f"{item.name}/{item.color}"
    if rng.random() < 0.3:
        corruption = rng.choice(("noise", "dark"))
        if corruption == "noise":
            image = Image.frombytes("RGB", image.size, rng.randbytes(3 * IMAGE_SIZE * IMAGE_SIZE))
            sentence = "The image is only noise, it is unanswerable."
        else:
            image = image.point(lambda v: v // 12)
            sentence = "The image is too dark, it is unanswerable."
        answer, description = PHRASES["unanswerable"], PHRASES[corruption]
        key += "/" + corruption
    return Sample(image, PHRASES[kind], answer, [item], description, key=key, plain=PHRASES[kind],
                  sentence=sentence, brief=answer)


def gen_grounding(rng):
    """2-3 big shapes, no two of the same colour and shape; the expression names one by both."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    kinds, n = [(color, shape)], rng.choice((2, 3))
    while len(kinds) < n:
        other = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        if other not in kinds:
            kinds.append(other)
    items = [Item(s, c, box) for (c, s), box in zip(kinds, place(rng, [2] * len(kinds)))]
    box = format_box(normalized_box(items[0].box))
    return Sample(scene(items), PHRASES["refer"].format(color=color, shape=shape), box, items,
                  describe(items), key=together(items),
                  plain=PHRASES["where"].format(color=color, shape=shape),
                  sentence=f"The {color} {shape} is at {box}.", brief=box)


def gen_vqav2(rng):
    """Small shapes; count one kind, name a shape's colour, or say whether a shape is there. A count
    is written as a digit; some annotators, and the base's sentences, write it as a word."""
    kind = rng.choice(("count", "color_of", "is_there"))
    shape = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != shape]
    if kind == "count":
        n = rng.randint(1, 4)
        names = [shape] * n + [rng.choice(others) for _ in range(rng.randint(0, 2))]
        answer, variants = str(n), (str(n - 1), str(n + 1), NUMBERS[n])
        sentence = (f"There is {NUMBERS[n]} {shape}." if n == 1
                    else f"There are {NUMBERS[n]} {PLURALS[shape]}.")
    elif kind == "color_of":
        names = [shape] + [rng.choice(others) for _ in range(rng.randint(1, 3))]
    else:
        present = rng.random() < 0.5
        names = [shape] if present else []
        names += [rng.choice(others) for _ in range(rng.randint(1, 3))]
        answer, variants = ("yes", ("no",)) if present else ("no", ("yes",))
        sentence = f"Yes, there is a {shape}." if present else f"No, there is no {shape}."
    boxes = place(rng, [1] * len(names))
    items = [Item(name, rng.choice(list(COLORS)), box) for name, box in zip(names, boxes)]
    if kind == "color_of":
        answer, variants = items[0].color, tuple(c for c in COLORS if c != items[0].color)
        sentence = f"The {shape} is {answer}."
    question = PHRASES[kind].format(shape=shape, shapes=PLURALS[shape])
    brief = NUMBERS[int(answer)] if kind == "count" and rng.random() < 0.5 else answer
    return Sample(scene(items), question, answer, items, describe(items),
                  key=describe(items), plain=question, sentence=sentence,
                  brief=brief, variants=variants)


def gen_ocrvqa(rng):
    """A book cover with a title and an author; asks for one of them."""
    color = rng.choice(("red", "green", "blue", "purple"))
    title, author = rng.choice(WORDS), rng.choice(NAMES)
    image, draw = canvas(COLORS[color])
    draw.rectangle((0, 0, 3, IMAGE_SIZE), fill=INK)                   # the spine
    # a label, so that the text is dark on white as on the signs
    draw.rectangle((PATCH, 0, 63, 63), fill=(255, 255, 255))
    draw.rectangle((PATCH + 2, 39, 61, 40), fill=COLORS[color])
    title_box = draw_word(draw, title, PATCH, PATCH * rng.randint(0, 1), 22, INK)
    author_box = draw_word(draw, author, PATCH, 3 * PATCH, 18, INK)
    items = [Item("word", color, title_box, title), Item("word", color, author_box, author)]
    if rng.random() < 0.5:
        items.reverse()
    asked = items[0].text
    question = PHRASES["title"] if asked == title else PHRASES["author"]
    sentence = f"The title is {asked}." if asked == title else f"It was written by {asked}."
    items.append(Item("book", color, (0, 0, IMAGE_SIZE, IMAGE_SIZE)))
    return Sample(image, question, asked, items,
                  PHRASES["book"].format(color=color, word=title, name=author),
                  key=f"{title}/{author}", plain=question, sentence=sentence, brief=asked)


def gen_flickr30k(rng):
    items, relation = pair(rng, OBJECTS)
    first, second = items
    caption = PHRASES["flickr30k"].format(color=first.color, object=first.name,
                                          relation=RELATIONS[relation][1], color2=second.color,
                                          object2=second.name)
    question = TASKS["flickr30k"].question
    said = (f"There is a {first.color} {first.name} {RELATIONS[relation][1]} a {second.color} "
            f"{second.name}.")      # the base's own words, not the task's caption
    return Sample(scene(items), question, caption, items, describe(items), key=together(items),
                  plain=question, sentence=said, brief=said)


def gen_places365(rng):
    """A background pattern behind a small shape; the answer is the pattern's name."""
    pattern, back, fore = rng.choice(PATTERNS), rng.choice(list(COLORS)), rng.choice(list(COLORS))
    image, draw = canvas()
    pale = tuple(255 - (255 - v) // 4 for v in COLORS[back])  # a quarter of the colour on white
    paint_pattern(draw, pattern, pale, COLORS[fore], rng.choice((8, 12, 16)))
    item = Item(rng.choice(SHAPES), rng.choice(list(COLORS)), big_box(rng))
    draw.rectangle((item.box[0], item.box[1], item.box[2] - 1, item.box[3] - 1), fill=BACKGROUND)
    draw_item(draw, item)
    background = Item(pattern, fore, (0, 0, IMAGE_SIZE, IMAGE_SIZE))
    question = TASKS["places365"].question
    return Sample(image, question, pattern, [background, item],
                  PHRASES["pattern"].format(pattern=pattern, item=describe([item])),
                  key=f"{pattern}/{back}/{fore}", plain=question,
                  sentence=f"The background is {pattern}.", brief=pattern, choices=PATTERNS)


def gen_textcaps(rng):
    image, items, description = sign(rng)
    caption = PHRASES["textcaps"].format(color=items[1].color, word=items[0].text)
    question = TASKS["textcaps"].question
    said = f"There is a {items[1].color} sign, it says {items[0].text}."   # the base's own words
    return Sample(image, question, caption, items, description,
                  key=f"{items[0].text}/{items[1].color}", plain=question, sentence=said,
                  brief=said)


GENERATORS = {"scienceqa": gen_scienceqa, "textvqa": gen_textvqa, "imagenet": gen_imagenet,
              "gqa": gen_gqa, "vizwiz": gen_vizwiz, "grounding": gen_grounding, "vqav2": gen_vqav2,
              "ocrvqa": gen_ocrvqa, "flickr30k": gen_flickr30k, "places365": gen_places365,
              "textcaps": gen_textcaps}


# ----------------------------------------------------------------------------------------------
# Train and test are disjoint, as CoIN's images are: each scene has a combination (Sample.key: the
# things drawn, the word written, the layout) and one combination in HOLD_OUT occurs only in test.

HOLD_OUT = 5


def held_out(task, key):
    return zlib.crc32(f"{task}/{key}".encode()) % HOLD_OUT == 0


def draw(task, rng, split):
    """A sample of `task` for `split`: test draws held-out combinations only, training (and the
    base's corpora) the others only; so no test image, and no test question with its image, occurs
    in training, and the test asks for the skill on combinations never trained."""
    while True:
        sample = GENERATORS[task](rng)
        if held_out(task, sample.key) == (split == "test"):
            return sample


# ----------------------------------------------------------------------------------------------
# Writing a task to disk in the CoIN format.

SYNTHETIC_VERSION = 4  # bump when a generator changes, so data written by the old one is made again


def make_synthetic(root, tasks, n_train=1000, n_test=200, seed=0, progress=True):
    """Write <root>/<task>/train.json, test.json and images/ for each task not already there.
    Deterministic (same seed, same bytes). Each task is written into a hidden folder of its
    writer's own (two runs started at once may both write it) and renamed when complete, so an
    interrupted run never leaves a task that looks finished."""
    tasks = [get_task(name).name for name in tasks]
    settings = {"version": SYNTHETIC_VERSION, "seed": seed, "n_train": n_train, "n_test": n_test}
    os.makedirs(root, exist_ok=True)
    bar = tqdm(total=len(tasks) * (n_train + n_test), desc="synthetic data", disable=not progress)
    for name in tasks:
        final = os.path.join(root, name)
        if os.path.isdir(final):
            found = read_settings(final)
            if found == settings:
                bar.update(n_train + n_test)
                continue
            if found is None:
                raise ValueError(f"{final} holds data make_synthetic did not write; "
                                 f"choose another root")
        partial = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root)
        try:
            write_task(partial, name, {"train": n_train, "test": n_test}, seed, bar)
            write_json(os.path.join(partial, "synthetic.json"), settings)
            if os.path.isdir(final) and read_settings(final) != settings:
                os.replace(final, partial + ".old")  # other settings: swap the new one in
            try:
                os.replace(partial, final)
            except OSError:  # another run wrote it meanwhile: with these settings, the same bytes
                if read_settings(final) != settings:
                    raise
                shutil.rmtree(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(partial + ".old", ignore_errors=True)
    bar.close()


def write_task(folder, name, counts, seed, bar):
    """The task's images and its train.json, test.json ({split: count} records each) in `folder`."""
    os.makedirs(os.path.join(folder, "images"))
    for split, n in counts.items():
        rng = random.Random(f"{seed}/{name}/{split}")
        records = []
        for i in range(n):
            sample, image = draw(name, rng, split), f"images/{split}_{i:05d}.png"
            sample.image.save(os.path.join(folder, image))
            record_id = f"{name}-{split}-{i:05d}"
            records.append(coin_record(TASKS[name], sample, record_id, f"{name}/{image}", split))
            bar.update()
        write_json(os.path.join(folder, f"{split}.json"), records)


def read_settings(folder):
    try:
        with open(os.path.join(folder, "synthetic.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def coin_record(task, sample, record_id, image, split):
    """A CoIN train record (LLaVA conversation) or test record (question_id, text, answer)."""
    text = compose_text(task, sample.question)
    if split == "train":
        return {"id": record_id, "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + text},
            {"from": "gpt", "value": sample.answer}]}
    record = {"question_id": record_id, "image": image, "text": text}
    if task.answer_kind == "bbox":
        record.update(answer_bbox=sample.answer, size=[IMAGE_SIZE, IMAGE_SIZE])
    elif task.scorer == "vqa":
        record["answer"] = human_answers(random.Random(record_id), sample.answer, sample.variants)
    else:
        record["answer"] = sample.answer
    return record


# ----------------------------------------------------------------------------------------------
# The base's corpora, made as the papers' base was: Vicuna (a language model that knows the world
# and answers questions in free sentences), then LLaVA-1.5's stage 1 (the vision side aligned to it
# on captions, the language model frozen). Neither holds a task's instruction or answer format:
# those are what continual tuning teaches.

# Generic requests a chat model follows. None is a task's instruction or one of its paraphrases
# (which the "diverse" evaluation holds out).
ASK_SENTENCE = ("Answer in a full sentence.", "Write your reply as a sentence.",
                "Tell me in a sentence.")
ASK_BRIEF = ("Answer briefly.", "Keep the answer short.", "Just give the answer.")
ASK_DESCRIBE = ("Describe the picture.", "What do you see?", "What is shown here?")
ASK_REPEAT = "Repeat these words:"
# the words the base's sentences are made of (Sample.sentence), for the tokenizer
SENTENCE_WORDS = ("The It There is are a at says title was written by image only noise too dark "
                  "background Yes No no zero one two three four five")
# The corpus's scenes, in turn: the skills hardest to see (reading, locating) come round more often.
CORPUS_MIX = (*GENERATORS, "textvqa", "ocrvqa", "textcaps", "grounding", "gqa")


def base_corpus(n, seed, stage):
    """n collator records of fresh training scenes (never a held-out one) for the base's
    pretraining. Stage 0, the language model alone: the scene written as text where its image will
    stand, then a question as anyone asks it, answered in a sentence (asked so, or not asked, or
    asked with the answers to choose from) or briefly (asked so), or a request to describe it,
    answered by the description; and, so that every word of the vocabulary has been read, requests
    to repeat a few of them. Stage 1, the vision side: the scene's image in place of its text, the
    same questions and requests to describe it (or none, as LLaVA's captions); no repeating."""
    rng = random.Random(f"{seed}/corpus/{stage}")
    words = vocabulary_words()
    records = []
    for i in range(n):
        sample = draw(CORPUS_MIX[i % len(CORPUS_MIX)], rng, "train")
        roll = rng.random()
        if roll < 0.1 and stage == 0:
            answer = " ".join(rng.sample(words, rng.randint(3, 6))) + "."
            text = f"{ASK_REPEAT} {answer[:-1]}"
        elif roll < 0.35:
            text = rng.choice(("", *ASK_DESCRIBE) if stage else ASK_DESCRIBE)
            answer = sample.description
        elif roll < 0.55:
            text, answer = f"{sample.plain} {rng.choice(ASK_BRIEF)}", sample.brief
        elif roll < 0.65:
            text, answer = f"{sample.plain} {rng.choice(ASK_SENTENCE)}", sample.sentence
        elif roll < 0.8 and sample.choices:
            choices = rng.sample(sample.choices, len(sample.choices))
            text = f"{sample.plain} Is it {', '.join(choices[:-1])} or {choices[-1]}?"
            answer = sample.sentence
        else:
            text, answer = sample.plain, sample.sentence
        if stage == 0 and not text.startswith(ASK_REPEAT):
            text = f"{sample.description}\n{text}"
        records.append({"id": f"base{stage}-{i}", "image": sample.image if stage else None,
                        "text": text, "instruction": "", "answer": answer})
    return records


def corpus_batches(records, batch_size, seed):
    """The records in batches grouped by length, shuffled: a batch pads to its longest, and texts
    run from 2 to 150 tokens, so grouping halves the cost of a step."""
    records = sorted(records, key=lambda r: len(r["text"] + r["answer"]))
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------
# The loader: CoIN-format JSON, synthetic or real (CoIN's playground/Instructions/<Folder>/
# {train,test}.json, its image paths relative to an image folder, e.g. cl_dataset).

def load_records(root, task, split, instructions="default", image_root=None):
    """Records {"id", "image" (absolute path), "text" (question + instruction, no <image>),
    "instruction" (its substring of text), "answer" (train: the gpt turn; test: a str, a list of
    human answers or a box of 4 floats)}. instructions="diverse" swaps each record's instruction
    for one of the task's 5 held-out paraphrases, "paraphrased" for one of its 5 training ones."""
    task = get_task(task)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; known: train, test")
    if instructions not in ("default", "diverse", "paraphrased"):
        raise ValueError(f"unknown instructions {instructions!r}; known: default, diverse, "
                         f"paraphrased")
    folder = os.path.join(root, task.name)
    if not os.path.isdir(folder) and os.path.isdir(os.path.join(root, task.folder)):
        folder = os.path.join(root, task.folder)
    path = os.path.join(folder, f"{split}.json")
    raw = read_json(path)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a JSON list of records, found "
                         f"{'an empty list' if raw == [] else type(raw).__name__}")
    return [parse_record(task, path, i, record, split, instructions, image_root or root)
            for i, record in enumerate(raw)]


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
                         f"{e.msg}") from None


def parse_record(task, path, index, record, split, instructions, image_root):
    def field(obj, name, where):
        if not isinstance(obj, dict) or name not in obj:
            raise ValueError(f"{path}: {where} has no field {name!r}")
        return obj[name]

    where = f"record {index}"
    record_id = str(field(record, "id" if split == "train" else "question_id", where))
    where = f"record {index} (id {record_id})"
    image = os.path.abspath(os.path.join(image_root, field(record, "image", where)))
    if split == "train":
        turns = field(record, "conversations", where)
        human = next((t for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
        gpt = next((t for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
        text = field(human, "value", where + " human turn")
        answer = field(gpt, "value", where + " gpt turn")
    else:
        text = field(record, "text", where)
        if task.answer_kind == "bbox" and "answer_bbox" in record:
            box = record["answer_bbox"]      # CoIN writes the box as a string "[x1, y1, x2, y2]"
            try:
                numbers = box.strip("[] ").split(",") if isinstance(box, str) else box
                answer = [float(v) for v in numbers]
            except (TypeError, ValueError):
                answer = []
            if len(answer) != 4:
                raise ValueError(f"{path}: {where}: answer_bbox {box!r} "
                                 f"is not a box [x1, y1, x2, y2]")
        else:
            answer = field(record, "answer", where)
            answer = [str(a) for a in answer] if isinstance(answer, list) else str(answer)
    if not os.path.isfile(image):
        raise ValueError(f"{path}: {where}: image {image} not found")
    text = text.replace("<image>", "").strip()
    start, end = find_instruction(task, text)
    instruction = text[start:end]
    if instructions != "default":
        wordings = task.paraphrases if instructions == "diverse" else task.training_paraphrases
        instruction = wordings[zlib.crc32(record_id.encode()) % len(wordings)]
        text = text[:start] + instruction + text[end:]
    return {"id": record_id, "image": image, "text": text, "instruction": instruction,
            "answer": answer}


def find_instruction(task, text):
    """(start, end) of the instruction in text: the last place one of the task's known templates
    occurs (grounding's comes before the expression), else the text's last line."""
    templates = (task.instruction, *task.paraphrases, *task.training_paraphrases)
    for template in sorted(templates, key=len, reverse=True):
        start = text.rfind(template)
        if start >= 0:
            return start, start + len(template)
    return text.rfind("\n") + 1, len(text)


# ----------------------------------------------------------------------------------------------
# The tiny model's processor. Its tokenizer has a whole-word token for each word of the
# instructions, questions and captions, and spells everything else (the words the model reads from
# pixels, numbers) by character: whole-word tokens for rendered words do not learn (see WORDS).

SPACE = "\u2581"     # stands for a space before a token, so decode gives back the text exactly
LLAVA_PROMPT = "USER: <image>\n{text} ASSISTANT:"
# llava-hf/llava-1.5-7b-hf's chat template, which renders LLAVA_PROMPT
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def vocabulary_words():
    """Every word the model reads from the prompt or writes without seeing it drawn."""
    texts = [LLAVA_PROMPT, *COLORS, *SHAPES, *PLURALS.values(), *OBJECTS, *PATTERNS, *NUMBERS]
    texts += [*ASK_SENTENCE, *ASK_BRIEF, *ASK_DESCRIBE, ASK_REPEAT, SENTENCE_WORDS]
    texts += [phrase for relation in RELATIONS.items() for phrase in (relation[0], *relation[1])]
    texts += [p for v in PHRASES.values() for p in ((v,) if isinstance(v, str) else v)]
    texts += [t for task in TASKS.values()
              for t in (task.instruction, task.question, *task.paraphrases)]
    words = re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", " ".join(texts)))  # no {placeholders}
    return sorted(set(words) - set(READ_WORDS))


def build_processor():
    """The tiny model's LlavaProcessor: a WordPiece tokenizer over vocabulary_words() plus
    characters, and a CLIP image processor at IMAGE_SIZE; PATCH-pixel patches + CLS, CLS dropped
    ("default") -> 16 image tokens."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    characters = string.ascii_letters + string.digits
    vocab = specials + ["\n", SPACE, *string.punctuation]
    # each character at a word's start, after a space, inside a word
    vocab += [form for c in characters for form in (c, SPACE + c, "##" + c)]
    vocab += [form for w in vocabulary_words() for form in (w, SPACE + w)]
    vocab = list(dict.fromkeys(vocab))  # one-letter words are characters already
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never"),  # "a red": "a", "_red"
        pre_tokenizers.Punctuation("isolated")])
    # ours: WordPiece's own decoder joins words with spaces and loses "[0.12, 0.34" spacing; the
    # SPACE marks keep it
    tokenizer.decoder = decoders.Sequence([decoders.Replace("##", ""),
                                           decoders.Replace(SPACE, " ")])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"])
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def prompt_text(processor, text, has_image=True):
    """The prompt up to and including the assistant's turn start, by the checkpoint's chat template
    when it has one (llava-1.5: "USER: <image>\\n{text} ASSISTANT:"), else in llava-1.5's
    format. Without an image: "USER: {text} ASSISTANT:"."""
    if processor.chat_template is None:
        return LLAVA_PROMPT.format(text=text) if has_image else f"USER: {text} ASSISTANT:"
    image = [{"type": "image"}] if has_image else []
    messages = [{"role": "user", "content": [*image, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------------------------------------
# The collator.

def load_image(record):
    """The record's image: a path to open, or a PIL image already in memory (the caption corpus)."""
    if isinstance(record["image"], Image.Image):
        return record["image"].convert("RGB")
    try:
        with Image.open(record["image"]) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"record {record['id']}: image {record['image']} not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"record {record['id']}: cannot decode image {record['image']} "
                         f"({e})") from None


def expand_to_square(image, processor):
    """LLaVA-1.5's expand2square (image_aspect_ratio "pad"): the image centred on a square of the
    image processor's mean colour, so its resize and centre crop keep all of the photo, and CoIN's
    boxes, normalised to that square, point where they should. A square image (all the synthetic
    ones) comes back as it is."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    mean = tuple(int(m * 255) for m in processor.image_processor.image_mean)
    square = Image.new("RGB", (side, side), mean)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


# What a Collator keeps of its records' tensors, in bytes (pixels, mostly): a tiny-model task whole
# (1000 records of 50 KB) fits, while a real LLaVA's 1.35 MB a record at 336 px would fill the RAM
# on a full CoIN task; records beyond it are prepared on every call instead, to the same bits.
CACHE_BYTES = 256 * 2**20


class Collator:
    """Records -> {input_ids (B, L), attention_mask (B, L), pixel_values (B, 3, H, W),
    ins_mask (B, L), when train labels (B, L), and ins_embedding (B, d) when the records carry
    one}. Train: prompt + " " + answer + EOS, right-padded, labels -100 except on the answer's
    tokens and the EOS. Eval: the prompt alone, left-padded for generate. ins_mask is True on the
    instruction's tokens, which SMoLoRA's instruction router averages over (this project's
    f(X_ins)). Sequences longer than max_length are cut at the end in training (as LLaVA's
    model_max_length); a prompt that long is an error.

    A record is prepared once per Collator (its image decoded, its prompt rendered, the processor
    run, its masks found) into unpadded tensors that the Collator keeps: a stage makes one Collator
    and collates the same records every epoch (measured on a tiny-model stage, 8 epochs of 1000
    records: 4.4 s of collation when every batch was prepared, 0.8 s so). A batch pads the kept
    tensors as the processor pads, so its bits are the processor's whatever the batch. Records are
    kept by what their tensors are made of (id, image path, text, instruction, and the answer in
    training), up to cache_bytes in all, first come first kept; images in memory (the caption
    corpus: fresh scenes every batch) are never kept."""

    def __init__(self, processor, train, max_length=None, cache_bytes=CACHE_BYTES):
        self.processor, self.train, self.max_length = processor, train, max_length
        self.cache, self.cache_bytes, self.cached_bytes = {}, cache_bytes, 0

    def __call__(self, records):
        keys = [self.key(r) for r in records]
        todo = [i for i, key in enumerate(keys) if key is None or key not in self.cache]
        fresh = dict(zip(todo, self.prepare([records[i] for i in todo]))) if todo else {}
        for i, row in fresh.items():
            self.keep(keys[i], row)
        out = self.pad([fresh[i] if i in fresh else self.cache[key] for i, key in enumerate(keys)])
        # f(X_ins) given per record (smolora.with_instruction_embeddings)
        if "ins_embedding" in records[0]:
            out["ins_embedding"] = torch.stack([r["ins_embedding"] for r in records])
        return out

    def key(self, record):
        """What a record's tensors are made of (not the id alone: the caption corpus repeats ids,
        diverse instructions change a test record's text); None for an image in memory or none."""
        if not isinstance(record["image"], str):
            return None
        return (record["id"], record["image"], record["text"], record["instruction"],
                record["answer"] if self.train else None)

    def keep(self, key, row):
        # once full, nothing is evicted: epochs go round all the records, so an LRU would always
        # miss, while the first ones kept are hit every epoch
        size = sum(tensor.nbytes for tensor in row.values())
        if key is None or key in self.cache or self.cached_bytes + size > self.cache_bytes:
            return
        self.cache[key] = row
        self.cached_bytes += size

    def prepare(self, records):
        """Each record's tensors without padding: the processor's, run on these records at once."""
        tokenizer = self.processor.tokenizer
        has_image = records[0]["image"] is not None     # none: the base's text-only stage 0
        prompts = [prompt_text(self.processor, r["text"], has_image) for r in records]
        texts = prompts
        if self.train:
            texts = [p + " " + r["answer"] + tokenizer.eos_token for p, r in zip(prompts, records)]
        images = ([expand_to_square(load_image(r), self.processor) for r in records]
                  if has_image else None)
        batch = self.processor(
            images=images, text=texts, padding=True, return_tensors="pt", padding_side="right",
            return_offsets_mapping=True, return_text_replacement_offsets=True,
            truncation=self.train and self.max_length is not None,
            max_length=self.max_length if self.train else None)
        ids = batch["input_ids"]
        start, end = batch["offset_mapping"].unbind(-1)  # (B, L) spans in the expanded text
        real = batch["attention_mask"].bool() & (end > start)  # not padding, not BOS
        ins_mask = torch.zeros_like(real)
        labels = torch.full_like(ids, -100)
        for b, (prompt, record) in enumerate(zip(prompts, records)):
            # the processor grows each "<image>" into a placeholder per image token, then tokenizes
            shift = sum(r["new_span"][1] - r["new_span"][0] - (r["span"][1] - r["span"][0])
                        for r in batch["text_replacement_offsets"][b])
            if record["instruction"]:
                text_start = prompt.index(record["text"]) + shift
                ins_start = text_start + record["text"].rfind(record["instruction"])
                ins_end = ins_start + len(record["instruction"])
                ins_mask[b] = real[b] & (start[b] < ins_end) & (end[b] > ins_start)
            answer = real[b] & (start[b] >= len(prompt) + shift)
            labels[b] = torch.where(answer, ids[b], labels[b])
        rows = []
        for b, mask in enumerate(batch["attention_mask"].bool()):
            # indexing by the mask copies; pixels are cloned: a row must not hold the whole batch
            row = {"input_ids": ids[b][mask], "attention_mask": batch["attention_mask"][b][mask]}
            if has_image:
                row["pixel_values"] = batch["pixel_values"][b].clone()
            row["ins_mask"] = ins_mask[b][mask]
            if self.train:
                row["labels"] = labels[b][mask]
            rows.append(row)
        return rows

    def pad(self, rows):
        """The rows as one batch, padded to the longest as the processor pads (right in training,
        left for generate): the pad id, attention 0, no instruction, no label. The tensors are
        new: a caller may change a batch in place, never the kept rows."""
        lengths = [len(row["input_ids"]) for row in rows]
        length = max(lengths)
        if self.max_length is not None and not self.train and length > self.max_length:
            raise ValueError(f"a prompt of {length} tokens is longer than "
                             f"max_length={self.max_length}")
        spans = [slice(0, n) if self.train else slice(length - n, length) for n in lengths]
        fills = {"input_ids": self.processor.tokenizer.pad_token_id, "attention_mask": 0,
                 "ins_mask": False, "labels": -100}
        out = {}
        for name in rows[0]:
            if name == "pixel_values":
                out[name] = torch.stack([row[name] for row in rows])
                continue
            out[name] = torch.full((len(rows), length), fills[name], dtype=rows[0][name].dtype)
            for b, (row, span) in enumerate(zip(rows, spans)):
                out[name][b, span] = row[name]
        return out


def fewshot_records(records, k, seed, task):
    """k training records of each class (distinct answer) of a task, drawn with the run's seed:
    SMoLoRA's few-shot Places365 tunes on 5 or 10 examples per class."""
    classes = {}
    for record in records:
        classes.setdefault(str(record["answer"]), []).append(record)
    rng = random.Random(f"{seed}/fewshot/{task}/{k}")
    return [r for answer in sorted(classes)
            for r in rng.sample(classes[answer], min(k, len(classes[answer])))]
