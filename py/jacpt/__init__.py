"""Japanese continual pre-training and LoRA of Qwen2.5-0.5B on NVIDIA NeMo 2.0."""

__version__ = "0.1.0"


def log(msg: str) -> None:
    """Progress and diagnostics: stderr, one prefix, so a command's stdout stays its result (a path)."""
    import sys

    print(f"[jacpt] {msg}", file=sys.stderr, flush=True)
