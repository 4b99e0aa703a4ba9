"""Japanese continual pre-training and LoRA of Qwen2.5-0.5B on NVIDIA NeMo 2.0."""

__version__ = "0.1.0"
