"""The simulated math tutoring task: parser, student, outcome, oracle utility and scripted policy."""

from __future__ import annotations

import numpy as np
import pytest

from itpo_batch.core.errors import ItpoError
from itpo_batch.sim.envs import textparse as tp
from itpo_batch.sim.envs.base import TaskConfig, episode_rng, load_task, play_scripted
from itpo_batch.sim.envs.math import CONFUSED, VAGUE, MathCase, MathTutoring, parse_answer, parse_message
from itpo_batch.sim.envs.math_problems import PROBLEMS

APPLES = next(i for i, p in enumerate(PROBLEMS) if p.key == "apples")


def make(hidden=("bags",), noise=0.0, **cfg):
    """Anna buys 4 bags of 6 apples (answer 24), with ``hidden`` left out of the opening."""
    task = MathTutoring(TaskConfig(user_noise=noise, **cfg))
    case = MathCase(APPLES, (("bags", 4), ("per_bag", 6)), tuple(hidden), "Anna", "Anna buys some bags...")
    ep = task.episode(case, np.random.default_rng(0))
    ep.start()
    return task, ep


def test_load_by_name_and_cases_are_well_formed():
    task = load_task("math")
    assert isinstance(task, MathTutoring) and 10 <= len(PROBLEMS) <= 15
    for g in range(60):
        case = task.sample_case(episode_rng(0, g))
        p = case.template
        assert 2 <= len(p.quantities) <= 3 and 1 <= len(case.hidden) <= min(2, len(p.quantities))
        assert isinstance(case.answer, int) and case.answer >= 0
        for q in p.quantities:
            sentence = (q.unknown if q.key in case.hidden else q.known).format(
                v=dict(case.values)[q.key], name=case.name
            )
            assert sentence in case.opening


def test_every_template_question_asks_exactly_its_quantity():
    for i, p in enumerate(PROBLEMS):
        for q in p.quantities:
            assert parse_message(q.ask.format(name="Anna"), i) == ((q.key,), None), (p.key, q.key)


@pytest.mark.parametrize(
    ("text", "asked"),
    [
        ("How mny bags did she buy?", ("bags",)),
        ("What is the number of bagss?", ("bags",)),
        ("How many apples are in every bag?", ("per_bag",)),
        ("How many bags, and how many apples per bag?", ("bags", "per_bag")),
    ],
)
def test_typos_and_synonyms_of_questions(text, asked):
    assert parse_message(text, APPLES) == (asked, None)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("The answer is 24.", 24),
        ("The answer is twenty-four apples, from 4 bags.", 24),
        ("4 x 6 = 24 apples", 24),
        ("So she has 24 apples in total.", 24),
        ("The total is 4 bags. The answer is 24.", 24),  # the last committing sentence counts
        ("She has 24 apples.", None),  # no answer marker
        ("Is the answer 24?", None),  # a question
        ("The answer is unclear.", None),  # no number
        ("Ok, so she has 4 bags.", None),  # "so" only counts at the start of a sentence
        ("4 x 6 = 24 is the answer.", 24),
        ("24 is the answer!", 24),
        ("Add the two numbers to get the total.", None),  # number words only count after answer/=
        ("Multiply them: 4 times 6 gives 24 altogether.", 24),
    ],
)
def test_answer_rule(text, value):
    assert parse_answer(text) == value


def test_numbers_round_trip_through_words():
    for n in range(1000):
        assert tp.numbers(f"It is {tp.number_to_words(n)}.") == [n]
    assert tp.numbers("1,200 and 2.5, then one hundred and five") == [1200, 2.5, 105]


def test_question_that_reveals_nothing_has_zero_utility():
    _, ep = make()
    res = ep.step("How many apples are in each bag?")  # given in the opening
    assert res.utility == 0.0 and res.reply.startswith("As I said")
    res = ep.step("How many bags did Anna buy?")
    assert res.utility == 1.0 and tp.numbers(res.reply) == [4] and ep.still_hidden == []
    assert ep.step("How many bags did she buy?").utility == 0.0


def test_utility_is_shared_between_hidden_quantities():
    _, ep = make(hidden=("bags", "per_bag"))
    assert ep.step("How many bags did Anna buy?").utility == 0.5
    _, ep = make(hidden=("bags", "per_bag"))
    assert ep.step("How many bags did Anna buy? How many apples are in each bag?").utility == 1.0


def test_confused_reply_for_unparseable_messages():
    _, ep = make()
    for text in ("Do you like math?", "", "Never mind, let us go step by step with it."):
        res = ep.step(text)
        assert res.reply == CONFUSED and res.utility == 0.0 and not res.done


