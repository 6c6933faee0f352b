"""Raw JSONL reading, pre-tokenization into shards, packing and context dropout."""

import importlib
import json
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tokenloom.data import (
    IGNORE_INDEX,
    PAD_DOCUMENT,
    BatchLoader,
    DataError,
    DataSummary,
    DataWarning,
    LengthBucketSampler,
    ShardDataset,
    context_dropout,
    non_pad_fraction,
    pack,
    plan_rows,
    pretokenize,
    read_jsonl,
    read_manifest,
)
from tokenloom.data.pretokenize import LengthWarning
from tokenloom.document import Document, ImagePart, TextPart, Turn

# The package exports the function `pretokenize`, which hides the module of the same name.
pretokenize_module = importlib.import_module("tokenloom.data.pretokenize")


def write_images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (40, 36), (60 * i % 256, 255 - 50 * i, 90))
        image.paste((255, 255, 255), (5 * i, 4, 5 * i + 12, 20))
        image.save(folder / f"im{i}.png")


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def corpus_lines(n, n_images=4):
    """Alternating roleless caption+image, chat with an image answer, and text-only documents."""
    lines = []
    for i in range(n):
        image = {"type": "image", "path": f"img/im{i % n_images}.png"}
        if i % 3 == 0:
            lines.append({"parts": [{"type": "text", "text": f"a red circle number {i}"}, image]})
        elif i % 3 == 1:
            lines.append({"messages": [{"role": "user", "content": f"Draw shape {i}"},
                                       {"role": "assistant", "content": [dict(image, width=16, height=24)]}]})
        else:
            lines.append({"parts": [{"type": "text", "text": "What color is the triangle? " * (1 + i % 4)}]})
    return lines


# --------------------------------------------------------------------------- raw JSONL

