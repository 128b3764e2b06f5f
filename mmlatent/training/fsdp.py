"""FSDP2 (`torch.distributed.fsdp.fully_shard`) as mmlatent's sharded strategy, through Lightning.

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` (FSDP2 + DTensor; it runs on a CPU accelerator
with gloo as on GPUs with NCCL) with two changes, because mmlatent shards and never splits tensors:
its device mesh is one dimension over every rank (Lightning's default mesh is nodes × devices named
data × tensor parallel, which would leave a one-node run unsharded), and it carries the FSDP2 settings
(mixed precision, resharding) that the Lightning module's `configure_model` hook applies with
`shard_model` (`--trainer.strategy=fsdp2` names it with its defaults). Sharded checkpoints
(`save_distributed_checkpoint: true`, a folder of `torch.distributed.checkpoint` shards) are written to a
temporary folder and renamed into place, so a crash mid-save leaves the previous `last.ckpt`;
consolidated ones (one `.ckpt` file gathered on rank 0) go through the trainer's `CheckpointIO`
(mmlatent's atomic writer).

Units. Each LM decoder layer is an FSDP unit; everything else (embeddings, head, norms, the vision tower
and projector, the latent modules) is the root unit, gathered once per step. FSDP2 gathers a unit's
parameters at every call of it, a collective every rank must join, so every rank must call a unit equally
often. The decoder layers run once per latent slot column in the latent stages, which differs from batch
to batch: the stages ask `busiest_rank` for the largest count and `latent_forward` cuts text segments
into that many forwards (exactly the same result). The vision tower runs a data-dependent number of
times (question images, aux-image targets) and stays in the root. Generation decodes a data-dependent
number of steps, so it runs with every unit gathered (`gathered`).

The stages do not call `LatentVLM.forward` (the latent loop calls the backbone's pieces), so the root's
hooks would never run: `call_through_root` runs a step's computation as the root module's forward, as
Lightning's own strategies redirect `training_step` through their wrappers. The trade-off of the latent
stages: with `reshard_after_forward` a decoder layer's parameters are gathered once per forward (least
memory); `reshard_after_forward: false` keeps them gathered from the forward to the backward (fewer
gathers; the whole LM unsharded in `param_dtype` on every device).
"""

from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, TypeVar

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from mmlatent.atomic import _fsync_folder, move
from mmlatent.model.pretrained_source import DTYPES

T = TypeVar("T")
DtypeName = Literal["bfloat16", "float16", "float32"]


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules `shard_model` gives an FSDP unit each: the LM's decoder layers."""
    from mmlatent.training.acceleration import decoder_layers

    return decoder_layers(model)


def shard_model(
    model: nn.Module,
    mesh,
    param_dtype: DtypeName | None = "bfloat16",
    reduce_dtype: DtypeName | None = "float32",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 to a `LatentVLM` in place: one unit per layer or block (`shard_units`), the rest in the
    root unit. `param_dtype`: the dtype parameters are gathered and computed in (None: their own);
    `reduce_dtype`: the dtype gradients are reduced in."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[param_dtype] if param_dtype else None,
        reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None,
    )
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        unit.mmlatent_reshard_after_forward = reshard_after_forward  # what `gathered` restores
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root: not resharded between forward and backward
    return model


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def call_through_root(module: nn.Module, fn: Callable[[], T]) -> T:
    """`fn()` run as `module`'s forward when `module` is an FSDP2 root (its hooks gather the root unit's
    parameters and register the backward), else `fn()` as it is."""
    if not is_sharded(module):
        return fn()

    def forward() -> T:
        del module.forward  # back to the class's forward before anything inside runs
        return fn()

    module.forward = forward
    try:
        return module()
    finally:
        module.__dict__.pop("forward", None)


def busiest_rank(n: int, module: nn.Module) -> int:
    """The largest `n` over all ranks when `module` is sharded (a collective), else `n`: how many LM forwards
    a step must make so that every rank gathers each decoder layer as often (`latent_forward`'s `min_forwards`)."""
    import torch
    import torch.distributed as dist

    if not (is_sharded(module) and dist.is_available() and dist.is_initialized()):
        return n
    device = next(module.parameters()).device
    count = torch.tensor([n], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every unit of an FSDP2 model gathered for the block's data-dependent number of forwards (generation),
    then sharded again; nothing for a model that is not sharded."""
    if not is_sharded(module):
        yield
        return
    units = [m for m in module.modules() if hasattr(m, "mmlatent_reshard_after_forward")]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit.mmlatent_reshard_after_forward, recurse=False)
            unit.reshard()


def regather_root(module: nn.Module) -> None:
    """Gather an FSDP2 root's parameters again after a backward taken inside its forward.

    `torch.autograd.grad` inside a step (stage 2's latent-only alignment) ends, like any backward, with
    FSDP2's end-of-backward callback, which reshards every unit, the root's too; the rest of the step
    still needs the root's parameters. A no-op for a module that is not sharded."""
    if is_sharded(module):
        module.unshard()


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every rank, through Lightning: the strategy of mmlatent's sharded recipes."""

    def __init__(
        self,
        param_dtype: DtypeName | None = "bfloat16",
        reduce_dtype: DtypeName | None = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            param_dtype: The dtype FSDP2 gathers parameters in and the layers compute in (mixed precision);
                the sharded master copy, its gradients and the optimiser keep the model's own dtype
                (`native.dtype` / `lm.dtype`). None: no casting.
            reduce_dtype: The dtype gradients are reduce-scattered in. None: `param_dtype`.
            reshard_after_forward: Free each layer's gathered parameters after its forward and gather them
                again for the backward (least memory), or keep them from forward to backward (one gather
                per step; the whole model unsharded in `param_dtype` on every device).
            save_distributed_checkpoint: True: each rank writes its shard of the weights and optimiser into
                a checkpoint folder (`last.ckpt/`), which `--ckpt_path`, `init_from`, teachers and
                `mmlatent export` all read. False: rank 0 gathers everything into one `.ckpt` file (the
                whole model and optimiser in rank 0's CPU memory while it saves).
            process_group_backend: `gloo` or `nccl`; None: the device's default (gloo on CPU).
            timeout: Timeout of the collectives.
        """
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Lightning's default mesh is (nodes, devices per node) for data × tensor parallelism; FSDP2 alone
        # shards over all ranks
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @property
    def shard_mesh(self):
        """The one-dimensional mesh over every rank that parameters are sharded on."""
        return self.device_mesh["data_parallel"]

    def shard(self, model: nn.Module) -> nn.Module:
        """`shard_model` with this strategy's mesh and settings (the module's `configure_model` calls it)."""
        return shard_model(model, self.shard_mesh, self.param_dtype, self.reduce_dtype, self.reshard_after_forward)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # every rank writes its shard into one temporary folder, which rank 0 then renames over the target
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"))))  # rank 0's name
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("fsdp2-checkpoint-written")
        if self.global_rank == 0:
            _fsync_folder(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{tmp.name.rsplit('-', 1)[1]}")
                move(path, old)
                move(tmp, path, durable=True)
                _remove(old)
            else:
                move(tmp, path, durable=True)
        self.barrier("fsdp2-checkpoint-renamed")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _register() -> None:
    """`--trainer.strategy=fsdp2` names `FSDP2Strategy` with its defaults (Lightning's strategy registry)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="mmlatent's FSDP2 over every rank")


_register()
