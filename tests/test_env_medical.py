"""The simulated medical task: parser, patient, outcome, oracle utility and scripted policy."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from itpo_batch.sim.envs.base import TaskConfig, episode_rng, load_task, play_scripted
from itpo_batch.sim.envs.medical import (
    CONFUSED,
    MedicalCase,
    MedicalDiagnosis,
    MedicalEpisode,
    knowledge,
    parse_message,
    posterior,
    question_gain,
)

KB = knowledge()


def make(disease="flu", present=("fever", "cough", "body aches"), complaint="fever", noise=0.0, **cfg):
    task = MedicalDiagnosis(TaskConfig(user_noise=noise, **cfg))
    case = MedicalCase(disease, tuple(present), complaint, f"I have {KB.have[complaint]}.")
    ep = task.episode(case, np.random.default_rng(0))
    ep.start()
    return task, ep


def brute_posterior(complaint: str, answers: dict[str, bool], noise: float) -> list[float]:
    """Slow reference: Bayes' rule one disease and one answer at a time."""
    raw = []
    for d in range(len(KB.diseases)):
        w = KB.prior[d] * KB.p[d, KB.symptoms.index(complaint)]
        for s, yes in answers.items():
            p = KB.p[d, KB.symptoms.index(s)]
            p_yes = p * (1 - noise) + (1 - p) * noise
            w *= p_yes if yes else 1 - p_yes
        raw.append(w)
    return [w / sum(raw) for w in raw]


def brute_entropy(post: list[float]) -> float:
    return -sum(p * math.log2(p) for p in post if p > 0)


def test_load_by_name_and_knowledge_is_consistent():
    assert isinstance(load_task("medical"), MedicalDiagnosis)
    assert KB.p.shape == (len(KB.diseases), len(KB.symptoms)) and np.all((KB.p > 0) & (KB.p < 1))
    assert abs(KB.prior.sum() - 1) < 1e-12 and 12 <= len(KB.diseases) <= 20 and len(KB.symptoms) >= 20


def test_every_template_parses_to_exactly_its_symptom_or_disease():
    for s in KB.symptoms:
        assert parse_message(f"Do you have {KB.ask[s]}?").asked == (s,), s
    for d in KB.diseases:
        parsed = parse_message(f"Based on your symptoms, the most likely diagnosis is {KB.disease_name[d]}.")
        assert parsed.committed == d and parsed.asked == ()


@pytest.mark.parametrize(
    ("text", "asked"),
    [
        ("Do you have a feverr?", ("fever",)),
        ("Any temperature or sniffles?", ("fever", "runny nose")),
        ("Have you been throwing up, or do you have loose stools?", ("vomiting", "diarrhea")),
        ("Are you sneezing?", ("sneezing",)),  # not a typo of "wheezing"
        ("Does it burn when you pee?", ("painful urination",)),
        ("Tell me if your throat hurts.", ("sore throat",)),
        ("Could it be strep throat?", ()),  # disease words are not symptoms, and a question does not commit
    ],
)
def test_typos_and_synonyms_of_symptoms(text, asked):
    parsed = parse_message(text)
    assert parsed.asked == asked and parsed.committed is None


@pytest.mark.parametrize(
    ("text", "disease"),
    [
        ("Diagnosis: flu", "flu"),
        ("I think you have influenza.", "flu"),
        ("It is most likely strep throat", "strep throat"),
        ("It's probably coronavirus.", "covid-19"),
        ("This looks like pnuemonia.", "pneumonia"),
        ("It is either the flu or covid-19.", "flu"),  # the first named disease counts
        ("Could it be covid? Do you have a fever? I think it is a common cold.", "common cold"),
    ],
)
def test_diagnosis_parsing(text, disease):
    assert parse_message(text).committed == disease


def test_question_that_reveals_nothing_has_zero_utility():
    _, ep = make()
    assert ep.step("Do you have a fever?").utility == 0.0  # the complaint
    first = ep.step("Do you have a cough?")
    assert first.utility > 0 and first.reply.startswith("Yes")
    again = ep.step("Any cough?")
    assert again.utility == 0.0 and again.reply.startswith("As I said")


def test_symptom_equally_likely_under_all_diseases_gives_no_information():
    flat = KB.p.copy()
    flat[:, KB.symptoms.index("earache")] = 0.4
    kb = dataclasses.replace(KB, p=flat)
    before = posterior(kb, "fever", {}, 0.05)
    for yes in (True, False):
        assert np.allclose(posterior(kb, "fever", {"earache": yes}, 0.05), before)
    assert question_gain(before, np.full((len(KB.diseases), 1), 0.4)) == pytest.approx(0.0, abs=1e-12)


