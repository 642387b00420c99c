"""The errors a caller can act on. Each names the field and the rule it broke."""

from __future__ import annotations


class I2VError(Exception):
    """Base for every error i2v raises on purpose."""


class InputError(I2VError, ValueError):
    """A request field broke a rule: `field` is the input name, `rule` says what was expected."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class ImageTooLarge(InputError):
    """An image input is over the size limit (the server answers 413 for it, 422 for other image faults)."""


class ModelUnavailable(I2VError):
    """A backend's weights could not be found or loaded."""


class Canceled(I2VError):
    """The caller asked the generation to stop; raised between denoising steps."""


class OutputError(I2VError):
    """The finished video could not be written (a full disk, an unwritable data folder)."""
