"""Bad data never stops a stream: bad samples and unreadable shards are logged, counted and skipped, each shard once;
a stream whose shards are all unreadable (or that yields nothing for long) stops with one line naming a shard."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

log = logging.getLogger(__name__)


class NoUsableData(RuntimeError):
    """Every shard of a stream failed to read: there is nothing to train on (one line, naming a shard and why)."""


class SkipCounter:
    """Counts bad samples and unreadable shards skipped by this worker; each bad shard is logged and counted once,
    however often a resampled stream comes back to it."""

    def __init__(self, max_empty_shards: int, shards: int | None = None) -> None:
        self.count = 0
        self.url, self.opened, self.counted_shard = None, 0, 0  # the current shard, its number, the last bad one
        self.empty_shards = 0  # shards opened in a row without a single sample coming out
        self.max_empty_shards = max_empty_shards
        self.shards = shards  # distinct shards of the stream, when known
        self.bad: dict[str, str] = {}  # unreadable shard -> why (the first error)

    def skip(self, what: str, exn: Exception) -> bool:
        """Log and count one bad sample or unreadable shard; returns True so WebDataset continues."""
        self.count += 1
        log.warning("skipping bad %s (%d skipped so far): %s", what, self.count, exn)
        return True

    def handler(self, exn: Exception) -> bool:
        """Handler for shard-level errors (unreadable URL, failed pipe, truncated tar): a shard counts once."""
        if self.counted_shard == self.opened or self.url in self.bad:  # e.g. a truncated tar raises twice, or again
            return True
        self.counted_shard = self.opened
        self.bad[self.url] = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
        return self.skip(f"shard {self.url}", exn)

    def opening(self, url: str) -> None:
        """Called per shard; stops a stream whose shards are all unreadable, or that yields no sample for long."""
        if self.shards is not None and len(self.bad) >= self.shards:
            first, why = next(iter(self.bad.items()))
            raise NoUsableData(f"no sample can be read: all {self.shards} shard(s) are unreadable, "
                               f"e.g. {first}: {why}")
        self.url, self.opened = url, self.opened + 1
        self.empty_shards += 1
        if self.empty_shards > self.max_empty_shards:
            raise NoUsableData(f"no sample can be read: {self.empty_shards - 1} shards in a row gave no sample "
                               f"(last {url}); check the shard URLs")

    def got_samples(self, samples: Iterable[dict]) -> Iterator[dict]:
        """Pass samples through, noting that the current shard is readable."""
        for sample in samples:
            self.empty_shards = 0
            yield sample


def open_shards(shards: Iterable[dict], skips: SkipCounter) -> Iterator[dict]:
    """Open each shard URL (file, `pipe:`, http...) and close it once read (webdataset's opener never closes)."""
    for shard in shards:
        url = shard["url"]
        skips.opening(url)
        try:
            stream = wds.gopen(url, "rb")
        except Exception as exn:
            skips.handler(exn)
            continue
        try:
            yield {"url": url, "stream": stream}
        except GeneratorExit:  # the consumer stopped early: a pipe's SIGPIPE exit is no error
            try:
                stream.close()
            except Exception:
                pass
            raise
        try:
            stream.close()  # for `pipe:` this also checks the command's exit status
        except Exception as exn:
            skips.handler(exn)


def raw_samples(urls: list[str], skips: SkipCounter | None = None) -> Iterator[dict]:
    """Raw samples (bytes per field, ``__key__``, ``__url__``) of shards in order, each read once; bad shards and
    samples are skipped and counted in ``skips`` as the training stream does (a stream of only bad shards stops)."""
    skips = skips if skips is not None else SkipCounter(max_empty_shards=len(urls) + 1, shards=len(set(urls)))
    files = tar_file_expander(open_shards(({"url": u} for u in urls), skips), handler=skips.handler)
    yield from skips.got_samples(group_by_keys(files, handler=skips.handler))
