"""The demo world is deterministic and its held-out problems and two-hop questions never leak into training."""
from ruyi_core.demo import world


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
    for r in sets["facts_qa"] + sets["two_hop"]:  # every answer is a value the pretraining text states
        assert f" {r['answer']}." in train_text
