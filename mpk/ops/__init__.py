"""The fused decode op kinds, by name. Each knows its tiling and its PyTorch reference."""

from mpk.ops.attention import AttentionMerge, AttentionSplit, QkNormRopeAppend
from mpk.ops.base import OpKind, TileTask
from mpk.ops.linear import AllreduceResidual, Linear, LinearResidual, RmsnormGateUpSilu, RmsnormLinear, RmsnormLmHeadArgmax
from mpk.ops.tokens import Embed, Sample

OP_KINDS: dict[str, OpKind] = {
    "embed": Embed(),
    "rmsnorm_linear": RmsnormLinear(),
    "qk_norm_rope_append": QkNormRopeAppend(),
    "attention_split": AttentionSplit(),
    "attention_merge": AttentionMerge(),
    "linear_residual": LinearResidual(),
    "linear": Linear(),
    "allreduce_residual": AllreduceResidual(),
    "rmsnorm_gate_up_silu": RmsnormGateUpSilu(),
    "rmsnorm_lm_head_argmax": RmsnormLmHeadArgmax(),
    "sample": Sample(),
}

__all__ = ["OP_KINDS", "OpKind", "TileTask"]