def test_correct_and_wrong_answers():
    _, ep = make()
    ep.step("How many bags did Anna buy?")
    res = ep.step("4 x 6 = 24. The answer is 24.")
    assert res.done and res.reply is None and res.utility == 1.0
    assert ep.result().success and ep.result().score == 1.0
    _, ep = make()
    res = ep.step("The answer is 18.")
    assert res.done and res.utility == 0.0 and ep.result().score == 0.0 and not ep.result().success
    _, ep = make()
    assert ep.step("How many bags? The answer is 24.").utility == 2.0  # the question still counts


def test_vague_student_reveals_nothing():
    _, ep = make(noise=1.0)
    res = ep.step("How many bags did Anna buy?")
    assert res.reply == VAGUE and res.utility == 0.0 and ep.still_hidden == ["bags"]


def test_termination_at_max_turns_and_outcome():
    _, ep = make(max_assistant_turns=2, word_cost=0.01)
    assert not ep.step("Do you like math?").done
    res = ep.step("Do you like math?")
    assert res.done and res.reply is None
    with pytest.raises(RuntimeError):
        ep.step("The answer is 24.")
    r = ep.result()
    assert r.score == 0.0 and r.outcome == pytest.approx(-0.08)
    _, ep = make(word_cost=0.01)
    ep.step("The answer is 24.")
    assert ep.result().outcome == pytest.approx(np.clip(1.0 - 0.04, -1, 1))


def test_user_brief_holds_the_hidden_values():
    _, ep = make(hidden=("bags", "per_bag"))
    brief = ep.user_brief()
    assert "Anna buys 4 bags of apples." in brief and "Each bag holds 6 apples." in brief
    assert "24" not in brief


play = play_scripted


def test_determinism_per_seed():
    task = MathTutoring()
    a, b = play(task, 5, 2, 3, 0.5), play(task, 5, 2, 3, 0.5)
    assert a.messages == b.messages and a.utilities == b.utilities and a.case == b.case


def test_scripted_policy_skill_and_termination():
    task = MathTutoring()
    rates = {}
    for skill in (0.0, 1.0):
        eps = [play(task, 1, g, 0, skill) for g in range(40)]
        assert all(e.done and len(e.utilities) <= task.config.max_assistant_turns for e in eps)
        assert all(min(e.utilities) >= 0 for e in eps)
        rates[skill] = np.mean([e.result().success for e in eps])
    assert rates[1.0] >= 0.9 and rates[0.0] <= 0.1


def capped_values_loop(problem, seed: int, cap):
    """Reference for ``Problem.draw(rng, cap)``: one uniform draw per quantity, from the values ≤ cap
    (or the first value when none is), in template order."""
    rng = np.random.default_rng(seed)
    out = {}
    for q in problem.quantities:
        allowed = [v for v in q.values if cap is None or v <= cap] or [q.values[0]]
        out[q.key] = allowed[int(rng.integers(len(allowed)))]
    return out


@pytest.mark.parametrize("cap", [None, 2, 4, 9, 35])
def test_max_value_caps_independent_quantities_against_a_loop(cap):
    for p in PROBLEMS:
        for seed in range(20):
            got = p.draw(np.random.default_rng(seed), cap)
            if p.sample is None:
                assert got == capped_values_loop(p, seed, cap), (p.key, seed)
            else:  # jointly drawn: the cap does not apply
                assert got == p.draw(np.random.default_rng(seed)), (p.key, seed)


def test_max_value_leaves_the_default_task_unchanged_and_shrinks_the_answers():
    default, capped = MathTutoring(), load_task("math", settings={"n_problems": 1, "max_value": 4})
    uncapped = load_task("math", settings={"max_value": None})
    for g in range(50):
        assert default.sample_case(episode_rng(3, g)) == uncapped.sample_case(episode_rng(3, g))
    answers = {capped.sample_case(episode_rng(3, g)).answer for g in range(300)}
    assert answers == {a * b for a in (2, 3, 4) for b in (2, 3, 4)}
    # the scripted policy's guesses for hidden quantities come from the capped range too
    eps = [play(capped, 1, g, 0, 0.0) for g in range(200)]
    guesses = [m["content"] for e in eps for m in e.messages if m["role"] == "assistant"]
    values = {parse_answer(t) for t in guesses} - {None}
    assert values and max(values) <= 16 + 3  # capped products, wrong ones off by at most 3
    with pytest.raises(ItpoError, match="max_value"):
        load_task("math", settings={"max_value": 1})
