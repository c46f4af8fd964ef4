import os

import torch

# Triton kernels run on the CPU through the interpreter; it must be on before triton's
# kernels are defined (at import of grpo_kernels.backends.triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
