"""ptfast's own exception types."""

__all__ = ["BankFormatError", "BankMismatchError", "PromptEmbedsError", "UnknownAdapterError"]


class UnknownAdapterError(KeyError, ValueError):
    """An adapter name that the model or bank does not have.

    One type everywhere (``ptfast.patch``-family functions, ``PromptBank``, the vLLM integration). It is a
    ``KeyError`` (a failed lookup by name) and a ``ValueError`` (a bad argument), so code written against either
    keeps working.
    """

    def __str__(self) -> str:  # KeyError's str() would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class BankFormatError(ValueError):
    """A saved ``PromptBank`` folder whose ``bank.json`` or ``tables.safetensors`` is malformed, damaged or edited:
    not valid JSON or safetensors, a missing or ill-typed field, a table of the wrong shape or dtype, a tensor too many
    or too few, a table whose SHA-256 is not the manifest's, or NaN/infinite values. The message names the file and
    the problem.

    A ``ValueError``, as the errors of a bad folder were before. A bank saved for other word embeddings is not
    malformed: that is ``BankMismatchError``.
    """


class BankMismatchError(ValueError):
    """A saved bank does not belong to these word embeddings (vocab size, hidden size, dtype or weights differ)."""


class PromptEmbedsError(ValueError):
    """Input that vLLM would crash on or silently mishandle: caught by ptfast before it reaches the engine."""
