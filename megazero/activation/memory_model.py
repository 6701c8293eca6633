"""A model of activation memory: the bytes autograd saves for backward on one rank, per layer and at
the peak of a training step, as pure functions of ModelConfig, ActivationConfig and a `Layout`.

What it counts is what SavedTensorMeter (saved_tensors.py) measures: the *storages* of tensors saved
for backward (parameters excluded; views of one storage counted once), so it is written op by op for
megazero's block (model/gpt.py, attention.py, norms.py, ops/reference.py, tensor_parallel/layers.py),
not from the paper's rounded constants. The paper (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models") counts, per layer with 16-bit activations and 1-byte
dropout masks: sbh(34 + 5as/h) plain, sbh(10 + 24/t + 5as/(ht)) with tp, sbh/t (34 + 5as/h) with
tp + SP, 34sbh/t with selective + SP, 2sbh with full recomputation (`paper_layer_bytes`).

Where our tensors differ from the paper's (all measured on CPU, torch 2.13):
- CPU dropout keeps a mask of the activation's dtype (CUDA native_dropout: bool, 1 byte).
- CPU LayerNorm keeps mean / rstd in the activation dtype, CUDA in fp32. RMSNorm (reference) keeps an
  fp32 copy of its input (unless fp32), its rsqrt, the fp32 product x * rsqrt and an fp32 copy of the
  weight (a non-parameter tensor) when the dtype is not fp32.
- sdpa without dropout (CPU flash, CUDA flash / efficient) keeps q, k, v, the output and an fp32
  log-sum-exp [b, heads, s]: no s^2 term. With dropout on CPU it takes torch's math path, in fp32 whatever
  the dtype: scaled q and k copies, v, softmax, dropout mask and dropped probabilities, [b, a, s, s] each.
  fused / unfused on CPU (the reference): q, k^T, v copies, a [s, s] bool causal mask, the fp32 softmax
  (and its cast when not fp32), dropout mask and dropped probabilities.
- With GQA on CPU, k and v are repeated to every query head before attention (CUDA sdpa takes groups).
- q / k / v are views of the fused QKV output: saving one view keeps the whole [b, s, (n + 2) g d / tp]
  storage (MHA with sdpa keeps exactly q, k and v that way).
- SwiGLU's F.linear keeps the regrouped copy of the local gate/up weight [2 ffn/tp, h]: per microbatch.
- rope keeps its cos / sin tables [s, rotated] fp32, cached per layer: shared by the microbatches.
- Sequence parallelism: norms, dropouts and the residual stream are [b, s/tp, h]; the column-parallel
  layers (QKV, fc1, the output layer) keep their [b, s/tp, h] input shard, as Megatron does, and gather it
  again in backward (linear_with_sequence_parallel); nothing keeps the gathered [b, s, h] tensor.
- The vocab-parallel cross entropy keeps its fp32 softmax [b, s, V/tp], the ids and a bool mask.
CUDA-only paths (bool masks, fp32 norm statistics, fused kernels, grouped sdpa, the offload prefetch)
follow torch's and megatron_kernels' code and are unverified here: no GPU measured them.

The step's peak composes units ((microbatch, chunk) forwards) along the rank's pipeline plan
(schedules.build_plan), each storage reference-counted as the meter counts it, recomputation transients
included: under full recomputation the backward of a span first re-runs it (all of its activations
live at once), under selective the core attention / MLP activation of one layer (selective's fc2
keeps the activation's input, not its output: 4sbh/tp x dtype bytes less per layer for GELU, sb ffn/tp
for SwiGLU, whose silu(gate) and product are both re-made). `in_flight` gives the
plan's counts, `paper_in_flight_layers` the paper's formula for the first stage. Partitioned or
offloaded checkpoint inputs apply to every span but the first of a chunk fed by the previous pipeline
stage: that one keeps the received buffer as it is (the executor holds it for its gradient anyway).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from megazero.activation.recompute import core_attention_pays, recompute_spans
from megazero.config import ActivationConfig, ModelConfig
from megazero.pipeline_parallel.partition import chunk_layer_ranges, layers_per_virtual_stage, virtual_stage
from megazero.pipeline_parallel.schedules import BACKWARD, FORWARD, build_plan

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32, INT64, BOOL = 4, 8, 1


@dataclass(frozen=True)
class Layout:
    """The numbers of a run that activation memory depends on besides the model and activation configs.

    dtype: the model (activation) dtype, fp32 | bf16 | fp16; device_type: cpu | cuda; training_dropout:
    the model runs in training mode with its configured dropout (False: dropout off, e.g. p = 0)."""

    tp: int = 1
    pp: int = 1
    vp: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1
    dtype: str = "fp32"
    device_type: str = "cpu"
    training_dropout: bool = True
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None


@dataclass
class Seg:
    """One op (or fused group of ops) in forward order: the storages it saves, as (key, bytes, host);
    `recompute`: the segments re-run in its backward (a checkpoint), whose saves are transient."""

    name: str
    saves: list[tuple[tuple, int, bool]] = field(default_factory=list)
    recompute: list["Seg"] | None = None

    def save(self, key, nbytes: int, host: bool = False) -> "Seg":
        self.saves.append((key if isinstance(key, tuple) else (key,), int(nbytes), host))
        return self


class _Shapes:
    """Local sizes of one rank: b, s (full), s_r (residual-stream rows: s/tp under SP), h, heads..."""

    def __init__(self, m: ModelConfig, act: ActivationConfig, lay: Layout):
        self.m, self.act, self.lay = m, act, lay
        tp = lay.tp
        self.e = DTYPE_BYTES[lay.dtype]
        self.cuda = lay.device_type == "cuda"
        self.b, self.s, self.h = lay.micro_batch_size, m.seq_length, m.hidden_size
        self.sp = act.sequence_parallel and tp > 1
        self.s_r = self.s // tp if self.sp else self.s
        self.d, groups = m.head_dim, m.query_groups
        self.n = m.num_attention_heads // groups  # query heads per group
        slices = min(tp, groups)
        self.replicas = tp // slices
        self.g_l = groups // slices  # local key/value groups (1 when shared by replicas)
        self.a_l = m.num_attention_heads // tp  # local query heads
        self.qkv_width = self.g_l * (self.n + 2) * self.d
        self.f_l = m.ffn_size // tp
        self.v_l = m.padded_vocab_size(tp) // tp
        self.hidden_p = m.hidden_dropout if lay.training_dropout else 0.0
        self.attn_p = m.attention_dropout if lay.training_dropout else 0.0
        self.mask_bytes = 1 if self.cuda else self.e  # dropout masks: CUDA bool, CPU the activation dtype
        self.stat_bytes = FP32 if self.cuda else self.e  # LayerNorm mean / rstd


def _norm(sh: _Shapes, seg: Seg, x_key, x_bytes: int, rows: int, width: int, kind: str, out: str) -> None:
    """A norm over `width` of `rows` rows whose input storage is x_key (x_bytes); its output is `out`."""
    fused = sh.m.fused_kernels and sh.cuda and 1 <= width <= 65536
    if kind == "LayerNorm" or fused:  # torch's layer_norm / the fused kernel: x, mean, rstd
        seg.save(x_key, x_bytes)
        stat = FP32 if fused else sh.stat_bytes
        seg.save(out + ".mean", rows * stat).save(out + ".rstd", rows * stat)
        return
    # RMSNorm reference: xf = x.float(); y = xf * rsqrt(mean(xf^2) + eps) * weight.float()
    if sh.e == FP32:
        seg.save(x_key, x_bytes)
    else:
        seg.save(out + ".xf32", rows * width * FP32).save(out + ".weight_fp32", width * FP32)
    seg.save(out + ".rsqrt", rows * FP32).save(out + ".normed_fp32", rows * width * FP32)


def _dropout(sh: _Shapes, seg: Seg, key: str, numel: int, p: float) -> None:
    if p > 0:
        seg.save(key, numel * sh.mask_bytes)


def _core_attention(sh: _Shapes, q, k, v, backend: str) -> tuple[Seg, bool]:
    """The core attention's saves given the storages of q, k, v ((key, bytes) each); returns the
    segment and whether its output reaches the dense layer as a view (sdpa flash) or a copy."""
    b, s, a, d, e = sh.b, sh.s, sh.a_l, sh.d, sh.e
    basd, bass = b * a * s * d, b * a * s * s
    seg = Seg("core_attention")
    grouped = sh.g_l != a
    if backend in ("auto", "sdpa") and sh.cuda:  # flash / efficient, grouped natively (unverified)
        for key, nbytes in (q, k, v):
            seg.save(key, nbytes)
        seg.save("attn.out", basd * e).save("attn.lse", b * a * s * FP32)
        return seg, True
    if grouped:  # k, v repeated to every query head: [b, a, s, d] copies
        k, v = ("attn.k_rep", basd * e), ("attn.v_rep", basd * e)
    if backend in ("auto", "sdpa"):
        if sh.attn_p == 0:  # CPU flash kernel
            for key, nbytes in (q, k, v):
                seg.save(key, nbytes)
            seg.save("attn.out", basd * e).save("attn.lse", b * a * s * FP32)
            return seg, True
        # CPU math path (fp32 whatever the dtype): scaled q, k^T, v; softmax, mask, dropped probs.
        # v is reshaped to [b * a, s, d]: a copy, except with one local head (a view of v's storage)
        seg.save("attn.q_scaled", basd * FP32).save("attn.kt_scaled", basd * FP32)
        seg.save(*(v if a == 1 and e == FP32 else ("attn.v", basd * FP32)))
        for name in ("softmax", "dropout_mask", "dropped"):
            seg.save("attn." + name, bass * FP32)
        return seg, False
    # fused / unfused: the reference on CPU; on CUDA the fused kernel keeps only its e-dtype output
    # matmul folds [b, a] to one batch dim: copies of q, k^T and v, except with one local head (views)
    single = a == 1
    seg.save(*(q if single else ("attn.q_mm", basd * e))).save(*(k if single else ("attn.kt_mm", basd * e)))
    if backend == "fused" and sh.cuda and s <= 4096 and sh.m.fused_kernels:
        seg.save("attn.probs", bass * e)
    else:
        seg.save("attn.causal_mask", s * s * BOOL).save("attn.softmax_fp32", bass * FP32)
        if e != FP32 and sh.attn_p == 0:
            seg.save("attn.probs", bass * e)  # the cast, kept by probs @ v
    if sh.attn_p > 0:
        seg.save("attn.dropout_mask", bass * sh.mask_bytes).save("attn.dropped", bass * e)
    seg.save(*(v if single else ("attn.v_mm", basd * e)))
    return seg, False


def _layer(sh: _Shapes, x_key, x_bytes: int, selective: bool) -> list[Seg]:
    """The segments of one transformer block whose input storage is x_key; storage keys are local to
    the block (the caller prefixes them)."""
    m, b, s, s_r, h, e = sh.m, sh.b, sh.s, sh.s_r, sh.h, sh.e
    segs = []
    # input norm and the QKV input, the norm's output: residual-stream rows (under SP the [b, s/tp, h]
    # shard; the QKV gathers it for the matmul and again in backward, keeping neither gathered copy)
    seg = Seg("input_norm")
    _norm(sh, seg, x_key, x_bytes, b * s_r, h, m.normalization, "ln1")
    segs.append(seg)
    segs.append(Seg("qkv").save("ln1.out", b * s_r * h * e))
    qkv = ("qkv", b * s * sh.qkv_width * e)
    # q is a view of the QKV output when one query head per group is used here (the reshape merges
    # (groups, heads per group) only then), else a copy; k, v are always views
    q_used = sh.n // sh.replicas
    q_view = sh.g_l == 1 or q_used == 1
    q = qkv if q_view else ("q_copy", b * s * sh.a_l * sh.d * e)
    k, v = qkv, qkv
    heads_q, heads_k = b * sh.a_l * s, b * sh.g_l * s
    if m.qk_layernorm:
        seg = Seg("qk_norm")
        _norm(sh, seg, *q, heads_q, sh.d, m.normalization, "qnorm")
        _norm(sh, seg, *k, heads_k, sh.d, m.normalization, "knorm")
        segs.append(seg)
        q, k = ("qnorm.out", heads_q * sh.d * e), ("knorm.out", heads_k * sh.d * e)
    if m.position_embedding_type == "rope":
        rotated = int(sh.d * m.rotary_percent)
        segs.append(Seg("rope").save(("shared", "rope.cos"), s * rotated * FP32)
                    .save(("shared", "rope.sin"), s * rotated * FP32))
        q, k = ("rope.q", heads_q * sh.d * e), ("rope.k", heads_k * sh.d * e)
    core, out_is_view = _core_attention(sh, q, k, v, m.attention_backend)
    if selective and core_attention_pays(m.attention_backend, sh.lay.device_type, sh.attn_p):
        kept = Seg("core_attention (checkpoint)")
        for key, nbytes in (q, k, v):
            kept.save(key, nbytes)
        kept.recompute = [core]
        segs.append(kept)
    else:
        segs.append(core)
    context = b * s * sh.a_l * sh.d * e
    segs.append(Seg("dense").save("attn.out" if out_is_view else "dense.in", context))
    seg = Seg("attention_dropout")
    _dropout(sh, seg, "drop1.mask", b * s_r * h, sh.hidden_p)
    segs.append(seg)
    seg = Seg("post_attention_norm")
    _norm(sh, seg, "x1", b * s_r * h * e, b * s_r, h, m.normalization, "ln2")
    segs.append(seg)
    # MLP: fc1 keeps its input (the [b, s/tp, h] shard under SP); SwiGLU also the regrouped local
    # weight [2 ffn/tp, h]
    seg = Seg("fc1").save("ln2.out", b * s_r * h * e)
    if m.swiglu:
        seg.save("swiglu.weight", 2 * sh.f_l * h * e)
    segs.append(seg)
    fc1_out = b * s * sh.f_l * e * (2 if m.swiglu else 1)
    act = Seg("activation").save("fc1.out", fc1_out)  # gelu's input / silu's gate (+ up: same storage)
    if m.swiglu:
        act.save("silu.out", b * s * sh.f_l * e)
    if selective:
        # fc2 keeps the activation's input (fc1's output, SwiGLU's gate/up storage) and re-makes its
        # output in backward for the weight gradient (linear_with_recomputed_activation): the
        # activation's saves (SwiGLU's silu(gate)) are a transient of that backward, and the activation
        # output [b, s, ffn/tp] is never kept
        fused = Seg("activation + fc2 (activation recomputed)").save("fc1.out", fc1_out)
        fused.recompute = [act]
        segs.append(fused)
    else:
        segs.append(act)
        segs.append(Seg("fc2").save("fc2.in", b * s * sh.f_l * e))
    seg = Seg("mlp_dropout")
    _dropout(sh, seg, "drop2.mask", b * s_r * h, sh.hidden_p)
    segs.append(seg)
    return segs


def _prefix(segs: list[Seg], prefix: tuple) -> list[Seg]:
    """Copies of segs with every key prefixed; a shared key ("shared", name) becomes ("shared", *prefix, name):
    the same storage for every microbatch (`_keyed` leaves it unit-free)."""
    out = []
    for seg in segs:
        saves = [(("shared",) + prefix + k[1:] if k[0] == "shared" else prefix + k, n, host) for k, n, host in seg.saves]
        rec = _prefix(seg.recompute, prefix) if seg.recompute is not None else None
        out.append(Seg(seg.name, saves, rec))
    return out


def _embedding(sh: _Shapes) -> Seg:
    """VocabParallelEmbedding: its local ids (int64) and the outside-range mask [b, s, 1]; then dropout
    on the (reduce-scattered under SP) sum with the positions."""
    b, s = sh.b, sh.s
    seg = Seg("embedding").save("emb.ids", b * s * INT64).save("emb.mask", b * s * BOOL)
    _dropout(sh, seg, "emb.dropout_mask", b * sh.s_r * sh.h, sh.hidden_p)
    return seg


def _head(sh: _Shapes, x_key, x_bytes: int) -> list[Seg]:
    """Final norm, the output layer's input (the shard under SP), the cross entropy's fp32 softmax and ids."""
    b, s, h = sh.b, sh.s, sh.h
    seg = Seg("final_norm")
    _norm(sh, seg, x_key, x_bytes, b * sh.s_r, h, sh.m.normalization, "lnf")
    out = Seg("output_layer").save("lnf.out", b * sh.s_r * h * sh.e)
    ce = (Seg("cross_entropy").save("ce.softmax", b * s * sh.v_l * FP32)
          .save("ce.target", b * s * INT64).save("ce.outside", b * s * BOOL))
    return [seg, out, ce]


def chunk_segments(m: ModelConfig, act: ActivationConfig, lay: Layout, layers: range, pre_process: bool,
                   post_process: bool, received_input: bool | None = None) -> list[Seg]:
    """One (microbatch, chunk) forward as segments in order, keys prefixed by layer ("L", i).

    received_input (default: not pre_process): the chunk's input comes from the previous pipeline
    stage, whose buffer the executor keeps for its gradient anyway, so a full-recomputation checkpoint
    of the first span keeps it as it is (GPTModel: never partitioned or offloaded)."""
    sh = _Shapes(m, act, lay)
    segs: list[Seg] = []
    x_bytes = sh.b * sh.s_r * sh.h * sh.e  # the residual stream between blocks
    x_key: tuple = ("chunk_input",)
    received = not pre_process if received_input is None else received_input
    if pre_process:
        segs.append(_embedding(sh))
    for n_span, (span, checkpointed) in enumerate(recompute_spans(list(layers), act)):
        span_segs: list[Seg] = []
        kept, recompute_input = x_key, x_key
        as_is = n_span == 0 and received  # the received buffer, kept as it is
        host = act.cpu_offload_activations and not as_is
        if checkpointed:
            partitioned = act.distribute_saved_activations and lay.tp > 1 and not as_is
            kept_bytes = -(-x_bytes // sh.e // lay.tp) * sh.e if partitioned else x_bytes
            if partitioned or host:
                kept = x_key + ("kept",)
            # the recomputation reads the kept tensor itself (same storage: on CPU the host copy too)
            # unless it is all-gathered or, on CUDA, copied back from host memory
            recompute_input = kept
            if partitioned or (host and sh.cuda):
                recompute_input = x_key + ("restored",)
        for i in span:
            block = _prefix(_layer(sh, ("in",), x_bytes, act.selective), ("L", i))
            # the block input's storage is the span input (first block) or the previous block's output
            first_key = recompute_input if i == span[0] else ("L", i - 1, "out")
            block[0].saves = [(first_key if k == ("L", i, "in") else k, n, h_)
                              for k, n, h_ in block[0].saves]
            if checkpointed and i == span[0] and host and not sh.cuda:
                block[0].saves = [(k, n, True if k == recompute_input else h_) for k, n, h_ in block[0].saves]
            span_segs += block
            x_key = ("L", i, "out")
        if checkpointed:
            seg = Seg(f"checkpoint {span[0]}-{span[-1]}").save(kept, kept_bytes, host)
            seg.recompute = span_segs
            segs.append(seg)
        else:
            segs += span_segs
    if post_process:
        segs += _prefix(_head(sh, ("x",), x_bytes), ("head",))
        segs[-3].saves = [(x_key if k == ("head", "x") else k, n, h_) for k, n, h_ in segs[-3].saves]
    return segs


class _Live:
    """Reference-counted storages as the meter keeps them: bytes count from the first save to the
    last release; device and host apart."""

    def __init__(self):
        self.refs: dict[tuple, int] = defaultdict(int)
        self.device = self.host = self.peak = self.host_peak = 0

    def add(self, saves) -> None:
        for key, nbytes, host in saves:
            self.refs[key] += 1
            if self.refs[key] == 1:
                if host:
                    self.host += nbytes
                    self.host_peak = max(self.host_peak, self.host)
                else:
                    self.device += nbytes
                    self.peak = max(self.peak, self.device)

    def release(self, saves) -> None:
        for key, nbytes, host in saves:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                del self.refs[key]
                if host:
                    self.host -= nbytes
                else:
                    self.device -= nbytes


def _forward(live: _Live, segs: list[Seg], unit: tuple) -> None:
    for seg in segs:
        live.add(_keyed(seg.saves, unit))


def _backward(live: _Live, segs: list[Seg], unit: tuple) -> None:
    for seg in reversed(segs):
        if seg.recompute is not None:  # the checkpoint re-runs its function, then backward through it
            _forward(live, seg.recompute, unit)
            _backward(live, seg.recompute, unit)
        live.release(_keyed(seg.saves, unit))


def _keyed(saves, unit: tuple):
    """Per-unit storage keys: (unit, key), except a layer's shared tables (rope), keyed by layer only."""
    return [(key if key[0] == "shared" else unit + key, n, host) for key, n, host in saves]


