"""The tensor program of one decode step: named tensors and the fused decode ops that connect them.

Activations are single-assignment within a step (each residual stream `x.{i}` is its own tensor),
so every read has exactly one producing op; the KV cache is *state*, the token ids *meta*.
With tensor parallelism the program holds every rank's ops side by side; tensor names carry a
`rank{r}/` prefix and the allreduce ops sum the partials of all ranks: in a decode graph of GEMV
batches each rank's producers push them into every rank as tagged words (`exchanges_words`), else
the allreduce reads them from the rank that made them.

Tile shapes are decided here (they fix tensor shapes such as the argmax candidates); the op
kinds in `mpk.ops` turn each op into tasks with read/write regions. The tensors the engine and
the runtimes read or fill by name are exported below (TOKENS, LOGITS, ...); `mpk.inputs` fills the
weights and meta tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from mpk import defaults
from mpk.dtypes import WEIGHT_DTYPES
from mpk.errors import MpkError
from mpk.models.config import ModelConfig
from mpk.taskgraph import OpSpec, Precision, TensorSpec
from mpk.util import cdiv

TILE_ALIGN = 16  # output rows per task come in multiples of this (tensor-core blocks; batch 1: gemv_align)
MIN_ATTN_CHUNK = 32  # fewest KV rows one attention task covers
# Contexts up to this many rows take one attention task per (sequence, KV group) and no merge phase:
# reading them on one SM costs less than the merge's dependent phase (docs/decisions.md, attention).
ONE_PASS_ATTN_ROWS = 256
# Splits that may hold this many rows or more (4 rounds of a CTA's 8 warps x 16 rows) keep their K/V
# rows in a shared-memory ring where head_dim is 128 or more (attention.cuh, RING): qwen3-8b batch 4
# at 4,096 positions 6% faster, batch 1 (260 rows a split) 1.2% slower with it (H200, docs/perf.md).
ATTN_RING_ROWS = 512
MAX_BATCH = 256  # decode batches beyond this belong to a prefill-style program, not this one
MAX_NUM_SMS = 1024  # several times any GPU's SM count; graphs grow with it (4096 SMs take 4 GB to compile qwen3-8b)

# Tensors outside the program reads or fills by name (one per rank, see `tensor_name`).
TOKENS = "tokens"  # meta [B] int64: the token each sequence feeds this step (the sampler writes the next)
PROMPT = "prompt"  # meta [B, S] int64: prompts, zero-padded
PROMPT_LEN = "prompt_len"  # meta [B] int64
LOGITS = "logits"  # activation [B, vocab shard] float32
# Per-sequence sampling parameters, two meta tensors so the sample op fits the GPU's 8 operand slots:
SAMPLE_FLOATS = "sample_floats"  # meta [B, 2] float32: temperature (0: greedy), top-p (1: all)
SAMPLE_INTS = "sample_ints"  # meta [B, 2] int64: top-k (0: all), seed
EMBED = "embed"  # weight: the embedding table (one row per sequence is read each step)
ROPE = "rope"  # weight [S, head_dim] float32: cos then sin of each position (a table, not a checkpoint weight)


@dataclass
class Program:
    cfg: ModelConfig
    batch: int
    max_seq_len: int
    tp_size: int
    num_sms: int
    precision: Precision
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    ops: list[OpSpec] = field(default_factory=list)
    one_step: bool = False  # runs one step per launch (TaskGraph.one_step)

    def tensor(self, name: str) -> TensorSpec:
        return self.tensors[name]

    def add_tensor(self, rank: int, name: str, kind: str, shape, dtype: str) -> str:
        full = tensor_name(rank, self.tp_size, name)
        self.tensors[full] = TensorSpec(full, kind, tuple(int(s) for s in shape), dtype, rank)
        return full

    def add_op(self, rank: int, kind: str, name: str, layer: int | None, inputs: dict, outputs: dict, **params):
        """One op instance; its op kind (mpk.ops) checks the roles it binds."""
        from mpk.ops import OP_KINDS

        prefix = f"rank{rank}/" if self.tp_size > 1 else ""
        op = OpSpec(prefix + name, kind, rank, layer, params, inputs, outputs)
        if kind not in OP_KINDS:
            raise MpkError(f"unknown op kind {kind!r} for {op.name}; known: {', '.join(OP_KINDS)}")
        OP_KINDS[kind].check(op)
        self.ops.append(op)


def tensor_name(rank: int, tp_size: int, name: str) -> str:
    return name if tp_size == 1 else f"rank{rank}/{name}"


def choose_tile(n: int, num_sms: int, align: int = TILE_ALIGN) -> int:
    """Rows per task so that one op's tasks make about one wave over the SMs."""
    return max(align, cdiv(cdiv(n, num_sms), align) * align) if n > align else n


