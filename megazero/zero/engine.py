"""ZeRO for one rank's model chunks: layout + gradient sync + parameter storage + optimizer, composed
for the trainer, which sees four calls per step:

    zero.start_step(num_microbatches)     before the schedule
    zero.finish_grad_sync()               after it: DP reduction done, tied embeddings summed
    result = zero.step(lr, clip, scale)   norm, clip, the update rule on owned fragments, parameter gather
    zero.release_params()                 after evaluation (stage 3 frees gathered units)

and `close()` at the end of the run (removes NVMe offload files).
"""

from __future__ import annotations

import torch
from torch import nn

from megazero import comm
from megazero.config import OptimizerConfig, ZeroConfig
from megazero.errors import ConfigError
from megazero.optim.update_rules import build_update_rule
from megazero.tensor_parallel.sharding import get_shard_spec
from megazero.topology import Topology
from megazero.zero.grad_sync import GradSync
from megazero.zero.layout import BufferLayout
from megazero.zero.optimizer import StepResult, ZeroOptimizer, decays
from megazero.zero.param_storage import ParamStorage
from megazero.zero.stage import ZeroStage
from megazero.zero.stage3 import Stage3Hooks


def parameter_groups(chunks: list[nn.Module], stage: ZeroStage) -> list[list[nn.Parameter]]:
    """Forward-ordered groups for the layout: one per parameter (packed into size-bounded buckets)
    unless parameters are sharded; then one per gather unit the chunk declares (`zero_units()`: the
    shared word embedding alone, the rest of the chunk, each block)."""
    groups: list[list[nn.Parameter]] = []
    for chunk in chunks:
        if stage.gather_units:
            groups += [unit.params for unit in chunk.zero_units()]
        else:
            groups += [[p] for p in chunk.parameters()]
    return groups


def build_layout(chunks: list[nn.Module], zero: ZeroConfig, dp: int) -> BufferLayout:
    """The flat ZeRO layout of these chunks over `dp` shard owners (a run's dp x cp; also what offline
    checkpoint writers must reproduce)."""
    stage = ZeroStage.of(zero.stage)
    return BufferLayout(parameter_groups(chunks, stage), dp, None if stage.gather_units else zero.reduce_bucket_size)


