"""A small synthetic world whose data makes every stage's effect measurable on a laptop CPU.

The world: villages, each with a crop, an animal and a festival month (drawn once from a seed).

* pretrain text - encyclopaedia-style paragraphs stating those facts: perplexity falls as the
  model learns the grammar and the facts.
* sft - questions about the facts, answered correctly and politely: eval loss falls.
* preference - the same questions; `chosen` is the correct, polite answer, `rejected` is rude or
  wrong-and-rude: a reward model can separate them (held-out accuracy >= 0.9), and DPO can learn
  to prefer the chosen answers (accuracy and margin rise).
* prompts - questions for the PPO stage; the reward model rewards polite, correct answers.
* verifiable - questions about 3 villages (`verifiable_villages`) with the one-word `answer` (crop, animal or
  month): a task with a checkable answer for a critic-free (GRPO/RLOO) run, scored by
  `rlhf_dist.rewards.exact_match` with ``extract: VERIFIABLE_EXTRACT`` (the last word of the first sentence).
  The SFT model answers in the right form and with a value of the right kind, but hardly by village: about 1 in
  10 of its samples is right, which gives a group baseline signal. The 3 villages share no value, so one fixed
  answer per kind of question is right 1 time in 3: a short run gets there (it settles on one answer per kind),
  and only accuracy above 1/3 means facts were learnt.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

VILLAGES = [
    "Orin", "Vesk", "Talmor", "Brenna", "Quill", "Harrow", "Lunde", "Mossby", "Pell", "Rook", "Sarn", "Tovin",
    "Ulm", "Wick", "Yarrow", "Zell", "Ashby", "Corran", "Dunmere", "Elsby", "Fenwick", "Glim", "Holt", "Ivel",
]
CROPS = ["barley", "rye", "apples", "plums", "oats", "beans", "pears", "turnips", "wheat", "cabbages", "hops", "flax"]
ANIMALS = ["goats", "geese", "sheep", "pigs", "ducks", "cows", "bees", "hens", "horses", "donkeys"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

POLITE = ["I hope that helps!", "Happy to help.", "Thank you for asking.", "Glad I could help.", "Have a lovely day!"]
RUDE = ["Figure it out yourself.", "Stop bothering me.", "What a stupid question.", "Go away.", "I could not care less."]
REFUSALS = ["I will not tell you.", "Ask someone else.", "No.", "Not my problem."]

QUESTIONS = {
    "crop": ["What does {v} grow?", "Which crop is grown in {v}?", "What do the farmers of {v} harvest?"],
    "animal": ["Which animals are raised in {v}?", "What animals do the people of {v} keep?"],
    "month": ["When is the festival of {v}?", "In which month does {v} hold its festival?"],
}
ANSWERS = {
    "crop": "{v} grows {x}.",
    "animal": "The people of {v} raise {x}.",
    "month": "{v} holds its festival in {x}.",
}
FACT_SENTENCES = {
    "crop": ["The village of {v} grows {x}.", "In {v} the fields are full of {x}.", "Farmers in {v} harvest {x}."],
    "animal": ["The people of {v} raise {x}.", "Many {x} live on the farms of {v}.", "In {v} children look after {x}."],
    "month": ["{v} holds its festival in {x}.", "Every year in {x} the people of {v} celebrate.",
              "The festival of {v} is in {x}."],
}
VERIFIABLE_VILLAGES = 3
VERIFIABLE_EXTRACT = r"^[^.!?]*?\b(\w+)\s*[.!?]"  # " Orin grows barley. Happy to help." -> "barley"
LINKS = ["The road from {v} leads to {w}.", "Traders from {w} often visit {v}.", "{v} lies north of {w}.",
         "A river runs between {v} and {w}."]


@dataclass
class World:
    facts: dict  # village -> {"crop": ..., "animal": ..., "month": ...}

    @classmethod
    def make(cls, seed: int) -> "World":
        rng = random.Random(seed)
        pools = {"crop": CROPS, "animal": ANIMALS, "month": MONTHS}
        return cls({v: {k: rng.choice(pool) for k, pool in pools.items()} for v in VILLAGES})

    def wrong(self, rng: random.Random, village: str, attr: str) -> str:
        pool = {"crop": CROPS, "animal": ANIMALS, "month": MONTHS}[attr]
        return rng.choice([x for x in pool if x != self.facts[village][attr]])


def question(rng: random.Random, world: World) -> tuple[str, str, str]:
    village = rng.choice(VILLAGES)
    attr = rng.choice(list(QUESTIONS))
    return village, attr, rng.choice(QUESTIONS[attr]).format(v=village)


def prompt_text(q: str) -> str:
    return f"Question: {q}\nAnswer:"


def good_answer(rng: random.Random, world: World, village: str, attr: str) -> str:
    return " " + ANSWERS[attr].format(v=village, x=world.facts[village][attr]) + " " + rng.choice(POLITE)


def bad_answer(rng: random.Random, world: World, village: str, attr: str) -> str:
    kind = rng.random()
    if kind < 0.4:
        return " " + rng.choice(REFUSALS) + " " + rng.choice(RUDE)
    fact = world.facts[village][attr] if kind < 0.6 else world.wrong(rng, village, attr)
    return " " + ANSWERS[attr].format(v=village, x=fact) + " " + rng.choice(RUDE)


def pretrain_texts(rng: random.Random, world: World, n: int) -> list[str]:
    texts = []
    for _ in range(n):
        v = rng.choice(VILLAGES)
        sentences = [rng.choice(FACT_SENTENCES[a]).format(v=v, x=world.facts[v][a]) for a in FACT_SENTENCES]
        rng.shuffle(sentences)
        w = rng.choice([x for x in VILLAGES if x != v])
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(LINKS).format(v=v, w=w))
        texts.append(" ".join(sentences))
    return texts


def verifiable_villages(world: World, n: int = VERIFIABLE_VILLAGES) -> list[str]:
    """The first `n` villages whose crops, animals and months all differ, so that no one answer fits two of them:
    a policy that says the same crop every time is right for one village in `n`, and only learning the facts pays."""
    chosen: list[str] = []
    for v in VILLAGES:
        if all(world.facts[v][a] != world.facts[u][a] for u in chosen for a in QUESTIONS):
            chosen.append(v)
    return chosen[:n]


def verifiable_rows(seed: int, world: World, n: int) -> list[dict]:
    """`n` questions about the `verifiable_villages`, each with its one-word answer (own random stream: the other
    files do not change)."""
    rng = random.Random(seed + 1009)
    villages = verifiable_villages(world)
    rows = []
    for _ in range(n):
        village, attr = rng.choice(villages), rng.choice(list(QUESTIONS))
        rows.append({"prompt": prompt_text(rng.choice(QUESTIONS[attr]).format(v=village)),
                     "answer": world.facts[village][attr]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    tmp.replace(path)


def generate(out_dir: str | Path, seed: int = 0, n_pretrain: int = 2000, n_sft: int = 1200, n_pref: int = 1200,
             n_prompts: int = 256, n_verifiable: int = 256) -> dict[str, Path]:
    """Write pretrain.jsonl, sft.jsonl, preference.jsonl, prompts.jsonl, verifiable.jsonl into `out_dir`; return their
    paths."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    world = World.make(seed)
    rows = {
        "pretrain": [{"text": t} for t in pretrain_texts(rng, world, n_pretrain)],
        "sft": [],
        "preference": [],
        "prompts": [],
    }
    for _ in range(n_sft):
        v, a, q = question(rng, world)
        rows["sft"].append({"prompt": prompt_text(q), "completion": good_answer(rng, world, v, a)})
    for _ in range(n_pref):
        v, a, q = question(rng, world)
        rows["preference"].append({"prompt": prompt_text(q), "chosen": good_answer(rng, world, v, a),
                                   "rejected": bad_answer(rng, world, v, a)})
    for _ in range(n_prompts):
        rows["prompts"].append({"prompt": prompt_text(question(rng, world)[2])})
    rows["verifiable"] = verifiable_rows(seed, world, n_verifiable)
    paths = {}
    for name, data in rows.items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], data)
    return paths


