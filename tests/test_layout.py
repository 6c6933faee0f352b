"""The package's architecture, checked from its source: data flows one way through the layers, no
module reaches into another's private names, nothing unpickles arbitrary objects, and research code
stays out of the installed package."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tokenloom"

# Lower layers never import higher ones (lazy imports inside functions count too).
LAYERS = [
    # the pieces, and the shapes world (a domain: it knows nothing of models)
    {"document", "vocab", "text_tokenizer", "formats", "model", "vqgan", "image_processing", "checkpoint",
     "precision", "report", "world", "adapters", "video_io", "quantize", "audio_io", "speech_codec",
     "speech_stream"},
    {"engine", "scoring"},  # generation
    {"pipeline", "speech_pipeline"},
    {"data", "train", "convert", "evaluation", "evaluation_parts", "video_evaluation", "speech_evaluation", "serve",
     "modalities"},  # what is built on the pipeline
    {"cli", "__main__"},  # __main__: python -m tokenloom (what torchrun -m tokenloom runs)
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"tokenloom.{module} is in no layer of tests/test_layout.py: add it where it belongs")


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if parts:
            yield ".".join(parts), path, path.name == "__init__.py"


def _imports(name: str, path: Path, is_package: bool):
    """(imported tokenloom module, imported names, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("tokenloom"):
                target = node.module.removeprefix("tokenloom").lstrip(".")
            else:
                continue
            yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tokenloom."):
                    yield alias.name.removeprefix("tokenloom."), [], node.lineno


def test_data_flows_one_way_through_the_layers():
    wrong = []
    for name, path, is_package in _modules():
        for target, names, line in _imports(name, path, is_package):
            if not target:  # `from . import __version__` and the like
                continue
            if _layer(target) > _layer(name):
                wrong.append(f"{path.relative_to(SRC)}:{line}: tokenloom.{name} imports tokenloom.{target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_private_name_of_another():
    wrong = []
    for name, path, is_package in _modules():
        for target, names, line in _imports(name, path, is_package):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                private.append(target)
            if private:
                wrong.append(f"{path.relative_to(SRC)}:{line}: {private}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("pattern", ["weights_only=False", "pickle.load", "pickle.loads", "import dill"])
def test_nothing_in_the_package_unpickles_arbitrary_objects(pattern):
    hits = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern in line]
    assert not hits, hits


def test_research_code_is_not_installed():
    research = {"code_stability", "copy_ceiling", "copied_target", "edit_copy_accuracy", "swap_image_tokenizer",
                "code_cooccurrence"}
    for path in SRC.rglob("*.py"):
        defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        assert not defined & research, f"{path.relative_to(SRC)} defines {sorted(defined & research)}"
    assert not (SRC / "code_transfer.py").exists() and not (SRC / "world" / "recipe.py").exists()
