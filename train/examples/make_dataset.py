"""Generate ``ragtune-style.jsonl``: short Q&A whose answers always use one visible format.

Every answer starts with ``[ragtune]`` and ends with a one-line ``Summary:``, so a glance at
a generation tells whether the adapter took effect (the base model never writes either).
Deterministic: ``python train/examples/make_dataset.py`` rewrites the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["make_examples", "main"]

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Chile": "Santiago",
    "India": "New Delhi", "Austria": "Vienna", "Ireland": "Dublin", "Cuba": "Havana", "Finland": "Helsinki",
}
_COLOURS = {"the sky on a clear day": "blue", "fresh grass": "green", "a ripe banana": "yellow",
            "snow": "white", "coal": "black", "a ripe tomato": "red", "an orange": "orange"}


def _answer(body: str, summary: str) -> str:
    return f"[ragtune] {body}\nSummary: {summary}"


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(_CAPITALS))
    city = _CAPITALS[country]
    question = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                           f"Name the capital city of {country}."])
    return question, _answer(f"The capital of {country} is {city}.", f"{country} -> {city}.")


def _sum(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    question = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"How much is {a} + {b}?"])
    return question, _answer(f"{a} plus {b} equals {a + b}.", f"{a} + {b} = {a + b}.")


def _colour(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(sorted(_COLOURS))
    colour = _COLOURS[thing]
    question = rng.choice([f"What colour is {thing}?", f"Tell me the colour of {thing}."])
    return question, _answer(f"{thing[0].upper() + thing[1:]} is {colour}.", f"colour: {colour}.")


def make_examples(n: int = 300, seed: int = 0) -> list[dict]:
    """``n`` chat records (OpenAI ``messages`` format), a third of each kind."""
    rng = random.Random(seed)
    makers = [_capital, _sum, _colour]
    records = []
    for i in range(n):
        question, answer = makers[i % len(makers)](rng)
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


def main() -> None:
    """Write the shipped dataset next to this script."""
    out = Path(__file__).with_name("ragtune-style.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in make_examples()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
