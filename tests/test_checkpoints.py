"""Checkpoints: committed by the manifest, verified on load, never unpickled."""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import blake3
import pytest

from spotrun.checkpoints import MANIFEST, CheckpointCorrupt, CheckpointStore, _write_direct

SRC = Path(__file__).resolve().parents[1] / "src" / "spotrun"


def test_round_trip_and_layout(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    saved = store.save("job1", 2, 340, {"a.bin": b"x" * 1000, "state.json": b"{}"},
                       {"note": "hi"})
    assert saved.path == "jobs/job1/a0002-s000000340"
    assert saved.nbytes == 1002
    loaded = store.load(saved.path)
    assert loaded.step == 340 and loaded.files["a.bin"] == b"x" * 1000
    assert loaded.meta == {"note": "hi"}
    manifest = json.loads((tmp_path / saved.path / MANIFEST).read_text())
    assert manifest["files"]["a.bin"]["size"] == 1000
    assert manifest["attempt"] == 2 and manifest["job"] == "job1"


def _takes_o_direct(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("extra", [0, 4096, 12345], ids=["blocks", "a-block-more", "a-tail"])
def test_a_large_state_written_past_the_page_cache_reads_back_whole(
        tmp_path: Path, extra: int) -> None:
    # From 64 MiB on, files go to disk through one aligned buffer (O_DIRECT) and the last
    # partial block through the cache: every byte and the hash must come back as written.
    size = 64 * 2**20 + extra
    data = hashlib.sha256(str(extra).encode()).digest() * (size // 32) + b"t" * (size % 32)
    # The direct writer itself, where this file system takes O_DIRECT (ext4, xfs do).
    if _takes_o_direct(tmp_path):
        direct = tmp_path / "direct.bin"
        assert _write_direct(str(direct), memoryview(data))
        assert direct.read_bytes() == data
    store = CheckpointStore(str(tmp_path))
    saved = store.save("job1", 1, 7, {"state.bin": data, "small.json": b"{}"})
    on_disk = tmp_path / saved.path / "state.bin"
    assert on_disk.stat().st_size == size
    listing = json.loads((tmp_path / saved.path / MANIFEST).read_text())["files"]
    assert listing["state.bin"]["blake3"] == blake3.blake3(data).hexdigest()
    assert store.load(saved.path).files["state.bin"] == data
    with open(on_disk, "r+b") as fh:  # and damage is still found
        fh.seek(size - 1)
        fh.write(b"!")
    with pytest.raises(CheckpointCorrupt, match="blake3"):
        store.load(saved.path)


@pytest.mark.parametrize("damage, reason", [
    ("flip", "blake3 check"),
    ("truncate", "truncated"),
    ("no-manifest", "manifest is missing"),
    ("bad-manifest", "not valid JSON"),
    ("missing-file", "missing"),
])
def test_damage_is_detected_not_loaded(tmp_path: Path, damage: str, reason: str) -> None:
    store = CheckpointStore(str(tmp_path))
    saved = store.save("job1", 1, 10, {"t.bin": bytes(range(256)) * 10})
    directory = tmp_path / saved.path
    data = directory / "t.bin"
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[100] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-7])
    elif damage == "no-manifest":
        (directory / MANIFEST).unlink()
    elif damage == "bad-manifest":
        (directory / MANIFEST).write_text("{not json")
    else:
        data.unlink()
    with pytest.raises(CheckpointCorrupt, match=reason):
        store.load(saved.path)


def _record_sha256_instead(directory: Path) -> None:
    """Rewrite a manifest as spotrun wrote it before BLAKE3: a sha256 for every file."""
    manifest = json.loads((directory / MANIFEST).read_text())
    for name, info in manifest["files"].items():
        del info["blake3"]
        info["sha256"] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_an_earlier_release_wrote_with_sha256_still_loads(
        tmp_path: Path) -> None:
    # Workers of a fleet being upgraded resume the checkpoints of the release before.
    store = CheckpointStore(str(tmp_path))
    state = bytes(range(256)) * 4096
    saved = store.save("job1", 1, 10, {"t.bin": state, "state.json": b"{}"})
    _record_sha256_instead(tmp_path / saved.path)
    assert store.load(saved.path).files["t.bin"] == state
    raw = bytearray(state)
    raw[5] ^= 1
    (tmp_path / saved.path / "t.bin").write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupt, match=r"t\.bin fails its sha256 check"):
        store.load(saved.path)


def test_a_directory_checkpoint_with_sha256_restores_and_a_file_without_a_digest_is_refused(
        tmp_path: Path) -> None:
    source, store = tmp_path / "work", CheckpointStore(str(tmp_path / "store"))
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "model.txt").write_text("weights")
    saved = store.save_dir("job1", 1, 3, source)
    directory = tmp_path / "store" / saved.path
    _record_sha256_instead(directory)
    dest = tmp_path / "restored"
    dest.mkdir()
    store.restore_dir(saved.path, dest)
    assert (dest / "sub" / "model.txt").read_text() == "weights"
    manifest = json.loads((directory / MANIFEST).read_text())
    del manifest["files"]["files/sub/model.txt"]["sha256"]
    (directory / MANIFEST).write_text(json.dumps(manifest))
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(CheckpointCorrupt, match=r"no checksum for file files/sub/model\.txt"):
        store.restore_dir(saved.path, again)
    assert list(again.iterdir()) == []


def test_delete_and_delete_job(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    a = store.save("job1", 1, 1, {"x": b"1"})
    b = store.save("job1", 1, 2, {"x": b"2"})
    store.delete(a.path)
    assert not store.exists(a.path) and store.exists(b.path)
    model = store.save_model("job1", {"m": b"w"})
    store.delete_job("job1")
    assert not store.exists(b.path)
    assert store.load_model("job1").files == {"m": b"w"}
    assert model.path == "models/job1/a0001"


def test_bad_file_names_are_refused(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    for name in (MANIFEST, "../escape", ".hidden"):
        with pytest.raises(ValueError):
            store.save("j", 1, 1, {name: b""})


def test_nothing_in_the_package_unpickles() -> None:
    """Invariant 7: no pickle, and torch.load only ever with weights_only=True."""
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                assert not any(n in ("pickle", "cPickle", "dill") for n in names), path
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and \
                    kw["weights_only"].value is True, path
