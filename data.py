"""Tasks and data: the CoIN / SMoLoRA task table, a synthetic mini-CoIN, the CoIN-format loader, the collator.

Read top to bottom: the task table (DESIGN.md section 3), ...
"""
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# The task table (DESIGN.md section 3). The instruction text is exactly the LLaVA-1.5 / CoIN one.

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


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str          # the instruction appended to the question (DESIGN.md section 3)
    answer_kind: str          # letter | phrase | bbox | caption
    scorer: str               # letter | vqa | exact | contains | iou | cider (eval.py)
    paraphrases: tuple        # 5 instructions of the same meaning and answer format, never trained on
    question: str = ""        # a fixed question, for tasks that have one (imagenet, places365, captions)


TASKS = {t.name: t for t in (
    Task("scienceqa", "Answer with the option's letter from the given choices directly.", "letter", "letter", (
        "Reply with the letter of the correct option only.",
        "Choose one option and answer with its letter alone.",
        "Give only the letter of the right choice.",
        "Select the correct choice and respond with just its letter.",
        "Answer with a single option letter from the choices.")),
    Task("textvqa", PHRASE, "phrase", "vqa", PHRASE_PARAPHRASES),
    Task("imagenet", PHRASE, "phrase", "contains", PHRASE_PARAPHRASES,
         question="What is the object in the image?"),
    Task("gqa", PHRASE, "phrase", "exact", PHRASE_PARAPHRASES),
    Task("vizwiz", "When the provided information is insufficient, respond with 'Unanswerable'.\n" + PHRASE,
         "phrase", "exact", tuple(
             "If the image does not let you answer, reply 'Unanswerable'.\n" + p for p in PHRASE_PARAPHRASES)),
    Task("grounding", "Please provide the bounding box coordinate of the region this sentence describes:",
         "bbox", "iou", (
             "Give the bounding box of the region described by this sentence:",
             "Output the box coordinates of the area this phrase refers to:",
             "Locate the region this sentence describes and give its bounding box:",
             "Return the bounding box coordinates for the region described here:",
             "Find the region matching this description and answer with its box:")),
    Task("vqav2", PHRASE, "phrase", "vqa", PHRASE_PARAPHRASES),
    Task("ocrvqa", PHRASE, "phrase", "exact", PHRASE_PARAPHRASES),
    Task("flickr30k", CAPTION, "caption", "cider", CAPTION_PARAPHRASES,
         question="What is happening in the presented picture?"),
    Task("places365", PHRASE, "phrase", "exact", PHRASE_PARAPHRASES,
         question="What is the background of the image?"),
    Task("textcaps", CAPTION, "caption", "cider", CAPTION_PARAPHRASES,
         question="What is happening in the presented picture?"),
)}

COIN_TASKS = ("scienceqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding", "vqav2", "ocrvqa")
SMOLORA_TASKS = ("scienceqa", "textvqa", "flickr30k", "imagenet", "gqa", "vqav2")
SMOLORA_UNSEEN = ("vizwiz", "textcaps", "ocrvqa", "places365")
