"""A seeded synthetic world for the demo: 48 people with a home city (one each) and three more attributes,
arithmetic tables and multi-step word problems with worked solutions, two-hop questions (the job of the
person who lives in Oslo) and simple instructions. Small enough that a tiny model learns it in minutes on
2 cores, rich enough that deeper tiers do visibly better: held-out problems and two-hop questions combine
steps that training only shows apart.

Every function is deterministic in its seed; nothing is downloaded.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kira", "Luca",
         "Maya", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Xenia",
         "Yusuf", "Zoe", "Arjun", "Bea", "Cyrus", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Kofi", "Lena", "Mateo", "Nadia", "Oscar", "Pia", "Rafael", "Sofia", "Tomas", "Uma", "Viktor", "Yara"]
# One home city per person (a permutation), so "the person who lives in Oslo" names exactly one person.
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth", "Dakar", "Hanoi", "Tunis",
          "Bergen", "Accra", "Delhi", "Dublin", "Havana", "Madrid", "Minsk", "Nairobi", "Porto", "Riga", "Rome",
          "Seoul", "Hamburg", "Tokyo", "Vienna", "Warsaw", "Zagreb", "Athens", "Berlin", "Bogota", "Boston",
          "Denver", "Geneva", "Lisbon", "London", "Manila", "Milan", "Munich", "Naples", "Ottawa", "Prague",
          "Santiago", "Sydney", "Taipei", "Toronto", "Turin", "Venice"]
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
ASKED = {"city": "What is the home city of {n}?", "color": "What color does {n} like?",
         "pet": "What pet does {n} own?", "job": "What work does {n} do?"}
# Every fact sentence starts with "The": a chat answer's first token is then never a name, which would be a
# different BPE token ("Alice") from the name in the question (" Alice") and so has to be learnt per name.
ANSWERS = {"city": "The home of {n} is {v}.", "color": "The favorite color of {n} is {v}.",
           "pet": "The pet of {n} is a {v}.", "job": "The job of {n} is {v}."}
# Question frames that training asks every attribute in, so that only the attribute's noun says what is asked: a
# frame trained with some attributes only teaches the deep exits to answer one of those, whatever the noun. The
# rephrased chat benchmark asks in frames no training text uses.
NOUNS = {"city": "home city", "color": "favorite color", "pet": "pet", "job": "job"}
FRAMES = ("What is the {a} of {n}?", "Which {a} does {n} have?", "Tell me the {a} of {n}.",
          "Do you know the {a} of {n}?", "Say what the {a} of {n} is.")
UNSEEN_FRAMES = ("Could you name the {a} of {n}?", "I would like to know the {a} of {n}.")
HOME = "The person who lives in {v} is {n}."  # a city fact read backwards: a two-hop question's first hop
TWO_HOP = {"color": "What is the favorite color of the person who lives in {c}?",
           "pet": "Which pet does the person who lives in {c} have?",
           "job": "What is the job of the person who lives in {c}?"}
MAX_VALUE = 18  # word problems keep every number in 0..18; operands are 1..9
# A word problem's phrasing: an opening, its steps, a question. Three of the twelve (opening, question) pairs never
# appear in training (`_unseen_phrasing`): the rephrased benchmark asks held-out problems in them.
OPENINGS = ("{n} has {s} {item}", "{n} starts with {s} {item}", "{n} owns {s} {item}", "At first {n} has {s} {item}")
GAINS = ("gets {k} more", "finds {k} more", "buys {k} more")
LOSSES = ("gives away {k}", "loses {k}", "sells {k}")
STEP_COUNTS = {2: "two", 3: "three"}
ASKS = ("How many {item} are left?", "How many {item} does {n} have now?", "How many {item} remain?")


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    color: str
    pet: str
    job: str


def make_people(seed: int = 0) -> list[Person]:
    rng = random.Random(seed)
    cities = rng.sample(CITIES, len(NAMES))
    return [Person(n, c, *(rng.choice(ATTRS[a]) for a in ("color", "pet", "job"))) for n, c in zip(NAMES, cities)]


def _fact_text(p: Person, rng: random.Random) -> str:
    attrs = list(ATTRS)
    rng.shuffle(attrs)
    out = [ANSWERS[a].format(n=p.name, v=getattr(p, a)) for a in attrs]
    if rng.random() < 0.5:
        out.insert(rng.randint(0, len(out)), HOME.format(v=p.city, n=p.name))
    return " ".join(out)


def _is_held_out(start: int, ops: tuple) -> bool:
    # A fixed tenth of the problem space never appears in training data (problems, not their single steps).
    h = start * 131
    for sign, k in ops:
        h = h * 31 + sign * 7 + k
    return h % 10 == 0


def _steps(rng: random.Random, n_ops: int) -> tuple[int, tuple]:
    """A start value and n_ops signed operands (1..9) keeping every intermediate value in 0..MAX_VALUE."""
    while True:
        x = start = rng.randint(1, 9)
        ops = []
        for _ in range(n_ops):
            k = rng.randint(1, 9)
            sign = 1 if x + k <= MAX_VALUE and (x - k < 0 or rng.random() < 0.5) else -1
            if x + sign * k < 0:
                break
            ops.append((sign, k))
            x += sign * k
        if len(ops) == n_ops:
            return start, tuple(ops)


def _unseen_phrasing(opening: int, ask: int) -> bool:
    return (opening + ask) % 4 == 3


def _problem(rng: random.Random, held_out: bool, unseen_phrasing: bool = False) -> tuple[str, int, str]:
    """A multi-step word problem (two or three steps), its answer and a worked solution; held-out problems and
    unseen phrasings are each a part of their space that training never shows."""
    while True:
        start, ops = _steps(rng, rng.choice((2, 2, 3)))
        if _is_held_out(start, ops) == held_out:
            break
    while True:
        opening, ask = rng.randrange(len(OPENINGS)), rng.randrange(len(ASKS))
        if _unseen_phrasing(opening, ask) == unseen_phrasing:
            break
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    # No verb twice in a problem: each clause's verb then names its number, a copy that needs no counting.
    verbs = {1: rng.sample(GAINS, len(GAINS)), -1: rng.sample(LOSSES, len(LOSSES))}
    acts = [verbs[sign].pop().format(k=k) for sign, k in ops]
    q = (f"{OPENINGS[opening].format(n=name, s=start, item=item)}, {', '.join(acts[:-1])} and {acts[-1]}. "
         + ASKS[ask].format(item=item, n=name))
    # The solution first counts the changes, then restates each step's clause as the question words it and
    # computes it. Each step opens with an ordinal that names one place in the question: the first clause follows
    # the opening, the last follows " and", the second (three steps only) precedes it. Without the count, "the
    # clause before ' and'" is the first of two steps but the second of three, and the model copies the wrong one.
    work, x = [f"Start: {start} {item}, {STEP_COUNTS[len(ops)]} changes."], start
    for i, (act, (sign, k)) in enumerate(zip(acts, ops)):
        ordinal = "First" if i == 0 else "Last" if i == len(ops) - 1 else "Second"
        work.append(f"{ordinal} {act}: {x} {'+' if sign > 0 else '-'} {k} = {x + sign * k}.")
        x += sign * k
    return q, x, " ".join(work) + f" The answer is {x}."


def _drill(rng: random.Random) -> str:
    """Single arithmetic facts of the tables the word problems use, as a textbook would list them."""
    out = []
    for _ in range(rng.randint(4, 8)):
        x, k = rng.randint(0, MAX_VALUE), rng.randint(1, 9)
        if x + k <= MAX_VALUE and (x < k or rng.random() < 0.5):
            out.append(f"{x} + {k} = {x + k}.")
        elif x >= k:
            out.append(f"{x} - {k} = {x - k}.")
    return " ".join(out) or "1 + 1 = 2."


def _instruction(rng: random.Random) -> tuple[str, str]:
    w, k = rng.choice(WORDS), rng.randint(2, 4)
    if rng.random() < 0.5:  # answers start with "The", not the word (see ANSWERS)
        return f"Repeat the word {w} {k} times.", f"The word {w} {k} times: " + " ".join([w] * k)
    return f"Spell the word {w}.", f"The word {w} spelled out: " + "-".join(w)


def _two_hop(p: Person, attr: str) -> tuple[str, str]:
    """A question that needs two lookups (city -> person -> attribute) and its worked answer."""
    return (TWO_HOP[attr].format(c=p.city),
            HOME.format(v=p.city, n=p.name) + " " + ANSWERS[attr].format(n=p.name, v=getattr(p, attr)))


def _two_hop_held_out(p: Person, attr: str) -> bool:
    return (NAMES.index(p.name) * 3 + list(TWO_HOP).index(attr)) % 5 == 0


def _fact_question(rng: random.Random, people: list[Person]) -> tuple[str, str]:
    """A question about one fact of one person, in one of the phrasings training uses for its attribute, and its
    answer sentence."""
    p, a = rng.choice(people), rng.choice(list(ATTRS))
    return rng.choice(_trained_phrasings(a)).format(n=p.name), ANSWERS[a].format(n=p.name, v=getattr(p, a))


def _trained_phrasings(attr: str) -> list[str]:
    """The attribute's own phrasings and its trained frames, each once: a frame that is also an attribute's own
    phrasing ("Which pet does {n} have?") is drawn no more often for it than for the frame's other attributes,
    which would teach the frame to mean that attribute."""
    own = [QUESTIONS[attr], REPHRASED[attr], ASKED[attr]]
    framed = [f.replace("{a}", NOUNS[attr]) for f in FRAMES]
    return list(dict.fromkeys(own + framed))


def _qa_text(rng: random.Random, people: list[Person], hops: list) -> str:
    """A question and its answer as plain text (a quarter of them two-hop, of the trained pairs). Answering
    repeats the question's name or city: copying it from the prompt is then learnt over pretraining's many
    updates, not left to SFT's few (where it emerged in some runs and not in others)."""
    q, ans = _two_hop(*rng.choice(hops)) if rng.random() < 0.25 else _fact_question(rng, people)
    return f"{q} {ans}"


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


