"""Word-problem templates of the math tutoring task (:mod:`itpo_batch.sim.envs.math`).

Each :class:`Problem` has 2–3 :class:`Quantity` slots and an exact integer answer (``solve``). A quantity
is stated in the opening by its ``known`` sentence (``{v}`` = the value) or, when it is missing, by its
``unknown`` sentence ("Anna buys some bags of apples."). ``ask`` is the scripted policy's question for it
and ``keywords`` are the phrases that make the parser treat a message as asking for it (fuzzy, see
``base.fuzzy_has``). Every ``ask`` parses to exactly its own quantity (checked in the tests).
``{name}`` is the student's character, drawn with the case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Values = dict[str, int]


@dataclass(frozen=True)
class Quantity:
    key: str
    known: str
    unknown: str
    ask: str
    keywords: tuple[str, ...]
    values: range = range(2, 10)
    "Values drawn uniformly when the problem has no ``sample`` function."


@dataclass(frozen=True)
class Problem:
    key: str
    quantities: tuple[Quantity, ...]
    question: str
    solve: Callable[[Values], int]
    sample: Callable[[np.random.Generator], Values] | None = field(default=None)
    "Draws consistent values when they are not independent (money left >= 0, exact division)."

    def draw(self, rng: np.random.Generator, cap: int | None = None) -> Values:
        """Values of one case; independent ones uniform over their range, capped at ``cap`` (a range that
        starts above it keeps its first value). Jointly drawn problems (``sample``) ignore ``cap``."""
        if self.sample is not None:
            return self.sample(rng)
        ranges = [
            q.values
            if cap is None
            else q.values[: max(1, len(range(q.values.start, cap + 1, q.values.step)))]
            for q in self.quantities
        ]
        return {
            q.key: int(r[int(rng.integers(len(r)))]) for q, r in zip(self.quantities, ranges, strict=True)
        }


def _pick(rng: np.random.Generator, r: range) -> int:
    return int(r[int(rng.integers(len(r)))])


def _pencils(rng: np.random.Generator) -> Values:
    count, price = _pick(rng, range(2, 8)), _pick(rng, range(2, 6))
    return {"money": count * price + _pick(rng, range(1, 25)), "count": count, "price": price}


def _marbles(rng: np.random.Generator) -> Values:
    friends, each = _pick(rng, range(2, 7)), _pick(rng, range(2, 10))
    return {"total": friends * each, "friends": friends}


def _pizza(rng: np.random.Generator) -> Values:
    pizzas, slices = _pick(rng, range(2, 6)), _pick(rng, range(4, 10, 2))
    return {"pizzas": pizzas, "slices": slices, "eaten": _pick(rng, range(1, pizzas * slices))}


Q = Quantity
PROBLEMS: tuple[Problem, ...] = (
    Problem(
        "apples",
        (
            Q("bags", "{name} buys {v} bags of apples.", "{name} buys some bags of apples.",
              "How many bags of apples did {name} buy?", ("many bags", "number of bags", "bags did", "bags does", "bags of apples")),
            Q("per_bag", "Each bag holds {v} apples.", "Each bag holds the same number of apples.",
              "How many apples are in each bag?", ("each bag", "per bag", "every bag", "one bag", "bag hold", "apples in")),
        ),
        "How many apples does {name} have?",
        lambda v: v["bags"] * v["per_bag"],
    ),
    Problem(
        "notebooks",
        (
            Q("count", "{name} buys {v} notebooks.", "{name} buys a few notebooks.",
              "How many notebooks did {name} buy?", ("many notebooks", "number of notebooks", "notebooks did", "notebooks does")),
            Q("price", "Each notebook costs {v} dollars.", "All the notebooks cost the same.",
              "How much does one notebook cost?", ("cost", "costs", "price", "each notebook", "one notebook", "per notebook")),
        ),
        "How many dollars does {name} spend?",
        lambda v: v["count"] * v["price"],
    ),
    Problem(
        "train",
        (
            Q("speed", "A train travels at {v} kilometers per hour.", "A train travels at a steady speed.",
              "How fast does the train go?", ("speed", "how fast", "fast", "per hour", "an hour", "kilometers per"),
              range(30, 100, 10)),
            Q("hours", "It travels for {v} hours.", "It travels for a few hours.",
              "For how many hours does it travel?", ("how long", "many hours", "number of hours", "hours does", "hours did", "time")),
        ),
        "How many kilometers does the train travel?",
        lambda v: v["speed"] * v["hours"],
    ),
    Problem(
        "garden",
        (
            Q("length", "A rectangular garden is {v} meters long.", "A rectangular garden is a few meters long.",
              "How long is the garden?", ("long", "length"), range(3, 16)),
            Q("width", "It is {v} meters wide.", "It is a few meters wide.",
              "How wide is the garden?", ("wide", "width"), range(2, 10)),
        ),
        "What is the area of the garden in square meters?",
        lambda v: v["length"] * v["width"],
    ),
    Problem(
        "savings",
        (
            Q("per_week", "{name} saves {v} dollars every week.", "{name} saves the same amount every week.",
              "How much does {name} save each week?", ("each week", "every week", "per week", "a week", "weekly", "how much"),
              range(3, 21)),
            Q("weeks", "{name} saves for {v} weeks.", "{name} saves for several weeks.",
              "For how many weeks does {name} save?", ("many weeks", "number of weeks", "how long", "weeks does", "weeks did")),
        ),
        "How many dollars does {name} save?",
        lambda v: v["per_week"] * v["weeks"],
    ),
    Problem(
        "cookies",
        (
            Q("rows", "A box has {v} rows of cookies.", "A box has a few rows of cookies.",
              "How many rows of cookies are in a box?", ("many rows", "number of rows", "rows of", "rows are", "rows in"),
              range(2, 6)),
            Q("per_row", "Each row has {v} cookies.", "Each row has the same number of cookies.",
              "How many cookies are in each row?", ("each row", "per row", "every row", "one row", "row has"), range(2, 7)),
            Q("boxes", "{name} buys {v} boxes.", "{name} buys some boxes.",
              "How many boxes did {name} buy?", ("many boxes", "number of boxes", "boxes did", "boxes does"), range(2, 5)),
        ),
        "How many cookies does {name} buy?",
        lambda v: v["rows"] * v["per_row"] * v["boxes"],
    ),
    Problem(
        "farm",
        (
            Q("cows", "A farmer has {v} cows.", "A farmer has some cows.",
              "How many cows does the farmer have?", ("cows", "cow", "many cows"), range(2, 13)),
            Q("hens", "The farmer also has {v} hens.", "The farmer also has some hens.",
              "How many hens does the farmer have?", ("hens", "hen", "chickens", "chicken"), range(2, 13)),
        ),
        "How many legs do the animals have?",
        lambda v: 4 * v["cows"] + 2 * v["hens"],
    ),
    Problem(
        "pencils",
        (
            Q("money", "{name} has {v} dollars.", "{name} has some money.",
              "How much money does {name} have?", ("money", "how much money", "wallet", "at first", "start with")),
            Q("count", "{name} buys {v} pencils.", "{name} buys some pencils.",
              "How many pencils did {name} buy?", ("many pencils", "number of pencils", "pencils did", "pencils does")),
            Q("price", "Each pencil costs {v} dollars.", "All the pencils cost the same.",
              "How much does one pencil cost?", ("cost", "costs", "price", "each pencil", "one pencil", "per pencil")),
        ),
        "How many dollars does {name} have left?",
        lambda v: v["money"] - v["count"] * v["price"],
        _pencils,
    ),
    Problem(
        "reading",
        (
            Q("per_day", "{name} reads {v} pages every day.", "{name} reads the same number of pages every day.",
              "How many pages does {name} read each day?", ("each day", "every day", "per day", "a day", "daily", "pages a", "pages each", "pages per"),
              range(5, 31, 5)),
            Q("days", "{name} reads for {v} days.", "{name} reads for a few days.",
              "For how many days does {name} read?", ("many days", "number of days", "how long", "days does", "days did")),
        ),
        "How many pages does {name} read?",
        lambda v: v["per_day"] * v["days"],
    ),
    Problem(
        "buses",
        (
            Q("buses", "A school rents {v} buses.", "A school rents some buses.",
              "How many buses does the school rent?", ("many buses", "number of buses", "buses does", "buses did")),
            Q("seats", "Each bus has {v} seats.", "Each bus has the same number of seats.",
              "How many seats does each bus have?", ("each bus", "per bus", "every bus", "one bus", "seats does", "seats in", "seats on"),
              range(20, 51, 5)),
        ),
        "How many seats are there?",
        lambda v: v["buses"] * v["seats"],
    ),
    Problem(
        "marbles",
        (
            Q("total", "{name} has {v} marbles.", "{name} has a bag of marbles.",
              "How many marbles does {name} have?", ("many marbles", "number of marbles", "marbles does", "marbles did", "bag of marbles")),
            Q("friends", "{name} shares them equally among {v} friends.", "{name} shares them equally among some friends.",
              "How many friends are there?", ("many friends", "number of friends", "friends are", "how many people", "how many kids", "how many children")),
        ),
        "How many marbles does each friend get?",
        lambda v: v["total"] // v["friends"],
        _marbles,
    ),
    Problem(
        "pizza",
        (
            Q("pizzas", "{name} orders {v} pizzas.", "{name} orders some pizzas.",
              "How many pizzas did {name} order?", ("many pizzas", "number of pizzas", "pizzas did", "pizzas does")),
            Q("slices", "Each pizza is cut into {v} slices.", "Each pizza is cut into equal slices.",
              "How many slices is each pizza cut into?", ("each pizza", "per pizza", "one pizza", "cut into", "slices in", "slices per", "slices is")),
            Q("eaten", "The family eats {v} slices.", "The family eats some of the slices.",
              "How many slices does the family eat?", ("eat", "eats", "ate", "eaten")),
        ),
        "How many slices are left?",
        lambda v: v["pizzas"] * v["slices"] - v["eaten"],
        _pizza,
    ),
    Problem(
        "wages",
        (
            Q("rate", "{name} earns {v} dollars per hour.", "{name} earns the same amount every hour.",
              "How much does {name} earn per hour?", ("per hour", "an hour", "each hour", "every hour", "hourly", "how much"),
              range(8, 21)),
            Q("hours", "{name} works for {v} hours.", "{name} works for a few hours.",
              "How many hours does {name} work?", ("many hours", "number of hours", "how long", "hours does", "hours did")),
        ),
        "How many dollars does {name} earn?",
        lambda v: v["rate"] * v["hours"],
    ),
)  # fmt: skip
