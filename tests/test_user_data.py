"""Users' own data: a Hugging Face imagefolder directory and a `datasets.Dataset` of image-text pairs
pre-tokenize to the documents of the equivalent JSONL (captioning, text to image, or both), resume
exactly, and a missing or unreadable image is an error naming the file and the metadata line before
anything is written."""

import importlib
import json
import re

import pytest
from PIL import Image

from tokenloom.cli import main as cli
from tokenloom.data import DataError, DataWarning, ShardDataset, pretokenize, read_manifest
from tokenloom.data.pairs import read_imagefolder
from tokenloom.formats import resolution_prompt
from tokenloom.pipeline import random_pipeline

datasets = pytest.importorskip("datasets")
pretokenize_module = importlib.import_module("tokenloom.data.pretokenize")

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}
TEXTS = {name: f"a {name} square" for name in COLORS}


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=32)


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "pipe"
    pipe.save_pretrained(path)
    return path


def make_folder(root, names=tuple(COLORS), column="text", metadata="metadata.jsonl"):
    """An imagefolder: images under img/ and a metadata file naming them, one row per image."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(COLORS):
        image = Image.new("RGB", (40, 48), "white")
        image.paste(COLORS[name], (4 + 3 * i, 6, 30, 34))
        image.save(root / "img" / f"{name}.png")
    rows = [{"file_name": f"img/{name}.png", column: TEXTS[name]} for name in names]
    if metadata.endswith(".csv"):
        (root / metadata).write_text("file_name," + column + "\n" + "".join(f"{r['file_name']},{r[column]}\n"
                                                                           for r in rows))
    else:
        (root / metadata).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def equivalent_jsonl(path, folder, task, prompt="Describe the image."):
    """What a user would write as JSONL for the same pairs: caption then text-to-image documents."""
    lines = []
    for name in COLORS:
        image = {"type": "image", "path": str(folder / "img" / f"{name}.png"), "width": 32, "height": 32}
        if task in ("caption", "both"):
            lines.append({"messages": [{"role": "user", "content": [image, {"type": "text", "text": prompt}]},
                                       {"role": "assistant", "content": [{"type": "text", "text": TEXTS[name]}]}]})
        if task in ("t2i", "both"):
            text = resolution_prompt(TEXTS[name], 32, 32)  # the random pipeline prompts with the resolution
            lines.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": [image]}]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def documents(directory):
    ds = ShardDataset(directory)
    return [(ids.tolist(), mask.tolist()) for ids, mask in (ds[i] for i in range(len(ds)))]


@pytest.mark.parametrize("task", ["caption", "t2i", "both"])
def test_imagefolder_and_dataset_make_the_documents_of_the_equivalent_jsonl(pipe, tmp_path, task):
    folder = make_folder(tmp_path / "folder")
    expected = pretokenize(equivalent_jsonl(tmp_path / "same.jsonl", folder, task), pipe, tmp_path / "jsonl",
                           progress=False)
    assert expected["documents"] == (8 if task == "both" else 4)
    want = documents(tmp_path / "jsonl")

    summary = pretokenize(folder, pipe, tmp_path / "folder-shards", task=task, shard_size=3, progress=False)
    assert documents(tmp_path / "folder-shards") == want
    assert summary["lines"] == 4 and summary["documents"] == len(want)
    if task != "caption":
        assert summary["image_sizes"] == {"32x32": len(want)}

    # The datasets library reads the folder as the same pairs (its imagefolder conventions), and a
    # Dataset of them, or one built in memory from PIL images, makes the same documents.
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded["text"]) == sorted(TEXTS.values())
    order = {text: k for k, text in enumerate(TEXTS.values())}
    loaded = loaded.select(sorted(range(len(loaded)), key=lambda i: order[loaded[i]["text"]]))
    pretokenize(loaded, pipe, tmp_path / "loaded", task=task, progress=False)
    assert documents(tmp_path / "loaded") == want
    in_memory = datasets.Dataset.from_dict({"picture": [Image.open(folder / "img" / f"{n}.png") for n in COLORS],
                                            "caption": list(TEXTS.values())})
    pretokenize(in_memory, pipe, tmp_path / "memory", task=task, image_column="picture", progress=False)
    assert documents(tmp_path / "memory") == want
    paths = datasets.Dataset.from_dict({"image": [str(folder / "img" / f"{n}.png") for n in COLORS],
                                        "text": list(TEXTS.values())})
    pretokenize([paths], pipe, tmp_path / "paths", task=task, progress=False)
    assert documents(tmp_path / "paths") == want


def test_csv_metadata_other_text_columns_and_image_size(pipe, tmp_path):
    folder = make_folder(tmp_path / "csv", column="caption", metadata="metadata.csv")
    source = read_imagefolder(folder)  # "caption" is found without being named
    assert [p.text for p in source.records] == list(TEXTS.values())
    described = make_folder(tmp_path / "described", column="description")
    with pytest.raises(DataError, match=r"metadata\.jsonl:1: no text column .*--text-column"):
        pretokenize(described, pipe, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    summary = pretokenize(described, pipe, tmp_path / "sized", text_column="description", task="t2i", image_size=16,
                          progress=False)
    assert summary["image_sizes"] == {"16x16": 4}
    text = pipe.format.decode(ShardDataset(tmp_path / "sized")[0][0]).text
    assert "16x16" in text and TEXTS["red"] in text  # the prompt names the size the image is drawn at
    with pytest.raises(ValueError, match="image_size 20x20: .*multiple of 8"):
        pretokenize(described, pipe, tmp_path / "never", text_column="description", image_size=20, progress=False)


def test_an_interrupted_imagefolder_pretokenize_resumes_to_identical_shards(pipe, tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "folder")
    kwargs = dict(task="both", shard_size=3, image_batch_size=2, progress=False)  # shards end inside pairs
    full = pretokenize(folder, pipe, tmp_path / "full", **kwargs)
    real = pretokenize_module._write_shard
    written = []

    class Interrupted(Exception):
        pass

    def crash_after_one(path, docs):
        if written:
            raise Interrupted
        written.append(path.name)
        return real(path, docs)

    monkeypatch.setattr(pretokenize_module, "_write_shard", crash_after_one)
    with pytest.raises(Interrupted):
        pretokenize(folder, pipe, tmp_path / "resumed", **kwargs)
    assert read_manifest(tmp_path / "resumed")["cursor"] == {"file": 0, "line": 1, "byte": 0, "part": 1}
    monkeypatch.setattr(pretokenize_module, "_write_shard", real)
    assert pretokenize(folder, pipe, tmp_path / "resumed", **kwargs) == {**full, "out_dir": str(tmp_path / "resumed")}
    for name in sorted(p.name for p in (tmp_path / "full").iterdir()):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    # Another task, or an edited caption, is another input: refused, not mixed in.
    with pytest.raises(DataError, match="read otherwise .*task"):
        pretokenize(folder, pipe, tmp_path / "full", **{**kwargs, "task": "t2i"})
    (folder / "metadata.jsonl").write_text((folder / "metadata.jsonl").read_text().replace("a red square", "a pink square"))
    with pytest.raises(DataError, match="changed content"):
        pretokenize(folder, pipe, tmp_path / "full", **kwargs)


def broken_folders(root):
    """(name, folder, what the error must say) for each way an imagefolder can be broken."""
    cases = []

    def case(name, edit, message):
        folder = make_folder(root / name)
        edit(folder)
        cases.append((name, folder, message))

    case("missing-image", lambda f: (f / "img" / "green.png").unlink(),
         r"metadata\.jsonl:2: image file .*img/green\.png does not exist")
    case("corrupt-image", lambda f: (f / "img" / "blue.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"),
         r"metadata\.jsonl:3: cannot load image .*img/blue\.png")
    case("no-metadata", lambda f: (f / "metadata.jsonl").unlink(), r"no metadata\.jsonl or metadata\.csv")
    case("bad-json", lambda f: (f / "metadata.jsonl").write_text('{"file_name": "img/red.png", "text": "x"}\n{oops\n'),
         r"metadata\.jsonl:2: not valid JSON")
    case("escaping-path", lambda f: (f / "metadata.jsonl").write_text('{"file_name": "../x.png", "text": "x"}\n'),
         r"metadata\.jsonl:1: file_name '\.\./x\.png' must be a relative path inside the folder")
    case("no-file-name", lambda f: (f / "metadata.jsonl").write_text('{"image": "img/red.png", "text": "x"}\n'),
         r"metadata\.jsonl:1: no 'file_name' column")
    case("empty-text", lambda f: (f / "metadata.jsonl").write_text('{"file_name": "img/red.png", "text": " "}\n'),
         r"metadata\.jsonl:1: the text column 'text' is empty")

    def splits(f):
        for split in ("train", "test"):
            make_folder(f / split)
    case("two-splits", splits, r"holds the splits test, train; read one at a time")
    return cases


def test_broken_imagefolders_are_errors_naming_the_file_and_line_before_any_output(pipe, model_dir, tmp_path,
                                                                                   capsys):
    for name, folder, message in broken_folders(tmp_path):
        out = tmp_path / "out" / name
        with pytest.raises(DataError, match=message):
            pretokenize(folder, pipe, out, progress=False)
        assert not out.exists(), name  # checked whole before anything is written
        assert cli(["pretokenize", str(model_dir), str(out), str(folder), "--task", "t2i"]) == 2
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip() and "%|" not in x]
        assert len(lines) == 1 and "Traceback" not in err and re.search(message, lines[0]), (name, err)
        assert not out.exists(), name
    # --skip-errors: the bad rows are warned about and counted, the rest pre-tokenized.
    folder = dict((n, f) for n, f, _ in broken_folders(tmp_path / "again"))["missing-image"]
    with pytest.warns(DataWarning, match=r"metadata\.jsonl:2: image file"):
        summary = pretokenize(folder, pipe, tmp_path / "skipped", on_error="skip", task="t2i", progress=False)
    assert (summary["lines"], summary["documents"], summary["skipped"]) == (4, 3, 1)
    # The split folder of a directory with splits reads alone.
    two = dict((n, f) for n, f, _ in broken_folders(tmp_path / "again"))["two-splits"]
    assert pretokenize(two, pipe, tmp_path / "train-split", split="train", task="t2i", progress=False)["documents"] == 4
    assert cli(["pretokenize", str(model_dir), str(tmp_path / "cli"), str(two), "--split", "test", "--task", "caption",
                "--image-size", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 4


def test_bad_datasets_are_errors_naming_the_row(pipe, tmp_path):
    folder = make_folder(tmp_path / "folder")
    rows = {"image": [str(folder / "img" / "red.png"), str(folder / "img" / "gone.png")], "text": ["a", "b"]}
    with pytest.raises(DataError, match=r"dataset row 1: image file .*gone\.png does not exist"):
        pretokenize(datasets.Dataset.from_dict(rows), pipe, tmp_path / "never", progress=False)
    with pytest.raises(DataError, match=r"the dataset has no text column 'words'"):
        pretokenize(datasets.Dataset.from_dict(rows), pipe, tmp_path / "never", text_column="words", progress=False)
    with pytest.raises(DataError, match=r"got a DatasetDict of splits \(train\); pass one split"):
        pretokenize(datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}), pipe, tmp_path / "never",
                    progress=False)
    assert not (tmp_path / "never").exists()
