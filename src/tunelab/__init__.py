"""tunelab: fine-tune open LLMs from one YAML file."""

__version__ = "0.1.0"
