"""ptfast's own exception types."""

__all__ = ["UnknownAdapterError"]


class UnknownAdapterError(KeyError, ValueError):
    """An adapter name that the model or bank does not have.

    One type everywhere (``ptfast.patch``-family functions, ``PromptBank``, the vLLM integration). It is a
    ``KeyError`` (a failed lookup by name) and a ``ValueError`` (a bad argument), so code written against either
    keeps working.
    """

    def __str__(self) -> str:  # KeyError's str() would wrap the message in quotes
        return str(self.args[0]) if self.args else ""