class ZeroEngine:
    def __init__(self, chunks: list[nn.Module], topo: Topology, zero: ZeroConfig, opt: OptimizerConfig,
                 device: torch.device):
        self.stage = zero.stage  # the number (checkpoints record it); `policy` is what the code reads
        stage = self.policy = ZeroStage.of(zero.stage)
        params = [p for c in chunks for p in c.parameters()]
        weight_decay = {id(p): decays(n, p) for c in chunks for n, p in c.named_parameters()}  # before ZeRO-3 storage
        # Parameters are replicated over dp x cp (context-parallel ranks hold the same weights and see
        # other tokens of the same samples), so ZeRO shards and reduces over the dp_cp group: the
        # "data-parallel" group, rank and size of zero/ are dp_cp's (= dp's while cp = 1). Averaging the
        # gradient over dp x cp is the global token-mean gradient as long as every cp rank's loss is the
        # mean over an equal number of tokens of the same samples (load-balanced chunks: s / cp each).
        self.layout = build_layout(chunks, zero, topo.dp_cp)
        assert {id(p) for p in params} == set(self.layout.range_of), "every parameter is laid out once"
        tied = any(get_shard_spec(p).own_bucket for p in params)
        self.storage = ParamStorage(self.layout, stage, topo.dp_cp_group, topo.dp_cp_rank,
                                    offload=zero.offload_param == "cpu")
        grad_dtype = torch.float32 if zero.grad_reduce_dtype == "fp32" else params[0].dtype
        self.grads = GradSync(self.layout, stage, topo.dp_cp_group, topo.dp_cp_rank, device, zero.overlap_comm,
                              embedding_group=topo.embedding_group if tied else None, grad_dtype=grad_dtype)
        self.optimizer = _build_optimizer(self.layout, self.grads, self.storage, weight_decay, opt, zero, stage, topo)
        self.stage3 = None  # (bench/comm_volume.py reads its block buckets)
        if stage.shards_parameters:
            self.stage3 = Stage3Hooks(chunks, self.layout, self.storage, zero.stage3_prefetch_layers)
            self.grads.register_bucket_done_hook(self.stage3.on_bucket_grads_done)
        elif stage.flat_param_buffer:
            for chunk in chunks:  # the all-gather after a step overlaps everything until the next forward
                chunk.register_forward_pre_hook(lambda module, args: self.storage.wait_gathers())

    def start_step(self, num_microbatches: int) -> None:
        self.grads.start_step(num_microbatches)

    def finish_grad_sync(self) -> None:
        self.grads.finish()

    def step(self, lr: float, max_norm: float, loss_scale: float) -> StepResult:
        result = self.optimizer.step(lr, max_norm, loss_scale)
        if not result.skipped:
            self.storage.after_step()  # stages 1-2: start gathering every rank's updated shard
        self.storage.release_all()
        return result

    def release_params(self) -> None:
        self.storage.release_all()

    def wait(self) -> None:
        """Finish every collective still in flight (the post-step parameter gather): call before
        reading parameters outside a forward (checkpoints, evaluation tools) and before teardown."""
        self.storage.wait_gathers()

    def close(self) -> None:
        """End of run: finish collectives, remove NVMe offload files."""
        self.wait()
        self.optimizer.close()

    # ----- checkpoints (megazero/checkpoint/state.py) ---------------------------------------------------
    def export_state(self) -> dict:
        """What a checkpoint saves of this rank's ZeRO state, collectives finished first: per owned
        fragment (same order) the fragment, its model-dtype values and (master or None, {state name:
        tensor}) (ZeroOptimizer.export_state); the update rule's name and declared state names, and its
        step count."""
        self.wait()
        opt = self.optimizer
        return {"fragments": list(opt.fragments), "values": list(opt.values), "state": opt.export_state(),
                "optimizer": self.optimizer_identity(), "step_count": opt.step_count()}

    def optimizer_identity(self) -> dict:
        """{"type": the update rule's name, "state": its declared state names}: what checkpoints record."""
        return self.optimizer.rule.identity()

    def fragments(self) -> list:
        """This rank's owned fragments (what export_state / import_state list, in that order)."""
        return list(self.optimizer.fragments)

    def value_dtypes(self) -> list[torch.dtype]:
        return [v.dtype for v in self.optimizer.values]

    @torch.no_grad()
    def import_state(self, values: list[torch.Tensor], masters: list[torch.Tensor],
                     states: list[dict[str, torch.Tensor]] | None, step_count: int) -> None:
        """Set every owned fragment's model-dtype values, fp32 master and the update rule's state (None:
        its initial state) and the step count, then rebuild what depends on them (stages 1-2: every
        rank's shard into the full parameter buffer)."""
        self.wait()
        for value, v in zip(self.optimizer.values, values):
            value.copy_(v)
        self.optimizer.import_state(masters, states, step_count)
        self.storage.after_step()
        self.wait()

    def memory_bytes(self) -> dict[str, int]:
        """Model-state bytes this rank holds between steps (on its device; offloaded state separately)."""
        out = {"params": self.storage.nbytes(), "grads": self.grads.nbytes(), "optimizer": self.optimizer.nbytes()}
        if self.optimizer.offload is not None:
            out["optimizer-host"] = self.optimizer.offload.host_bytes()
            out["optimizer-nvme"] = self.optimizer.offload.nvme_bytes()
        return out


def _build_optimizer(layout, grads, storage, weight_decay, opt: OptimizerConfig, zero: ZeroConfig,
                     stage: ZeroStage, topo: Topology) -> ZeroOptimizer:
    """The ZeRO optimizer; with NVMe offload a failure to create or preallocate the state files on any
    rank (unwritable path, full disk) becomes the same one-line ConfigError on every rank."""
    offload = None
    if zero.offload_optimizer != "none":
        offload = {"mode": zero.offload_optimizer, "sub_group_size": zero.offload_sub_group_size,
                   "nvme_path": zero.offload_nvme_path, "rank_tag": f"rank{topo.rank}"}
    error, optimizer = None, None
    try:
        # dp_group / dp_rank: the ZeRO shard owners, dp x cp (see ZeroEngine); model_group: tp x pp
        optimizer = ZeroOptimizer(layout, grads, storage, weight_decay, opt, stage=stage, dp_rank=topo.dp_cp_rank,
                                  tp_rank=topo.tp_rank, dp_group=topo.dp_cp_group, model_group=topo.model_group,
                                  offload=offload)
    except OSError as err:
        if zero.offload_optimizer != "nvme":
            raise
        rows = 1 + len(build_update_rule(opt, offload=True).state)  # fp32 master + the rule's state
        need = 4 * rows * sum(f.numel for f in layout.fragments_of_rank(topo.dp_cp_rank,
                                                                       whole=stage.owns_whole_buffer))
        error = (f"--offload-nvme-path {zero.offload_nvme_path}: cannot create the optimizer-state files of rank "
                 f"{topo.rank} ({need / 2**20:.1f} MiB): {err.strerror or err}; free space there or choose "
                 f"another path")
    if zero.offload_optimizer == "nvme":
        errors = [e for e in comm.all_gather_object(error, topo.world_group) if e]
        if errors:
            if optimizer is not None:
                optimizer.close()
            raise ConfigError(errors[0])
    return optimizer
