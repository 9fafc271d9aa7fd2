"""Object storage URIs as users write them (`s3://bucket/path?endpoint_override=host:9000&...`)."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.fs as pafs


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's file system and path for `uri`. ValueError, saying what to write instead, for a
    URI it cannot parse, and for a raw "#": pyarrow takes the rest as a fragment and drops it, so
    the endpoint and options after it were lost and requests went to AWS itself."""
    if "#" in uri:
        raise ValueError(f"write '#' as %23 in {redacted(uri)} (pyarrow drops everything after a '#': "
                         "the endpoint and options)")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise ValueError(f"cannot parse the URI {redacted(uri)}: percent-encode what a URI cannot hold "
                         f"(a space as %20, letters beyond ASCII) ({exc})") from exc


class StoreError(RuntimeError):
    """Object storage failed a request for a reason that is not the object's (the endpoint down or
    timing out, access refused, the service failing). Not an OSError, so that the readers' handlers
    of a damaged or vanished file let it through: the unit being read fails and is not committed,
    where an errors row for each of its samples had made a rerun skip them all for good."""


def store_failure(exc: BaseException, uri: str) -> StoreError | None:
    """The StoreError for `exc`, raised reading `uri`, when object storage failed the request
    rather than the object being missing (FileNotFoundError: deleted since the listing, a row of
    its own) or damaged; None otherwise. Arrow's S3 errors say "AWS Error <TYPE> during <operation>"."""
    if "://" not in uri or isinstance(exc, FileNotFoundError) or "AWS Error" not in str(exc):
        return None
    if re.search(r"AWS Error (NO_SUCH_KEY|RESOURCE_NOT_FOUND)\b", str(exc)):  # deleted between its HEAD and GET
        return None
    # the advice first: the one line a failed job prints is cut at 300 characters
    return StoreError(f"object storage failed reading {redacted(uri.split('?', 1)[0])}: run again once it answers "
                      f"(what is done is kept, nothing of this is committed): {exc}")


# the user part of an address (`s3://KEY:SECRET@bucket/...`, as pyarrow takes credentials): up to
# the first "/", "?" or "#", so that an "@" in a path or a local file's name is left alone
USER_PART = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@")


def redacted(uri: str) -> str:
    """`uri` with the credentials it may name replaced by ***, for a message or a page."""
    return USER_PART.sub(r"\1***@", uri)
