"""Resumable, verified HTTP downloads (stdlib only).

What GEARS users trip over, and what this module refuses: an HTML error page saved as data, a
403 saved as data, a connection that dropped half-way and a file that looks complete anyway.
Bytes go to `<file>.part`; an interrupted download resumes from there with an HTTP Range request,
and the file gets its final name only once its length matches what the server announced.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from regina_cli import __version__
from regina_cli.errors import ReginaError
from regina_cli.io import WRITE_ERRNOS, check_free_space, output_error

# GEARS' own addresses (cell-gears 0.1.2, gears/pertdata.py `PertData.load`): zips holding
# `<name>/perturb_processed.h5ad`.
GEARS_URLS = {
    "norman": "https://dataverse.harvard.edu/api/access/datafile/6154020",
    "adamson": "https://dataverse.harvard.edu/api/access/datafile/6154417",
    "dixit": "https://dataverse.harvard.edu/api/access/datafile/6154416",
    "replogle_k562_essential": "https://dataverse.harvard.edu/api/access/datafile/7458695",
    "replogle_rpe1_essential": "https://dataverse.harvard.edu/api/access/datafile/7458694",
}

# GEARS' gene -> GO terms dict (cell-gears 0.1.2, gears/pertdata.py `PertData.__init__`, saved there
# as gene2go_all.pkl): the annotation its GO graph is built from.
GO_URL = "https://dataverse.harvard.edu/api/access/datafile/6153417"

CHUNK = 1 << 20
TIMEOUT_S = 60
PART_SUFFIX = ".part"
_HTML_START = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")

Log = Callable[[str], None]


def looks_like_html(head: bytes) -> bool:
    return head.lstrip()[:14].lower().startswith(_HTML_START)


def _total_size(response, offset: int) -> int | None:
    """Size of the whole file: from Content-Range on a 206, else Content-Length."""
    content_range = response.headers.get("Content-Range")
    if response.status == 206 and content_range:
        match = re.match(r"bytes\s+\d+-\d+/(\d+)", content_range)
        if match:
            return int(match.group(1))
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _open(url: str, offset: int):
    headers = {"User-Agent": f"regina/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return None  # our partial file is no prefix of the server's: start again
        hint = {
            401: "the server wants credentials",
            403: "the server refused access",
            404: "no file at that address",
        }.get(exc.code, "the server reported an error")
        raise ReginaError(
            f"download of {url} failed with HTTP {exc.code} ({hint}): check the address, or download "
            "the file another way and use `regina fetch NAME --from FILE`"
        ) from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReginaError(
            f"cannot reach {url} ({reason}): without internet, copy the file here and use "
            "`regina fetch NAME --from FILE`"
        ) from None


class _Reporter:
    """A rich progress bar on a terminal; a plain line every 10 % in logs."""

    def __init__(self, label: str, total: int | None, start: int, log: Log, bar: bool):
        self.label, self.total, self.log, self.next_pct = label, total, log, 10
        self.progress = None
        if bar:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            from regina_cli.terminal import ReadableConsole

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), console=ReadableConsole(stderr=True),
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(label, total=total, completed=start)

    def update(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done)
        elif self.total:
            pct = 100 * done // self.total
            if pct >= self.next_pct:
                self.log(f"{self.label}: {pct}% ({done / 1e6:.1f} of {self.total / 1e6:.1f} MB)")
                self.next_pct = (pct // 10 + 1) * 10

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def download(url: str, dest: Path, *, log: Log = print, progress: bool | None = None) -> Path:
    """Fetch `url` into `dest`, resuming from `dest.part`; return `dest` once complete.

    Refuses HTTP errors and HTML pages (removing what they sent); a dropped connection keeps the
    `.part` so that running the same command again resumes.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + PART_SUFFIX)
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(url, offset)
    if response is None:
        part.unlink()
        offset = 0
        response = _open(url, 0)
    with response:
        if offset and response.status != 206:
            log("the server ignored the resume request: downloading from the start")
            offset = 0
        elif offset:
            log(f"resuming {dest.name} from {offset / 1e6:.1f} MB")
        total = _total_size(response, offset)
        content_type = response.headers.get("Content-Type", "")
        first = response.read(CHUNK)
        if "text/html" in content_type or (offset == 0 and looks_like_html(first)):
            part.unlink(missing_ok=True)
            raise ReginaError(
                f"{url} answered with a web page, not a data file (an error or login page): "
                "check the address, or download the file another way and use --from"
            )
        if total is not None:
            check_free_space(part, total - offset)
        show_bar = sys.stderr.isatty() if progress is None else progress
        reporter = _Reporter(f"downloading {dest.name}", total, offset, log, show_bar)
        done = offset
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "ab" if offset else "wb") as handle:
                block = first
                while block:
                    handle.write(block)
                    done += len(block)
                    reporter.update(done)
                    block = response.read(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:  # our disk, not the connection
                raise output_error(part, exc) from None
            raise ReginaError(
                f"download of {url} broke off after {done / 1e6:.1f} MB ({exc.__class__.__name__}): "
                "run the same command again to resume"
            ) from None
        finally:
            reporter.close()
    if total is not None and done != total:
        if done > total:
            part.unlink()
        raise ReginaError(
            f"download of {url} is incomplete ({done} of {total} bytes): run the same command again "
            "to resume"
        )
    os.replace(part, dest)
    return dest
