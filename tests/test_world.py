"""The demo world is deterministic and its held-out problems never leak into training data."""
from ruyi_core.data import world


def test_deterministic_and_held_out():
    assert world.pretrain_records(200, seed=3) == world.pretrain_records(200, seed=3)
    assert world.pretrain_records(50, seed=3) != world.pretrain_records(50, seed=4)
    train_text = " ".join(r["text"] for r in world.pretrain_records(3000))
    train_text += " ".join(m["content"] for r in world.sft_records(1500) for m in r["messages"])
    held = world.eval_sets()["arithmetic"]
    assert len(held) == 50 and all(r["question"] not in train_text for r in held)
    mc = world.eval_sets()["facts_mc"]
    people = {p.name: p for p in world.make_people()}
    for r in mc:  # the gold choice is the fact the pretraining text states
        name = next(n for n in people if n in r["question"])
        assert r["choices"][r["gold"]] in {people[name].city, people[name].color, people[name].pet, people[name].job}