GOOD = {"parts": [{"type": "text", "text": "hello"}, {"type": "image", "path": "img/im0.png"}]}
BAD_LINES = {
    "not json": ('{"parts": [', "not valid JSON"),
    "unknown key": ({"parts": [], "colour": "red"}, "unknown key 'colour'"),
    "unknown part type": ({"parts": [{"type": "audio", "path": "x.wav"}]}, "unknown part type 'audio'"),
    "unknown part key": ({"parts": [{"type": "text", "text": "a", "lang": "en"}]}, "unknown key 'lang'"),
    "missing image": ({"parts": [{"type": "image", "path": "img/nope.png"}]}, "nope.png does not exist"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    "bad width": ({"parts": [{"type": "image", "path": "img/im0.png", "width": -3}]}, "width must be a positive"),
    "no parts": ({"messages": []}, "no parts"),
    "both layouts": ({"parts": [], "messages": []}, "exactly one of"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_line_raises_with_file_and_line(tmp_path, case):
    write_images(tmp_path / "img", 1)
    bad, reason = BAD_LINES[case]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", bad])
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message  # line numbers count the blank line
    assert reason in message


def test_malformed_lines_skipped_warned_and_counted(tmp_path):
    write_images(tmp_path / "img", 1)
    bad = [line for line, _ in BAD_LINES.values()]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, *bad, GOOD, "   "])
    summary = DataSummary()
    with pytest.warns(DataWarning) as record:
        docs = list(read_jsonl(path, on_error="skip", summary=summary))
    assert [n for n, _ in docs] == [1, len(bad) + 2]
    assert summary.skipped == len(bad) and summary.documents == 2 and summary.lines == len(bad) + 2
    assert len(record) == len(bad)
    for k, w in enumerate(record):
        assert f"{path}:{k + 2}: " in str(w.message)
    assert summary.errors[0].startswith(f"{path}:2: ")


def test_parsed_document_resolves_images_and_roles(tmp_path):
    write_images(tmp_path / "img", 2)
    path = write_jsonl(tmp_path / "d.jsonl", [corpus_lines(2)[1]])
    [(line, doc)] = list(read_jsonl(path))
    assert line == 1
    assert [t.role for t in doc.turns] == ["user", "assistant"]
    assert doc.turns[0].parts == [TextPart("Draw shape 1")]
    [image] = doc.images
    assert image.path == tmp_path / "img" / "im1.png" and (image.width, image.height) == (16, 24)


# --------------------------------------------------------------------------- pre-tokenization


def test_pretokenize_encodes_documents_like_the_pipeline(pipe, tmp_path):
    write_images(tmp_path / "img")
    path = write_jsonl(tmp_path / "d.jsonl", corpus_lines(6))
    summary = pretokenize(path, pipe, tmp_path / "shards", shard_size=4, progress=False)
    assert summary["documents"] == 6 and summary["shards"] == 2 and summary["complete"]
    ds = ShardDataset(tmp_path / "shards")
    assert len(ds) == 6 and ds.num_tokens == summary["tokens"]
    # Document 1: a chat whose answer is a 16x24 image.
    codes = pipe.image_tokenizer.encode([Image.open(tmp_path / "img" / "im1.png")], width=16, height=24)[0]
    expected = pipe.format.encode(Document([Turn("user", [TextPart("Draw shape 1")]),
                                            Turn("assistant", [ImagePart(codes)])]))
    ids, mask = ds[1]
    assert ids.tolist() == expected.ids and mask.tolist() == expected.loss_mask
    assert codes.shape == (3, 2)
    # Default image size for parts without width/height.
    doc0 = pipe.format.decode(ds[0][0])
    assert doc0.text == "a red circle number 0" and doc0.images[0].codes.shape == (4, 4)


def test_file_that_is_not_an_image(pipe, tmp_path):
    write_images(tmp_path / "img")
    (tmp_path / "img" / "fake.png").write_text("this is not a PNG")
    lines = corpus_lines(3)
    lines[1]["messages"][1]["content"][0]["path"] = "img/fake.png"
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: cannot load image .*fake\.png"):
        pretokenize(path, pipe, tmp_path / "a", progress=False)
    with pytest.warns(DataWarning, match=rf"{re.escape(str(path))}:2: cannot load image"):
        summary = pretokenize(path, pipe, tmp_path / "b", on_error="skip", progress=False)
    assert summary["skipped"] == 1 and summary["documents"] == 2
    assert read_manifest(tmp_path / "b")["counts"]["errors"][0].startswith(f"{path}:2:")


def test_too_long_documents_are_skipped_or_truncated(pipe, tmp_path):
    write_images(tmp_path / "img")
    path = write_jsonl(tmp_path / "d.jsonl", corpus_lines(6))
    with pytest.warns(LengthWarning, match="exceeds max_length 30"):
        skipped = pretokenize(path, pipe, tmp_path / "s", max_length=30, progress=False)
    lengths = ShardDataset(tmp_path / "s").lengths
    assert skipped["too_long"] > 0 and skipped["documents"] == 6 - skipped["too_long"]
    assert lengths.max() <= 30
    with pytest.warns(LengthWarning):
        cut = pretokenize(path, pipe, tmp_path / "t", max_length=30, truncate=True, progress=False)
    assert cut["documents"] == 6 and cut["truncated"] == skipped["too_long"]
    assert ShardDataset(tmp_path / "t").lengths.max() == 30


def test_interrupted_pretokenize_resumes_to_identical_shards(pipe, tmp_path, monkeypatch):
    write_images(tmp_path / "img")
    lines = corpus_lines(17)
    lines.insert(5, "{broken")  # a skipped line before the interruption: counted once
    lines.insert(14, {"parts": [{"type": "video"}]})  # and one after it
    inputs = [write_jsonl(tmp_path / "a.jsonl", lines[:9]), write_jsonl(tmp_path / "b.jsonl", lines[9:])]
    kwargs = dict(shard_size=3, image_batch_size=2, on_error="skip", progress=False)
    warnings.simplefilter("ignore", DataWarning)
    full = pretokenize(inputs, pipe, tmp_path / "full", **kwargs)

    real = pretokenize_module._write_shard
    written = []

    class Interrupted(Exception):
        pass

    def crash_after_two(path, docs):
        if len(written) == 2:
            raise Interrupted("simulated interruption")
        written.append(path.name)
        return real(path, docs)

    monkeypatch.setattr(pretokenize_module, "_write_shard", crash_after_two)
    with pytest.raises(Interrupted):
        pretokenize(inputs, pipe, tmp_path / "resumed", **kwargs)
    partial = read_manifest(tmp_path / "resumed")
    assert not partial["complete"] and len(partial["shards"]) == 2
    assert not list((tmp_path / "resumed").glob(".*.tmp"))  # no half-written shard left
    monkeypatch.setattr(pretokenize_module, "_write_shard", real)
    resumed = pretokenize(inputs, pipe, tmp_path / "resumed", **kwargs)

    assert resumed == {**full, "out_dir": str(tmp_path / "resumed")}
    assert full["skipped"] == 2 and full["documents"] == 17 and full["shards"] == 6
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in names:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    # A finished directory is left alone; other settings are refused.
    assert pretokenize(inputs, pipe, tmp_path / "full", **kwargs) == full
    with pytest.raises(DataError, match="shard_size"):
        pretokenize(inputs, pipe, tmp_path / "full", **{**kwargs, "shard_size": 4})


# --------------------------------------------------------------------------- packing


def random_docs(rng, lengths, vocab_size, bos=0):
    docs = []
    for n in lengths:
        ids = rng.integers(11, vocab_size, n)
        ids[0] = bos
        mask = rng.random(n) < 0.7
        mask[0] = False
        docs.append((ids, mask))
    return docs


def test_packed_rows_keep_documents_apart(pipe):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, [17, 9, 30, 5, 12, 24, 3], pipe.vocab.size)
    batch = pack(docs, seq_len=32, pad_id=pipe.vocab.pad)
    inputs, labels, doc_ids = batch["input_ids"], batch["labels"], batch["document_ids"]
    assert inputs.shape[1] == 32 and inputs.shape[0] < len(docs)  # several documents share rows
    model = pipe.model.eval()
    with torch.no_grad():
        packed = model(inputs, document_ids=doc_ids)
    seen = []
    for b in range(inputs.shape[0]):
        row_docs = [d for d in doc_ids[b].unique().tolist() if d != PAD_DOCUMENT]
        assert row_docs == list(range(1, len(row_docs) + 1))
        for d in row_docs:
            where = (doc_ids[b] == d).nonzero().squeeze(1)
            start, n = int(where[0]), len(where)
            assert where.tolist() == list(range(start, start + n))  # contiguous
            ids = inputs[b, start:start + n]
            k = next(i for i, (x, _) in enumerate(docs) if len(x) == n and np.array_equal(x, ids.numpy()))
            seen.append(k)
            with torch.no_grad():
                alone = model(ids[None])[0]
            torch.testing.assert_close(packed[b, start:start + n], alone, atol=1e-5, rtol=1e-4)
            mask = docs[k][1]
            expected = [int(ids[i + 1]) if mask[i + 1] else IGNORE_INDEX for i in range(n - 1)] + [IGNORE_INDEX]
            assert labels[b, start:start + n].tolist() == expected  # last token: boundary, never trained
        pad = doc_ids[b] == PAD_DOCUMENT
        assert (labels[b][pad] == IGNORE_INDEX).all() and (inputs[b][pad] == pipe.vocab.pad).all()
    assert sorted(seen) == list(range(len(docs)))


