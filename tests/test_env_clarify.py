"""The clarify sanity task (parser, user, outcome, oracle, scripted policy) and the tasks' difficulty knobs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from itpo_batch.core.errors import ItpoError
from itpo_batch.sim.envs.base import TaskConfig, load_task, play_scripted
from itpo_batch.sim.envs.clarify import (
    OPTIONS,
    Clarify,
    ClarifyCase,
    ClarifyConfig,
    committed_option,
)
from itpo_batch.sim.envs.medical import MedicalDiagnosis, knowledge, scaled_knowledge


def episode(preference="tea", explicit=False, **settings):
    task = Clarify(ClarifyConfig(**settings))
    case = ClarifyCase("drink", preference, "Can you pick a drink for me?", explicit)
    ep = task.episode(case, np.random.default_rng(0))
    ep.start()
    return ep


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Here is your tea.", ("tea", False)),
        ("Which drink would you like?", (None, True)),
        ("Tea or coffee? Here is your milk.", ("milk", True)),  # a question, then a commit: the commit counts
        ("Would you like tea?", (None, True)),  # naming an option in a question does not commit
        ("Here is your coffee. Or tea.", ("coffee", False)),  # the first committing sentence
        ("It is a teapot day.", (None, False)),
        ("Here is your soda.", ("soda", False)),  # soda is an option of drinks, in play or not
    ],
)
def test_parser(text, expected):
    assert committed_option(text, OPTIONS["drink"]) == expected


def test_ask_then_answer_succeeds_and_the_oracle_credits_both_turns():
    ep = episode(user_noise=0.0)
    r1 = ep.step("Which drink would you like?")
    assert r1.reply == "I would like tea." and not r1.done
    assert r1.utility == pytest.approx(math.log2(5))
    r2 = ep.step("Here is your tea.")
    assert r2.done and r2.utility == 1.0
    res = ep.result()
    assert res.success and res.score == 1.0 and res.outcome == 1.0  # no word cost by default


def test_a_wrong_answer_ends_with_zero_and_asking_again_learns_nothing():
    ep = episode(user_noise=0.0)
    ep.step("Which drink?")
    again = ep.step("What would you like?")
    assert again.utility == 0.0 and again.reply.startswith("As I said")
    last = ep.step("Here is your coffee.")
    assert last.done and last.utility == 0.0 and not ep.result().success


def test_confused_reply_and_turn_limit():
    ep = episode(user_noise=0.0, max_assistant_turns=2)
    r = ep.step("Hello there.")
    assert "do not understand" in r.reply and r.utility == 0.0
    r = ep.step("Nice weather.")
    assert r.done and ep.result().score == 0.0


def test_vague_user_reveals_nothing():
    ep = episode(user_noise=1.0)
    r = ep.step("Which drink would you like?")
    assert r.reply == "Anything is fine, I guess." and r.utility == 0.0 and not ep.revealed


def test_options_out_of_play_are_not_answers():
    ep = episode(n_options=2, user_noise=0.0)  # tea, coffee in play
    r = ep.step("Here is your juice.")
    assert not r.done and "do not understand" in r.reply


def test_explicit_request_states_the_preference():
    task = load_task("clarify", settings={"explicit_rate": 1.0})
    ep = play_scripted(task, 0, 3, 0, skill=0.0)
    assert ep.case.explicit and ep.case.opening.endswith(f"I would like {ep.case.preference}.")
    assert len(ep.utilities) == 1 and ep.result().success  # named at once, nothing asked


@pytest.mark.parametrize(("skill", "n_options"), [(0.0, 5), (0.2, 5), (0.5, 3), (1.0, 4)])
def test_scripted_success_matches_its_formula(skill, n_options):
    """Success = P(ask) + P(guess) / n_options (with the 5% vague replies the asker may re-ask or guess)."""
    task = load_task("clarify", settings={"n_options": n_options, "user_noise": 0.0})
    succ = np.mean([play_scripted(task, 7, g, 0, skill).result().success for g in range(1500)])
    expected = skill + (1 - skill) / n_options
    assert abs(succ - expected) < 4 * math.sqrt(expected * (1 - expected) / 1500) + 1e-9


def test_settings_are_checked():
    with pytest.raises(ItpoError, match="n_options"):
        load_task("clarify", settings={"n_options": 9})
    with pytest.raises(ItpoError, match=r"task_settings\.nope.*known under task_settings\.: .*n_options"):
        load_task("clarify", settings={"nope": 1})
    with pytest.raises(ItpoError, match="n_diseases"):
        load_task("medical", settings={"n_diseases": 1})
    with pytest.raises(ItpoError, match="max_hidden"):
        load_task("math", settings={"max_hidden": 3})
    with pytest.raises(ItpoError, match="max_points"):
        load_task("docwrite", settings={"max_points": 5})


def test_a_shared_config_keeps_the_tasks_own_defaults():
    task = MedicalDiagnosis(TaskConfig(user_noise=0.2))
    assert task.config.user_noise == 0.2 and task.config.n_diseases == 14
    assert load_task("medical").kb is knowledge()  # the defaults are the knowledge base as written


def test_scaled_knowledge_against_a_loop():
    kb, bg = knowledge(), 0.03
    small = scaled_knowledge(5, 1.7)
    top = sorted(range(len(kb.diseases)), key=lambda i: (-kb.prior[i], i))[:5]
    assert small.diseases == tuple(kb.diseases[i] for i in sorted(top))
    for r, i in enumerate(sorted(top)):
        assert small.prior[r] == pytest.approx(kb.prior[i] / sum(kb.prior[j] for j in top))
        for s in range(len(kb.symptoms)):
            want = min(max(bg + 1.7 * (kb.p[i, s] - bg), 0.01), 0.99)
            assert small.p[r, s] == pytest.approx(want)


def success(name: str, settings: dict, n: int = 400) -> float:
    task = load_task(name, settings=settings)
    return float(np.mean([play_scripted(task, 1, g, 0, 0.8).result().score for g in range(n)]))


@pytest.mark.parametrize(
    ("name", "easy", "hard"),
    [
        ("medical", {"n_diseases": 4, "distinctiveness": 2.0}, {"distinctiveness": 0.5}),
        ("math", {"max_hidden": 1}, {}),
        ("docwrite", {"n_tones": 1, "n_audiences": 1, "max_points": 2}, {}),
    ],
)
def test_difficulty_knobs_move_the_scripted_score(name, easy, hard):
    """Same scripted policy, same seeds: the easy setting scores higher than the hard one."""
    assert success(name, easy) > success(name, hard) + 0.03


def test_medical_cases_stay_in_play():
    task = load_task("medical", settings={"n_diseases": 3})
    diseases = {play_scripted(task, 2, g, 0, 0.8).case.disease for g in range(200)}
    assert diseases <= set(task.kb.diseases) and len(task.kb.diseases) == 3
