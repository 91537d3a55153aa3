"""The document-writing task: BLEU, parser, user, oracle utility, outcome and the scripted policy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import sacrebleu

from itpo_batch.sim.envs.base import TaskConfig, episode_rng, load_task, play_scripted
from itpo_batch.sim.envs.docwrite import (
    ASK,
    AUDIENCES,
    CONFUSED,
    IRRELEVANT,
    LENGTHS,
    SCENARIOS,
    SUCCESS_BLEU,
    TONES,
    VAGUE,
    DocCase,
    DocEpisode,
    DocWriting,
    asked_categories,
    bleu,
    parse_draft,
    render_document,
)

CASE = DocCase(scenario=0, audience="team", tone="formal", length="detailed", points=(2, 0, 5))


def _episode(case: DocCase = CASE, noise: float = 0.0, seed: int = 0) -> DocEpisode:
    ep = DocWriting(TaskConfig(user_noise=noise)).episode(case, np.random.default_rng(seed))
    ep.start()
    assert isinstance(ep, DocEpisode)
    return ep


def _play(task: DocWriting, group: int, member: int, skill: float) -> DocEpisode:
    ep = play_scripted(task, 7, group, member, skill)
    assert isinstance(ep, DocEpisode)
    return ep


def _rngs(n: int) -> list[np.random.Generator]:
    return [episode_rng(3, g) for g in range(n)]


# -- BLEU and the case generator ---------------------------------------------------------------------
def test_bleu_is_sacrebleu_word_level_sentence_bleu() -> None:
    ref = CASE.target
    hyps = [ref, "Dear team, I am writing to announce the schedule.", "Hi there, no idea.", ref.lower()]
    for h in hyps:
        assert bleu(h, ref) == pytest.approx(sacrebleu.sentence_bleu(h, [ref]).score / 100)
    assert all(bleu(c.target, c.target) == 1.0 for c in map(DocWriting().sample_case, _rngs(40)))
    shuffled = " ".join(reversed(ref.split()))  # same words and characters, other order
    assert bleu(shuffled, ref) < 0.2


def test_sample_case_and_target_shape() -> None:
    task = load_task("docwrite")
    assert isinstance(task, DocWriting) and task.name == "docwrite"
    for g in range(50):
        c = task.sample_case(episode_rng(1, g))
        assert 2 <= len(c.points) <= 4 and len(set(c.points)) == len(c.points)
        tone = TONES[c.tone]
        assert c.target.count(tone.point.split("{")[0]) == len(c.points)  # one sentence per point
        assert c.target.endswith(tone.closing) == (c.length == "detailed")
    assert task.sample_case(episode_rng(1, 3)) == task.sample_case(episode_rng(1, 3))


@pytest.mark.parametrize("scenario", range(len(SCENARIOS)))
def test_feedback_approves_every_target(scenario: int) -> None:
    """Data integrity: the markers, keywords and addresses never collide with other template text."""
    n = len(SCENARIOS[scenario].points)
    for audience, tone, length in itertools.product(AUDIENCES, TONES, LENGTHS):
        for points in [tuple(range(n)), (1, 3)]:
            ep = _episode(DocCase(scenario, audience, tone, length, points))
            res = ep.step("Draft: " + ep.case.target)
            assert res.reply == "This looks good to me.", (audience, tone, length, points, res.reply)


# -- parser ----------------------------------------------------------------------------------------
def test_parse_draft_rules() -> None:
    assert parse_draft("Draft: Dear team, hello there.") == ("Dear team, hello there.", False)
    assert parse_draft("Final draft: Dear team, hello there.") == ("Dear team, hello there.", True)
    assert parse_draft("Here is my final version: one two three") == ("one two three", True)
    assert parse_draft("Finl drat: one two three") == ("one two three", True)  # typos in the head
    assert parse_draft("Draft: too short") is None
    assert parse_draft("Here is what I think about your draft today: one two three") is None
    assert parse_draft("Quick question: who is it for?") is None
    assert parse_draft("A draft without a colon") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ASK["tone"], ["tone"]),
        (ASK["audience"], ["audience"]),
        (ASK["points"], ["points"]),
        (ASK["length"], ["length"]),
        ("Who is the audiance?", ["audience"]),  # typo
        ("Who will read it?", ["audience"]),  # synonym phrase
        ("How should it sound, more formall or freindly?", ["tone"]),
        ("What styl do you want?", []),  # 5-letter words must be exact
        ("What should the lengh be?", ["length"]),
        ("Anything else I should includ?", ["points"]),
        ("Who is it for, and what tone?", ["tone", "audience"]),
        ("Which one do you prefer?", []),  # 'one' is not 'tone'
        ("Shall we go along with it?", []),  # 'along' is not 'long'
    ],
)
def test_questions_understood(text: str, expected: list[str]) -> None:
    assert asked_categories(text) == expected


def test_scripted_irrelevant_questions_ask_nothing() -> None:
    assert all(asked_categories(q) == [] and parse_draft(q) is None for q in IRRELEVANT)


# -- user and oracle utility -----------------------------------------------------------------------
def test_opening_reveals_kind_topic_and_first_point_only() -> None:
    ep = _episode()
    opening = ep.messages[-1]["content"]
    assert ep.messages[0]["role"] == "system" and ep.messages[-1]["role"] == "user"
    assert "announcement" in opening and "parking moves to lot B" in opening
    assert ep.unknown() == ["tone", "audience", "points", "length"] and ep.n_hidden == 5


def test_eliciting_a_preference_has_positive_utility() -> None:
    ep = _episode()
    res = ep.step("What tone should it have?")
    assert res.utility == pytest.approx(1 / 5) and res.reply == "Make it formal."
    assert ep.known["tone"] == "formal" and not res.done
    res = ep.step("Who is it for, and how long should it be?")
    assert res.utility == pytest.approx(2 / 5) and set(res.info["revealed"]) == {"audience", "length"}


def test_points_question_reveals_all_remaining_points() -> None:
    ep = _episode()
    res = ep.step("What key points should I mention?")
    assert res.utility == pytest.approx(2 / 5)
    assert ep.known_points == [2, 0, 5] and "nine" in res.reply and "remote" in res.reply
    again = ep.step("Any other points?")
    assert again.utility == 0.0 and again.reply == "That's all I want to mention."


def test_questions_that_reveal_nothing_have_zero_utility() -> None:
    ep = _episode()
    assert ep.step("Which font would you like?").utility == 0.0
    assert ep.step("What tone should it have?").utility > 0
    repeated = ep.step("What tone should it have?")  # already known
    assert repeated.utility == 0.0 and repeated.info["revealed"] == []


def test_unparseable_message_gets_confused_reply_and_zero_utility() -> None:
    ep = _episode()
    res = ep.step("Sure thing, working on it.")
    assert res.reply == CONFUSED and res.utility == 0.0 and res.info["act"] == "confused"
    assert not ep.known and ep.known_points == [2]


def test_vague_user_reveals_nothing() -> None:
    ep = _episode(noise=1.0)
    res = ep.step("What tone should it have?")
    assert res.reply == VAGUE and res.utility == 0.0 and "tone" not in ep.known


def test_draft_utility_is_bleu_gain_over_best_previous_draft() -> None:
    ep = _episode()
    target = CASE.target
    d1 = render_document(0, "team", "formal", "detailed", [2, 0])
    d2 = render_document(0, "friends", "casual", "short", [2])
    d3 = render_document(0, "team", "formal", "detailed", [2, 0, 5])
    r1 = ep.step("Draft: " + d1)
    assert r1.utility == pytest.approx(bleu(d1, target)) and 0 < r1.utility < 1
    r2 = ep.step("Draft: " + d2)  # worse than d1: clipped at 0
    assert bleu(d2, target) < bleu(d1, target) and r2.utility == 0.0
    r3 = ep.step("Final draft: " + d3)
    assert r3.utility == pytest.approx(1.0 - bleu(d1, target)) and r3.done and r3.reply is None


def test_draft_feedback_names_one_wrong_thing_and_reveals_it() -> None:
    ep = _episode()
    res = ep.step("Draft: " + render_document(0, "friends", "casual", "short", [2]))
    assert res.reply == "Please make it more formal." and ep.known["tone"] == "formal"
    res = ep.step("Draft: " + render_document(0, "friends", "formal", "short", [2]))
    assert res.reply == "Also mention that all meetings now start at nine." and 0 in ep.known_points
    res = ep.step("Draft: " + render_document(0, "friends", "formal", "short", [2, 0, 5, 3]))
    assert res.reply == "It should be addressed to my team." and ep.known["audience"] == "team"
    res = ep.step("Draft: " + render_document(0, "team", "formal", "short", [2, 0, 5, 3]))
    assert res.reply == "Please drop the part about lunch." and ep.rejected == {3}


def test_perfect_final_draft_succeeds_and_outcome_is_score_plus_cost() -> None:
    ep = _episode()
    text = "Final draft: " + CASE.target
    res = ep.step(text)
    assert res.done and res.info["act"] == "final"
    out = ep.result()
    assert out.score == pytest.approx(1.0) and out.success
    assert out.cost == pytest.approx(-5e-5 * len(text.split()))
    assert out.outcome == pytest.approx(float(np.clip(out.score + out.cost, -1, 1)))


def test_turn_limit_ends_episode_and_last_draft_counts() -> None:
    ep = _episode()
    for _ in range(4):
        assert not ep.step("Do you want a title?").done
    res = ep.step("Should I add emojis?")
    assert res.done and res.reply is None and ep.result().score == 0.0  # no draft at all
    ep = _episode()
    good = render_document(0, "team", "formal", "detailed", [2, 0, 5])
    ep.step("Draft: " + good)
    ep.step("Draft: " + render_document(0, "friends", "casual", "short", [2]))
    for _ in range(3):
        ep.step("Which font would you like?")
    assert ep.done and len(ep.utilities) == 5
    score, success = ep.result().score, ep.result().success
    assert score == pytest.approx(bleu(ep.drafts[-1], CASE.target)) and score < SUCCESS_BLEU and not success


def test_user_brief_states_hidden_attributes() -> None:
    brief = _episode().user_brief()
    for phrase in ("my team", "formal", "closing line", "parking moves to lot B", "remote work"):
        assert phrase in brief


# -- scripted policy -------------------------------------------------------------------------------
def test_scripted_episodes_are_deterministic() -> None:
    task = DocWriting()
    for g, m in [(0, 0), (3, 5), (11, 2)]:
        a, b = _play(task, g, m, 0.5), _play(task, g, m, 0.5)
        assert a.messages == b.messages and a.utilities == b.utilities and a.result() == b.result()


def test_scripted_policy_terminates_and_is_always_parsed() -> None:
    task = DocWriting()
    for g, skill in itertools.product(range(15), (0.0, 0.3, 0.7, 1.0)):
        ep = _play(task, g, 0, skill)
        assert ep.done and 1 <= len(ep.utilities) <= task.config.max_assistant_turns
        replies = [m["content"] for m in ep.messages if m["role"] == "user"]
        assert CONFUSED not in replies


def test_scripted_skill_controls_success() -> None:
    task = DocWriting()
    rate = {
        skill: np.mean([_play(task, g, m, skill).result().success for g in range(12) for m in range(4)])
        for skill in (0.0, 1.0)
    }
    assert rate[1.0] >= 0.9 and rate[0.0] <= 0.35


def test_skilled_policy_utilities_sum_to_about_two() -> None:
    """Questions elicit every hidden attribute (sum 1); the final draft gains the whole BLEU (about 1)."""
    ep = _play(DocWriting(TaskConfig(user_noise=0.0)), 4, 0, 1.0)
    assert [m["content"] for m in ep.messages if m["role"] == "assistant"][:4] == list(ASK.values())
    assert sum(ep.utilities[:4]) == pytest.approx(1.0) and ep.utilities[4] == pytest.approx(1.0)
