"""The one exception scorers raise for bad input, so the API can answer 4xx instead of 500."""

from __future__ import annotations


class RewardInputError(ValueError):
    """Input a scorer cannot score (no quoted target, unknown class, ...); `item` is its index."""

    def __init__(self, message: str, item: int | None = None, code: str = "bad_input") -> None:
        super().__init__(message)
        self.message = message
        self.item = item
        self.code = code

    def at(self, item: int) -> "RewardInputError":
        """The same error, tagged with the index of the item it belongs to."""
        return RewardInputError(self.message, item=item, code=self.code)
