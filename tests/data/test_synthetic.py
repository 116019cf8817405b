"""The embedded synthetic world: deterministic, split-disjoint, answerable, fast."""

import hashlib
import json
import time

import pytest

from slmctl.data.synthetic import ATTRIBUTES, SPLITS, SQUAD_PROMPT, SyntheticWorld, format_prompt, state


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(seed=0, n_people=200)


def test_same_seed_same_data_different_seed_different_data():
    a, b = SyntheticWorld(seed=3, n_people=100), SyntheticWorld(seed=3, n_people=100)
    c = SyntheticWorld(seed=4, n_people=100)
    assert a.qa("test", 50) == b.qa("test", 50)
    assert a.texts("train", 50) == b.texts("train", 50)
    assert a.qa("test", 50) != c.qa("test", 50)
    assert a.texts("train", 50) != c.texts("train", 50)
    assert a.qa("train", 20) == a.qa("train", 40)[:20]  # asking for more extends, never reshuffles


PINNED_DIGEST = "8a6d4e75a1600e5eb5f6579729140781edbc585e1e9a94007471fe38f5429ddc"


def test_output_is_pinned():
    # Changing the generator changes every dataset and checkpoint made from it: do it deliberately
    # and update this digest. It also catches platform differences (the data must not have any).
    world = SyntheticWorld(seed=0, n_people=50)
    data = {"qa": world.qa("validation", 5, min_facts=4, max_facts=8), "texts": world.texts("test", 5)}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert digest == PINNED_DIGEST


def test_splits_share_no_example_text_or_id(world):
    qa = {split: world.qa(split, 300, min_facts=2, max_facts=6) for split in SPLITS}
    texts = {split: world.texts(split, 300) for split in SPLITS}
    pairs = {split: {(e["source"], e["target"]) for e in qa[split]} for split in SPLITS}
    for split in SPLITS:
        assert len(pairs[split]) == 300  # no repeats within a split
        assert len({e["id"] for e in qa[split]}) == 300
        assert len(set(texts[split])) == 300
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            assert not pairs[first] & pairs[second]
            assert not {e["question"] for e in qa[first]} & {e["question"] for e in qa[second]}
            assert not {e["id"] for e in qa[first]} & {e["id"] for e in qa[second]}
            assert not set(texts[first]) & set(texts[second])


def test_splits_stay_disjoint_in_a_tiny_world():
    world = SyntheticWorld(seed=1, n_people=2)  # so few facts that examples repeat
    pairs = {split: {(e["question"], e["context"]) for e in world.qa(split, 8, min_facts=1, max_facts=2)}
             for split in SPLITS}
    assert all(len(p) == 8 for p in pairs.values())
    assert not pairs["train"] & pairs["validation"] and not pairs["train"] & pairs["test"]
    assert not pairs["validation"] & pairs["test"]
    with pytest.raises(ValueError, match="distinct test examples"):
        world.qa("test", 1000, min_facts=1, max_facts=1)


def test_held_out_facts_never_appear_in_training_data(world):
    train = " ".join(world.texts("train", 500) + [e["context"] for e in world.qa("train", 500)])
    for p, a in world.split_facts["test"] + world.split_facts["validation"]:
        person, attribute = world.people[p], ATTRIBUTES[a]
        for statement in attribute.statements:
            sentence = state(attribute, statement, person, person.name)
            assert sentence + "." not in train and sentence + " and" not in train


def test_answer_is_verbatim_in_context_and_true_of_the_subject(world):
    names = [person.name for person in world.people]
    for example in world.qa("validation", 300, min_facts=4, max_facts=30):
        assert example["answer"] == example["target"] and example["answer"] in example["context"]
        subjects = [person for person in world.people if person.name in example["question"]]
        assert len(subjects) == 1  # names never hide inside other names
        subject = subjects[0]
        assert subject.name in example["context"]
        assert example["answer"] in subject.facts.values()
        sentences = example["context"][:-1].split(". ")
        assert len(set(sentences)) == len(sentences)
        assert all(any(sentence.startswith(name) for name in names) for sentence in sentences)


def test_context_length_follows_the_number_of_facts(world):
    def mean_words(lo, hi):
        examples = world.qa("train", 50, min_facts=lo, max_facts=hi)
        for e in examples:  # every fact is one sentence
            assert lo <= e["context"].count(".") <= hi
        return sum(len(e["source"].split()) for e in examples) / len(examples)

    short, medium, long = mean_words(2, 4), mean_words(16, 24), mean_words(300, 400)
    assert 20 < short < 60 < medium < 250 < 1500 < long


