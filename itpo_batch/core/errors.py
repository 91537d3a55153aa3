"""User-facing error types.

Every error a user can cause (bad logs, a model path that does not exist, a chat template that cannot
mark assistant tokens) is an :class:`ItpoError`. The CLI catches exactly this type, prints its message
without a traceback and exits with :attr:`ItpoError.exit_code`. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class ItpoError(Exception):
    """Base class for errors caused by input, configuration or environment; exit code 2."""

    exit_code: int = 2


class LogValidationError(ItpoError):
    """Logs broke one or more rules of the data contract (``schemas/``).

    ``report`` is the :class:`~itpo_batch.data.validation_report.ValidationReport` behind the message, so a caller
    can render it another way (e.g. JSON) without validating again.
    """

    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report


class RenderError(ItpoError):
    """A conversation could not be turned into tokens with a correct assistant mask.

    ``index`` is the conversation's position in the list given to the renderer (None for errors of the
    tokenizer as a whole), so callers that know conversation ids can name the conversation.
    """

    def __init__(self, message: str, index: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.index, self.reason = index, reason or message

    @classmethod
    def at(cls, index: int, reason: str) -> RenderError:
        return cls(f"conversation {index}: {reason}", index, reason)


class ModelLoadError(ItpoError):
    """A model or tokenizer could not be resolved or loaded from local files."""


class NonFiniteError(ItpoError):
    """A loss, gradient norm, reward, advantage, prediction or parameter became NaN or infinite.

    "NaN cannot spread": training stages check what they already computed (one ``isfinite().all()``
    per tensor, a ``math.isfinite`` per float; the count of bad values is taken only on failure) and stop
    here, before anything of the step is written, so a run's committed rounds never hold a NaN. The
    caller that knows the context (``iterate``: the arm and round; ``score``) adds it with :meth:`at`.
    ``quantity`` names what was checked, ``bad`` / ``total`` count its values.
    """

    HINT = "nothing of it was written; a learning rate too high for the model is the usual cause"

    def __init__(self, quantity: str, bad: int, total: int, where: str | None = None, hint: str = HINT):
        self.quantity, self.bad, self.total, self.where, self.hint = quantity, bad, total, where, hint
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{quantity} not finite: {bad} of {total} values NaN or infinite; {hint}")

    def at(self, where: str, hint: str = HINT) -> NonFiniteError:
        """The same error placed by its caller (e.g. ``"iterate, method itpo, round 2"``), with its hint."""
        return NonFiniteError(self.quantity, self.bad, self.total, where, hint)

    @classmethod
    def check(cls, quantity: str, value: object) -> None:
        """Raise unless ``value`` (a float, or a torch tensor on any device) is entirely finite.

        Duck-typed on ``Tensor.isfinite`` so that this module stays free of torch (the CLI imports it
        at start-up); a tensor costs one ``isfinite().all()`` and one device sync.
        """
        if isinstance(value, int | float):
            if not math.isfinite(value):
                raise cls(quantity, 1, 1)
            return
        finite = value.isfinite()  # type: ignore[attr-defined]
        if not bool(finite.all()):
            raise cls(quantity, int((~finite).sum()), int(finite.numel()))

    @classmethod
    def check_all(cls, quantity: str, tensors: Iterable[object]) -> None:
        """:meth:`check` over several tensors (e.g. a model's parameters), counted together on failure."""
        tensors = list(tensors)
        if all(bool(t.isfinite().all()) for t in tensors):  # type: ignore[attr-defined]
            return
        bad = sum(int((~t.isfinite()).sum()) for t in tensors)  # type: ignore[attr-defined]
        raise cls(quantity, bad, sum(int(t.numel()) for t in tensors))  # type: ignore[attr-defined]
