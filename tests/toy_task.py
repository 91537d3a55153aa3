"""A small guessing task for rollout and user-simulator tests (independent of the built-in tasks).

The user thinks of a word. The assistant may ask for a hint (oracle utility 0.5 the first time) and
commits with "answer: WORD" (utility 1 if right). The scripted policy asks for the hint, then answers,
with probability ``skill`` per turn; otherwise it guesses a random word.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from itpo_batch.sim.envs.base import Episode, Message, Task, TurnResult, words

WORDS = [
    ("apple", "a red fruit"),
    ("river", "flowing water"),
    ("piano", "an instrument"),
    ("tiger", "a big cat"),
]
NUDGE = "Please ask me for a hint or give your answer."


class GuessEpisode(Episode):
    def __init__(self, task: Task, case: Any, rng: np.random.Generator):
        super().__init__(task, case, rng)
        self.hinted = False
        self.guess: str | None = None

    def opening(self) -> list[Message]:
        return [
            {"role": "system", "content": "Find the user's secret word."},
            {"role": "user", "content": "I am thinking of a word. Can you find it?"},
        ]

    def _assistant_turn(self, text: str) -> TurnResult:
        w = words(text)
        if "answer" in w:
            i = w.index("answer")
            self.guess = w[i + 1] if i + 1 < len(w) else ""
            right = self.guess == self.case[0]
            return TurnResult(None, 1.0 if right else 0.0, True, {"guess": self.guess})
        if "hint" in w and not self.hinted:
            self.hinted = True
            noisy = self.rng.random() < self.task.config.user_noise
            reply = "Hmm, I am not sure." if noisy else f"The hint is: {self.case[1]}."
            return TurnResult(reply, 0.5, False, {"asked": "hint"})
        return TurnResult(NUDGE, 0.0, False, {})

    def _score(self) -> tuple[float, bool]:
        right = self.guess == self.case[0]
        return (1.0 if right else 0.0), right

    def user_brief(self) -> str:
        return f"You are thinking of the word '{self.case[0]}'. Its hint is '{self.case[1]}'."


class GuessTask(Task):
    name = "guess"
    episode_cls = GuessEpisode

    def sample_case(self, rng: np.random.Generator) -> Any:
        return WORDS[int(rng.integers(len(WORDS)))]

    def scripted_reply(self, episode: Episode, rng: np.random.Generator, skill: float) -> str:
        assert isinstance(episode, GuessEpisode)
        if rng.random() < skill:
            return f"My answer: {episode.case[0]}" if episode.hinted else "Could I get a hint, please?"
        return f"My answer: {WORDS[int(rng.integers(len(WORDS)))][0]}"
