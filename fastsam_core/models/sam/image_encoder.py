"""Fast SAM ViT image encoder.

Replaces `segment_anything.modeling.image_encoder.ImageEncoderViT` (and its `Block` and
`Attention`) with modules that keep the reference's parameter names, forward signature and
output dtype, and differ in how they compute:

- attention through `fastsam_core.ops.attention` (SDPA with the decomposed relative-position
  bias as its mask, in the compute dtype, fp32 softmax statistics), with the relative-position
  index tables built once as non-persistent buffers;
- weights and activations in the configured dtype, LayerNorm statistics in fp32;
- the neck on channels-last tokens: the 1x1 convolution as a matmul, LayerNorm2d as
  `F.layer_norm` over channels;
- no host-device synchronization in the forward; optional `torch.compile`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    window_partition,
    window_unpartition,
)
from torch import nn

from fastsam_core.config import FastConfig
from fastsam_core.models.compiled import LazyCompiled
from fastsam_core.models.convert import adopt_module, adopt_parameter, dtype_name, module_device
from fastsam_core.models.fallback import ReferenceFallback, has_forward_hooks, hooks_note
from fastsam_core.models.quant import Int8Tokens, PendingLayerNorm, build_sparse_weights
from fastsam_core.models.sam.common import layer_norm_2d
from fastsam_core.ops.attention import (
    KERNEL_FALLBACKS,
    choose_backend,
    rel_pos_attention,
    rel_pos_index,
)
from fastsam_core.report import StageReport, UnsupportedModule


class FastAttention(nn.Module):
    """Multi-head attention with decomposed relative positions on a fixed token grid.

    Replaces `segment_anything.modeling.image_encoder.Attention`; same parameters
    (`qkv`, `proj`, `rel_pos_h`, `rel_pos_w`).

    Args:
        qkv: C -> 3C linear.
        proj: C -> C linear.
        num_heads: number of heads; head dim d = C / num_heads.
        grid: (h, w) token grid the attention runs on (a window, or the whole image).
        rel_pos_h, rel_pos_w: (2h - 1) x d and (2w - 1) x d tables, or None.
        backend: `FastConfig.attention`, one of `fastsam_core.ops.attention.BACKENDS`:
            "auto" is resolved on each call by the inputs' device (SDPA off CUDA, as
            `choose_backend` reports it), so a model built on the CPU and moved to CUDA may
            take the kernel there.
    """

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        grid: tuple[int, int],
        rel_pos_h: nn.Parameter | None,
        rel_pos_w: nn.Parameter | None,
        backend: str,
    ) -> None:
        super().__init__()
        self.qkv = qkv
        self.proj = proj
        self.num_heads = num_heads
        self.scale = (qkv.in_features // num_heads) ** -0.5
        self.grid = grid
        self.backend = backend
        self.use_rel_pos = rel_pos_h is not None
        if self.use_rel_pos:
            self.rel_pos_h = rel_pos_h
            self.rel_pos_w = rel_pos_w
            device = rel_pos_h.device
            self.register_buffer("rel_index_h", rel_pos_index(grid[0], device), persistent=False)
            self.register_buffer("rel_index_w", rel_pos_index(grid[1], device), persistent=False)
            self.register_load_state_dict_post_hook(FastAttention._index_where_the_tables_are)

    def _apply(self, fn: Callable, recurse: bool = True) -> FastAttention:
        """`.to()`, `.to_empty()`, ...: the index tables follow from the grid, not from what
        `fn` makes of them (`to_empty` leaves them uninitialized, and no checkpoint holds
        them: they are not persistent)."""
        super()._apply(fn, recurse)
        if self.use_rel_pos:
            self._build_index(self.rel_index_h.device)
        return self

    def _index_where_the_tables_are(self, incompatible_keys: object) -> None:
        """After a load: a model built on the meta device and loaded with `assign=True` has
        its position tables, not yet its index tables (no checkpoint holds them)."""
        if self.use_rel_pos and self.rel_index_h.device != self.rel_pos_h.device:
            self._build_index(self.rel_pos_h.device)

    def _build_index(self, device: torch.device) -> None:
        self.rel_index_h = rel_pos_index(self.grid[0], device)
        self.rel_index_w = rel_pos_index(self.grid[1], device)

    @classmethod
    def from_reference(
        cls, ref: Attention, grid: tuple[int, int], dtype: torch.dtype, backend: str
    ) -> FastAttention:
        rel_pos_h = rel_pos_w = None
        if ref.use_rel_pos:
            for name, table, size in (("rel_pos_h", ref.rel_pos_h, grid[0]),
                                      ("rel_pos_w", ref.rel_pos_w, grid[1])):
                if table.shape[0] != 2 * size - 1:
                    raise UnsupportedModule(
                        f"{name} has {table.shape[0]} rows, expected {2 * size - 1} for a "
                        f"{grid[0]}x{grid[1]} grid (img_size or the table changed after "
                        "construction; the reference interpolates the table on every call, "
                        "the fast encoder takes tables of its grid's size only)"
                    )
            rel_pos_h = adopt_parameter(ref.rel_pos_h, dtype)
            rel_pos_w = adopt_parameter(ref.rel_pos_w, dtype)
        return cls(
            qkv=adopt_module(ref.qkv, dtype),
            proj=adopt_module(ref.proj, dtype),
            num_heads=ref.num_heads,
            grid=grid,
            rel_pos_h=rel_pos_h,
            rel_pos_w=rel_pos_w,
            backend=backend,
        )

    def forward(self, x: torch.Tensor | Int8Tokens) -> torch.Tensor:
        """x: B x h x w x C (or its `Int8Tokens`, for an int8 qkv) -> B x h x w x C."""
        b, h, w, c = x.shape
        # B x N x 3C -> 3 x B x heads x N x d
        qkv = self.qkv(x).view(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        pos_h = pos_w = None
        if self.use_rel_pos:
            pos_h = self.rel_pos_h[self.rel_index_h]  # h x h x d
            pos_w = self.rel_pos_w[self.rel_index_w]  # w x w x d
        backend = self.backend if q.is_cuda or self.backend != "auto" else "sdpa"
        out = rel_pos_attention(q, k, v, pos_h, pos_w, (h, w), self.scale, backend)
        # B x heads x N x d -> B x h x w x C
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


class FastBlock(nn.Module):
    """Pre-norm transformer block, windowed (window_size > 0) or global.

    Replaces `segment_anything.modeling.image_encoder.Block`; same parameters
    (`norm1`, `attn`, `norm2`, `mlp`). With int8 linears `norm1` may be a
    `models.quant.DeferredLayerNorm`, handing qkv the int8 codes of its output (then
    window-partitioned as codes; not while `attn` or qkv have forward hooks).
    """

    def __init__(
        self, norm1: nn.Module, attn: FastAttention, norm2: nn.Module, mlp: nn.Module,
        window_size: int,
    ) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp
        self.window_size = window_size

    @classmethod
    def from_reference(
        cls, ref: Block, token_grid: tuple[int, int], dtype: torch.dtype, backend: str
    ) -> FastBlock:
        ws = ref.window_size
        grid = (ws, ws) if ws > 0 else token_grid
        return cls(
            norm1=adopt_module(ref.norm1, dtype),
            attn=FastAttention.from_reference(ref.attn, grid, dtype, backend),
            norm2=adopt_module(ref.norm2, dtype),
            mlp=adopt_module(ref.mlp, dtype),
            window_size=ws,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x H x W x C -> B x H x W x C."""
        shortcut = x
        hw = x.shape[1:3]
        ws = self.window_size
        x = self.norm1(x)
        if isinstance(x, PendingLayerNorm):  # int8 qkv: the norm's codes, maybe (models.quant)
            x = x.for_linear(self.attn.qkv, ws, carriers=(self.attn,))
        elif ws > 0:
            # B x H x W x C -> (B * windows) x ws x ws x C, zero-padded as the reference does
            x = window_partition(x, ws)[0]
        x = self.attn(x)
        if ws > 0:
            padded = (hw[0] + (-hw[0]) % ws, hw[1] + (-hw[1]) % ws)
            x = window_unpartition(x, ws, padded, hw)  # -> B x H x W x C
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class FastImageEncoderViT(ReferenceFallback):
    """SAM's ViT image encoder, built from a reference `ImageEncoderViT`.

    Same parameter names as the reference (`patch_embed`, `pos_embed`, `blocks`, `neck`), so
    `state_dict()` keys and shapes are the reference's. Input: B x 3 x img_size x img_size
    float (normalized, as `Sam.preprocess` returns); output: B x out_chans x H/16 x W/16 in the
    input's dtype. Runs in the dtype of its weights, whatever the autocast state.

    Inference only: in training mode, or when autograd would record (grad mode on and the
    input or the parameters require grad), it runs the reference encoder instead (and says
    so once), because the fast weights may be a converted copy.
    """

    def __init__(
        self,
        img_size: int,
        patch_embed: nn.Module,
        pos_embed: nn.Parameter | None,
        blocks: list[FastBlock],
        neck: nn.Sequential,
        compile_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.stage = "image encoder"
        self.img_size = img_size
        self.patch_embed = patch_embed
        self.pos_embed = pos_embed
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck
        self.fused_neck = _is_reference_neck(neck)
        self._run_fast = LazyCompiled(self._forward_fast, compile_mode, "image encoder",
                                      fullgraph=True, dynamic=False)

    @classmethod
    def from_reference(
        cls, ref: ImageEncoderViT, config: FastConfig, dtype: torch.dtype
    ) -> FastImageEncoderViT:
        """Build from `ref`, sharing its parameters if `dtype` is theirs, else converting them.

        Raises:
            UnsupportedModule: `ref` is not the reference ViT (MobileSAM, HQ-SAM, ...).
        """
        if type(ref) is not ImageEncoderViT:
            raise UnsupportedModule(
                f"{type(ref).__module__}.{type(ref).__qualname__} is not "
                "segment_anything's ImageEncoderViT"
            )
        for i, blk in enumerate(ref.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention:
                attn = type(getattr(blk, "attn", None)).__qualname__
                raise UnsupportedModule(f"blocks[{i}] is {type(blk).__qualname__} with attn "
                                        f"{attn}, not a Block with an Attention")
        stride = ref.patch_embed.proj.stride
        token_grid = (ref.img_size // stride[0], ref.img_size // stride[1])
        return cls(
            img_size=ref.img_size,
            patch_embed=adopt_module(ref.patch_embed, dtype),
            pos_embed=None if ref.pos_embed is None else adopt_parameter(ref.pos_embed, dtype),
            blocks=[FastBlock.from_reference(b, token_grid, dtype, config.attention)
                    for b in ref.blocks],
            neck=adopt_module(ref.neck, dtype),
            compile_mode=config.compile,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x 3 x img_size x img_size float -> B x out_chans x H/16 x W/16, x's dtype."""
        fallback = self._check_input(x) or self.inference_only_reason(x)
        if fallback is not None:
            return self.run_reference(fallback, x)
        if self._run_fast.compiled is not None:
            build_sparse_weights(self, x)
        with torch.autocast(x.device.type, enabled=False):
            y = self._run_fast(x.to(self.patch_embed.proj.weight.dtype),
                               eager=has_forward_hooks(self.neck))
        return y.to(x.dtype)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.neck_forward(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus absolute positions: B x 3 x S x S -> B x H x W x C."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def neck_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The neck on tokens: B x H x W x C -> B x out x H x W (the reference's modules
        called where not fused, or while hooks sit on them)."""
        if not self.fused_neck or has_forward_hooks(self.neck):
            return self.neck(x.permute(0, 3, 1, 2))
        conv1, norm1, conv2, norm2 = self.neck
        # 1x1 conv on channels-last tokens is a matmul: B x H x W x C -> B x H x W x out
        x = F.linear(x, conv1.weight.flatten(1))
        x = F.layer_norm(x, norm1.weight.shape, norm1.weight, norm1.bias, norm1.eps)
        # B x H x W x out -> B x out x H x W (channels-last memory) for the 3x3 conv
        x = F.conv2d(x.permute(0, 3, 1, 2), conv2.weight, None, conv2.stride, conv2.padding)
        return layer_norm_2d(x, norm2).contiguous()  # B x out x H x W

    def _check_input(self, x: torch.Tensor) -> str | None:
        """Raise on input the reference cannot take; return a reason to fall back, or None."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"image_encoder: x must be a torch.Tensor, got {type(x).__name__}")
        in_chans = self.patch_embed.proj.in_channels
        if x.dim() != 4 or x.shape[1] != in_chans:
            raise ValueError(
                f"image_encoder: x must be B x {in_chans} x {self.img_size} x {self.img_size}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"image_encoder: x must be a floating-point tensor normalized by "
                f"Sam.preprocess, got dtype {x.dtype}"
            )
        if tuple(x.shape[2:]) != (self.img_size, self.img_size):
            stride = self.patch_embed.proj.stride
            grid = (x.shape[2] // stride[0], x.shape[3] // stride[1])
            if self.pos_embed is not None and grid != tuple(self.pos_embed.shape[1:3]):
                raise ValueError(
                    f"image_encoder: x must be {self.img_size} x {self.img_size} pixels "
                    f"(pad with Sam.preprocess), got {tuple(x.shape[2:])}"
                )
            return f"input size {tuple(x.shape[2:])} differs from img_size {self.img_size}"
        if x.device != self.patch_embed.proj.weight.device:
            raise ValueError(
                f"image_encoder: x is on {x.device}, the model on "
                f"{self.patch_embed.proj.weight.device}"
            )
        return None

    def describe(self) -> list[StageReport]:
        """Which path each part of the encoder takes, and why."""
        dtype = dtype_name(self.patch_embed.proj.weight.dtype)
        stages = [StageReport(
            "image_encoder", "fast",
            f"ViT, {len(self.blocks)} blocks, {dtype}, compile: {self._run_fast.summary}"
            + self.fallback_summary(),
        )]
        device = module_device(self)  # where it runs now, maybe not where it was built
        for kind, blocks in (("windowed", [b for b in self.blocks if b.window_size > 0]),
                             ("global", [b for b in self.blocks if b.window_size == 0])):
            if blocks:
                attn = blocks[0].attn
                backend, reason = choose_backend(attn.backend, device)
                bias = "rel-pos bias" if attn.use_rel_pos else "no rel-pos bias"
                detail = (f"{len(blocks)} blocks on {attn.grid[0]}x{attn.grid[1]} tokens, {bias}; "
                          f"{reason}")
                if backend in ("auto", "triton") and KERNEL_FALLBACKS:
                    detail += ("; kernel fell back to SDPA (this process): "
                               + ", ".join(KERNEL_FALLBACKS))
                stages.append(StageReport(f"image_encoder.attention[{kind}]", backend, detail))
        if not self.fused_neck:
            neck = ("reference", "not the reference neck layout")
        elif has_forward_hooks(self.neck):
            neck = ("reference", hooks_note(self, "neck", eager=True).removeprefix("; "))
        else:
            neck = ("fused", "1x1 conv as matmul, LayerNorm2d as layer_norm")
        stages.append(StageReport("image_encoder.neck", *neck))
        return stages


def _is_reference_neck(neck: nn.Module) -> bool:
    """True for ImageEncoderViT's neck: Conv2d 1x1, LayerNorm2d, Conv2d, LayerNorm2d."""
    if not isinstance(neck, nn.Sequential) or len(neck) != 4:
        return False
    conv1, norm1, conv2, norm2 = neck
    return (
        type(conv1) is nn.Conv2d and conv1.kernel_size == (1, 1) and conv1.bias is None
        and conv1.stride == (1, 1) and conv1.padding == (0, 0) and conv1.groups == 1
        and type(conv2) is nn.Conv2d and conv2.bias is None and conv2.groups == 1
        and conv2.dilation == (1, 1) and isinstance(conv2.padding, tuple)
        and conv2.padding_mode == "zeros"
        and type(norm1) is LayerNorm2d and type(norm2) is LayerNorm2d
    )
