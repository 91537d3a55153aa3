"""User-facing error types.

Every error a user can cause (bad logs, a model path that does not exist, a chat template that cannot
mark assistant tokens) is an :class:`ItpoError`. The CLI catches exactly this type, prints its message
without a traceback and exits with :attr:`ItpoError.exit_code`. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


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
