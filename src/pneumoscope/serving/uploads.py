"""Uploads read from a multipart body as it streams in, in memory, bounded in size, file count and pace (413, 408)."""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import HTTPException, Request

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and part headers on top of the files
BODY_GRACE_S = 10.0  # a body may start this late...
MIN_BODY_RATE = 50_000  # ... and must then keep arriving at this many bytes a second on average (20 MB in 410 s)
MAX_BOUNDARY = 70  # characters of a multipart boundary (RFC 2046)


def _clean_name(filename: str | None) -> str:
    """The upload's base name, printable and at most 100 characters: it is echoed in answers."""
    name = os.path.basename((filename or "").replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable())[:100]
    return name or "upload"


async def read_multipart(
    request: Request,
    fields: tuple[str, ...],
    *,
    max_bytes: int,
    max_files: int,
    grace_s: float = BODY_GRACE_S,
    min_rate: float = MIN_BODY_RATE,
) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each part named in ``fields``, parsed from the body as it streams in.

    Everything stays in memory: the body is counted as it arrives (chunked or
    not) and refused with 413 as soon as it passes ``max_bytes``; Starlette's own
    form parser would spool it to a temporary file first. A body slower than
    ``min_rate`` bytes a second (after ``grace_s``) is refused with 408.
    """
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser

    how = f"send multipart/form-data with the image in a `{fields[0]}` field, e.g. `curl -F {fields[0]}=@xray.dcm URL`"
    boundary = _form_boundary(request, how)
    too_big = f"the limit is {max_bytes:,} bytes of files per request. Send a smaller file (downscale it or export a PNG)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + FORM_OVERHEAD:
        raise HTTPException(413, f"upload is {int(declared):,} bytes; {too_big}")
    form = _FormParts(fields, max_files)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        await _stream_into(parser, request, max_bytes=max_bytes, too_big=too_big, grace_s=grace_s, min_rate=min_rate)
        parser.finalize()
    except MultipartParseError as err:
        raise HTTPException(400, f"the multipart body is malformed ({type(err).__name__}); {how}") from err
    if not form.parts:
        raise HTTPException(422, f"no `{fields[0]}` field in the form; {how}")
    return [(name, bytes(data)) for name, data in form.parts]


def _form_boundary(request: Request, how: str) -> bytes:
    """The multipart boundary of the request's Content-Type; 415 when it is not multipart/form-data, 400 when too long."""
    from python_multipart.multipart import parse_options_header

    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise HTTPException(415, f"the request body must be multipart/form-data, got {content_type.decode('latin-1')[:60]!r}; {how}")
    if len(params[b"boundary"]) > MAX_BOUNDARY:  # RFC 2046: at most 70 characters (a longer one made the parser fail with 500)
        raise HTTPException(
            400, f"the multipart boundary is {len(params[b'boundary'])} characters; at most {MAX_BOUNDARY} are allowed (RFC 2046); {how}"
        )
    return params[b"boundary"]


class _FormParts:
    """The multipart parser's callbacks: the parts named in ``fields`` kept as (file name, bytes), at most ``max_files``."""

    def __init__(self, fields: tuple[str, ...], max_files: int):
        self.fields, self.max_files = fields, max_files
        self.parts: list[tuple[str, bytearray]] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._keep = False

    def callbacks(self) -> dict:
        return {
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
        }

    def _on_header_field(self, data, start, end):
        self._field += data[start:end]

    def _on_header_value(self, data, start, end):
        key = self._field.lower()
        self._headers[key] = self._headers.get(key, b"") + data[start:end]

    def _on_header_end(self):
        self._field = b""

    def _on_headers_finished(self):
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._headers = {}
        self._keep = options.get(b"name", b"").decode("utf-8", "replace") in self.fields
        if self._keep:
            if len(self.parts) == self.max_files:
                raise HTTPException(413, f"a request may carry at most {self.max_files} files; send the rest in another request")
            self.parts.append((_clean_name(options.get(b"filename", b"").decode("utf-8", "replace")), bytearray()))

    def _on_part_data(self, data, start, end):
        if self._keep:
            self.parts[-1][1].extend(data[start:end])


async def _stream_into(parser, request: Request, *, max_bytes: int, too_big: str, grace_s: float, min_rate: float) -> None:
    """Feed the body to ``parser`` as it arrives: 413 past ``max_bytes`` (and the form's overhead), 408 when slower than
    ``min_rate`` bytes a second after ``grace_s``."""
    received, started, chunks = 0, time.monotonic(), request.stream()
    while True:
        wait = started + grace_s + received / min_rate - time.monotonic()  # the slowest pace allowed so far
        try:
            chunk = await asyncio.wait_for(anext(chunks), timeout=max(wait, 0.0))
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise HTTPException(
                408,
                f"the upload arrived too slowly ({received:,} bytes in {time.monotonic() - started:.0f} s); "
                f"after {grace_s:g} s a body must arrive at {min_rate:,} bytes/s or more. Send it again "
                "over a faster connection",
                headers={"Connection": "close"},
            ) from None
        received += len(chunk)
        if received > max_bytes + FORM_OVERHEAD:
            raise HTTPException(413, f"upload is over {received - len(chunk):,} bytes and still coming; {too_big}")
        parser.write(chunk)
