"""Lists of image paths in a table: a CSV or Parquet file with a `path` column (an audit's input,
so that a million files need no folder and no shell glob).

CSV is read with the standard library; Parquet needs pyarrow (which the `ray` extra installs).
"""

import csv
from pathlib import Path

from ..errors import OnnxAttrError
from .remote import is_uri

LIST_SUFFIXES = {".csv", ".parquet"}
COLUMN = "path"


def is_path_list(path):
    """Whether `path` names a list of paths (by its suffix) rather than an image."""
    return Path(path).suffix.lower() in LIST_SUFFIXES


def read_path_list(path):
    """The paths in the `path` column of a CSV or Parquet file, in order; relative paths are
    relative to the list's folder, URIs (s3://..., io/remote.py) stay strings. OnnxAttrError if
    the file cannot be read or has no such column."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            if rows and COLUMN not in rows[0]:
                raise KeyError(COLUMN)
            values = [row[COLUMN] for row in rows]
        else:
            values = _parquet_column(path)
    except KeyError:
        raise OnnxAttrError(f"{path}: no '{COLUMN}' column (a list of images needs one)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise OnnxAttrError(f"{path}: cannot read the list of images ({err})") from None
    return [value if is_uri(value) else path.parent / value for value in values if value]


def _parquet_column(path):
    """The `path` column of a Parquet file (KeyError without one). pyarrow is imported here,
    when a Parquet list is read, not with the package (it weighs 60 MB)."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise OnnxAttrError(f"{path}: reading a Parquet list needs pyarrow: "
                            "pip install 'onnxattr[ray]' (or pyarrow)") from None
    table = parquet.read_table(path)
    if COLUMN not in table.column_names:
        raise KeyError(COLUMN)
    return table.column(COLUMN).to_pylist()