@dataclass(frozen=True)
class RankMemory:
    pp_rank: int
    peak_bytes: int  # device bytes saved for backward, the step's peak
    host_peak_bytes: int
    stored_per_microbatch: list[int]  # per chunk: device bytes one microbatch leaves after its forward
    peak_in_flight: int  # most (microbatch, chunk) units forwarded and not yet backwarded


def rank_memory(m: ModelConfig, act: ActivationConfig, lay: Layout, pp_rank: int) -> RankMemory:
    """The step's peak on pipeline rank `pp_rank`: its plan (schedules.build_plan) run over the
    reference-counted storages of each unit, recomputation transients included."""
    counts = layers_per_virtual_stage(m.num_layers, lay.pp, lay.vp, lay.first_stage_layers, lay.last_stage_layers)
    last = lay.pp * lay.vp - 1
    chunks = []
    for c, layers in enumerate(chunk_layer_ranges(pp_rank, lay.pp, counts)):
        v = virtual_stage(pp_rank, c, lay.pp)
        chunks.append(chunk_segments(m, act, lay, layers, v == 0, v == last))
    live, in_flight, most = _Live(), 0, 0
    stored = []
    for segs in chunks:
        probe = _Live()
        _forward(probe, segs, ("probe",))
        stored.append(probe.device)
    for a in build_plan(pp_rank, lay.pp, lay.vp, lay.num_microbatches):
        unit = (a.microbatch, a.chunk)
        if a.kind == FORWARD:
            _forward(live, chunks[a.chunk], unit)
            in_flight += 1
            most = max(most, in_flight)
        elif a.kind == BACKWARD:
            _backward(live, chunks[a.chunk], unit)
            in_flight -= 1
    assert live.device == 0 and live.host == 0, "the model left storages live after the step"
    return RankMemory(pp_rank, live.peak, live.host_peak, stored, most)


