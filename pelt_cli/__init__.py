"""pelt: parameter-efficient fine-tuning surgery for Hugging Face checkpoints, from the shell."""

__version__ = "0.1.0"
