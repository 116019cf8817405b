"""The embedded default dataset: a small, seeded synthetic world of people and their facts.

Every slmctl stage must run with no network and no download, so this module invents its
data. A seed fixes a world (people with syllable-made names, ages, cities, jobs,
employers, favourite things and best friends) and the world yields

  - short fact paragraphs for language-model pretraining (`SyntheticWorld.texts`), and
  - SQuAD-style extractive question answering (`SyntheticWorld.qa`): a context of many
    shuffled facts about several people, a question about one of those facts, and a short
    answer that appears verbatim in the context. Long input, short output: the case
    where encoder-decoders win.
  - long extractive answers (`SyntheticWorld.about`): a context of paragraphs, one per person, a
    request for everything it says about one person, and that person's paragraph copied word for
    word (30-100 tokens): an output made of the input, where drafting from the prompt pays.

Splits are made from facts, not from examples: the world's (person, attribute) facts are
dealt 80/10/10 into train, validation and test. Every validation (test) example asks about,
or in a paragraph states, a validation (test) fact, and holds no fact of the other held-out
split; training data holds training facts only. So no example can appear in two splits,
every split is drawn without rejection (equally fast), and a model can only answer a
held-out question by reading the context: the fact was never in its training data.

Everything is a pure function of the seed and the arguments: all choices come from
`random.Random` instances seeded with strings (which `random` hashes with SHA-512, not
Python's salted `hash()`), so the same seed gives the same data on any platform.

    world = SyntheticWorld(seed=0, n_people=500)
    world.texts("train", n=1000)                             # list[str]
    world.qa("validation", n=200, min_facts=8, max_facts=24)  # list[dict]
    world.about("validation", n=200, min_facts=8, max_facts=24)  # list[dict], long answers
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

SQUAD_PROMPT = ("Answer the following question based only on the context.\n"
                "###Question\n{question}\n###Context\n{context}\n###Answer\n")

SPLITS = ("train", "validation", "test")
QUESTION_KINDS = ("fact", "about")  # `qa`: one fact, a short answer; `about`: everything about one person, a long one
ABOUT_QUESTIONS = ("What does the context say about {name}?", "Tell me everything the context says about {name}.",
                   "Repeat every sentence of the context about {name}.")
ABOUT_FACTS = (4, 8)  # sentences about the asked person in an `about` context: its answer's length
HELD_OUT_FRACTION = 0.1  # of the world's facts, for validation and for test each


def format_prompt(question: str, context: str) -> str:
    """The encoder's input for a question about a context (SQuAD style)."""
    return SQUAD_PROMPT.format(question=question, context=context)


# -- the world's vocabulary --------------------------------------------------------------

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kr", "st", "tr", "sh", "th")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("n", "l", "r", "s", "m", "th", "nd", "rk", "ll", "x")

JOBS = ("baker", "teacher", "nurse", "farmer", "painter", "carpenter", "doctor", "pilot", "tailor",
        "potter", "weaver", "cook", "driver", "engineer", "librarian", "gardener", "sailor",
        "builder", "dentist", "lawyer", "writer", "singer", "plumber", "mechanic", "chemist",
        "architect", "astronomer", "fisherman", "jeweller", "locksmith")
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "teal", "pink", "brown", "grey",
           "black", "white", "violet", "gold", "silver", "amber")
PETS = ("cat", "dog", "rabbit", "parrot", "hamster", "goldfish", "tortoise", "ferret", "lizard",
        "canary", "mouse", "snake", "owl", "frog", "pony")
FOODS = ("soup", "bread", "rice", "noodles", "cheese", "apples", "pears", "plums", "beans", "honey",
         "cake", "porridge", "dumplings", "carrots", "lentils", "pancakes")
INSTRUMENTS = ("piano", "violin", "cello", "flute", "guitar", "drum", "harp", "trumpet", "clarinet",
               "oboe", "banjo", "accordion")
COMPANY_KINDS = ("Foods", "Works", "Labs", "Motors", "Textiles", "Bank", "Shipping", "Press", "Farms", "Tools")
N_CITIES = 30
N_COMPANIES = 20
AGES = (18, 79)


