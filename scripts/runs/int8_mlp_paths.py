"""How far apart the int8 MLP's two paths are (`Int8MLP.run("separate" | "fused")`), and each
from the float MLP, per compute dtype: what `ops.quant.MLP_PATHS_MATCH_REL_L2` is set from.
The fused kernels run in the Triton interpreter (set below), so this runs on a CPU.

    python scripts/runs/int8_mlp_paths.py > scripts/runs/int8_mlp_paths.txt
"""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from segment_anything.modeling.common import MLPBlock  # noqa: E402
from torch import nn  # noqa: E402

from fastsam_core.models.quant import DeferredLayerNorm, Int8Linear, Int8MLP  # noqa: E402
from fastsam_core.numerics import rel_l2  # noqa: E402

torch.manual_seed(0)
for k, hidden, tokens in ((48, 96, 64), (768, 3072, 128)):
    norm, mlp = nn.LayerNorm(k), MLPBlock(k, hidden).eval()
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.1)
    x = torch.randn(tokens, k) * 2 + 0.3
    with torch.inference_mode():
        exact = mlp(norm(x))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        low_mlp = copy.deepcopy(mlp).to(dtype)
        int8 = Int8MLP(low_mlp)
        int8.lin1, int8.lin2 = Int8Linear(low_mlp.lin1), Int8Linear(low_mlp.lin2)
        deferred = DeferredLayerNorm(copy.deepcopy(norm).to(dtype))
        with torch.inference_mode():
            separate = int8.run("separate", deferred(x.to(dtype)))
            fused = int8.run("fused", deferred(x.to(dtype)))
        print(f"{tokens} tokens, {k} -> {hidden}, {str(dtype)[6:]}: fused vs separate "
              f"{rel_l2(fused, separate):.2e}, separate vs float "
              f"{rel_l2(separate.float(), exact):.2e}, fused vs float "
              f"{rel_l2(fused.float(), exact):.2e} (relative L2)")
