"""Runs in object storage (``s3://``, ``gs://``, any fsspec URL): list on the driver, read on the worker.

The driver lists the objects under a URL (names and sizes only) and lays them out as empty files in a local
*skeleton* directory, so that :func:`autopsy.importers.discover.find_runs` groups them into runs exactly as it groups
a local directory (its rules look at names and layout, never at contents). Each run then travels to a worker as the
relative keys of its objects; the worker copies those objects (bounded in size) into a temporary directory of its
own, runs the very importers a local run goes through (same salvage of cut-off files, nothing written to the
bucket), and writes the URL back over the temporary path in everything the report says. An object the worker may
not read is one :class:`~autopsy.runinfo.Damage` of that run, in one line; the run's other objects, and the other
runs, go on.

Credentials come from the standard chain of the filesystem on the worker (``AWS_ACCESS_KEY_ID``, ... for S3) or
from ``storage_options``; the endpoint from ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3``) is forwarded to the
workers, secrets are not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from autopsy.errors import AutopsyError, InputError, MissingDependencyError, UnreadableError, UsageError, first_line
from autopsy.importers.discover import MAX_FILES, RunFiles, find_runs
from autopsy.runinfo import Damage

__all__ = [
    "MIRROR_LIMIT",
    "RemoteRun",
    "is_url",
    "list_runs",
    "mirror",
    "parse_storage_options",
    "relocate",
    "storage_options_for",
]

MIRROR_LIMIT = 2 << 30  # checkpoint weights copied per run at most (logs are always copied): 2 GiB
_URL = re.compile(r"^(?P<protocol>[a-zA-Z][a-zA-Z0-9+.-]*)://")
_FILESYSTEM_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def is_url(spec: str) -> bool:
    """True for an fsspec URL other than ``file://`` and ``wandb://`` (those have their own roads)."""
    m = _URL.match(spec)
    return m is not None and m.group("protocol").lower() not in ("file", "wandb")


@dataclasses.dataclass(frozen=True)
class RemoteRun:
    """One run in object storage, as a worker receives it: relative keys under ``base``, no open handle."""

    base: str  # the URL the keys hang from, without a trailing slash
    root: str  # the run's directory (or file, for a log standing alone), relative to base
    files: tuple[tuple[str, str], ...]  # (importer kind, relative key)
    checkpoints: tuple[tuple[int, str], ...]  # (step, relative directory)
    weights: tuple[tuple[str, int], ...]  # (relative key, size): checkpoint weights the scan reads
    storage_options: tuple[tuple[str, Any], ...] = ()

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.storage_options)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options JSON`` -> a dict (a one-line :class:`UsageError` when it is not a JSON object)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--storage-options must be a JSON object: {first_line(exc)}") from None
    if not isinstance(value, dict):
        raise UsageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def storage_options_for(url: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options a worker opens ``url`` with: ``given``, plus the S3 endpoint from ``AWS_ENDPOINT_URL(_S3)``."""
    out = dict(given or {})
    protocol = url.split("://", 1)[0].lower()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint and "endpoint_url" not in out:
        if "endpoint_url" not in (out.get("client_kwargs") or {}):
            out["endpoint_url"] = endpoint
    return out


def _filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """``(fs, path)`` for ``url``; a missing filesystem package is a one-line error naming it."""
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError("fsspec is needed to read URLs: pip install 'autopsy[fleet]'") from None
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        package = _FILESYSTEM_PACKAGES.get(url.split("://", 1)[0].lower(), "the filesystem's package")
        raise MissingDependencyError(f"{package} is needed to read {url}: pip install {package} ({exc})") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"cannot open {url}: {first_line(exc)}") from None


def _listing(fs: Any, path: str, url: str) -> dict[str, int]:
    """Every object under ``path``: full path -> size (a one-line error when the listing itself fails)."""
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        raise InputError(f"no such file or directory: {url}") from None
    except (PermissionError, OSError) as exc:
        raise UnreadableError(f"cannot list {url}: {first_line(exc)}") from None
    except Exception as exc:  # botocore/aiohttp errors: the endpoint, the credentials
        raise UnreadableError(f"cannot list {url}: {type(exc).__name__}: {first_line(exc)}") from None
    if len(found) > MAX_FILES:
        raise UsageError(f"{url} holds over {MAX_FILES:,} objects: analyse narrower prefixes")
    return {str(k): int(v.get("size") or 0) for k, v in found.items() if v.get("type", "file") != "directory"}


def _plant(skeleton: Path, rel: str) -> Path | None:
    """An empty file at ``skeleton/rel`` (None for a key that would leave the skeleton)."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        return None
    path = skeleton.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def list_runs(url: str, *, storage_options: dict[str, Any] | None = None) -> list[tuple[str, RemoteRun]]:
    """The runs under ``url`` (name, :class:`RemoteRun`), grouped as a local directory of the same layout is."""
    import tempfile

    options = storage_options_for(url, storage_options)
    fs, path = _filesystem(url, options)
    path = path.rstrip("/")
    objects = _listing(fs, path, url)
    if not objects:
        raise InputError(f"no such file or directory: {url}")
    single = list(objects) == [path]
    base_path = path.rsplit("/", 1)[0] if single else path
    base = url.rstrip("/").rsplit("/", 1)[0] if single else url.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="autopsy-listing-") as tmp:
        skeleton = Path(tmp) / (base_path.rsplit("/", 1)[-1] or "bucket")
        skeleton.mkdir()
        sizes: dict[str, int] = {}
        for full, size in objects.items():
            rel = full[len(base_path) :].lstrip("/")
            if _plant(skeleton, rel) is not None:
                sizes[rel] = size
        target = skeleton / path.rsplit("/", 1)[-1] if single else skeleton
        runs = find_runs(target)
        weights: dict[str, list[tuple[str, int]]] = {}  # checkpoint dir -> the safetensors files in it
        for key in sorted(sizes):
            if key.endswith(".safetensors") and "/" in key:
                weights.setdefault(key.rsplit("/", 1)[0], []).append((key, sizes[key]))
        return [(r.name, _remote(r, skeleton, base, weights, options)) for r in runs]


