"""Images named by URI (`s3://bucket/a.jpg`, `gs://...`, `hdfs://...`, `file:///data/a.jpg`),
read through pyarrow's filesystems, so that an audit's list of images can point at object
storage. pyarrow comes with the `ray` extra; it is imported when a URI is read, not with the
package. Credentials are pyarrow's (its environment variables and configuration files).
"""

import io
import re
from pathlib import Path

from ..errors import OnnxAttrError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The most bytes read from one URI: an image of MAX_PIXELS as uncompressed 16-bit RGBA
MAX_BYTES = 1 << 30


def is_uri(text):
    """Whether `text` (a str or path) is a URI with a scheme, like `s3://bucket/a.jpg`."""
    return isinstance(text, str) and bool(_SCHEME.match(text))


def as_input(text):
    """An input as the audit keeps it: a URI stays a string, anything else is a Path."""
    return text if is_uri(text) else Path(text)


def open_uri(uri):
    """The bytes at `uri` as a seekable file object; OnnxAttrError (one line) when pyarrow is
    missing, the scheme is unknown, or the object cannot be read."""
    try:
        import pyarrow.fs
    except ImportError:
        raise OnnxAttrError(f"{uri}: reading a URI needs pyarrow: pip install 'onnxattr[ray]' "
                            "(or pyarrow)") from None
    fs = pyarrow.fs
    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            raise OnnxAttrError(f"{uri}: not found")
        if info.type != fs.FileType.File:
            raise OnnxAttrError(f"{uri}: is not a file")
        if info.size is not None and info.size > MAX_BYTES:
            raise OnnxAttrError(f"{uri}: {info.size} bytes, more than an image of the largest "
                                "size accepted")
        with filesystem.open_input_file(path) as handle:
            return io.BytesIO(handle.read())
    except OnnxAttrError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError, ...)
        raise OnnxAttrError(" ".join(f"{uri}: cannot read ({err})".split())) from None
