"""A seeded synthetic world for the demo: people with attributes, arithmetic word problems and simple
instructions. Small enough that a tiny model learns it in minutes on 2 cores, rich enough that deeper
tiers do visibly better (fact recall and multi-step arithmetic both need capacity).

Every function is deterministic in its seed; nothing is downloaded.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kira", "Luca",
         "Maya", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Xenia",
         "Yusuf", "Zoe", "Arjun", "Bea", "Cyrus", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas"]
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth", "Dakar", "Hanoi", "Tunis",
          "Bergen"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "horse", "goat", "hamster"]
JOBS = ["baker", "pilot", "doctor", "farmer", "teacher", "painter", "sailor", "miner", "judge", "chef"]
ITEMS = ["apples", "coins", "books", "pears", "stones", "shells", "cards", "eggs"]
WORDS = ["sun", "tree", "river", "cloud", "stone", "bird", "lamp", "road"]
ATTRS = {"city": CITIES, "color": COLORS, "pet": PETS, "job": JOBS}
QUESTIONS = {"city": "Where does {n} live?", "color": "What is the favorite color of {n}?",
             "pet": "Which pet does {n} have?", "job": "What is the job of {n}?"}
REPHRASED = {"city": "In which city does {n} live?", "color": "Which color does {n} like best?",
             "pet": "What animal does {n} keep as a pet?", "job": "What does {n} do for a living?"}
ANSWERS = {"city": "{n} lives in {v}.", "color": "The favorite color of {n} is {v}.",
           "pet": "{n} has a {v}.", "job": "{n} works as a {v}."}


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    color: str
    pet: str
    job: str


def make_people(seed: int = 0) -> list[Person]:
    rng = random.Random(seed)
    return [Person(n, *(rng.choice(ATTRS[a]) for a in ATTRS)) for n in NAMES]


def _fact_text(p: Person, rng: random.Random) -> str:
    attrs = list(ATTRS)
    rng.shuffle(attrs)
    return " ".join(ANSWERS[a].format(n=p.name, v=getattr(p, a)) for a in attrs)


def _is_held_out(a: int, b: int, c: int) -> bool:
    # A fixed tenth of the problem space never appears in training data.
    return (a * 131 + b * 31 + c * 7) % 10 == 0


def _problem(rng: random.Random, held_out: bool) -> tuple[str, int, str]:
    """A two-step word problem, its answer and a worked solution."""
    while True:
        a, b, c = rng.randint(2, 20), rng.randint(1, 9), rng.randint(1, 9)
        if _is_held_out(a, b, c) == held_out and a + b - c >= 0:
            break
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    q = f"{name} has {a} {item}, gets {b} more and gives away {c}. How many {item} are left?"
    work = f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. The answer is {a + b - c}."
    return q, a + b - c, work


def _instruction(rng: random.Random) -> tuple[str, str]:
    w, k = rng.choice(WORDS), rng.randint(2, 4)
    if rng.random() < 0.5:
        return f"Repeat the word {w} {k} times.", " ".join([w] * k)
    return f"Spell the word {w}.", "-".join(w)


def _unique(n: int, draw) -> list[dict]:
    """n distinct records from `draw()`: a clean corpus has no exact duplicates (the data gate checks)."""
    seen, out = set(), []
    for _ in range(100 * n):
        rec = draw()
        key = json.dumps(rec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(rec)
            if len(out) == n:
                return out
    raise ValueError(f"the demo world has fewer than {n} distinct records of this kind")


def pretrain_records(n: int, seed: int = 0) -> list[dict]:
    rng, people = random.Random(seed + 1), make_people(seed)

    def draw() -> dict:
        r = rng.random()
        if r < 0.5:
            text = " ".join(_fact_text(p, rng) for p in rng.sample(people, rng.randint(1, 2)))
            return {"text": text, "source": "facts", "lang": "en"}
        if r < 0.85:
            q, _, work = _problem(rng, held_out=False)
            return {"text": f"{q} {work}", "source": "arithmetic", "lang": "en"}
        q, a = _instruction(rng)
        return {"text": f"{q} {a}", "source": "instructions", "lang": "en"}

    return _unique(n, draw)


def sft_records(n: int, seed: int = 0) -> list[dict]:
    rng, people = random.Random(seed + 2), make_people(seed)

    def draw() -> dict:
        r = rng.random()
        if r < 0.45:
            p, a = rng.choice(people), rng.choice(list(ATTRS))
            q = rng.choice([QUESTIONS, REPHRASED])[a].format(n=p.name)
            ans = ANSWERS[a].format(n=p.name, v=getattr(p, a))
        elif r < 0.9:
            q, _, ans = _problem(rng, held_out=False)
        else:
            q, ans = _instruction(rng)
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}

    return _unique(n, draw)


def rl_records(n: int, seed: int = 0, held_out: bool = False) -> list[dict]:
    rng = random.Random(seed + (4 if held_out else 3))

    def draw() -> dict:
        q, a, _ = _problem(rng, held_out)
        return {"prompt": q, "answer": str(a)}

    return _unique(n, draw)


def heldout_prompts(n: int, seed: int = 0) -> list[dict]:
    """RL-kind prompts from the held-out tenth of the problem space (the arithmetic set's first n)."""
    return rl_records(n, seed + 100, held_out=True)


# The held-out evaluation sets a benchmark selects with `path: demo:<name>`, in eval_sets' order.
EVAL_SETS = ("arithmetic", "facts_mc", "heldout_text")


def eval_sets(seed: int = 0, n: int = 50) -> dict[str, list[dict]]:
    """Held-out evaluation sets: generative arithmetic (exact match), fact cloze over every value of an attribute
    (log-likelihood of "Alice lives in" -> " Paris") and held-out text for perplexity."""
    rng, people = random.Random(seed + 5), make_people(seed)
    mc = []
    for _ in range(n):  # a cloze over every value of the attribute: chance is 1/8 .. 1/12
        p, a = rng.choice(people), rng.choice(list(ATTRS))
        choices = list(ATTRS[a])
        rng.shuffle(choices)
        mc.append({"question": ANSWERS[a].format(n=p.name, v="\0").split("\0")[0].rstrip(), "choices": choices,
                   "gold": choices.index(getattr(p, a))})
    arith = [{"question": r["prompt"], "answer": r["answer"]} for r in heldout_prompts(n, seed)]
    ppl = [{"text": f"{q} {work}"} for q, _, work in (_problem(rng, True) for _ in range(n))]
    return dict(zip(EVAL_SETS, (arith, mc, ppl), strict=True))


def heldout_texts(seed: int = 0) -> list[str]:
    """Pretrain-kind held-out text: the heldout_text set's worked problems."""
    return [r["text"] for r in eval_sets(seed)["heldout_text"]]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_demo_corpus(out_dir: str | Path, seed: int = 0, n_pretrain: int = 4000, n_sft: int = 1500,
                      n_rl: int = 300) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {
        "pretrain": write_jsonl(out / "pretrain.jsonl", pretrain_records(n_pretrain, seed)),
        "sft": write_jsonl(out / "sft.jsonl", sft_records(n_sft, seed)),
        "rl": write_jsonl(out / "rl.jsonl", rl_records(n_rl, seed)),
    }
    for name, recs in eval_sets(seed).items():
        paths[f"eval_{name}"] = write_jsonl(out / "eval" / f"{name}.jsonl", recs)
    return paths
