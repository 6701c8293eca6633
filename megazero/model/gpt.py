"""The GPT decoder built from tensor-parallel layers: GPT-2 by default, the Llama family by config.

Defaults are the GPT-2 architecture (so Hugging Face's GPT2LMHeadModel exports exactly): learned
absolute positions, pre-LayerNorm blocks (eps 1e-5), tanh-approximate GELU, biases everywhere,
attention scale 1/sqrt(head_dim), a final LayerNorm and an output layer tied to the word embedding.
The parts a Llama-family block swaps in are chosen by ModelConfig (docs/models.md): RMSNorm, rotary
positions (model/rope.py) or none, SwiGLU, grouped-query attention (model/attention.py), q/k norms,
no linear biases (or a QKV bias only), an untied output layer.

Shapes: activations are batch-first [b, s, h]. With tp ranks, each rank holds heads/tp query heads
(and their key/value groups: attention.py) and ffn/tp MLP columns; activations between blocks are
replicated [b, s, h] on every TP rank, or with sequence parallelism (ActivationConfig.sequence_parallel)
split along s, [b, s/tp, h] with rank r holding positions [r*s/tp, (r+1)*s/tp): the embedding output,
the norms, the dropouts, the residual stream and what pipeline stages send. The column-parallel layers
all-gather s, the row-parallel ones reduce-scatter it (tensor_parallel/layers.py). Parameters are the
same either way (checkpoints load across the switch); the replicated ones in that region (norms,
row-parallel biases, position embeddings) get their gradients summed over TP (sum_grad_over_tp).

Layer names use *global* layer numbers (`layers.7.attention...`) so that a pipeline stage holding
layers 4-7 has the same parameter names, initial values and checkpoint keys as a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from megazero import comm
from megazero.activation import recompute
from megazero.config import ActivationConfig, ModelConfig
from megazero.context_parallel.sharding import local_positions
from megazero.model.attention import ContextParallel, SelfAttention, make_norm
from megazero.random import RNGStreams
from megazero.tensor_parallel.collectives import sum_grad_over_tp
from megazero.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megazero.tensor_parallel.init import normal_init, set_init
from megazero.tensor_parallel.sharding import ZeroUnit, get_shard_spec, set_shard_spec
from megazero.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelOutput,
    parallel_lm_logits,
)


class MLP(nn.Module):
    """GELU MLP (GPT-2), or SwiGLU (--swiglu): silu(x W_gate) * (x W_up), then W_down.

    SwiGLU's gate and up projections are one column-parallel weight whose global rows interleave them,
    [ffn, (gate, up)], so any contiguous TP split keeps each gate row with its up row and the layout is
    the same for every tp (checkpoints reshard freely; HF's gate_proj / up_proj are rows 0::2 / 1::2)."""

    def __init__(self, cfg: ModelConfig, tp_group, output_init, dtype, device,
                 activation: ActivationConfig = ActivationConfig()):
        super().__init__()
        self.swiglu = cfg.swiglu
        # selective recomputation: fc2 keeps the activation function's input (fc1's output) instead of
        # its output and re-makes the output in backward for its weight gradient (no matmul re-run;
        # tensor_parallel/layers.py: linear_with_recomputed_activation)
        self.recompute_activation = activation.selective
        sp = activation.sequence_parallel  # x [b, s/tp, h] gathered in, output reduce-scattered
        self.dense_h_to_4h = ColumnParallelLinear(
            cfg.hidden_size, cfg.ffn_size * (2 if cfg.swiglu else 1), tp_group=tp_group,
            init_method=normal_init(cfg.init_method_std), bias=cfg.add_bias_linear, sequence_parallel=sp,
            dtype=dtype, device=device)
        self.dense_4h_to_h = RowParallelLinear(
            cfg.ffn_size, cfg.hidden_size, tp_group=tp_group, init_method=output_init,
            bias=cfg.add_bias_linear, input_is_parallel=True, sequence_parallel=sp, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.swiglu:
            return self._fc2(_gelu, self.dense_h_to_4h(x))  # [b, s, ffn/tp] inside
        # The stored rows pair (gate_i, up_i); regroup this rank's rows as [gate rows; up rows] (a copy of
        # the local weight) so silu and the product run on contiguous halves: on strided pairs their
        # forward and backward cost ~3x more (bench/llama_vs_hf.py --profile).
        lin = self.dense_h_to_4h
        rows, h = lin.weight.shape  # [2 * ffn/tp, h]
        weight = lin.weight.view(rows // 2, 2, h).transpose(0, 1).reshape(rows, h)
        bias = None if lin.bias is None else lin.bias.view(rows // 2, 2).t().reshape(rows)
        gate, up = lin.linear(x, weight, bias).chunk(2, dim=-1)  # [b, s, ffn/tp] each
        return self._fc2(_swiglu, gate, up)

    def _fc2(self, fn, *inputs: torch.Tensor) -> torch.Tensor:
        """dense_4h_to_h(fn(*inputs)); under selective recomputation fn's output is re-made in backward."""
        if self.recompute_activation:
            return self.dense_4h_to_h(*inputs, activation=fn)
        return self.dense_4h_to_h(fn(*inputs))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _sp_norm_group(tp_group, activation: ActivationConfig):
    """The group over which a norm in the residual stream sums its weight gradients: TP under SP (each
    rank normalises its own positions), else none (every rank normalises the same replicated tensor)."""
    return tp_group if activation.sequence_parallel else None


class ResidualDropout(nn.Dropout):
    """Dropout on the residual stream. Replicated activations draw from the ambient (TP-replicated)
    stream, so TP ranks drop the same elements; under SP each rank holds different positions and draws
    from its own "tensor-parallel" stream (Megatron's rng-tracker fork). No fork when nothing is drawn."""

    def __init__(self, p: float, rng: RNGStreams, sequence_parallel: bool):
        super().__init__(p)
        self.rng, self.sequence_parallel = rng, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drawn = self.sequence_parallel and self.training and self.p > 0
        with self.rng.fork("tensor-parallel") if drawn else contextlib.nullcontext():
            return super().forward(x)


class TransformerBlock(nn.Module):
    """x + drop(attn(ln1(x))), then + drop(mlp(ln2(.))); x is [b, s, h] ([b, s/tp, h] under SP)."""

    def __init__(self, cfg: ModelConfig, tp_group, rng: RNGStreams, dtype, device,
                 activation: ActivationConfig = ActivationConfig(), cp: ContextParallel = ContextParallel()):
        super().__init__()
        # GPT-2 / Megatron: residual-branch output projections scaled by 1/sqrt(2 * num_layers).
        output_init = normal_init(cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers))
        norm_group = _sp_norm_group(tp_group, activation)
        self.input_layernorm = make_norm(cfg, cfg.hidden_size, dtype, device, norm_group)
        self.attention = SelfAttention(cfg, tp_group, rng, output_init, dtype, device, activation, cp)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size, dtype, device, norm_group)
        self.mlp = MLP(cfg, tp_group, output_init, dtype, device, activation)
        self.hidden_dropout = ResidualDropout(cfg.hidden_dropout, rng, activation.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.hidden_dropout(self.attention(self.input_layernorm(x)))
        return x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))


class GPTModel(nn.Module):
    """A GPT (or one pipeline chunk of it: `layer_range`, `pre_process`, `post_process`).

    forward(tokens [b, s], labels [b, s] | None) -> per-token loss [b, s] (fp32) when labels are given,
    else this rank's vocab slice of the logits [b, s, V_padded/tp].
    """

    def __init__(self, cfg: ModelConfig, *, tp_group, rng: RNGStreams, layer_range: range | None = None,
                 pre_process: bool = True, post_process: bool = True, dtype=torch.float32, device=None,
                 activation: ActivationConfig = ActivationConfig(), cp: ContextParallel = ContextParallel()):
        super().__init__()
        assert cfg.vocab_size is not None
        self.cfg, self.tp_group, self.rng, self.activation = cfg, tp_group, rng, activation
        self.cp = cp  # context parallelism: this rank's tokens are its s/cp load-balanced chunks
        self.activation_dtype = dtype  # of the hidden states between blocks and pipeline stages
        self.pre_process, self.post_process = pre_process, post_process
        tp = self.tp_size = comm.group_size(tp_group)
        self.sequence_parallel = sp = activation.sequence_parallel
        layer_range = layer_range if layer_range is not None else range(cfg.num_layers)

        # The word embedding exists on the first stage (input) and, tied, on the last (output layer). On
        # a last stage that is not also the first it is a copy: same name, so same initial values; its
        # gradient is summed with the first stage's over the embedding group (zero/grad_sync.py). A chunk
        # holding only one of the two ends is pipelined (pp > 1; vp > 1 needs pp > 1), so its embedding is
        # shared across stages: its ShardSpec says so (own_bucket; tied_copy on the last stage).
        # Untied (--untie-embeddings-and-output-weights): the last stage has an output layer of its own.
        self.tied = not cfg.untie_embeddings_and_output_weights
        if pre_process or (post_process and self.tied):
            self.word_embeddings = VocabParallelEmbedding(
                cfg.padded_vocab_size(tp), cfg.hidden_size, tp_group=tp_group,
                init_method=normal_init(cfg.init_method_std), logical_vocab_size=cfg.vocab_size,
                sequence_parallel=sp, dtype=dtype, device=device)
            if pre_process != post_process and self.tied:
                w = self.word_embeddings.weight
                set_shard_spec(w, dataclasses.replace(get_shard_spec(w), tied_copy=not pre_process, own_bucket=True))
        if pre_process:
            if cfg.position_embedding_type == "learned_absolute":  # rope lives in attention; none: NoPE
                self.position_embeddings = nn.Parameter(
                    torch.empty(cfg.max_positions, cfg.hidden_size, dtype=dtype, device=device))
                set_init(self.position_embeddings, normal_init(cfg.init_method_std))
            self.embedding_dropout = ResidualDropout(cfg.hidden_dropout, rng, sp)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, tp_group, rng, dtype, device, activation, cp) for i in layer_range})
        # full recomputation: which consecutive layers run as one checkpointed span (recompute.py)
        self.recompute_spans = recompute.recompute_spans(list(layer_range), activation)
        self.input_storage = recompute.InputStorage(
            partition_group=tp_group if activation.distribute_saved_activations else None,
            offload=activation.cpu_offload_activations, synchronize=activation.synchronize_checkpoint_boundary)
        # a chunk's input from the previous pipeline stage stays alive anyway (the executor keeps the
        # received buffer for its .grad), so the first span keeps it as it is (recompute.KEEP, with the
        # boundary sync): a host copy or a 1/tp chunk would come on top of it, not instead
        self.received_input_storage = recompute.InputStorage(synchronize=activation.synchronize_checkpoint_boundary)
        if post_process:
            self.final_layernorm = make_norm(cfg, cfg.hidden_size, dtype, device, _sp_norm_group(tp_group, activation))
            if not self.tied:
                self.output_layer = VocabParallelOutput(
                    cfg.padded_vocab_size(tp), cfg.hidden_size, tp_group=tp_group,
                    init_method=normal_init(cfg.init_method_std), logical_vocab_size=cfg.vocab_size,
                    sequence_parallel=sp, dtype=dtype, device=device)

    def pipeline_activation(self, micro_batch_size: int) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the hidden state this chunk receives from / sends to a neighbouring
        pipeline stage: [b, s, h], replicated over TP, in the model dtype; with sequence parallelism
        [b, s/tp, h], this rank's positions (1/tp of the bytes). With context parallelism s is the
        local s/cp (SP: s/(cp tp), the SP shard of the local sequence). The pipeline carries whatever is
        declared here, with no trainer change."""
        s = self.cfg.seq_length // self.cp.size
        s = s // self.tp_size if self.sequence_parallel else s
        return (micro_batch_size, s, self.cfg.hidden_size), self.activation_dtype

    def zero_units(self) -> list[ZeroUnit]:
        """ZeRO-3 gather units, forward order (zero/stage3.py, zero/engine.py): the word embedding alone
        when it is shared across pipeline stages (ShardSpec.own_bucket: the same shard boundaries on
        both ends), the rest of the chunk's non-block parameters, then each block (per-layer)."""
        blocks = list(self.layers.values())
        in_block = {id(p) for blk in blocks for p in blk.parameters()}
        own = [p for p in self.parameters() if get_shard_spec(p).own_bucket]
        rest = [p for p in self.parameters() if id(p) not in in_block and not get_shard_spec(p).own_bucket]
        return ([ZeroUnit([p]) for p in own] + ([ZeroUnit(rest)] if rest else [])
                + [ZeroUnit(list(blk.parameters()), blk) for blk in blocks])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> [b, s, h] ([b, s/tp, h] under SP: the word embedding reduce-scatters)."""
        x = self.word_embeddings(tokens)
        if self.cfg.position_embedding_type == "learned_absolute":
            x = x + self._positions(tokens.shape[1])
        return self.embedding_dropout(x)

    def _positions(self, s: int) -> torch.Tensor:
        """The learned position embeddings of this rank's positions: [s, h], or under SP rows
        [r*s/tp, (r+1)*s/tp) of them, whose gradient rows the other ranks fill (summed over TP)."""
        if self.cp.size > 1:
            return self._cp_positions(s)
        if not self.sequence_parallel:
            return self.position_embeddings[:s]
        assert s % self.tp_size == 0, f"sequence parallelism: sequence length {s} not divisible by tp {self.tp_size}"
        local, start = s // self.tp_size, comm.group_rank(self.tp_group) * (s // self.tp_size)
        return sum_grad_over_tp(self.position_embeddings[:s], self.tp_group)[start:start + local]

    def _cp_positions(self, s: int) -> torch.Tensor:
        """Context parallelism: the s local tokens are this cp rank's two load-balanced chunks of the
        s * cp global ones, so their rows are those of their global positions (sharding.local_positions);
        under SP this TP rank adds rows [r*s/tp, (r+1)*s/tp) of those (the SP shard of the local
        sequence), gradient rows summed over TP as above."""
        global_s = s * self.cp.size
        rows = local_positions(global_s, self.cp.rank, self.cp.size, self.position_embeddings.device)
        if not self.sequence_parallel:
            return self.position_embeddings[rows]
        assert s % self.tp_size == 0, f"sequence parallelism: local sequence {s} not divisible by tp {self.tp_size}"
        local, start = s // self.tp_size, comm.group_rank(self.tp_group) * (s // self.tp_size)
        return sum_grad_over_tp(self.position_embeddings[:global_s], self.tp_group)[rows[start:start + local]]

    def forward(self, tokens_or_hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens_or_hidden) if self.pre_process else tokens_or_hidden
        for n, (layer_ids, checkpointed) in enumerate(self.recompute_spans):
            blocks = [self.layers[str(i)] for i in layer_ids]
            if checkpointed:
                storage = self.received_input_storage if n == 0 and not self.pre_process else self.input_storage
                x = recompute.checkpoint(_run_blocks(blocks), x, rng=self.rng, storage=storage)
            else:
                x = _run_blocks(blocks)(x)
        if not self.post_process:
            return x  # hidden states [b, s, h] ([b, s/tp, h] under SP) for the next pipeline stage
        x = self.final_layernorm(x)  # under SP on this rank's positions; the output layer gathers s
        if self.tied:
            logits = parallel_lm_logits(x, self.word_embeddings.weight, self.tp_group,
                                        self.sequence_parallel)  # [b, s, V/tp]
            vocab_start = self.word_embeddings.vocab_start
        else:
            logits, vocab_start = self.output_layer(x), self.output_layer.vocab_start
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, self.tp_group, vocab_start, self.cfg.vocab_size)


def _run_blocks(blocks: list[nn.Module]):
    """The function of a span of blocks: x [b, s, h] ([b, s/tp, h] under SP) -> x after each block in turn."""
    def run(x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x)
        return x
    return run
