"""tokenloom: native multimodal token models (text and images as tokens of one vocabulary)."""

__version__ = "0.1.0"

__all__ = ["load", "Pipeline", "Document", "TextPart", "ImagePart", "Turn", "__version__"]


def __getattr__(name):
    # Lazy, so `import tokenloom` (and `tokenloom --help`) stays fast.
    if name in ("load", "Pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("Document", "TextPart", "ImagePart", "Turn"):
        from . import document

        return getattr(document, name)
    raise AttributeError(f"module 'tokenloom' has no attribute {name!r}")
