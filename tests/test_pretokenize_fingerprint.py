"""Defect 12: pre-tokenization resumes only over the very bytes it started on. An input edited in
place to the same size is detected (by its SHA-256) and refused, never continued into a mix of
shards of the old and the new text."""

import hashlib
import importlib
import json

import pytest

from tokenloom.data import DataError, pretokenize, read_manifest

pretokenize_module = importlib.import_module("tokenloom.data.pretokenize")
KWARGS = dict(shard_size=2, progress=False)


def write_corpus(path, n=7):
    lines = [{"parts": [{"type": "text", "text": f"a red circle and a blue square, line {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def edit_in_place(path, old="red", new="tan"):
    """Change one word on the last line, keeping the file's size."""
    assert len(old) == len(new)
    text = path.read_text()
    cut = text.rindex(old)
    edited = text[:cut] + new + text[cut + len(old):]
    assert len(edited.encode()) == len(text.encode()) and edited != text
    path.write_text(edited)


def shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.parquet"))}


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, shards):
    real = pretokenize_module._write_shard
    written = []

    def write(path, docs):
        if len(written) == shards:
            raise Interrupted("simulated interruption")
        written.append(path.name)
        return real(path, docs)

    monkeypatch.setattr(pretokenize_module, "_write_shard", write)
    return real


def test_an_input_is_hashed_in_the_pass_that_looks_for_refused_parts(tmp_path):
    path = tmp_path / "a.jsonl"
    data = b'{"text": "one"}\n\n{"text": "video, speech"}\n{"text": "no newline at the end"}'
    path.write_bytes(data)
    reader = pretokenize_module._JsonlInput(path, 0)
    reader.read_ahead(refuse_video=True, refuse_speech=True)  # the words alone are no video or speech part
    assert reader.identity()["sha256"] == hashlib.sha256(data).hexdigest()


def test_same_size_edit_of_a_partly_done_input_is_refused(pipe, tmp_path, monkeypatch):
    path = write_corpus(tmp_path / "a.jsonl")
    out = tmp_path / "shards"
    real = interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):
        pretokenize(path, pipe, out, **KWARGS)
    monkeypatch.setattr(pretokenize_module, "_write_shard", real)
    before, manifest = shard_bytes(out), read_manifest(out)
    assert len(before) == 1 and not manifest["complete"]
    assert manifest["settings"]["inputs"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    size = path.stat().st_size
    edit_in_place(path)
    assert path.stat().st_size == size
    with pytest.raises(DataError, match=r"differing: inputs: .*a\.jsonl changed content at the same size"):
        pretokenize(path, pipe, out, **KWARGS)
    # Nothing was added to the old shards, and the manifest still describes them.
    assert shard_bytes(out) == before and read_manifest(out) == manifest

    # overwrite starts over: exactly what a fresh run on the edited input gives.
    edited = pretokenize(path, pipe, out, overwrite=True, **KWARGS)
    fresh = pretokenize(path, pipe, tmp_path / "fresh", **KWARGS)
    assert edited == {**fresh, "out_dir": str(out)} and edited["complete"]
    assert shard_bytes(out) == shard_bytes(tmp_path / "fresh")


def test_same_size_edit_of_a_finished_input_is_refused_like_a_resize(pipe, tmp_path):
    path = write_corpus(tmp_path / "a.jsonl")
    out = tmp_path / "shards"
    done = pretokenize(path, pipe, out, **KWARGS)
    assert pretokenize(path, pipe, out, **KWARGS) == done  # unchanged: left alone
    before = shard_bytes(out)
    edit_in_place(path)
    with pytest.raises(DataError, match="changed content at the same size"):
        pretokenize(path, pipe, out, **KWARGS)
    assert shard_bytes(out) == before
    # A change of size was refused before this fix, and still is, naming the sizes.
    path.write_text(path.read_text() + json.dumps({"parts": [{"type": "text", "text": "one more"}]}) + "\n")
    with pytest.raises(DataError, match=r"differing: inputs: .*changed size \(\d+ -> \d+ bytes\)"):
        pretokenize(path, pipe, out, **KWARGS)


def test_manifest_without_fingerprints_is_not_trusted(pipe, tmp_path):
    path = write_corpus(tmp_path / "a.jsonl")
    out = tmp_path / "shards"
    pretokenize(path, pipe, out, **KWARGS)
    manifest = read_manifest(out)
    for entry in manifest["settings"]["inputs"]:
        del entry["sha256"]  # as a manifest written before inputs were fingerprinted
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no content fingerprint"):
        pretokenize(path, pipe, out, **KWARGS)
