"""Object storage URIs as users write them (`s3://bucket/path?endpoint_override=host:9000&...`)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's file system and path for `uri`. ValueError, saying what to write instead, for a
    URI it cannot parse, and for a raw "#": pyarrow takes the rest as a fragment and drops it, so
    the endpoint and options after it were lost and requests went to AWS itself."""
    if "#" in uri:
        raise ValueError(f"write '#' as %23 in {uri} (pyarrow drops everything after a '#': the endpoint and options)")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise ValueError(f"cannot parse the URI {uri}: percent-encode what a URI cannot hold (a space as %20, "
                         f"letters beyond ASCII) ({exc})") from exc
