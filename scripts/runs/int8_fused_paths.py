"""How far apart the fused and the separate int8 paths are, and each from the float layers,
per compute dtype: what `ops.quant.FUSED_PATHS_MATCH_REL_L2` is set from. Two kinds:
the int8 MLP (`Int8MLP.run("separate" | "fused")`, LayerNorm before it) and a LayerNorm
feeding an int8 qkv through a window partition (`PendingLayerNorm.laid_out`, then qkv).
The fused kernels run in the Triton interpreter (set below), so this runs on a CPU.

    python scripts/runs/int8_fused_paths.py > scripts/runs/int8_fused_paths.txt
"""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from segment_anything.modeling.common import MLPBlock  # noqa: E402
from segment_anything.modeling.image_encoder import window_partition  # noqa: E402
from torch import nn  # noqa: E402

from fastsam_core.models.quant import DeferredLayerNorm, Int8Linear, Int8MLP  # noqa: E402
from fastsam_core.numerics import rel_l2  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def layer_norm(k: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(k)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.1)
    return norm


def show(what: str, dtype: torch.dtype, separate, fused, exact) -> None:
    print(f"{what}, {str(dtype)[6:]}: fused vs separate {rel_l2(fused, separate):.2e}, "
          f"separate vs float {rel_l2(separate.float(), exact):.2e}, fused vs float "
          f"{rel_l2(fused.float(), exact):.2e} (relative L2)")


torch.manual_seed(0)
for k, hidden, tokens in ((48, 96, 64), (768, 3072, 128)):
    norm, mlp = layer_norm(k), MLPBlock(k, hidden).eval()
    x = torch.randn(tokens, k) * 2 + 0.3
    with torch.inference_mode():
        exact = mlp(norm(x))
    for dtype in DTYPES:
        low_mlp = copy.deepcopy(mlp).to(dtype)
        int8 = Int8MLP(low_mlp)
        int8.lin1, int8.lin2 = Int8Linear(low_mlp.lin1), Int8Linear(low_mlp.lin2)
        deferred = DeferredLayerNorm(copy.deepcopy(norm).to(dtype))
        with torch.inference_mode():
            separate = int8.run("separate", deferred(x.to(dtype)))
            fused = int8.run("fused", deferred(x.to(dtype)))
        show(f"MLP: {tokens} tokens, {k} -> {hidden}", dtype, separate, fused, exact)

# norm1 -> qkv on a token grid that the windows pad (as vit_b's 64 x 64 grid by 14 x 14)
for k, grid, window in ((48, (6, 5), 4), (768, (9, 9), 7)):
    norm, qkv = layer_norm(k), nn.Linear(k, 3 * k)
    x = torch.randn(2, *grid, k) * 2 + 0.3
    with torch.inference_mode():
        exact = qkv(window_partition(norm(x), window)[0])
    for dtype in DTYPES:
        int8 = Int8Linear(copy.deepcopy(qkv).to(dtype))
        deferred = DeferredLayerNorm(copy.deepcopy(norm).to(dtype))
        with torch.inference_mode():
            separate, fused = (int8(deferred(x.to(dtype)).laid_out(path, window))
                               for path in ("separate", "fused"))
        show(f"norm1 -> qkv: 2 x {grid[0]}x{grid[1]} tokens in {window}x{window} windows, "
             f"{k} -> {3 * k}", dtype, separate, fused, exact)