def test_long_contexts_hide_the_answer_among_other_peoples_facts_of_the_same_kind(world):
    """The long-context task (12-20 facts, recipes/long-context.yaml): several people per context,
    and in most examples another person's fact of the asked attribute (the distractor a reader must
    not copy), so the answer cannot be found by the kind of fact alone."""
    people = {person.name: person for person in world.people}
    with_distractor = 0
    examples = world.qa("validation", 200, min_facts=12, max_facts=20)
    for example in examples:
        subject = next(person for name, person in people.items() if name in example["question"])
        stated = []  # (person, attribute) of every sentence
        for sentence in example["context"][:-1].split(". "):
            person = next(p for name, p in people.items() if sentence.startswith(name))
            stated += [(person.name, a.name) for a in ATTRIBUTES if person.facts[a.name] in sentence]
        asked = {a for name, a in stated if name == subject.name and subject.facts[a] == example["answer"]}
        assert asked and len({name for name, _ in stated}) >= 2
        with_distractor += any(name != subject.name and a in asked for name, a in stated)
    assert with_distractor / len(examples) > 0.7


def test_paragraphs_are_about_one_named_person(world):
    for text in world.texts("validation", 100):
        assert text.endswith(".") and text.count(".") >= 2
        people = [person for person in world.people if text.startswith((person.name + " ", person.name + "'s "))]
        assert len(people) == 1
        assert sum(value in text for value in people[0].facts.values()) >= 3


def test_prompt_format_is_exact(world):
    instruction = "Answer the following question based only on the context.\n"
    assert SQUAD_PROMPT == instruction + "###Question\n{question}\n###Context\n{context}\n###Answer\n"
    assert format_prompt("Q?", "C.") == instruction + "###Question\nQ?\n###Context\nC.\n###Answer\n"
    example = world.qa("test", 1)[0]
    assert set(example) == {"id", "source", "target", "context", "question", "answer"}
    assert example["source"] == format_prompt(example["question"], example["context"])


@pytest.mark.parametrize("call, message", [
    (lambda w: w.qa("dev", 10), "unknown split 'dev'; valid splits: train, validation, test"),
    (lambda w: w.texts("valid", 10), "valid splits: train, validation, test"),
    (lambda w: w.qa("train", 0), "n must be a positive integer, got 0"),
    (lambda w: w.texts("train", -5), "n must be a positive integer"),
    (lambda w: w.qa("train", 10, min_facts=9, max_facts=8), "min_facts <= max_facts"),
    (lambda w: w.qa("train", 10, min_facts=0, max_facts=8), "1 <= min_facts"),
])
def test_bad_arguments_fail_with_one_line(world, call, message):
    with pytest.raises(ValueError, match=message) as error:
        call(world)
    assert "\n" not in str(error.value)


def test_generation_is_fast():
    """10,000 long-context questions in CPU seconds, not minutes (CPU time: a busy neighbour on the
    cores does not count against it; about 1 s on a 2-core AMD EPYC)."""
    world = SyntheticWorld(seed=0, n_people=500)
    start = time.process_time()
    examples = world.qa("validation", 10_000, min_facts=16, max_facts=24)
    assert len(examples) == 10_000
    assert time.process_time() - start < 4.0


def test_about_answers_are_the_persons_paragraph_copied_and_not_found_by_its_length(world):
    """The long-output task: the context is one paragraph per person; the answer is the asked person's
    paragraph word for word, every sentence about them and nobody else's; 4 to 8 of them (30-100 tokens),
    within the context's min..max facts. Another person's paragraph is often as long, so the length
    does not give the answer away."""
    names = [person.name for person in world.people]
    examples = world.about("validation", 200, min_facts=10, max_facts=16)
    assert len({e["id"] for e in examples}) == 200 and examples == world.about("validation", 200, 10, 16)
    longest = 0
    for e in examples:
        (person,) = [name for name in names if name in e["question"]]
        paragraphs = e["context"].split("\n")
        sentences = [s + "." for paragraph in paragraphs for s in paragraph[:-1].split(". ")]
        assert 10 <= len(sentences) <= 16 and len(set(sentences)) == len(sentences)
        mine = [s for s in sentences if s.startswith(person + " ") or s.startswith(person + "'s ")]
        assert 4 <= len(mine) <= 8 and e["answer"] == e["target"] == " ".join(mine) and e["answer"] in paragraphs
        assert all(len({s.split()[0] for s in paragraph.split(". ")}) == 1 for paragraph in paragraphs)  # one subject each
        assert e["source"] == format_prompt(e["question"], e["context"])
        longest += max(len(paragraph) for paragraph in paragraphs if paragraph != e["answer"]) >= len(e["answer"])
    assert longest > 0.3 * len(examples)
    words = [len(e["answer"].split()) for e in examples]
    assert 18 <= min(words) and max(words) <= 70
    train = " ".join(e["context"] for e in world.about("train", 300, 10, 16))
    for p, a in world.split_facts["test"] + world.split_facts["validation"]:  # held-out facts stay held out
        person, attribute = world.people[p], ATTRIBUTES[a]
        assert not any(state(attribute, st, person, person.name) + "." in train for st in attribute.statements)
    short = world.about("train", 50, min_facts=5, max_facts=6)  # a curriculum's first, shorter contexts
    assert all(5 <= e["context"].count(".") <= 6 and 1 <= e["context"].count(".") - e["answer"].count(".") for e in short)
    with pytest.raises(ValueError, match="max_facts >= 5"):
        world.about("train", 5, min_facts=2, max_facts=4)
