"""A quantized KV cache (int8 with per-head, per-token scales; fp8 e4m3 where torch has it)."""
