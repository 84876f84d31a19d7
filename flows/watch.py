"""`adaptflow watch DIR`: fingerprint a data folder by content; emit `adaptflow.dataset.updated` when it changes.

The fingerprint covers file names and contents (not times), so `touch` changes nothing. A file still being
written does not fire twice: the folder must look the same (names, sizes, modification times) over a settle
interval before it is fingerprinted. The last fingerprint per folder lives in a small JSON state file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tasks.errors import RunFailed, UserInputError
from tasks.modeling import cache_home

EVENT = "adaptflow.dataset.updated"
log = logging.getLogger("adaptflow.watch")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Name -> (size, mtime): cheap, to see whether anything is still being written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in _files(folder)}


def file_digests(folder: Path) -> dict[str, str]:
    """Name -> sha256 of the content."""
    digests = {}
    for path in _files(folder):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def fingerprint(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def state_file(folder: Path) -> Path:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache_home() / "watch" / f"{key}.json"


def settled(folder: Path, settle_seconds: float) -> dict[str, tuple[int, int]]:
    """Wait until the folder looks the same twice, `settle_seconds` apart (writers have finished)."""
    before = snapshot(folder)
    while True:
        time.sleep(settle_seconds)
        after = snapshot(folder)
        if after == before:
            return after
        before = after


def pending(folder: Path, settle_seconds: float, state: Path) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The change since the last fingerprint this watcher recorded, with the new file digests, or None."""
    settled(folder, settle_seconds)
    digests = file_digests(folder)
    previous = json.loads(state.read_text()) if state.exists() else {"fingerprint": None, "files": {}}
    current = fingerprint(digests)
    if current == previous["fingerprint"]:
        return None
    old = previous["files"]
    change = {
        "path": str(folder.resolve()),
        "fingerprint": current,
        "added": sorted(set(digests) - set(old)),
        "changed": sorted(n for n in digests if n in old and old[n] != digests[n]),
        "removed": sorted(set(old) - set(digests)),
    }
    return change, digests


def record(state: Path, change: dict[str, Any], digests: dict[str, str]) -> None:
    """Remember a change as seen: only once its event was accepted, or the retrain it asks for never happens."""
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"fingerprint": change["fingerprint"], "files": digests}))


def check(folder: Path, settle_seconds: float = 1.0, state: Path | None = None) -> dict[str, Any] | None:
    """Compare the folder with its last fingerprint; return the change (and remember it), or None."""
    state = state or state_file(folder)
    found = pending(folder, settle_seconds, state)
    if found is None:
        return None
    record(state, *found)
    return found[0]


def emit(change: dict[str, Any]) -> None:
    """The Prefect event a deployment trigger listens for (resource: the folder, payload: what changed).

    Raises:
        RunFailed: the Prefect API does not answer: the event would be lost (Prefect's events worker only logs).
    """
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
        url = client.api_url
    if problem is not None:
        raise RunFailed(
            f"the Prefect API at {url} does not answer ({type(problem).__name__}): the change of {change['path']} "
            "was not sent and is not recorded; start the server (or set PREFECT_API_URL) and watch again"
        )
    emit_event(
        event=EVENT,
        resource={
            "prefect.resource.id": f"adaptflow.dataset.{hashlib.sha256(change['path'].encode()).hexdigest()[:12]}",
            "prefect.resource.name": change["path"],
            "adaptflow.fingerprint": change["fingerprint"],
        },
        payload=change,
    )
    EventsWorker.drain_all(timeout=30)  # events go out on a background thread: send before the process exits


def watch(folder: Path, once: bool, interval: float = 10.0, settle_seconds: float = 1.0) -> list[dict[str, Any]]:
    """Check now (and every `interval` seconds unless `once`), emitting an event per change.

    Raises:
        UserInputError: DIR is not a folder.
        RunFailed: the Prefect API does not answer (the change stays pending for the next check).
    """
    if not folder.is_dir():
        raise UserInputError(f"DIR: not a folder: {folder}")
    if not os.environ.get("PREFECT_API_URL"):
        log.warning("PREFECT_API_URL is not set: events go nowhere a deployment listens; point it at your server")
    changes = []
    state = state_file(folder)
    while True:
        found = pending(folder, settle_seconds, state)
        if found:
            change = found[0]
            try:
                emit(change)
            except RunFailed as exc:
                if once:
                    raise
                log.warning("%s; trying again in %.0f s", exc, interval)  # still pending: sent when the API is back
            else:
                record(state, *found)
                log.info("%s changed (%s): event %s emitted", folder, _summary(change), EVENT)
                changes.append(change)
        if once:
            return changes
        time.sleep(interval)


def _summary(change: dict[str, Any]) -> str:
    return ", ".join(f"{len(change[k])} {k}" for k in ("added", "changed", "removed") if change[k]) or "first look"
