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


def instruction(rng: random.Random) -> dict[str, str]:
    """An alpaca-style row: a question about a short story or review, answered from it."""
    name, pet, adj = rng.choice(NAMES), rng.choice(PETS), rng.choice(ADJS)
    place, verb = rng.choice(PLACES), rng.choice(VERBS)
    text = f"{name} had a {adj} {pet}. Every day they {verb} together in the {place}."
    kind = rng.randrange(4)
    if kind == 0:
        return {"instruction": "Which pet is in the story?", "input": text, "output": f"A {adj} {pet}."}
    if kind == 1:
        return {"instruction": "Where did they play?", "input": text, "output": f"In the {place}."}
    if kind == 2:
        return {"instruction": f"Write one sentence about {name} and a {pet}.", "input": "", "output": text}
    positive = rng.random() < 0.5
    return {
        "instruction": "Is this review positive or negative?",
        "input": review(rng, positive),
        "output": "Positive." if positive else "Negative.",
    }


def preference_pairs(rows: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    """Preference pairs (explicit format) from instruction rows: the right answer chosen, the answer to another
    question of the same kind rejected."""
    pairs = []
    for row in rows[:200]:
        others = [o for o in rows if o["instruction"] == row["instruction"] and o["output"] != row["output"]]
        wrong = rng.choice(others or [o for o in rows if o["output"] != row["output"]])
        prompt = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
        pairs.append({"prompt": prompt, "chosen": row["output"], "rejected": wrong["output"]})
    return pairs


def main() -> None:
    rng = random.Random(0)
    stories = [story(rng) for _ in range(400)]
    (HERE / "sample_stories.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    reviews = []
    for _ in range(300):
        positive = rng.random() < 0.5
        reviews.append({"text": review(rng, positive), "label": "positive" if positive else "negative"})
    (HERE / "sample_reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    rows = [instruction(rng) for _ in range(300)]
    (HERE / "sample_instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = preference_pairs(rows, random.Random(1))
    (HERE / "sample_preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


if __name__ == "__main__":
    main()