def test_non_pad_fraction_counts_document_tokens(pipe):
    docs = random_docs(np.random.default_rng(1), [10, 6, 12, 3], pipe.vocab.size)
    batch = pack(docs, seq_len=16, pad_id=pipe.vocab.pad)
    # First-fit decreasing: [12, 3] and [10, 6] -> 31 tokens in 2 x 16 positions.
    assert batch["input_ids"].shape == (2, 16)
    assert batch["num_tokens"] == 31 and non_pad_fraction(batch) == pytest.approx(31 / 32)
    assert batch["num_targets"] == int((batch["labels"] != IGNORE_INDEX).sum())
    one_per_row = pack(docs[:1], seq_len=16, pad_id=pipe.vocab.pad)
    assert non_pad_fraction(one_per_row) == pytest.approx(10 / 16)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=0, max_size=60), st.integers(40, 64))
def test_plan_rows_places_every_document_once_within_capacity(lengths, seq_len):
    rows = plan_rows(lengths, seq_len)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= seq_len for row in rows)
    # First fit: a later row's documents never fit the room an earlier row has left.
    sums = [sum(lengths[i] for i in row) for row in rows]
    assert all(sums[i] + min(lengths[k] for k in rows[j]) > seq_len
               for i in range(len(rows)) for j in range(i + 1, len(rows)))


