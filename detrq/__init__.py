"""detrq: output sensitivity-aware DETR quantization."""