def _remote(
    run: RunFiles, skeleton: Path, base: str, weights: dict[str, list[tuple[str, int]]], options: dict[str, Any]
) -> RemoteRun:
    def rel(p: Path) -> str:
        return p.relative_to(skeleton).as_posix()

    files = tuple((kind, rel(p)) for kind, paths in run.files.items() for p in paths)
    checkpoints = tuple(sorted((int(s), rel(d)) for s, d in run.checkpoints.items()))
    return RemoteRun(
        base=base,
        root=rel(run.root) if run.root != skeleton else "",
        files=files,
        checkpoints=checkpoints,
        weights=tuple(w for _, d in checkpoints for w in weights.get(d, ())),
        storage_options=tuple(sorted(options.items())),
    )


def _fetch(fs: Any, remote: str, local: Path) -> str | None:
    """Copy one object; the reason in one line when it cannot be read."""
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get_file(remote, str(local))
        return None
    except AutopsyError as exc:
        return str(exc)
    except (PermissionError, FileNotFoundError, OSError) as exc:
        return first_line(exc)
    except Exception as exc:  # the client's own errors (ClientError, aiohttp): one line for a person
        return f"{type(exc).__name__}: {first_line(exc)}"


def mirror(
    run: RemoteRun, dest: Path, *, name: str, limit: int = MIRROR_LIMIT
) -> tuple[RunFiles, list[Damage], list[str]]:
    """Copy the run's objects under ``dest`` (its logs always, checkpoint weights up to ``limit`` bytes).

    Returns the local :class:`RunFiles` (unreadable objects left out), the damage (one per object that could not be
    read, named by its URL) and notes.
    """
    fs, base_path = _filesystem(run.base, run.options)
    base_path = base_path.rstrip("/")
    damage: list[Damage] = []
    notes: list[str] = []
    files = RunFiles(name=name, root=dest / run.root if run.root else dest)
    for kind, key in run.files:
        problem = _fetch(fs, f"{base_path}/{key}", dest / key)
        if problem is None:
            files.add(kind, dest / key)
        else:
            damage.append(
                Damage(file=f"{run.base}/{key}", offset=None, problem=f"cannot read: {problem}", salvaged="nothing")
            )
    for step, key in run.checkpoints:
        (dest / key).mkdir(parents=True, exist_ok=True)
        files.checkpoints[step] = dest / key
    spent, skipped = 0, 0
    for key, size in run.weights:
        if spent + size > limit:
            skipped += 1
            continue
        spent += size
        problem = _fetch(fs, f"{base_path}/{key}", dest / key)
        if problem is not None:
            damage.append(
                Damage(file=f"{run.base}/{key}", offset=None, problem=f"cannot read: {problem}", salvaged="nothing")
            )
    if skipped:
        notes.append(f"{skipped} checkpoint weight file(s) over the {limit >> 20} MiB copy limit were not scanned")
    return files, damage, notes


_NOT_OURS = frozenset({"frame", "config", "summary"})  # the run's own data: what its logs say, never our paths


def relocate(obj: Any, old: str, new: str, *, anywhere: bool = True, _depth: int = 0) -> Any:
    """``obj`` with ``old`` rewritten to ``new`` in its strings (anywhere in them, or only at their start):
    dataclasses and dicts in place, lists/tuples rebuilt; a report's config, summary and frame are left alone (what
    the run's files say is not a path of ours). For a worker's own paths in a report about a URL or another
    directory."""
    if _depth > 40:
        return obj
    if isinstance(obj, str):
        if anywhere:
            return obj.replace(old, new) if old in obj else obj
        return new + obj[len(old) :] if obj.startswith(old) else obj

    def deeper(v: Any) -> Any:
        return relocate(v, old, new, anywhere=anywhere, _depth=_depth + 1)

    if isinstance(obj, list):
        obj[:] = [deeper(v) for v in obj]
        return obj
    if isinstance(obj, tuple):
        return type(obj)(deeper(v) for v in obj) if not hasattr(obj, "_fields") else obj
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = deeper(obj[k])
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.name not in _NOT_OURS:
                setattr(obj, f.name, deeper(getattr(obj, f.name)))
        return obj
    return obj
