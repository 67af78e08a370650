"""The one exception type users see: a message that fits on one line."""


class OnnxAttrError(Exception):
    """A problem with the user's input (image, model, class, option), stated in one line."""


class OnnxAttrNote(UserWarning):
    """Something the user should know but that is not an error (a builder fallback, an assumed
    pixel contract); the CLI prints each as one "note:" line on stderr."""
