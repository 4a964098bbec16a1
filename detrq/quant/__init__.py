"""Weight quantization: the Eq. (6) quantizer and which weights count, bit maps and sizes, the per-channel and
GPTQ quantizers, bit-packed checkpoints, and the ILP that allocates bits (Eq. (2)/(4))."""