def test_sampler_is_deterministic_and_resumable(pipe):
    lengths = np.random.default_rng(2).integers(3, 40, 101)
    make = lambda: LengthBucketSampler(lengths, seq_len=48, batch_size=4, seed=5, window=16)  # noqa: E731
    it = iter(make())
    first = [next(it) for _ in range(30)]  # several epochs
    again = iter(make())
    assert [next(again) for _ in range(30)] == first
    flat = [i for batch in first[:8] for row in batch for i in row]
    assert len(set(flat)) == len(flat)  # no repeats within the first epoch
    sampler = make()
    it = iter(sampler)
    for _ in range(11):
        next(it)
    state = sampler.state_dict()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    it = iter(resumed)
    assert [next(it) for _ in range(19)] == first[11:]
    other = LengthBucketSampler(lengths, seq_len=48, batch_size=4, seed=6, window=16)
    assert [next(iter(other)) for _ in range(1)] != first[:1]
    with pytest.raises(DataError, match="another dataset"):
        LengthBucketSampler(lengths[:-1], seq_len=48, batch_size=4, seed=5, window=16).load_state_dict(state)


def test_sampler_without_packing_buckets_by_length():
    lengths = np.random.default_rng(3).integers(2, 100, 64)
    sampler = LengthBucketSampler(lengths, seq_len=100, batch_size=8, seed=0, window=64, packing=False)
    batches = list(zip(range(8), sampler))
    spread = [np.ptp(lengths[[row[0] for row in batch]]) for _, batch in batches]
    assert all(len(row) == 1 for _, batch in batches for row in batch)
    assert max(spread) < np.ptp(lengths) / 2  # neighbours in a batch have similar lengths


# --------------------------------------------------------------------------- context dropout


def chat_with_two_images(pipe):
    a, b = np.arange(16).reshape(4, 4) % 64, np.arange(16, 32).reshape(4, 4) % 64
    doc = Document.chat([("user", [TextPart("Draw two shapes"), ImagePart(a)]),
                         ("assistant", [TextPart("here"), ImagePart(b), TextPart("done")])])
    enc = pipe.format.encode(doc)
    return np.array(enc.ids), np.array(enc.loss_mask)


def test_context_dropout_replaces_exactly_the_context_before_an_image(pipe):
    v = pipe.vocab
    ids, mask = chat_with_two_images(pipe)
    begins = np.flatnonzero(ids == v.image_begin)
    assert len(begins) == 2
    prefix = pipe.unconditional_prompt()
    assert prefix == [v.bos, v.uncond]
    rng = np.random.default_rng(0)
    out_ids, out_mask = context_dropout(ids, mask, image_begin=v.image_begin, uncond_prefix=prefix, p=1.0, rng=rng)
    cut = begins[-1]  # the last image's context holds everything before it, first image included
    assert out_ids.tolist() == [v.bos, v.uncond] + ids[cut:].tolist()
    assert out_mask.tolist() == [False, False] + mask[cut:].tolist()
    for seed in range(20):
        same = context_dropout(ids, mask, image_begin=v.image_begin, uncond_prefix=prefix, p=0.0,
                               rng=np.random.default_rng(seed))
        assert same[0].tolist() == ids.tolist() and same[1].tolist() == mask.tolist()
    # At p=0.5 the first image alone is sometimes picked: then only its own context goes.
    outcomes = set()
    for seed in range(40):
        out, _ = context_dropout(ids, mask, image_begin=v.image_begin, uncond_prefix=prefix, p=0.5,
                                 rng=np.random.default_rng(seed))
        outcomes.add(len(out))
        assert out.tolist() in ([*ids], [v.bos, v.uncond, *ids[begins[0]:]], [v.bos, v.uncond, *ids[cut:]])
    assert len(outcomes) == 3


