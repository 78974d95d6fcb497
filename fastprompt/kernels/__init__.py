"""Kernels: one file per prefix-attention backend (`aten_prefix_attention`, `triton_backend` with
`triton_prefix_attention` and `triton_configs`, `cuda_prefix_attention`, `cpu_prefix_attention`,
`torch_prefix_attention`), each with its `BACKEND` declaration (`declaration`), and the code they
share: the normalised inputs (`inputs`), the LSE merge (`lse_merge`), the prefix by matrix products
and a bank's grouping (`prefix_matmul`), the row folds (`rows`), the per-forward memo
(`tensor_memo`) and aten's raw kernels with their CPU stand-ins (`aten_kernels`). Imports nothing
above this package."""