@dataclass(frozen=True)
class Attribute:
    """One kind of fact about a person: how to state it and how to ask for it.

    A statement is (form, phrase): form "subject" puts the person before the phrase
    ("Mara Quell" + "lives in Tobrin"), form "owner" puts their possessive before it
    ("Mara Quell's" + "favourite colour is teal"). Every question can be answered from
    every statement of the same attribute.
    """

    name: str
    statements: tuple[tuple[str, str], ...]
    questions: tuple[str, ...]


ATTRIBUTES = (
    Attribute("age",
              (("subject", "is {value} years old"), ("subject", "is {value}"), ("owner", "age is {value}")),
              ("How old is {name}?", "What is {name}'s age?", "What age is {name}?")),
    Attribute("city",
              (("subject", "lives in {value}"), ("subject", "resides in {value}"), ("owner", "home is in {value}")),
              ("Where does {name} live?", "In which city does {name} live?", "What city does {name} live in?")),
    Attribute("birthplace",
              (("subject", "was born in {value}"), ("subject", "comes from {value}"), ("owner", "hometown is {value}")),
              ("Where was {name} born?", "In which city was {name} born?", "What is {name}'s hometown?")),
    Attribute("job",
              (("subject", "works as {a_value}"), ("subject", "is {a_value} by trade"),
               ("subject", "earns a living as {a_value}")),
              ("What does {name} do for a living?", "What is {name}'s job?", "What is {name}'s profession?")),
    Attribute("employer",
              (("subject", "works for {value}"), ("subject", "is employed by {value}"),
               ("owner", "employer is {value}")),
              ("Who does {name} work for?", "Which company employs {name}?", "Who is {name}'s employer?")),
    Attribute("colour",
              (("owner", "favourite colour is {value}"), ("subject", "likes the colour {value} best"),
               ("subject", "loves the colour {value} more than any other")),
              ("What is {name}'s favourite colour?", "Which colour does {name} like best?")),
    Attribute("pet",
              (("subject", "has a pet {value}"), ("subject", "keeps {a_value} as a pet"),
               ("owner", "pet is {a_value}")),
              ("What pet does {name} have?", "What kind of pet does {name} keep?",
               "What animal does {name} have as a pet?")),
    Attribute("food",
              (("owner", "favourite food is {value}"), ("subject", "loves to eat {value}"),
               ("subject", "likes {value} more than any other food")),
              ("What is {name}'s favourite food?", "What food does {name} like best?")),
    Attribute("instrument",
              (("subject", "plays the {value}"), ("subject", "practises the {value} every evening"),
               ("owner", "instrument is the {value}")),
              ("Which instrument does {name} play?", "What instrument does {name} play?")),
    Attribute("friend",
              (("owner", "best friend is {value}"), ("owner", "closest friend is {value}")),
              ("Who is {name}'s best friend?", "Who is {name}'s closest friend?")),
)


@dataclass(frozen=True)
class Person:
    """One inhabitant: `facts` maps each attribute name to its value, as it appears in text."""

    name: str        # "Mara Quell"
    first_name: str  # "Mara"
    pronoun: str     # "she" or "he"
    facts: dict[str, str]


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def fill(attribute: Attribute, phrase: str, person: Person) -> str:
    """A statement's phrase with the person's value in it: "lives in Tobrin"."""
    value = person.facts[attribute.name]
    return phrase.format(value=value, a_value=with_article(value))


def state(attribute: Attribute, statement: tuple[str, str], person: Person, subject: str) -> str:
    """One fact as a sentence without its full stop: "Mara Quell lives in Tobrin", "Her pet is a cat"."""
    form, phrase = statement
    return f"{subject if form == 'subject' else possessive(subject)} {fill(attribute, phrase, person)}"


def possessive(subject: str) -> str:
    return {"She": "Her", "He": "His"}.get(subject, subject + "'s")


class WordMaker:
    """Makes pronounceable capitalised words from syllables, none a prefix of another.

    Prefix-free words keep facts unambiguous to a reader that matches strings: with
    "Quell" and "Quellin" both surnames, "Mara Quell" would be found inside "Mara Quellin".
    """

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words: set[str] = set()
        self.prefixes: set[str] = set()  # every prefix of every word made so far, the words included

    def make(self, count: int, min_syllables: int, max_syllables: int, coda_probability: float) -> list[str]:
        made = []
        for _ in range(1000 * count + 1000):
            n_syllables = self.rng.randint(min_syllables, max_syllables)
            word = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(n_syllables))
            if self.rng.random() < coda_probability:
                word += self.rng.choice(CODAS)
            word = word.capitalize()
            if word in self.prefixes or any(word[:i] in self.words for i in range(1, len(word))):
                continue
            self.words.add(word)
            self.prefixes.update(word[:i] for i in range(1, len(word) + 1))
            made.append(word)
            if len(made) == count:
                return made
        raise ValueError(f"could not make {count} distinct words of {min_syllables}-{max_syllables} syllables")