def peak_bytes(m: ModelConfig, act: ActivationConfig, lay: Layout) -> tuple[int, int]:
    """(max over pipeline ranks of the step's peak, the first stage's): what the bench compares."""
    peaks = [rank_memory(m, act, lay, r).peak_bytes for r in range(lay.pp)]
    return max(peaks), peaks[0]


def layer_bytes(m: ModelConfig, act: ActivationConfig, lay: Layout) -> int:
    """Device bytes one block stores for one microbatch after its forward (its input included; under
    full recomputation with one layer per checkpoint: the kept input only, as partitioned / offloaded;
    rope tables included). A block whose input was made on this stage: the first span of a chunk fed by
    the previous pipeline stage keeps its received input whole (chunk_segments)."""
    segs = chunk_segments(m, act, lay, range(1, 2), False, False, received_input=False)
    live = _Live()
    _forward(live, segs, ("u",))
    return live.device


def layer_breakdown(m: ModelConfig, act: ActivationConfig, lay: Layout) -> list[tuple[str, int]]:
    """(segment, new device bytes) of one block's forward, in order: where the bytes of layer_bytes are."""
    live, out = _Live(), []
    for seg in chunk_segments(m, act, lay, range(1, 2), False, False, received_input=False):
        before = live.device
        live.add(_keyed(seg.saves, ("u",)))
        out.append((seg.name, live.device - before))
    return out


