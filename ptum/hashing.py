"""SHA-256 of bytes, of a file (streamed; memoized per process with `sha256_file_cached`) and of
the files of a directory, and the check of a file against its recorded hash. The one place ptum
hashes its outputs; torch-free (`ptum embed` uses it too)."""

from __future__ import annotations

import hashlib
from pathlib import Path


class HashMismatch(ValueError):
    """A file whose bytes are not the ones recorded when it was written (one-line message)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# (resolved path, size, mtime_ns) -> SHA-256 of the files hashed by this process.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file_cached(path: Path) -> str:
    """`sha256_file`, computed once per process for a file whose path, size and modification
    time (ns) are unchanged: a grid that loads the same data once per cell hashes it once.
    A rewrite that keeps both size and mtime_ns escapes the memo; ptum's writers never do."""
    path = Path(path)
    key = _stat_key(path)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = sha256_file(path)
    if _stat_key(path) == key:  # not rewritten while it was read
        _DIGESTS[key] = digest
    return digest


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def sha256_files(directory: Path) -> dict[str, str]:
    """{name: SHA-256} of every file directly in `directory`, in name order (a manifest)."""
    return {p.name: sha256_file(p) for p in sorted(Path(directory).iterdir()) if p.is_file()}


def verify_file(path: Path, expected: str, recorded_in: Path | str, rerun: str) -> None:
    """Raise HashMismatch (or FileNotFoundError) unless `path` hashes to `expected`, the SHA-256
    that `recorded_in` holds for it; `rerun` says what rebuilds the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; re-run {rerun}")
    check_digest(path, sha256_file(path), expected, recorded_in, f"re-run {rerun}")


def check_digest(path: Path, got: str, expected: str, recorded_in: Path | str, fix: str) -> None:
    """Raise HashMismatch, one line naming `path`, `recorded_in` and `fix`, unless `got` (the
    SHA-256 of `path`) is `expected`."""
    if got != expected:
        raise HashMismatch(
            f"{path}: SHA-256 {got[:12]}... differs from {expected[:12]}... recorded in "
            f"{recorded_in} (modified or corrupt); {fix}"
        )
