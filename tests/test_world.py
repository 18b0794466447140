"""The demo's data is deterministic, and its held-out problems, phrasings, two-hop questions and plays never leak
into training."""
import random
import re

from ruyi_core.demo import literature, world, write_source


def test_deterministic_and_held_out():
    assert world.pretrain_records(200, seed=3) == world.pretrain_records(200, seed=3)
    assert world.pretrain_records(50, seed=3) != world.pretrain_records(50, seed=4)
    train_text = " ".join(r["text"] for r in world.pretrain_records(3000))
    train_text += " ".join(m["content"] for r in world.sft_records(1500) for m in r["messages"])
    sets = world.eval_sets()
    assert len(sets["arithmetic"]) == 50 and all(r["question"] not in train_text for r in sets["arithmetic"])
    assert sets["two_hop"] and all(r["question"] not in train_text for r in sets["two_hop"])
    # held-out text: worked problems and two-hop answers no training text holds
    assert len(sets["heldout_text"]) == 50 + len(sets["two_hop"])
    assert all(r["text"] not in train_text for r in sets["heldout_text"])
    people = {p.name: p for p in world.make_people()}
    assert len({p.city for p in people.values()}) == len(people)  # "the person who lives in X" is one person
    for r in sets["facts_mc"]:  # the gold choice is the fact the pretraining text states
        name = next(n for n in people if f" {n} " in f" {r['question']} ")
        assert r["choices"][r["gold"]] in {people[name].city, people[name].color, people[name].pet, people[name].job}
    for r in sets["facts_qa"] + sets["two_hop"] + sets["facts_rephrased"]:  # values the pretraining text states
        assert f" {r['answer']}." in train_text
    # unseen phrasings: no training sentence asks as these do (names, numbers, items and step verbs blanked)
    steps = "|".join(p.format(k=r"\d+") for p in world.GAINS + world.LOSSES)

    def shape(q):
        q = re.sub(steps, "STEP", q)
        return re.sub(r"\d+", "#", re.sub(r"\b(" + "|".join(world.NAMES + world.ITEMS) + r")\b", "_", q)).strip()

    problems = {shape(q) for q in re.findall(r"[^.?]*\d[^.?]*\. How many [^?]*\?", train_text)}
    assert len({shape(r["question"]) for r in sets["arithmetic"]} & problems) >= 5  # the trained phrasings
    assert sets["arithmetic_rephrased"] and not {shape(r["question"]) for r in sets["arithmetic_rephrased"]} & problems
    asked = {shape(q) for q in re.findall(r"[^.?]*[.?]", train_text)}
    assert sets["facts_rephrased"] and not {shape(r["question"]) for r in sets["facts_rephrased"]} & asked
    # ... while every trained frame asks every attribute: no frame tells which attribute is asked
    assert all(shape(f.format(a=noun, n="_")) in asked for f in world.FRAMES for noun in world.NOUNS.values())


def test_literature_holds_out_whole_plays(tmp_path):
    train, held = literature.passages(held_out=False), literature.passages(held_out=True)
    assert len(train) > 8000 and len(held) > 400 and not set(train) & set(held)
    assert any("Denmark" in p for p in held) and not any("Elsinore" in p for p in train)
    records = [r for r in map(eval_json, write_source("demo", "pretrain", tmp_path, 0, {"pretrain": 100})
                              .read_text().splitlines())]
    assert sum(r["source"] == "literature" for r in records) == 25 and len(records) == 125
    bench = write_source("demo:literature", "benchmark", tmp_path, 0, {}).read_text().splitlines()
    assert len(bench) == 60 and all(eval_json(line)["text"] in held for line in bench)


def eval_json(line):
    import json

    return json.loads(line)


def test_a_changed_world_is_a_new_demo_source(tmp_path, monkeypatch):
    """A `demo` shard carries the demo code's version: after an upgrade that changes the world, a rerun curates
    and trains again instead of stopping at the data gate (or taking KFP's cached tasks)."""
    import shutil
    from pathlib import Path

    import ruyi_core.demo as demo
    from ruyi_core.data.sources import source_version

    before = source_version("demo")
    copy = tmp_path / "demo"
    shutil.copytree(Path(demo.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(demo, "__file__", str(copy / "__init__.py"))
    assert source_version("demo") == before
    (copy / "world.py").write_text((copy / "world.py").read_text() + "\n# another world\n")
    assert source_version("demo") != before


def test_a_worked_solution_counts_the_steps_and_names_each_by_its_place():
    """Each verb appears once in a problem, so the clause a step restates names its number; the ordinals say which
    clause of the question each step copies."""
    rng = random.Random(0)
    for _ in range(200):
        q, answer, work = world._problem(rng, held_out=False)
        clauses = q.split(". ")[0].split(", ", 1)[1].replace(" and ", ", ").split(", ")
        verbs = [re.sub(r" \d+", "", c) for c in clauses]
        assert len(set(verbs)) == len(verbs), q
        ordinals = ["First", *["Second"] * (len(clauses) - 2), "Last"]
        steps = re.findall(r"(First|Second|Last) ([^:]+): (\d+) ([+-]) (\d+) = (\d+)\.", work)
        assert [s[0] for s in steps] == ordinals and [s[1] for s in steps] == clauses, (q, work)
        assert f"{world.STEP_COUNTS[len(clauses)]} changes" in work and work.endswith(f"The answer is {answer}.")