def test_context_dropout_cuts_a_video_before_it_never_between_its_frames(pipe):
    from tokenloom.document import VideoPart

    v = pipe.vocab
    rng = np.random.default_rng(3)
    video = VideoPart(rng.integers(0, v.codebook_size, (3, 2, 2)))
    doc = Document.chat([("user", [TextPart("a red circle moves")]), ("assistant", [video, TextPart("ok")])])
    enc = pipe.format.encode(doc)
    ids, mask = np.array(enc.ids), np.array(enc.loss_mask)
    start = int(np.flatnonzero(ids == v.video_begin)[0])
    assert (ids == v.image_begin).sum() == 3
    for seed in range(20):
        out, out_mask = context_dropout(ids, mask, image_begin=v.image_begin, uncond_prefix=[v.bos, v.uncond], p=1.0,
                                        rng=np.random.default_rng(seed), video=(v.video_begin, v.video_end))
        assert out.tolist() == [v.bos, v.uncond, *ids[start:]]  # what the engine's guidance row sees
        assert out_mask.tolist() == [False, False, *mask[start:]]


def test_loader_applies_context_dropout_deterministically(pipe, tmp_path):
    write_images(tmp_path / "img")
    path = write_jsonl(tmp_path / "d.jsonl", corpus_lines(12))
    pretokenize(path, pipe, tmp_path / "s", progress=False)
    ds = ShardDataset(tmp_path / "s")
    v = pipe.vocab

    def batches(p, n=4, state=None):
        sampler = LengthBucketSampler(ds.lengths, seq_len=96, batch_size=2, seed=1, window=8)
        loader = BatchLoader(ds, sampler, pad_id=v.pad, image_begin=v.image_begin,
                             uncond_prefix=pipe.unconditional_prompt(), context_dropout=p)
        if state:
            loader.load_state_dict(state)
        it = iter(loader)
        return [next(it) for _ in range(n)], loader.state_dict()

    def documents(batch):
        out = []
        for b in range(batch["input_ids"].shape[0]):
            for d in batch["document_ids"][b].unique().tolist():
                if d != PAD_DOCUMENT:
                    out.append(batch["input_ids"][b][batch["document_ids"][b] == d].tolist())
        return out

    never, _ = batches(0.0)
    always, _ = batches(1.0)
    originals = {tuple(ds[i][0].tolist()) for i in range(len(ds))}
    with_image = 0
    for batch in never:
        assert all(tuple(doc) in originals for doc in documents(batch))
    for batch in always:
        for doc in documents(batch):
            if v.image_begin in doc:
                with_image += 1
                assert doc[:3] == [v.bos, v.uncond, v.image_begin]
            else:
                assert tuple(doc) in originals
    assert with_image > 0
    half, _ = batches(0.5, n=6)
    again, _ = batches(0.5, n=6)
    _, state = batches(0.5, n=2)
    resumed, _ = batches(0.5, n=4, state=json.loads(json.dumps(state)))
    for x, y in zip(half, again):
        assert torch.equal(x["input_ids"], y["input_ids"])
    for x, y in zip(half[2:], resumed):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_pretokenize_command(pipe, tmp_path, capsys):
    from tokenloom.cli import main as cli

    write_images(tmp_path / "img")
    path = write_jsonl(tmp_path / "d.jsonl", [*corpus_lines(3), "oops"])
    pipe.save_pretrained(tmp_path / "model")
    args = [str(tmp_path / "model"), str(tmp_path / "s"), str(path)]
    assert cli(["pretokenize", *args]) == 2
    assert f"{path}:4: not valid JSON" in capsys.readouterr().err
    with pytest.warns(DataWarning):
        assert cli(["pretokenize", *args, "--skip-errors"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["documents"] == 3 and out["skipped"] == 1 and out["complete"]