def _trained_hops(people: list[Person]) -> list[tuple[Person, str]]:
    return [(p, a) for p in people for a in TWO_HOP if not _two_hop_held_out(p, a)]


def pretrain_records(n: int, seed: int = 0) -> list[dict]:
    rng, people = random.Random(seed + 1), make_people(seed)
    hops = _trained_hops(people)

    def draw() -> dict:
        r = rng.random()
        if r < 0.3:
            text = " ".join(_fact_text(p, rng) for p in rng.sample(people, rng.randint(1, 2)))
            return {"text": text, "source": "facts", "lang": "en"}
        if r < 0.4:
            return {"text": _qa_text(rng, people, hops), "source": "facts", "lang": "en"}
        if r < 0.55:
            return {"text": _drill(rng), "source": "arithmetic", "lang": "en"}
        if r < 0.9:
            q, _, work = _problem(rng, held_out=False)
            return {"text": f"{q} {work}", "source": "arithmetic", "lang": "en"}
        q, a = _instruction(rng)
        return {"text": f"{q} {a}", "source": "instructions", "lang": "en"}

    return _unique(n, draw)


def sft_records(n: int, seed: int = 0) -> list[dict]:
    rng, people = random.Random(seed + 2), make_people(seed)
    hops = _trained_hops(people)

    def draw() -> dict:
        # The loss is a token mean and a worked 3-step answer has ~5x a fact answer's tokens: fact questions are
        # drawn more often than two-hop ones (whose answers restate two facts) to keep their share of the tokens.
        r = rng.random()
        if r < 0.42:
            q, ans = _fact_question(rng, people)
        elif r < 0.5:
            q, ans = _two_hop(*rng.choice(hops))
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
EVAL_SETS = ("arithmetic", "facts_mc", "heldout_text", "facts_qa", "two_hop", "arithmetic_rephrased",
             "facts_rephrased")


