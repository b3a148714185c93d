"""Raw Triton kernels, each with its launcher and a plain-torch `*_ref` beside it.

No nn.Module and no SAM imports here (see ../shared/design.md, section 2).
"""