# -- the world ----------------------------------------------------------------------------

class SyntheticWorld:
    """A seeded world of `n_people` people; `texts` and `qa` draw datasets from it.

    `people[i].facts` holds everyone's facts; `split_facts[split]` lists the
    (person index, attribute index) facts dealt to each split.
    """

    def __init__(self, seed: int = 0, n_people: int = 500):
        if not isinstance(n_people, int) or n_people < 2:
            raise ValueError(f"n_people must be an integer >= 2 (everyone needs a best friend), got {n_people!r}")
        self.seed, self.n_people = seed, n_people
        rng = random.Random(f"slmctl-synthetic:{seed}:world")
        words = WordMaker(rng)
        names_per_pool = int((2 * n_people) ** 0.5) + 2  # first x last names >= 2 * n_people
        self.first_names = words.make(names_per_pool, 2, 2, coda_probability=0.3)
        self.surnames = words.make(names_per_pool, 2, 3, coda_probability=1.0)
        self.cities = words.make(N_CITIES, 2, 2, coda_probability=1.0)
        self.companies = [f"{word} {rng.choice(COMPANY_KINDS)}" for word in words.make(N_COMPANIES, 2, 2, 0.5)]

        name_pairs = rng.sample(range(names_per_pool ** 2), n_people)
        first_and_last = [(self.first_names[pair // names_per_pool], self.surnames[pair % names_per_pool])
                          for pair in name_pairs]
        self.people: list[Person] = []
        for i, (first, last) in enumerate(first_and_last):
            friend = rng.randrange(n_people - 1)
            friend += friend >= i  # anyone but themselves
            facts = {
                "age": str(rng.randint(*AGES)),
                "city": rng.choice(self.cities),
                "birthplace": rng.choice(self.cities),
                "job": rng.choice(JOBS),
                "employer": rng.choice(self.companies),
                "colour": rng.choice(COLOURS),
                "pet": rng.choice(PETS),
                "food": rng.choice(FOODS),
                "instrument": rng.choice(INSTRUMENTS),
                "friend": " ".join(first_and_last[friend]),
            }
            self.people.append(Person(f"{first} {last}", first, rng.choice(("she", "he")), facts))

        all_facts = [(p, a) for p in range(n_people) for a in range(len(ATTRIBUTES))]
        rng.shuffle(all_facts)
        n_held_out = max(1, round(HELD_OUT_FRACTION * len(all_facts)))
        self.split_facts = {"validation": all_facts[:n_held_out],
                            "test": all_facts[n_held_out:2 * n_held_out],
                            "train": all_facts[2 * n_held_out:]}
        split_of_fact = {fact: split for split, facts in self.split_facts.items() for fact in facts}
        # usable[split][p]: the attributes of person p that data of `split` may state
        self.usable = {split: [[a for a in range(len(ATTRIBUTES)) if split_of_fact[p, a] in ("train", split)]
                               for p in range(n_people)]
                       for split in SPLITS}

    # -- pretraining text -----------------------------------------------------------------

    def texts(self, split: str = "train", n: int = 1000) -> list[str]:
        """`n` distinct fact paragraphs of `split`, each about one person."""
        check_split_and_n(split, n)
        rng = random.Random(f"slmctl-synthetic:{self.seed}:texts:{split}")

        def candidate():
            paragraph = self._paragraph(rng, split)
            return paragraph, paragraph

        return [paragraph for paragraph, _ in self._take(split, n, candidate)]

    def _paragraph(self, rng: random.Random, split: str) -> str:
        """3 or more facts about one person, one of them a fact of `split`, in random order:
        "Mara Quell is 34 years old. She lives in Tobrin and works as a baker. ..." """
        p, anchor = rng.choice(self.split_facts[split])
        others = [a for a in self.usable[split][p] if a != anchor]
        attributes = [anchor] + rng.sample(others, rng.randint(min(2, len(others)), len(others)))
        rng.shuffle(attributes)
        person = self.people[p]
        statements = [(ATTRIBUTES[a], rng.choice(ATTRIBUTES[a].statements)) for a in attributes]
        pronoun = person.pronoun.capitalize()
        sentences = []
        i = 0
        while i < len(statements):
            if not sentences:
                subject = person.name
            else:
                subject = rng.choices((pronoun, person.first_name, person.name), weights=(6, 2, 2))[0]
            attribute, statement = statements[i]
            sentence = state(attribute, statement, person, subject)
            if i + 1 < len(statements) and statement[0] == "subject" and rng.random() < 0.5:
                next_attribute, (next_form, next_phrase) = statements[i + 1]
                if next_form == "subject":  # "She lives in Tobrin and works as a baker."
                    sentence += " and " + fill(next_attribute, next_phrase, person)
                    i += 1
            sentences.append(sentence + ".")
            i += 1
        return " ".join(sentences)

    # -- question answering ---------------------------------------------------------------

    def qa(self, split: str = "train", n: int = 1000, min_facts: int = 8, max_facts: int = 24) -> list[dict]:
        """`n` distinct SQuAD-style examples of `split`, each with `min_facts`..`max_facts` facts.

        Each dict holds id, source (the prompt), target (the answer), context, question and
        answer. The context is one line of full-name fact sentences about several people in
        random order; no person appears twice for the same attribute, so the answer is
        determined by the context.
        """
        check_split_and_n(split, n)
        most_facts = sum(len(attributes) for attributes in self.usable[split])
        integers = isinstance(min_facts, int) and isinstance(max_facts, int)
        if not (integers and 1 <= min_facts <= max_facts <= most_facts):
            raise ValueError(f"need 1 <= min_facts <= max_facts <= {most_facts} (the facts a {split} example may state), "
                             f"got min_facts={min_facts!r}, max_facts={max_facts!r}")
        return self._questions("qa", split, n, min_facts, max_facts, self._qa_candidate)

    def _qa_candidate(self, rng: random.Random, split: str, min_facts: int, max_facts: int) -> tuple[str, str, str]:
        asked = rng.choice(self.split_facts[split])
        n_facts = rng.randint(min_facts, max_facts)
        n_attributes = len(ATTRIBUTES)
        fewest_people = -(-n_facts // n_attributes)
        most_people = min(self.n_people, max(fewest_people, -(-n_facts // 2)))  # from all facts about a few to ~2 each
        n_people = rng.randint(fewest_people, most_people)
        # Gather people (the asked one first) until there are enough people and enough facts to state.
        people = {asked[0]}
        others = [(asked[0], a) for a in self.usable[split][asked[0]] if a != asked[1]]
        while len(people) < n_people or len(others) < n_facts - 1:
            p = rng.randrange(self.n_people)
            if p not in people:
                people.add(p)
                others.extend((p, a) for a in self.usable[split][p])
        facts = [asked] + rng.sample(others, n_facts - 1)  # distinct (person, attribute) facts
        rng.shuffle(facts)
        sentences = []
        for p, a in facts:
            attribute, person = ATTRIBUTES[a], self.people[p]
            sentences.append(state(attribute, rng.choice(attribute.statements), person, person.name) + ".")
        context = " ".join(sentences)
        person, attribute = self.people[asked[0]], ATTRIBUTES[asked[1]]
        question = rng.choice(attribute.questions).format(name=person.name)
        return question, context, person.facts[attribute.name]

    def about(self, split: str = "train", n: int = 1000, min_facts: int = 8, max_facts: int = 24) -> list[dict]:
        """`n` distinct long-answer examples of `split`, with the same keys as `qa`'s: a context of
        `min_facts`..`max_facts` full-name fact sentences in paragraphs, one per person (4 to 8 of them, and
        at most max_facts - 1, about the asked person), a request for everything it says about that person,
        and as the answer that person's paragraph, copied word for word."""
        check_split_and_n(split, n)
        if not (isinstance(min_facts, int) and isinstance(max_facts, int) and ABOUT_FACTS[0] + 1 <= max_facts
                and 1 <= min_facts <= max_facts):
            raise ValueError(f"need 1 <= min_facts <= max_facts and max_facts >= {ABOUT_FACTS[0] + 1} (the asked person's "
                             f"sentences and someone else's), got min_facts={min_facts!r}, max_facts={max_facts!r}")
        return self._questions("about", split, n, min_facts, max_facts, self._about_candidate)

    def _questions(self, kind: str, split: str, n: int, min_facts: int, max_facts: int, make) -> list[dict]:
        """The first `n` distinct examples `make(rng, split, min_facts, max_facts)` -> (question, context, answer)
        gives, from a generator seeded by the world, `kind` and the arguments."""
        rng = random.Random(f"slmctl-synthetic:{self.seed}:{kind}:{split}:{min_facts}:{max_facts}")

        def candidate():
            question, context, answer = make(rng, split, min_facts, max_facts)
            return question + "\n" + context, (question, context, answer)

        prefix = split if kind == "qa" else f"{split}-{kind}"
        return [{"id": f"{prefix}-{digest.hex()[:16]}", "source": format_prompt(question, context), "target": answer,
                 "context": context, "question": question, "answer": answer}
                for (question, context, answer), digest in self._take(split, n, candidate)]

    def _about_candidate(self, rng: random.Random, split: str, min_facts: int, max_facts: int) -> tuple[str, str, str]:
        """A context of paragraphs, one per person (as a document groups what it says by subject), each of
        4 to 8 sentences in random order, the paragraphs in random order and the last one cut to fit
        `n_facts`; the asked person's paragraph is whole and drawn as long as the others are, so the
        answer is found by the name, not by the length. The answer is that paragraph, word for word:
        a contiguous passage of the context, as an extractive answer, a quote or an edited section is."""
        p, anchor = rng.choice(self.split_facts[split])
        mine = [a for a in self.usable[split][p] if a != anchor]
        told = [anchor] + rng.sample(mine, min(len(mine), rng.randint(*ABOUT_FACTS) - 1, max_facts - 2))
        rng.shuffle(told)
        n_facts = rng.randint(max(min_facts, len(told) + 1), max_facts)
        paragraphs, people, room = [[(p, a) for a in told]], {p}, n_facts - len(told)
        while room > 0:  # everyone else's paragraphs, as long as the asked person's may be
            q = rng.randrange(self.n_people)
            if q not in people:
                people.add(q)
                theirs = rng.sample(self.usable[split][q], min(len(self.usable[split][q]), rng.randint(*ABOUT_FACTS), room))
                paragraphs += [[(q, a) for a in theirs]] if theirs else []
                room -= len(theirs)
        rng.shuffle(paragraphs)
        texts = [" ".join(state(ATTRIBUTES[a], rng.choice(ATTRIBUTES[a].statements), self.people[q], self.people[q].name) + "."
                          for q, a in paragraph) for paragraph in paragraphs]
        answer = texts[next(i for i, paragraph in enumerate(paragraphs) if paragraph[0][0] == p)]
        return rng.choice(ABOUT_QUESTIONS).format(name=self.people[p].name), "\n".join(texts), answer

    def examples(self, questions: str, split: str, n: int, min_facts: int, max_facts: int) -> list[dict]:
        """`qa` (questions="fact") or `about` (questions="about")."""
        if questions not in QUESTION_KINDS:
            raise ValueError(f"unknown questions {questions!r}; choose from: {', '.join(QUESTION_KINDS)}")
        return (self.qa if questions == "fact" else self.about)(split, n, min_facts, max_facts)

    def qa_dataset(self, split: str = "train", n: int = 1000, min_facts: int = 8, max_facts: int = 24):
        """`qa(...)` as a Hugging Face `datasets.Dataset` (same columns)."""
        import datasets  # imported here: it takes about a second, and most callers want plain lists

        return datasets.Dataset.from_list(self.qa(split, n, min_facts, max_facts))

    def _take(self, split: str, n: int, make_candidate) -> list[tuple]:
        """The first `n` distinct candidates, with the BLAKE2 digests of their content.

        `make_candidate()` returns (content, item). Duplicates only occur in tiny worlds or
        contexts; when too many candidates repeat, the world cannot supply `n`.
        """
        taken, seen = [], set()
        for _ in range(20 * n + 1000):
            content, item = make_candidate()
            digest = hashlib.blake2b(content.encode(), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            taken.append((item, digest))
            if len(taken) == n:
                return taken
        raise ValueError(f"this world (seed={self.seed}, n_people={self.n_people}) gave only {len(taken)} distinct "
                         f"{split} examples of n={n}; ask for fewer, or use more people or facts")


def check_split_and_n(split: str, n: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
