"""Layers -> pipeline stages x virtual chunks (Megatron's interleaved assignment).

With pp stages and vp chunks per stage there are pp*vp *virtual stages*; virtual stage v lives on
pipeline rank v % pp as its chunk v // pp, and the layers are cut into pp*vp consecutive blocks in
virtual-stage order. Example, 16 layers, pp=4, vp=2 (two layers per virtual stage):

    rank 0: chunk 0 = layers 0-1,  chunk 1 = layers 8-9      (1-based: 1-2 and 9-10)
    rank 1: chunk 0 = layers 2-3,  chunk 1 = layers 10-11
    ...

Virtual stage 0 also holds the embedding, the last virtual stage the final norm, output layer and
loss. Optional uneven ends (`first_stage_layers`, `last_stage_layers`) give the first / last virtual
stage a different layer count to balance the embedding and loss cost; the rest split evenly.
"""

from __future__ import annotations

from megazero.errors import ConfigError


def virtual_stage(pp_rank: int, chunk: int, pp: int) -> int:
    return chunk * pp + pp_rank


def stage_of_virtual(v: int, pp: int) -> tuple[int, int]:
    """virtual stage -> (pp_rank, chunk)."""
    return v % pp, v // pp


def layers_per_virtual_stage(num_layers: int, pp: int, vp: int = 1, first_stage_layers: int | None = None,
                             last_stage_layers: int | None = None) -> list[int]:
    """Layer count of each virtual stage (length pp*vp), validated with one-line ConfigErrors."""
    if pp < 1 or vp < 1:
        raise ConfigError(f"pipeline size ({pp}) and virtual pipeline size ({vp}) must be >= 1")
    for name, value in (("--decoder-first-pipeline-num-layers", first_stage_layers),
                        ("--decoder-last-pipeline-num-layers", last_stage_layers)):
        if value is not None and value < 0:  # 0 is allowed: an embedding-only (or loss-only) stage
            raise ConfigError(f"{name} must be >= 0, got {value}")
    n_virtual = pp * vp
    if vp > 1 and pp == 1:
        raise ConfigError("interleaved pipeline (virtual stages > 1) needs --pipeline-model-parallel-size > 1")
    counts: list[int | None] = [None] * n_virtual
    if first_stage_layers is not None:
        counts[0] = first_stage_layers
    if last_stage_layers is not None:
        if n_virtual == 1:
            raise ConfigError("--decoder-last-pipeline-num-layers needs more than one pipeline stage")
        counts[-1] = last_stage_layers
    fixed = sum(c for c in counts if c is not None)
    free = [i for i, c in enumerate(counts) if c is None]
    rest = num_layers - fixed
    if rest < 0:
        raise ConfigError(f"first/last pipeline stage layer counts ({fixed} together) exceed --num-layers {num_layers}")
    if free:
        if rest % len(free):
            what = "pp x vp" if first_stage_layers is None and last_stage_layers is None else \
                "the number of remaining virtual stages"
            raise ConfigError(
                f"--num-layers {num_layers}{' minus the first/last stage layers' if len(free) < n_virtual else ''} = "
                f"{rest} is not divisible by {what} = {len(free)}; change --num-layers, --pp or the virtual pipeline size")
        if rest < len(free):
            raise ConfigError(
                f"{rest} layers left for {len(free)} virtual pipeline stages: every stage needs at least one layer; "
                f"lower --pp / the virtual pipeline size or the first/last stage layers")
        for i in free:
            counts[i] = rest // len(free)
    elif rest != 0:
        raise ConfigError(f"first/last stage layers ({fixed}) must add up to --num-layers {num_layers}")
    return [int(c) for c in counts]  # type: ignore[arg-type]


def layers_of_config(cfg) -> list[int]:
    """layers_per_virtual_stage for a RunConfig: its depth, pp, vp and first/last stage layer counts."""
    p = cfg.parallel
    return layers_per_virtual_stage(cfg.model.num_layers, p.pipeline_model_parallel_size, cfg.virtual_pipeline_size(),
                                    p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)


def chunk_layer_ranges(pp_rank: int, pp: int, counts: list[int]) -> list[range]:
    """Global layer indices of each chunk this pipeline rank holds (chunk order)."""
    starts = [sum(counts[:v]) for v in range(len(counts))]
    vp = len(counts) // pp
    return [range(starts[v], starts[v] + counts[v]) for v in (virtual_stage(pp_rank, c, pp) for c in range(vp))]
