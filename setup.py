"""Build entry point; metadata lives in pyproject.toml.

The CUDA extension in csrc/ (the `cuda` backend's forward kernel) is built only when asked and
possible: FASTPROMPT_BUILD_CUDA=1 with a CUDA build of torch importable at build time, i.e.
`FASTPROMPT_BUILD_CUDA=1 pip install --no-build-isolation .`. Otherwise the package is pure
Python, and a source checkout can still JIT-build the extension with ninja on first use.
"""

import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("FASTPROMPT_BUILD_CUDA") != "1":
        return {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise RuntimeError("FASTPROMPT_BUILD_CUDA=1 needs a CUDA build of torch at build time (pip install --no-build-isolation)")
    ext = CUDAExtension(
        "fastprompt.kernels._cuda_ext",  # beside cuda_prefix_attention.py, which loads it
        ["csrc/prefix_attention_binding.cpp", "csrc/prefix_attention.cu"],
        include_dirs=[os.path.abspath("csrc")],
        define_macros=[("FASTPROMPT_WITH_CUDA", None), ("TORCH_EXTENSION_NAME", "_cuda_ext")],
        extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O3", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extensions())
