"""This rank's model: one GPT chunk per virtual pipeline stage it holds, initialised layout-invariantly
in the model dtype. (Each chunk declares its own ZeRO facts: ShardSpec per parameter, zero_units().)"""

from __future__ import annotations

import torch

from megazero.config import RunConfig
from megazero.model import GPTModel
from megazero.model.attention import ContextParallel
from megazero.pipeline_parallel.partition import chunk_layer_ranges, layers_of_config, virtual_stage
from megazero.random import RNGStreams
from megazero.tensor_parallel.init import initialize_parameters
from megazero.topology import Topology

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model_chunks(cfg: RunConfig, topo: Topology, rng: RNGStreams, device: torch.device) -> torch.nn.ModuleList:
    vp = cfg.virtual_pipeline_size()
    last_virtual = topo.pp * vp - 1
    dtype = DTYPES[cfg.precision.params_dtype]
    chunks = torch.nn.ModuleList()
    for c, layers in enumerate(chunk_layer_ranges(topo.pp_rank, topo.pp, layers_of_config(cfg))):
        v = virtual_stage(topo.pp_rank, c, topo.pp)
        chunk = GPTModel(cfg.model, tp_group=topo.tp_group, rng=rng, layer_range=layers, pre_process=v == 0,
                         post_process=v == last_virtual, dtype=dtype, device=device,
                         activation=cfg.activation, cp=context_parallel(cfg, topo))
        initialize_parameters(chunk, cfg.training.seed)
        chunks.append(chunk)
    return chunks


def context_parallel(cfg: RunConfig, topo: Topology) -> ContextParallel:
    """This rank's cp group, rank and comm type for the model (the default, no cp, when cp = 1)."""
    if topo.cp == 1:
        return ContextParallel()
    return ContextParallel(topo.cp_group, topo.cp_rank, topo.cp, cfg.parallel.cp_comm_type)
