"""The NVIDIA backend: Triton kernels behind the Backend interface (backend.py).

device.py      which GPU, what it can do (no Triton import)     kv_cache.py   paged KV layout and the write kernel
norm_rope.py   RMSNorm (+ residual), partial NeoX rotary         attention.py  split-KV paged decode, varlen prefill
routing.py     sigmoid top-k routing, sort-by-expert dispatch    gemm.py       grouped / FP8 block-scaled GEMM kernel
moe.py         the expert block: dispatch, 2 GEMMs, combine      fp8.py        FP8 linear weights
graphs.py      decode steps replayed from CUDA graphs            triton_utils.py  rounding, matmul step, interpreter
"""
