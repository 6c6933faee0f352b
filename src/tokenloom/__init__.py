"""tokenloom: native multimodal token models (text and images as tokens of one vocabulary)."""

__version__ = "0.1.0"
