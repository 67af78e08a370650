"""The one exception type users see: a message that fits on one line."""


class OnnxAttrError(Exception):
    """A problem with the user's input (image, model, class, option), stated in one line."""
