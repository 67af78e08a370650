"""Class names given by the user: a list, or a file of one name per line or a JSON list."""

import json
from pathlib import Path

from ..errors import OnnxAttrError


def read_labels(labels):
    """A list of class names from a list, or from a file of one name per line or a JSON list."""
    if isinstance(labels, (list, tuple)):
        return list(labels)
    try:
        text = Path(labels).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise OnnxAttrError(f"cannot read labels file {labels}: "
                            f"{getattr(err, 'strerror', None) or err}") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise OnnxAttrError(f"labels file {labels} is not a JSON list ({err.msg})") from None
    return [line.strip() for line in text.strip().splitlines()]