# The CUDA-core GEMV keeps a batch of 2-4 where a warp's share is small: these mirror the defaults of
# MPK_SIMT_ROWS and MPK_SIMT_WORK_KB in small_tile_on_cuda_cores (gemv.cuh), which makes the choice.
SIMT_MAX_WARP_ROWS = 6
SIMT_MAX_WARP_WORK = 96 * 1024  # batch x the bytes of a warp's weight rows
CTA_WARPS = 8  # warps of the megakernel's CTA (kWarps in mpk/csrc/common.cuh)


def gemv_on_cuda_cores(batch: int, rows_per_col: int, k: int, tile: int) -> bool:
    """Whether a decode GEMV of `tile` columns a task runs on CUDA cores (gemv.cuh's Gemv): always at
    batch 1 and where K is not whole 32-wide k-steps, and at batches 2-4 when a warp's share is small."""
    if batch == 1 or k % 32:
        return True
    rows = rows_per_col * min(CTA_WARPS, cdiv(tile, CTA_WARPS))
    return batch <= 4 and rows <= SIMT_MAX_WARP_ROWS and batch * rows * k * 2 <= SIMT_MAX_WARP_WORK


def gemv_align(prog: Program, n: int, rows_per_col: int, k: int) -> int:
    """Output columns per task of a decode matrix product (n columns of K = k) come in multiples of
    this. The CUDA-core GEMV gives each of a task's 8 warps whole columns, so 8 will do: at batch 1 a
    1024-wide output then spans 128 SMs, where 16s left half of them idle, and at batch 4 llama-3.2-1b's
    QKV spans 128 SMs, where 32-column tiles left it 96. The tensor cores take whole 16-row blocks (8
    columns of gate/up's row pairs)."""
    if gemv_on_cuda_cores(prog.batch, rows_per_col, k, choose_tile(n, prog.num_sms, 8)):
        return 8
    return max(8, TILE_ALIGN // rows_per_col)


def gemv_tile(n: int, prog: Program, rows_per_col: int, k: int) -> int:
    return choose_tile(n, prog.num_sms, gemv_align(prog, n, rows_per_col, k))


@dataclass(frozen=True)
class Shard:
    """What rank r of tp_size holds of one model."""

    kv_groups: int  # KV heads on this rank
    q_heads: int
    intermediate: int
    vocab_start: int
    vocab_stop: int

    @property
    def vocab(self) -> int:
        return self.vocab_stop - self.vocab_start


def shard_of(cfg: ModelConfig, rank: int, tp_size: int) -> Shard:
    if tp_size < 1:
        raise MpkError(f"--tp must be at least 1, not {tp_size}")
    for what, n in (("num_key_value_heads", cfg.num_kv_heads), ("intermediate_size", cfg.intermediate_size)):
        if n % tp_size:
            raise MpkError(f"{what}={n} does not divide over tensor-parallel size {tp_size}; pick a --tp that divides it")
    per_rank_vocab = cdiv(cfg.vocab_size, tp_size)
    if per_rank_vocab * (tp_size - 1) >= cfg.vocab_size:
        raise MpkError(f"a vocabulary of {cfg.vocab_size} tokens is too small to split over {tp_size} GPUs")
    start = min(cfg.vocab_size, rank * per_rank_vocab)
    return Shard(
        kv_groups=cfg.num_kv_heads // tp_size,
        q_heads=cfg.num_heads // tp_size,
        intermediate=cfg.intermediate_size // tp_size,
        vocab_start=start,
        vocab_stop=min(cfg.vocab_size, start + per_rank_vocab),
    )


def attention_splits(batch: int, kv_groups: int, max_seq_len: int, num_sms: int) -> int:
    """Attention tasks per (sequence, KV group), so that they about fill the SMs. Each covers its
    share of the rows up to the current position (`mpk.ops.attention.split_rows`); at the longest
    context a split still has MIN_ATTN_CHUNK rows or more. One means the one-pass `attention` op."""
    if max_seq_len <= ONE_PASS_ATTN_ROWS:
        return 1
    want = max(1, num_sms // max(1, batch * kv_groups))
    return max(1, min(want, cdiv(max_seq_len, MIN_ATTN_CHUNK)))


ACTIVATIONS = ("float32", "model")
DEFAULT_ACTIVATIONS = "float32"  # docs/decisions.md: bf16 activations drift 4-5e-2 from float32 on 8B models
KV_CACHES = ("model", "float32")
DEFAULT_KV_CACHE = "model"  # docs/decisions.md: a bf16 cache halves KV traffic within the accuracy bound
MATMUL_INPUTS = ("auto", "float32", "bfloat16")
DEFAULT_MATMUL_INPUTS = "auto"  # matmul_inputs_for: float32 at batch 1, bf16 from batch 2
GEMV_MAX_BATCH = 8  # the largest decode batch of the GEMV templates; larger ones run GEMM tiles (Gemv.tile_as_gemm)
MAX_K_SPLITS = 4  # K slices of a decode GEMM of few tasks (k_splits)


def precision_of(weights: str, activations: str, kv_cache: str = DEFAULT_KV_CACHE,
                 matmul_inputs: str = DEFAULT_MATMUL_INPUTS) -> Precision:
    """`activations`: "float32" keeps activations and GEMV inputs in float32 over the weights'
    dtype: a float32 reference computation on the stored weights. "model" keeps them in the
    weights' dtype, rounding every op's output as transformers does. `kv_cache`, chosen on its own:
    "model" stores K and V in the weights' dtype, "float32" in float32. `matmul_inputs`
    "bfloat16" rounds the input of every decode matrix product to bf16 (float32 accumulation,
    float32 residual stream): what tensor cores multiply in one pass instead of two; "auto" (here)
    means float32 (`matmul_inputs_for` resolves it by batch)."""
    if weights not in WEIGHT_DTYPES:
        raise MpkError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, not {weights!r}")
    if activations not in ACTIVATIONS:
        raise MpkError(f"activations must be one of {', '.join(ACTIVATIONS)}, not {activations!r}")
    if kv_cache not in KV_CACHES:
        raise MpkError(f"the KV cache must be one of {', '.join(KV_CACHES)}, not {kv_cache!r}")
    if matmul_inputs not in MATMUL_INPUTS:
        raise MpkError(f"matrix-product inputs must be one of {', '.join(MATMUL_INPUTS)}, not {matmul_inputs!r}")
    act = "float32" if activations == "float32" else weights
    kv = "float32" if kv_cache == "float32" else weights
    matmul_inputs = "float32" if matmul_inputs == "auto" else matmul_inputs
    mm = "bfloat16" if matmul_inputs == "bfloat16" and act == "float32" else act
    return Precision(weights=weights, activations=act, kv_cache=kv, matmul_inputs=mm)


def matmul_inputs_for(matmul_inputs: str, activations: str, batch: int, weights: str = "bfloat16") -> str:
    """The matrix-product inputs of a decode batch. "auto" is float32 at batch 1, where bf16 gains
    nothing, and bf16 from batch 2, where the tensor-core GEMV then needs one pass instead of two
    (docs/decisions.md, "Activation precision") and GEMM tiles beyond GEMV_MAX_BATCH multiply bf16
    alone ("Batches beyond 8"). Float32 weights run on the CPU executor alone, with no tile: float32."""
    if matmul_inputs == "auto":
        return "float32" if batch == 1 or weights == "float32" else "bfloat16"
    if matmul_inputs == "float32" and activations == "float32" and weights != "float32" and batch > GEMV_MAX_BATCH:
        raise MpkError(f"float32 matrix-product inputs run up to batch {GEMV_MAX_BATCH}; a batch of {batch} "
                       "multiplies bf16 inputs on tensor cores (use --matmul-inputs auto or bfloat16)")
    return matmul_inputs


def build_decode_program(cfg: ModelConfig, batch: int, max_seq_len: int, tp_size: int = 1,
                         num_sms: int = defaults.NUM_SMS, activations: str = DEFAULT_ACTIVATIONS,
                         weights: str = "bfloat16", kv_cache: str = DEFAULT_KV_CACHE,
                         matmul_inputs: str = DEFAULT_MATMUL_INPUTS) -> Program:
    """The decode step of `cfg` for `batch` sequences of up to `max_seq_len` tokens on tp_size GPUs,
    with weights stored as `weights`, activations, the KV cache and matrix-product inputs as
    `precision_of` says, matrix-product inputs as `matmul_inputs_for`. Batches of more than
    GEMV_MAX_BATCH run their matrix products as GEMM tiles."""
    if not 1 <= batch <= MAX_BATCH:
        raise MpkError(f"--batch must be between 1 and {MAX_BATCH}, not {batch}")
    precision = precision_of(weights, activations, kv_cache,
                             matmul_inputs_for(matmul_inputs, activations, batch, weights))
    if not 1 <= num_sms <= MAX_NUM_SMS:
        raise MpkError(f"--num-sms must be between 1 and {MAX_NUM_SMS}, not {num_sms}")
    if tp_size < 1:
        raise MpkError(f"--tp must be at least 1, not {tp_size}")
    if max_seq_len < 1:
        raise MpkError(f"the context length must be at least 1 token, not {max_seq_len}")
    if max_seq_len > cfg.max_position_embeddings:
        raise MpkError(
            f"a context of {max_seq_len} tokens is longer than the model's {cfg.max_position_embeddings}; "
            "use a shorter prompt or fewer new tokens"
        )
    prog = Program(cfg, batch, max_seq_len, tp_size, num_sms, precision)
    shards = [shard_of(cfg, r, tp_size) for r in range(tp_size)]
    for r in range(tp_size):
        _declare_rank_tensors(prog, r, shards[r])
    # Program order, stage by stage, every rank's op of a stage side by side.
    for r in range(tp_size):
        prog.add_op(r, "embed", "embed", None,
                    {"tokens": rank_name(prog, r, TOKENS), "table": rank_name(prog, r, EMBED)}, {"out": rank_name(prog, r, "x.0")})
    for layer in range(cfg.num_layers):
        _attention_block(prog, layer, shards)
        mlp_block(prog, layer, shards)
    x_final = f"x.{2 * cfg.num_layers}"
    lm_tile = [lm_head_tile(prog, s) for s in shards]
    for r in range(tp_size):
        prog.add_op(r, "rmsnorm_lm_head_argmax", "lm_head", None,
                    {"x": rank_name(prog, r, x_final), "norm": rank_name(prog, r, "final_norm"), "weight": rank_name(prog, r, "lm_head")},
                    {"logits": rank_name(prog, r, LOGITS), "cand_val": rank_name(prog, r, "cand_val"), "cand_idx": rank_name(prog, r, "cand_idx")},
                    tile=lm_tile[r], vocab_start=shards[r].vocab_start, eps=cfg.rms_norm_eps)
    for r in range(tp_size):
        inputs = {role: rank_name(prog, r, name) for role, name in
                  (("prompt", PROMPT), ("prompt_len", PROMPT_LEN), ("sample_floats", SAMPLE_FLOATS),
                   ("sample_ints", SAMPLE_INTS))}
        for k in range(tp_size):
            inputs[f"cand_val{k}"] = rank_name(prog, k, "cand_val")
            inputs[f"cand_idx{k}"] = rank_name(prog, k, "cand_idx")
            inputs[f"logits{k}"] = rank_name(prog, k, LOGITS)
        prog.add_op(r, "sample", "sample", None, inputs, {"tokens": rank_name(prog, r, TOKENS)}, ranks=tp_size)
    from mpk.ops import OP_KINDS
    from mpk.ops.linear import Gemv

    for op in prog.ops:  # each matrix product says so itself: its CPU reference and its template follow it
        kind = OP_KINDS[op.kind]
        if isinstance(kind, Gemv):
            if precision.matmul_inputs != precision.activations:
                op.params["bf16_inputs"] = True
            if batch > GEMV_MAX_BATCH:
                kind.tile_as_gemm(op, gemm_weight_rows(prog, op))
    return prog


def product_input_dtype(prog: Program) -> str:
    """The dtype of a decode step's activations that only a matrix product reads: the attention's
    output (read by the O projection) and the MLP's hidden one, SiLU(gate) * up (read by the down
    projection). Where those multiply bf16 inputs (float32 activations, Precision.matmul_inputs, one
    GPU, a GEMV batch), the producing task stores them rounded to bf16 already: the same products from
    half the bytes to stage (docs/decisions.md)."""
    pr = prog.precision
    if pr.activations == "float32" and pr.matmul_inputs == "bfloat16" and prog.tp_size == 1 \
            and prog.batch <= GEMV_MAX_BATCH:
        return "bfloat16"
    return pr.activations


def gemm_weight_rows(prog: Program, op) -> int:
    """A decode GEMM's weight rows per task (of `op`'s weight)."""
    return _gemm_block(prog, prog.tensors[op.inputs["weight"]].shape[0])


def _gemm_block(prog: Program, weight_rows: int) -> int:
    """Weight rows per GEMM task: the larger block when it still gives every SM a task."""
    from mpk.ops.linear import GEMM_ROWS, GEMM_WEIGHT_ROWS

    small, large = min(GEMM_WEIGHT_ROWS), max(GEMM_WEIGHT_ROWS)
    return large if cdiv(weight_rows, large) * cdiv(prog.batch, GEMM_ROWS) >= prog.num_sms else small


def k_splits(prog: Program, k: int) -> int:
    """K slices of a decode batch's O or down projection: a GEMM of fewer tasks than half the SMs is
    split into as many slices as make one wave (up to MAX_K_SPLITS; slices of whole 32-wide k-steps).
    On one GPU with float32 activations only, where the slices' float32 sums add up to the product
    that linear_residual rounds once."""
    from mpk.ops.linear import GEMM_ROWS

    if prog.one_step or prog.batch <= GEMV_MAX_BATCH or prog.tp_size > 1 or prog.precision.activations != "float32":
        return 1  # a prefill program's GEMMs have row blocks enough
    H = prog.cfg.hidden_size
    tasks = cdiv(H, _gemm_block(prog, H)) * cdiv(prog.batch, GEMM_ROWS)
    if 2 * tasks > prog.num_sms:
        return 1
    splits = min(MAX_K_SPLITS, prog.num_sms // tasks)
    while splits > 1 and k % (32 * splits):
        splits -= 1
    return splits


def lm_head_tile(prog: Program, sh: Shard) -> int:
    """Vocabulary rows per LM-head task: a GEMM block beyond GEMV_MAX_BATCH (the candidates' count
    follows from it)."""
    return _gemm_block(prog, sh.vocab) if prog.batch > GEMV_MAX_BATCH else gemv_tile(sh.vocab, prog, 1, prog.cfg.hidden_size)


def rank_name(prog: Program, rank: int, name: str) -> str:
    """The name of rank `rank`'s copy of tensor `name` in `prog`."""
    return tensor_name(rank, prog.tp_size, name)


def _declare_rank_tensors(prog: Program, r: int, sh: Shard) -> None:
    cfg, B, S = prog.cfg, prog.batch, prog.max_seq_len
    H, hd = cfg.hidden_size, cfg.head_dim
    splits = attention_splits(B, sh.kv_groups, S, prog.num_sms)
    add = prog.add_tensor
    wt, act = prog.precision.weights, prog.precision.activations
    add(r, TOKENS, "meta", (B,), "int64")
    add(r, PROMPT, "meta", (B, S), "int64")
    add(r, PROMPT_LEN, "meta", (B,), "int64")
    add(r, SAMPLE_FLOATS, "meta", (B, 2), "float32")
    add(r, SAMPLE_INTS, "meta", (B, 2), "int64")
    add(r, EMBED, "weight", (cfg.vocab_size, H), wt)
    add(r, ROPE, "weight", (S, hd), "float32")
    add(r, "x.0", "activation", (B, H), act)
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        declare_layer(prog, r, sh, layer, B, product_inputs=product_input_dtype(prog))
        if splits > 1:
            add(r, p + "attn_part", "activation", (B, sh.kv_groups, splits, cfg.q_per_kv, hd), "float32")
            add(r, p + "attn_lse", "activation", (B, sh.kv_groups, splits, cfg.q_per_kv), "float32")
    add(r, "final_norm", "weight", (H,), wt)
    add(r, "lm_head", "weight", (sh.vocab, H), wt)
    n_lm_tiles = cdiv(sh.vocab, lm_head_tile(prog, sh))
    add(r, LOGITS, "activation", (B, sh.vocab), "float32")
    add(r, "cand_val", "activation", (B, n_lm_tiles), "float32")
    add(r, "cand_idx", "activation", (B, n_lm_tiles), "int64")


def declare_layer(prog: Program, r: int, sh: Shard, layer: int, rows: int, mlp: bool = True,
                  product_inputs: str | None = None) -> None:
    """Rank r's weights and KV cache of one layer, and the activations its ops pass along for `rows`
    rows (one per sequence in decode, one per position and sequence in prefill). Without `mlp`,
    only what the layer's attention needs. `product_inputs`: the dtype of the activations only a
    matrix product reads, the attention's output and the MLP's hidden one (default: the activations')."""
    cfg, S = prog.cfg, prog.max_seq_len
    H, hd = cfg.hidden_size, cfg.head_dim
    qkv_rows = sh.kv_groups * cfg.qkv_rows_per_group
    add = prog.add_tensor
    wt, act, kv = prog.precision.weights, prog.precision.activations, prog.precision.kv_cache
    p = f"layers.{layer}."
    add(r, p + "attn_norm", "weight", (H,), wt)
    add(r, p + "qkv", "weight", (qkv_rows, H), wt)
    if cfg.qkv_bias:
        add(r, p + "qkv_bias", "weight", (qkv_rows,), wt)
    if cfg.qk_norm:
        add(r, p + "q_norm", "weight", (hd,), wt)
        add(r, p + "k_norm", "weight", (hd,), wt)
    add(r, p + "k_cache", "state", (prog.batch, S, sh.kv_groups, hd), kv)
    add(r, p + "v_cache", "state", (prog.batch, S, sh.kv_groups, hd), kv)
    add(r, p + "qkv_out", "activation", (rows, qkv_rows), act)
    add(r, p + "attn", "activation", (rows, sh.q_heads * hd), product_inputs or act)
    if not mlp:
        return
    add(r, p + "o", "weight", (H, sh.q_heads * hd), wt)
    add(r, p + "mlp_norm", "weight", (H,), wt)
    add(r, p + "gate_up", "weight", (2 * sh.intermediate, H), wt)
    add(r, p + "down", "weight", (H, sh.intermediate), wt)
    add(r, p + "h", "activation", (rows, sh.intermediate), product_inputs or act)
    add(r, f"x.{2 * layer + 1}", "activation", (rows, H), act)
    add(r, f"x.{2 * layer + 2}", "activation", (rows, H), act)
    if exchanges_words(prog):
        for weight in ("o", "down"):  # float32 pairs: (value, step tag) words (`mpk.ops.linear.LinearTagged`)
            add(r, p + f"{weight}_inbox", "mailbox", (prog.tp_size, rows, 2 * H), "float32")
    elif prog.tp_size > 1:
        add(r, p + "o_partial", "activation", (rows, H), "float32")
        add(r, p + "down_partial", "activation", (rows, H), "float32")
    for weight, k in (("o", sh.q_heads * hd), ("down", sh.intermediate)):
        splits = k_splits(prog, k)
        for s in range(splits if splits > 1 else 0):  # the K slices' partial products
            add(r, p + f"{weight}_part{s}", "activation", (rows, H), "float32")


def _attention_block(prog: Program, layer: int, shards: list[Shard]) -> None:
    """QKV projection, attention splits, merge, O projection. The splits norm and rope the group's
    q and k themselves and the merge appends this step's K/V row (docs/decisions.md, attention); with
    one split, one `attention` task per (sequence, group) does all of it."""
    cfg = prog.cfg
    p = f"layers.{layer}."
    x_in, x_out = f"x.{2 * layer}", f"x.{2 * layer + 1}"
    for r, sh in enumerate(shards):
        n = partial(rank_name, prog, r)
        inputs = {"x": n(x_in), "norm": n(p + "attn_norm"), "weight": n(p + "qkv")}
        if cfg.qkv_bias:
            inputs["bias"] = n(p + "qkv_bias")
        prog.add_op(r, "rmsnorm_linear", p + "qkv", layer, inputs, {"out": n(p + "qkv_out")},
                    tile=qkv_tile(cfg, sh, prog.num_sms, gemv_align(prog, sh.kv_groups * cfg.qkv_rows_per_group, 1,
                                                                    cfg.hidden_size)), eps=cfg.rms_norm_eps)
    heads = dict(q_per_kv=cfg.q_per_kv, head_dim=cfg.head_dim, eps=cfg.rms_norm_eps)
    for r, sh in enumerate(shards):
        n = partial(rank_name, prog, r)
        current = {"qkv": n(p + "qkv_out"), "rope": n(ROPE)}
        q_norm = {"q_norm": n(p + "q_norm")} if cfg.qk_norm else {}
        k_norm = {"k_norm": n(p + "k_norm")} if cfg.qk_norm else {}
        cache = {"k_cache": n(p + "k_cache"), "v_cache": n(p + "v_cache")}
        splits = attention_splits(prog.batch, sh.kv_groups, prog.max_seq_len, prog.num_sms)
        if splits == 1:
            past = {"k_past": cache["k_cache"], "v_past": cache["v_cache"]}
            prog.add_op(r, "attention", p + "attention", layer, {**current, **q_norm, **k_norm, **past},
                        {"out": n(p + "attn"), **cache}, scale=cfg.head_dim ** -0.5, window=cfg.sliding_window,
                        **heads)
            continue
        prog.add_op(r, "attention_split", p + "attention", layer, {**current, **q_norm, **k_norm, **cache},
                    {"part": n(p + "attn_part"), "lse": n(p + "attn_lse")},
                    splits=splits, scale=cfg.head_dim ** -0.5, window=cfg.sliding_window, **heads)
        prog.add_op(r, "attention_merge", p + "attn_merge", layer,
                    {**current, **k_norm, "part": n(p + "attn_part"), "lse": n(p + "attn_lse")},
                    {"out": n(p + "attn"), **cache}, **heads)
    row_parallel_linear(prog, layer, "o", p + "attn", x_in, x_out)


def mlp_block(prog: Program, layer: int, shards: list[Shard]) -> None:
    p = f"layers.{layer}."
    x_in, x_out = f"x.{2 * layer + 1}", f"x.{2 * layer + 2}"
    for r, sh in enumerate(shards):
        n = partial(rank_name, prog, r)
        prog.add_op(r, "rmsnorm_gate_up_silu", p + "gate_up", layer,
                    {"x": n(x_in), "norm": n(p + "mlp_norm"), "weight": n(p + "gate_up")}, {"out": n(p + "h")},
                    tile=gemv_tile(sh.intermediate, prog, 2, prog.cfg.hidden_size), eps=prog.cfg.rms_norm_eps)
    row_parallel_linear(prog, layer, "down", p + "h", x_in, x_out)


def row_parallel_linear(prog: Program, layer: int, weight: str, x: str, residual: str, out: str) -> None:
    """out = residual + x @ W^T; with TP each rank's partial product is summed by an allreduce op,
    and a decode batch's GEMM of few tasks is split along K, its slices summed the same way."""
    p = f"layers.{layer}."
    H, N = prog.cfg.hidden_size, prog.tp_size
    k = prog.tensors[rank_name(prog, 0, p + weight)].shape[1]
    tile = gemv_tile(H, prog, 1, k)
    name = p + ("o" if weight == "o" else "down")
    splits = k_splits(prog, k)
    if splits > 1:
        for s in range(splits):
            prog.add_op(0, "linear", f"{name}.k{s}", layer, {"x": x, "weight": p + weight},
                        {"out": p + f"{weight}_part{s}"}, tile=tile, k_range=(s * k // splits, (s + 1) * k // splits))
        inputs = {f"partial{s}": p + f"{weight}_part{s}" for s in range(splits)}
        prog.add_op(0, "allreduce_residual", name + "_sum", layer, {**inputs, "residual": residual}, {"out": out},
                    tile=tile, ranks=splits)
        return
    if exchanges_words(prog):
        for r in range(N):
            n = partial(rank_name, prog, r)
            inboxes = {f"inbox{k}": rank_name(prog, k, p + f"{weight}_inbox") for k in range(N)}
            prog.add_op(r, "linear_tagged", name, layer, {"x": n(x), "weight": n(p + weight)}, inboxes,
                        tile=tile, ranks=N, slot=r)
        for r in range(N):
            n = partial(rank_name, prog, r)
            prog.add_op(r, "allreduce_tagged", name + "_allreduce", layer,
                        {"inbox": n(p + f"{weight}_inbox"), "residual": n(residual)},
                        {"out": n(out)}, tile=tile, ranks=N)
        return
    for r in range(N):
        n = partial(rank_name, prog, r)
        if N == 1:
            prog.add_op(r, "linear_residual", name, layer,
                        {"x": n(x), "weight": n(p + weight), "residual": n(residual)}, {"out": n(out)}, tile=tile)
        else:
            prog.add_op(r, "linear", name, layer, {"x": n(x), "weight": n(p + weight)},
                        {"out": n(p + f"{weight}_partial")}, tile=tile)
    if N == 1:
        return
    for r in range(N):
        inputs = {f"partial{k}": rank_name(prog, k, p + f"{weight}_partial") for k in range(N)}
        inputs["residual"] = rank_name(prog, r, residual)
        prog.add_op(r, "allreduce_residual", name + "_allreduce", layer, inputs, {"out": rank_name(prog, r, out)},
                    tile=tile, ranks=N)


def exchanges_words(prog: Program) -> bool:
    """Whether the row-parallel projections push their partials into every rank as tagged words that
    the allreduce polls, with no event counter between them (docs/decisions.md, "Tensor parallelism"):
    decode graphs of GEMV batches on several GPUs. GEMM tiles keep partials that the allreduce reads
    from the rank that made them, after a counter."""
    return prog.tp_size > 1 and not prog.one_step and prog.batch <= GEMV_MAX_BATCH


def qkv_tile(cfg: ModelConfig, sh: Shard, num_sms: int, align: int = TILE_ALIGN) -> int:
    """QKV tiles never straddle two KV groups, so the attention of group g waits only for group g's tiles."""
    rows = cfg.qkv_rows_per_group
    tile = choose_tile(sh.kv_groups * rows, num_sms, align)
    if tile >= rows:
        return rows
    while rows % tile:
        tile -= align if tile > align and (rows % align == 0) else 1
    return tile