def test_confused_reply_for_unparseable_messages():
    _, ep = make()
    # common words are not typos of keywords: never/fever, case/face, step/strep, your/sour
    for text in ("Do you like sports?", "", "Hmm.", "Never mind. In any case, let's take it step by step."):
        res = ep.step(text)
        assert res.reply == CONFUSED and res.utility == 0.0 and not res.done


def test_correct_and_wrong_diagnosis():
    _, ep = make()
    res = ep.step("Based on your symptoms, the most likely diagnosis is the flu.")
    assert res.done and res.reply is None and res.utility == 1.0
    assert ep.result().success and ep.result().score == 1.0
    _, ep = make()
    res = ep.step("Diagnosis: a common cold.")
    assert res.done and res.utility == 0.0 and not ep.result().success and ep.result().score == 0.0


def test_commit_adds_the_information_of_questions_in_the_same_message():
    _, a = make()
    gain = a.step("Do you have chills?").utility
    _, b = make()
    assert b.step("Do you have chills? Diagnosis: flu.").utility == pytest.approx(gain + 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_info_gain_equals_brute_force_posterior(seed):
    task = MedicalDiagnosis(TaskConfig(user_noise=0.1))
    case = task.sample_case(episode_rng(seed, 0))
    ep = task.episode(case, episode_rng(seed, 0, 0))
    ep.start()
    rng = np.random.default_rng(seed)
    for _ in range(4):
        before = dict(ep.answers)
        picks = rng.choice(KB.symptoms, size=2, replace=False)
        res = ep.step(f"Do you have {KB.ask[picks[0]]} or {KB.ask[picks[1]]}?")
        h0 = brute_entropy(brute_posterior(case.complaint, before, 0.1))
        h1 = brute_entropy(brute_posterior(case.complaint, ep.answers, 0.1))
        assert res.utility == pytest.approx(h0 - h1, abs=1e-9)
        assert np.allclose(ep.posterior(), brute_posterior(case.complaint, ep.answers, 0.1))


def test_expected_gain_matches_brute_force_enumeration():
    post = np.asarray(brute_posterior("cough", {"fever": True}, 0.05))
    cols = [KB.symptoms.index(s) for s in ("mucus", "wheezing", "sneezing")]
    q = KB.p[:, cols] * 0.95 + (1 - KB.p[:, cols]) * 0.05
    expected = brute_entropy(list(post))
    for outcome in np.ndindex(2, 2, 2):
        joint = [
            post[d] * np.prod([q[d, j] if o else 1 - q[d, j] for j, o in enumerate(outcome)])
            for d in range(len(post))
        ]
        expected -= sum(joint) * brute_entropy([w / sum(joint) for w in joint])
    assert question_gain(post, q) == pytest.approx(expected, abs=1e-9)


def test_patient_answers_at_most_three_symptoms_per_message():
    _, ep = make()
    res = ep.step("Do you have chills, a cough, a headache, nausea or a rash?")
    assert res.info["asked"] == ["chills", "cough", "headache"] and "nausea" not in ep.answers


def test_noise_flips_answers_and_is_remembered():
    _, ep = make(noise=1.0)
    assert ep.step("Do you have a cough?").reply.startswith("No")
    assert ep.step("Do you have a cough?").reply.startswith("As I said: No")


def test_termination_at_max_turns_and_outcome():
    _, ep = make(max_assistant_turns=3, word_cost=0.01)
    for i in range(3):
        res = ep.step("Do you like sports?")
        assert res.done == (i == 2)
    assert res.reply is None and len(ep.utilities) == 3
    with pytest.raises(RuntimeError):
        ep.step("Diagnosis: flu")
    r = ep.result()
    assert r.score == 0.0 and r.cost == pytest.approx(-0.01 * 12) and r.outcome == pytest.approx(-0.12)
    _, ep = make(word_cost=0.01)
    ep.step("Diagnosis: flu")
    assert ep.result().outcome == pytest.approx(np.clip(1.0 - 0.02, -1, 1))


def test_user_brief_describes_the_hidden_profile():
    _, ep = make()
    brief = ep.user_brief()
    assert "do not know your diagnosis" in brief and "a fever" in brief and "body aches" in brief
    assert "flu" not in brief.replace("influenza", "")


play = play_scripted


def test_determinism_per_seed():
    task = MedicalDiagnosis()
    a, b = play(task, 7, 3, 1, 0.5), play(task, 7, 3, 1, 0.5)
    assert a.messages == b.messages and a.utilities == b.utilities
    assert isinstance(a, MedicalEpisode) and a.case == b.case


def test_scripted_policy_skill_and_termination():
    task = MedicalDiagnosis()
    rates = {}
    for skill in (0.0, 1.0):
        eps = [play(task, 1, g, 0, skill) for g in range(40)]
        assert all(e.done and len(e.utilities) <= task.config.max_assistant_turns for e in eps)
        rates[skill] = np.mean([e.result().success for e in eps])
    assert rates[1.0] >= 0.6 and rates[0.0] <= 0.25
