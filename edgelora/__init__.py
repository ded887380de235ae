"""edgelora: federated parameter-efficient fine-tuning (SLoRA, FLASC) for real edge devices."""
__version__ = "0.1.0"
