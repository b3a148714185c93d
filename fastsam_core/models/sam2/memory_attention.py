"""Fast SAM 2 memory attention: the current frame's features attend to the memory bank.

Replaces `sam2.modeling.memory_attention.MemoryAttention` (layers of self-attention, cross-
attention to the memory with 2D rotary position encoding, MLP), keeping the parameter names,
the forward signature and the output (seq-first HW x B x C, in the input's dtype).
Differences:

- the rotary tables are real cos / sin pairs computed once per token count and device and
  kept (the reference multiplies complex tensors, rebuilding its table whenever the feature
  size changes); the memory's rotary part is rotated frame by frame against the same table,
  the object-pointer tokens at the end of the memory are left unrotated, as in the reference;
- weights and activations in the configured dtype whatever the autocast state, with the
  rotation in fp32 as the reference does; the memory is cast to that dtype on entry, so an
  fp32 model works without autocast even though `SAM2VideoPredictor` stores memories in bf16;
- SDPA attention; no host-device synchronization; optional `torch.compile` with dynamic
  shapes (the memory grows over the first frames);
- an optional key mask (`memory_mask`) lets one batch hold memory banks of different lengths,
  padded to a common layout: each element attends only to its own memories, as if alone;
- training mode or autograd recording run the kept reference instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.position_encoding import compute_axial_cis
from sam2.modeling.sam.transformer import RoPEAttention
from torch import nn

from fastsam_core.config import FastConfig
from fastsam_core.models.compiled import LazyCompiled
from fastsam_core.models.convert import adopt_module, dtype_name
from fastsam_core.models.fallback import ReferenceFallback, without_autocast
from fastsam_core.report import StageReport, UnsupportedModule


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary encoding of x (... x N x D) by the N x D/2 tables: each pair of channels
    (2i, 2i+1) is the complex number x_2i + j x_2i+1, multiplied by cos + j sin. fp32 math,
    result in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))  # ... x N x D/2 x 2
    real, imag = pairs[..., 0], pairs[..., 1]
    out = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class FastRoPEAttention(nn.Module):
    """`RoPEAttention` (same parameters): q, k, v projections, heads, rotary encoding of q and
    of the first `k_len - num_k_exclude_rope` keys, SDPA, output projection.

    forward(q, k, v, cos, sin, num_k_exclude_rope, key_mask): q B x Nq x C, k and v
    B x Nk x C_kv, cos / sin Nq x D/2 (D the head size), key_mask None or B x Nk bool (True:
    attend) -> B x Nq x C. Keys to rotate must be a whole number of Nq-token frames
    (`rope_k_repeat`), as in the reference.
    """

    def __init__(self, ref: RoPEAttention, dtype: torch.dtype) -> None:
        super().__init__()
        self.q_proj = adopt_module(ref.q_proj, dtype)
        self.k_proj = adopt_module(ref.k_proj, dtype)
        self.v_proj = adopt_module(ref.v_proj, dtype)
        self.out_proj = adopt_module(ref.out_proj, dtype)
        self.num_heads = ref.num_heads
        self.rope_k_repeat = ref.rope_k_repeat

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, num_k_exclude_rope: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # B x N x C -> B x heads x N x C/heads
        q = self.q_proj(q).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k = self.k_proj(k).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.v_proj(v).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        q = rotate(q, cos, sin)
        n_rope = k.shape[2] - num_k_exclude_rope
        b, h, _, d = k.shape
        # B x heads x (frames * Nq) x D -> B x heads x frames x Nq x D: one table per frame
        k_rope = rotate(k[:, :, :n_rope].reshape(b, h, -1, q.shape[2], d), cos, sin)
        k = torch.cat((k_rope.flatten(2, 3), k[:, :, n_rope:]), dim=2)
        if key_mask is not None:
            key_mask = key_mask[:, None, None, :]  # B x 1 x 1 x Nk, broadcast over heads, queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # B x heads x Nq x D
        return self.out_proj(out.transpose(1, 2).flatten(2))  # B x Nq x C


class FastMemoryAttentionLayer(nn.Module):
    """`MemoryAttentionLayer` (same parameters), eval mode: dropout is the identity.

    forward(tgt, memory, pos, query_pos, cos, sin, num_k_exclude_rope, memory_mask): tgt
    B x HW x C, memory and pos B x M x C_mem, query_pos B x HW x C, memory_mask None or B x M
    bool -> B x HW x C.
    """

    def __init__(self, ref: MemoryAttentionLayer, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = FastRoPEAttention(ref.self_attn, dtype)
        self.cross_attn_image = FastRoPEAttention(ref.cross_attn_image, dtype)
        for name in ("linear1", "linear2", "norm1", "norm2", "norm3"):
            setattr(self, name, adopt_module(getattr(ref, name), dtype))
        self.activation = ref.activation
        self.pos_enc_at_attn = ref.pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = ref.pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = ref.pos_enc_at_cross_attn_keys

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                num_k_exclude_rope: int, memory_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(tgt)
        qk = x + query_pos if self.pos_enc_at_attn else x
        tgt = tgt + self.self_attn(qk, qk, x, cos, sin)
        x = self.norm2(tgt)
        tgt = tgt + self.cross_attn_image(
            x + query_pos if self.pos_enc_at_cross_attn_queries else x,
            memory + pos if self.pos_enc_at_cross_attn_keys else memory,
            memory, cos, sin, num_k_exclude_rope, memory_mask)
        x = self.norm3(tgt)
        return tgt + self.linear2(self.activation(self.linear1(x)))


class FastMemoryAttention(ReferenceFallback):
    """SAM 2's memory attention (see the module docstring)."""

    def __init__(self, ref: MemoryAttention, dtype: torch.dtype,
                 compile_mode: str | None = None) -> None:
        super().__init__()
        self.stage = "SAM 2 memory attention"
        self.layers = nn.ModuleList(FastMemoryAttentionLayer(layer, dtype)
                                    for layer in ref.layers)
        self.norm = adopt_module(ref.norm, dtype)
        self.num_layers = ref.num_layers
        self.d_model = ref.d_model
        self.pos_enc_at_input = ref.pos_enc_at_input
        self.batch_first = ref.batch_first
        attn = ref.layers[0].self_attn
        self.head_dim = attn.internal_dim // attn.num_heads
        self.rope_theta = _rope_theta(attn)
        # the reference's table for its configured feature size (possibly not square)
        self._ref_table = attn.freqs_cis.detach().cpu()
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # the memory grows over the first frames: dynamic shapes, no recompilation per length
        self._run_fast = LazyCompiled(self._forward_fast, compile_mode,
                                      "SAM 2 memory attention", dynamic=True)

    @classmethod
    def from_reference(cls, ref: MemoryAttention, config: FastConfig,
                       dtype: torch.dtype) -> FastMemoryAttention:
        if type(ref) is not MemoryAttention:
            raise UnsupportedModule(f"{type(ref).__qualname__} is not sam2's MemoryAttention")
        attns = [a for layer in ref.layers for a in (getattr(layer, "self_attn", None),
                                                      getattr(layer, "cross_attn_image", None))]
        if not attns or any(type(layer) is not MemoryAttentionLayer for layer in ref.layers) \
                or any(type(a) is not RoPEAttention for a in attns):
            raise UnsupportedModule("layers other than MemoryAttentionLayer with RoPE self- "
                                    "and cross-attention")
        first = attns[0]
        if any(a.internal_dim // a.num_heads != first.internal_dim // first.num_heads
               or _rope_theta(a) != _rope_theta(first)
               or not torch.equal(a.freqs_cis.cpu(), first.freqs_cis.cpu()) for a in attns):
            raise UnsupportedModule("attention layers with different rotary tables (head "
                                    "size, base or feature size): one table is shared here")
        return cls(ref, dtype, config.compile)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def rope_tables(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (n x head_dim/2, fp32) for n query tokens, cached: the reference's
        configured table when n matches it, else its square-grid table for sqrt(n) a side."""
        key = (n, device)
        if key not in self._tables:
            if self._ref_table.shape[0] == n:
                table = self._ref_table
            else:
                side = math.sqrt(n)
                table = compute_axial_cis(self.head_dim, side, side, self.rope_theta)
            self._tables[key] = (table.real.float().to(device), table.imag.float().to(device))
        return self._tables[key]

    @without_autocast
    def forward(self, curr: torch.Tensor | list, memory: torch.Tensor,
                curr_pos: torch.Tensor | list | None = None,
                memory_pos: torch.Tensor | None = None,
                num_obj_ptr_tokens: int = 0,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """curr, curr_pos: HW x B x C (or a one-element list of it), memory, memory_pos:
        M x B x C_mem (the last num_obj_ptr_tokens are object pointers) -> HW x B x C in
        curr's dtype.

        memory_mask (not in the reference's signature): None, or B x M bool, True where
        element b's memory holds a real token. Each element then attends only to its own
        tokens: a batch of banks of different lengths padded to one layout (whole frames
        first, padded to a common frame count, then the pointers, padded to
        num_obj_ptr_tokens; `pad_memory_banks` in `fastsam_core.pipelines.video`) gives
        every element what its unpadded bank alone would."""
        if isinstance(curr, list):
            if len(curr) != 1 or not isinstance(curr_pos, list) or len(curr_pos) != 1:
                raise ValueError("memory_attention: curr and curr_pos lists must have one "
                                 "element each")
            curr, curr_pos = curr[0], curr_pos[0]
        if memory_mask is not None and (memory_mask.dtype != torch.bool
                                        or memory_mask.shape != (memory.shape[1],
                                                                 memory.shape[0])):
            raise ValueError(f"memory_attention: memory_mask must be a bool tensor of shape "
                             f"(batch, memory tokens) = {(memory.shape[1], memory.shape[0])}, "
                             f"got {memory_mask.dtype} {tuple(memory_mask.shape)}")
        why = self._unsupported(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens) or \
            self.inference_only_reason(curr, memory, curr_pos, memory_pos)
        if why is not None and memory_mask is not None:
            return self._reference_per_element(why, curr, memory, curr_pos, memory_pos,
                                               num_obj_ptr_tokens, memory_mask)
        if why is not None:
            # the memories SAM2VideoPredictor stores are bf16: the reference needs them in
            # curr's dtype once autocast is off (without_autocast above)
            memory, memory_pos = (None if t is None else t.to(curr.dtype)
                                  for t in (memory, memory_pos))
            return self.run_reference(why, [curr], memory, [curr_pos], memory_pos,
                                      num_obj_ptr_tokens)
        cos, sin = self.rope_tables(curr.shape[0], curr.device)
        out = self._run_fast(curr.to(self.dtype), memory.to(self.dtype),
                             curr_pos.to(self.dtype), memory_pos.to(self.dtype), cos, sin,
                             num_obj_ptr_tokens, memory_mask)
        return out.to(curr.dtype)

    def _reference_per_element(self, why: str, curr: torch.Tensor, memory: torch.Tensor,
                               curr_pos: torch.Tensor, memory_pos: torch.Tensor,
                               num_obj_ptr_tokens: int,
                               memory_mask: torch.Tensor) -> torch.Tensor:
        """The reference, one batch element at a time on its unpadded memory (it takes no
        mask). Reads the mask on the host: a fallback, not the fast path."""
        outs = []
        first_ptr = memory.shape[0] - num_obj_ptr_tokens
        for b in range(curr.shape[1]):
            keep = memory_mask[b]
            n_ptr = int(keep[first_ptr:].sum())
            mem, pos = (t[:, b][keep].unsqueeze(1).to(curr.dtype) for t in (memory, memory_pos))
            outs.append(self.run_reference(why, [curr[:, b : b + 1]], mem,
                                           [curr_pos[:, b : b + 1]], pos, n_ptr))
        return torch.cat(outs, dim=1)

    def _forward_fast(self, curr: torch.Tensor, memory: torch.Tensor, curr_pos: torch.Tensor,
                      memory_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      num_obj_ptr_tokens: int,
                      memory_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pos_enc_at_input:
            curr = curr + 0.1 * curr_pos
        # seq-first -> batch-first: B x HW x C, B x M x C_mem
        x, query_pos = curr.transpose(0, 1), curr_pos.transpose(0, 1)
        memory, memory_pos = memory.transpose(0, 1), memory_pos.transpose(0, 1)
        for layer in self.layers:
            x = layer(x, memory, memory_pos, query_pos, cos, sin, num_obj_ptr_tokens,
                      memory_mask)
        return self.norm(x).transpose(0, 1)  # HW x B x C

    def _unsupported(self, curr: torch.Tensor, memory: torch.Tensor,
                     curr_pos: torch.Tensor | None, memory_pos: torch.Tensor | None,
                     num_obj_ptr_tokens: int) -> str | None:
        """Inputs the fast path does not take (the reference gets them, and fails or not as
        it would have, given memories in curr's dtype)."""
        if not self.batch_first:
            return "batch_first=False"
        if curr_pos is None or memory_pos is None:
            return "no position encodings given"
        if memory.shape[1] != curr.shape[1]:
            return "batch sizes of curr and memory differ"
        hw, n_rope = curr.shape[0], memory.shape[0] - num_obj_ptr_tokens
        if n_rope < 0 or n_rope % hw:
            return f"memory of {memory.shape[0]} tokens is not whole frames of {hw} + pointers"
        if n_rope != hw and not self.layers[0].cross_attn_image.rope_k_repeat:
            return "several memory frames without rope_k_repeat"
        return None

    def describe(self) -> list[StageReport]:
        dtype = dtype_name(self.dtype)
        return [StageReport(
            "memory_attention", "fast",
            f"{self.num_layers} layers, SDPA, cached rotary tables, {dtype}, compile: "
            f"{self._run_fast.summary}" + self.fallback_summary())]


def _rope_theta(attn: RoPEAttention) -> float:
    """The rotary base the reference was built with (kept only inside its partial)."""
    return float(attn.compute_cis.keywords["theta"])
