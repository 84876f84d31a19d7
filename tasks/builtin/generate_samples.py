"""Writes the sample data shipped with adaptflow (templated, original text; run to regenerate).

python -m tasks.builtin.generate_samples
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Ava", "Noah"]
PETS = ["cat", "dog", "bird", "fish", "rabbit", "turtle", "puppy", "kitten"]
ADJS = ["little", "happy", "small", "big", "red", "soft", "brave", "funny", "shy", "kind"]
PLACES = ["park", "garden", "house", "forest", "school", "river", "yard", "kitchen"]
VERBS = ["played", "ran", "danced", "sang", "read", "walked", "jumped", "laughed"]
FEELINGS = ["happy", "glad", "proud", "sleepy", "excited", "calm"]
GOOD = ["great", "wonderful", "lovely", "excellent", "delightful", "fantastic", "charming", "superb"]
BAD = ["awful", "terrible", "boring", "dreadful", "disappointing", "poor", "dull", "bad"]
THINGS = ["movie", "book", "meal", "song", "show", "game", "trip", "story"]


def story(rng: random.Random) -> str:
    name, pet, adj = rng.choice(NAMES), rng.choice(PETS), rng.choice(ADJS)
    place, verb, feeling = rng.choice(PLACES), rng.choice(VERBS), rng.choice(FEELINGS)
    return (
        f"Once upon a time, {name} had a {adj} {pet}. "
        f"Every day they {verb} together in the {place}. "
        f"At night the {pet} was {feeling} and went to sleep."
    )


def review(rng: random.Random, positive: bool) -> str:
    word = rng.choice(GOOD if positive else BAD)
    thing = rng.choice(THINGS)
    tail = rng.choice(["I would do it again.", "Everyone smiled."] if positive else ["Never again.", "What a waste."])
    return f"The {thing} was {word}. {tail}"


def main() -> None:
    rng = random.Random(0)
    stories = [story(rng) for _ in range(400)]
    (HERE / "sample_stories.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    reviews = []
    for _ in range(300):
        positive = rng.random() < 0.5
        reviews.append({"text": review(rng, positive), "label": "positive" if positive else "negative"})
    (HERE / "sample_reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))


if __name__ == "__main__":
    main()
