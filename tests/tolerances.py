"""Every parity tolerance of the test suite, each with its reason (../shared/design.md, sec. 3).

Never loosen one to make a test pass: find the cause.
"""

# fp32 fast path vs fp32 reference, relative L2 error.
FP32_OP_REL_L2 = 1e-5  # one op: only the summation order differs
FP32_STAGE_REL_L2 = 1e-4  # a block, the neck, a whole encoder: op errors compound over layers

# Low precision (bf16 / fp16): both the fast path and the naive reference (the reference module
# converted with .to(dtype)) are compared against a float64 reference; the fast path may not be
# worse than the naive one by more than this factor, plus this absolute slack.
LOWP_FACTOR = 2.0  # room for a different but equally valid rounding order
LOWP_SLACK = 1e-3  # so that tiny naive errors (a few ulps) do not make the bound meaningless
# The naive reference's own error, in units of the dtype's machine epsilon (torch.finfo).
LOWP_NAIVE_MAX_EPS = 2.0  # measured ~0.8 eps; more means a broken reference loosens the bound

# Masks (logits > 0) against the fp32 reference, on pixels outside the margin below.
MASK_IOU_FP32 = 1.0  # fp32 logits agree to ~1e-6: every pixel outside the margin must agree
MASK_IOU_BF16 = 0.99  # bf16 moves logits by ~1%: a few pixels near object edges may flip
MASK_IOU_INT8 = 0.98  # int8 weights and activations move logits further

# Pixels whose reference logit lies within this margin of the threshold (0) are not compared:
# random-weight models put many logits near zero, where any rounding flips the sign. The
# margin is relative to the standard deviation of the reference logits of that mask.
MASK_LOGIT_MARGIN = 0.05

# Automatic mask generation, fp32, fast generator vs the reference generator: each reference
# mask must have a fast counterpart (same point, same crop) within these.
AMG_MASK_IOU = 0.99  # fp32 logits differ by ~1e-6: only pixels at the threshold may flip
AMG_BBOX_PX = 1  # a flipped edge pixel moves a box edge by at most one pixel
AMG_AREA_REL = 0.01  # likewise for the area
AMG_SCORE_ABS = 1e-3  # stability score: counts pixels near +-offset, some flip in fp32
# Predicted IoU: FP32_STAGE_REL_L2 relative, plus this absolute slack for scores near zero
# (random weights predict IoUs around 0), where a relative bound alone would demand equality.
AMG_PRED_IOU_ABS = 1e-7  # about one fp32 ulp at magnitude 1
# A mask whose reference score lies within this of a filter threshold, or whose box IoU with
# another mask lies within this of an NMS threshold, may be kept by one generator only: such
# cases are counted and reported, not failed.
AMG_BORDERLINE_EPS = 1e-3
AMG_MAX_BORDERLINE = 2  # more than this many one-sided masks is a defect, not a rounding flip

# `fastsam check`, fp32: the largest difference of a predicted IoU score (magnitude <= 1).
CHECK_FP32_SCORE_ABS = 1e-4  # FP32_STAGE_REL_L2 of a score of magnitude 1 (measured ~1e-7)

# Exact arithmetic carried out in fp32 (integer codes times their scales) against float64:
# a few roundings of fp32 (machine epsilon 1.2e-7), relative; absolute for outputs near zero.
FP32_ROUNDING_REL = 1e-6
FP32_ROUNDING_ABS = 1e-5  # FP32_ROUNDING_REL of the tests' outputs of magnitude ~10

# Lossy linears (int8): signal-to-quantization-noise ratio against the float result, dB.
INT8_LINEAR_MIN_SQNR_DB = 30.0  # 8-bit symmetric codes give ~40 dB on Gaussian-like data
INT8_ENCODER_MIN_SQNR_DB = 20.0  # the whole encoder: per-layer noise accumulates over blocks

# Fused int8 kernels against their plain-torch references.
# A fused LayerNorm sums its statistics in another order: a value within this distance (in
# code units) of a rounding half may round to the neighbouring code, nothing else may differ.
INT8_CODE_TIE_BAND = 1e-3
# A linear fed such codes: identical outputs but for a rare one-code flip at a tie, which
# costs ~65 dB on the tests' shapes (quantization noise itself is ~40 dB, INT8_LINEAR_*).
INT8_TIE_FLIP_MIN_SQNR_DB = 60.0
# An fp32 result stored in bf16: one rounding, half an ulp of bf16's 8 significant bits.
BF16_ROUNDING_REL = 2.0**-8
# A 2:4 linear on the sparse tensor cores against the dense product with the same pruned
# weight (fp16): the output's own rounding costs ~66 dB; the rest is room for another
# accumulation order (split-K).
SPARSE_MATMUL_MIN_SQNR_DB = 40.0