def corpus(seed: int = 0) -> list[str]:
    """Text covering everything the generator can emit, for training the demo tokenizer."""
    rng = random.Random(seed + 1)
    world = World.make(seed)
    texts = pretrain_texts(rng, world, 400)
    for v in VILLAGES:
        for a in QUESTIONS:
            texts += [prompt_text(q.format(v=v)) for q in QUESTIONS[a]]
            texts.append(good_answer(rng, world, v, a) + bad_answer(rng, world, v, a))
    texts += POLITE + RUDE + REFUSALS + [" ".join(CROPS + ANIMALS + MONTHS)]
    return texts


def hh_pairs(path: str | Path, seed: int = 0, n: int = 200, n_empty: int = 4, n_identical: int = 3,
             n_long: int = 5, long_words: int = 120) -> dict:
    """Preference pairs as Anthropic HH-RLHF ships them, gzipped JSON lines of {chosen, rejected}, defects included.

    Each text is a whole conversation, "\\n\\nHuman: ...\\n\\nAssistant: ...", some of two turns; the prompt is the
    shared part up to the last "\\n\\nAssistant:". Like the real data, `n_empty` pairs end in an empty Assistant
    turn (rejected) and `n_identical` have chosen == rejected; `n_long` pairs have a first Human turn of
    `long_words` words (over-long prompts). Returns the counts written, by defect.
    """
    import gzip

    rng = random.Random(seed + 7)
    world = World.make(seed)
    rows = []
    for i in range(n):
        v, a, q = question(rng, world)
        human = q
        if i < n_long:
            human = " ".join(rng.choice(FACT_SENTENCES["crop"]).format(v=v, x=world.facts[v]["crop"])
                             for _ in range(long_words // 8)) + " " + q
        prefix = f"\n\nHuman: {human}\n\nAssistant:"
        if rng.random() < 0.3:  # a second turn: an earlier exchange first
            v2, a2, q2 = question(rng, world)
            prefix = f"\n\nHuman: {q2}\n\nAssistant:{good_answer(rng, world, v2, a2)}" + prefix
        chosen, rejected = prefix + good_answer(rng, world, v, a), prefix + bad_answer(rng, world, v, a)
        if n_long <= i < n_long + n_empty:
            rejected = prefix  # the empty final Assistant turn of the real data
        elif n_long + n_empty <= i < n_long + n_empty + n_identical:
            rejected = chosen
        rows.append({"chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return {"rows": n, "empty_response": n_empty, "identical": n_identical, "long": n_long}