# ----- the paper's formulas (16-bit activations, 1-byte dropout masks) ---------------------------------
def paper_layer_bytes(m: ModelConfig, act: ActivationConfig, tp: int, micro_batch_size: int) -> float:
    """Korthikanti et al. 2022, per layer: sbh(34 + 5as/h) with t = 1; sbh(10 + 24/t + 5as/(ht)) with
    tp; sbh/t (34 + 5as/h) with tp + SP; selective drops the 5as/h term; full keeps 2sbh (/t with SP)."""
    s, b, h, a, t = m.seq_length, micro_batch_size, m.hidden_size, m.num_attention_heads, tp
    sbh = s * b * h
    sp = act.sequence_parallel and t > 1
    if act.full:
        return 2 * sbh / (t if sp else 1)
    attention = 0 if act.selective else 5 * a * s / h
    if sp:
        return sbh / t * (34 + attention)
    return sbh * (10 + 24 / t + attention / t)


def paper_in_flight_layers(num_layers: int, pp: int, vp: int, num_microbatches: int) -> float:
    """Layers' worth of activations the first stage holds: L (p microbatches of L/p layers) for 1F1B,
    L (1 + (p - 1) / (p m)) for the interleaved schedule with m chunks per stage (the paper's m)."""
    if vp == 1:
        return float(num_layers) * min(pp, num_microbatches) / pp
    return num_layers * (1 + (pp - 1) / (pp * vp))


def paper_first_stage_bytes(m: ModelConfig, act: ActivationConfig, lay: Layout) -> float:
    return paper_layer_bytes(m, act, lay.tp, lay.micro_batch_size) * paper_in_flight_layers(
        m.num_layers, lay.pp, lay.vp, lay.num_microbatches)