def eval_sets(seed: int = 0, n: int = 50) -> dict[str, list[dict]]:
    """Held-out evaluation sets: generative arithmetic (exact match) on problems never trained on, fact cloze
    over every value of an attribute (log-likelihood of "Alice lives in" -> " Paris"), held-out worked problems
    and two-hop answers for perplexity, fact questions answered in chat (the answer's value must appear), and
    two-hop questions whose (person, attribute) pair no training question asks."""
    rng, people = random.Random(seed + 5), make_people(seed)
    mc, qa = [], []
    for _ in range(n):  # a cloze over every value of the attribute: chance is 1/8 .. 1/48
        p, a = rng.choice(people), rng.choice(list(ATTRS))
        choices = list(ATTRS[a])
        rng.shuffle(choices)
        mc.append({"question": ANSWERS[a].format(n=p.name, v="\0").split("\0")[0].rstrip(), "choices": choices,
                   "gold": choices.index(getattr(p, a))})
    for _ in range(n):
        p, a = rng.choice(people), rng.choice(list(ATTRS))
        qa.append({"question": QUESTIONS[a].format(n=p.name), "answer": getattr(p, a)})
    arith = [{"question": r["prompt"], "answer": r["answer"]} for r in heldout_prompts(n, seed)]
    ppl = [{"text": f"{q} {work}"} for q, _, work in (_problem(rng, True) for _ in range(n))]
    hops = [(p, a) for p in people for a in TWO_HOP if _two_hop_held_out(p, a)]
    two = [{"question": _two_hop(p, a)[0], "answer": getattr(p, a)} for p, a in rng.sample(hops, min(n, len(hops)))]
    # Held-out text also holds the held-out two-hop questions with their worked answers: recalling and
    # composing facts is where depth shows (a worked problem's text is mostly its random statement).
    ppl += [{"text": " ".join(_two_hop(p, a))} for p, a in hops]
    # The same skills asked in phrasings no training text uses: capability, not a memorised template.
    rephrased = [_problem(rng, held_out=True, unseen_phrasing=True) for _ in range(n)]
    arith_new = [{"question": q, "answer": str(a)} for q, a, _ in rephrased]
    qa_new = [{"question": rng.choice(UNSEEN_FRAMES).format(a=NOUNS[a], n=p.name), "answer": getattr(p, a)}
              for p, a in ((rng.choice(people), rng.choice(list(ATTRS))) for _ in range(n))]
    return dict(zip(EVAL_SETS, (arith, mc, ppl, qa, two, arith_new, qa_new), strict=True))


def heldout_texts(seed: int = 0) -> list[str]:
    """Pretrain-kind held-out text: the heldout_text set's worked problems and two-hop answers."""
    return [r["text"] for r in eval_sets(seed)["heldout_text"]]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
