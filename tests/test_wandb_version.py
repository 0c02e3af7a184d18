"""A ``.wandb`` log whose header names a version this reader does not know: read as version 0, and said."""

from __future__ import annotations

import shutil

import pytest

from autopsy.importers._leveldb_log import FILE_HEADER, LogStream, read_log
from helpers.paths import SHARED


def _real_log() -> bytes:
    found = sorted((SHARED / "real-logs" / "korean-re-klue").glob("wandb/*/run-*.wandb"))
    if not found:
        pytest.skip("no real .wandb file under ../shared/real-logs")
    return found[0].read_bytes()


@pytest.mark.parametrize("version", [0, 1, 255])
def test_an_unknown_version_byte_is_read_as_0_with_a_note(version):
    data = _real_log()
    assert data[:7] == FILE_HEADER
    changed = data[:6] + bytes([version]) + data[7:]
    got = read_log(changed)
    assert got.version == version
    assert got.records == read_log(data).records  # the same records as version 0
    if version:
        (note,) = got.notes
        assert f"version {version}" in note and "read as version 0" in note
    else:
        assert not got.notes
    assert LogStream(changed).notes == got.notes


def test_the_note_reaches_the_run(tmp_path):
    pytest.importorskip("wandb")
    import autopsy
    from autopsy.runinfo import run_info

    src = sorted((SHARED / "real-logs" / "korean-re-klue").glob("wandb/*"))
    if not src:
        pytest.skip("no real W&B run under ../shared/real-logs")
    run_dir = tmp_path / "wandb" / src[0].name
    shutil.copytree(src[0], run_dir)
    log = next(run_dir.glob("run-*.wandb"))
    data = log.read_bytes()
    log.write_bytes(data[:6] + b"\x07" + data[7:])
    notes = run_info(autopsy.load(tmp_path)).notes
    assert any("version 7" in n for n in notes), notes
