"""Setup shared by the whole test suite."""

import os

import torch

# Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter. It must be switched on
# before triton is first imported (importing torch's submodules or fbn_fast does that), hence here: the one file
# pytest loads before collecting any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
