"""Fetching one URL from a dataset mirror: streamed with a progress bar, transient errors
retried with backoff inside a time budget, failures said in a few words.

Used by the download stage (dlilabs.download), which decides which mirrors to try.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pooch
import requests

log = logging.getLogger("dlilabs.download")

BACKOFF_S = 0.5  # first pause between tries of one URL, doubled at each retry
MIN_TRY_S = 0.5  # a try with less time than this could not even connect: skip it
# Worth another try: no connection, no answer in time, a transfer cut short, a busy server.
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
RETRY_STATUS = {429, 500, 502, 503, 504}


class FetchError(Exception):
    """One URL could not be fetched; the message says why in a few words."""


class Budget:
    """Seconds still allowed for waiting on mirrors, each mirror getting a fair share. Only
    tries that received no data are charged (and the pauses between tries): a slow download
    that is making progress is never cut short."""

    def __init__(self, seconds: float) -> None:
        self.total = self.share = seconds

    def charge(self, seconds: float) -> None:
        self.total -= seconds
        self.share -= seconds


def get(url: str, path: Path, retries: int, timeout: float, budget: Budget) -> None:
    """Stream `url` into `path` with pooch (progress bar), retrying transient errors with
    backoff while the budget allows; raise FetchError saying why it failed."""
    tries, last = int(retries) + 1, "not tried: earlier mirrors used up the time budget"
    for attempt in range(tries):
        pause = BACKOFF_S * 2 ** (attempt - 1) if attempt else 0.0
        if (limit := min(float(timeout), budget.share - pause)) < MIN_TRY_S:
            break
        time.sleep(pause)
        budget.charge(pause)
        started = time.monotonic()
        try:
            pooch.HTTPDownloader(progressbar=True, timeout=limit, chunk_size=1 << 16)(
                url, str(path), None
            )
            return
        except requests.HTTPError as error:
            last = describe(error, limit)
            if error.response is None or error.response.status_code not in RETRY_STATUS:
                raise FetchError(last) from error  # 404 and friends: retrying will not help
        except TRANSIENT as error:
            last = describe(error, limit)
        except requests.RequestException as error:  # a malformed URL, too many redirects...
            raise FetchError(describe(error, limit)) from error
        if not path.exists() or path.stat().st_size == 0:
            budget.charge(time.monotonic() - started)
        log.warning("%s: %s (try %d of %d)", url, last, attempt + 1, tries)
    raise FetchError(last)


def describe(error: Exception, limit: float) -> str:
    """A few words on why a request failed, instead of urllib3's nested repr."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code} {error.response.reason}"
    if isinstance(error, requests.ConnectTimeout):
        return f"no connection within {limit:.1f} s"
    if isinstance(error, requests.ReadTimeout) or "Read timed out" in str(error):
        return f"connected, but no data for {limit:.1f} s"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "transfer cut short (the connection closed before the end of the file)"
    reason = re.search(r"\[Errno [-\d]+\] ([^'\")]+)", str(error))
    return f"cannot connect: {reason.group(1)}" if reason else f"{type(error).__name__}: {error}"
