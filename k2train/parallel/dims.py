"""The parallel degrees and the named DeviceMesh: the one object that knows the layout.

Mesh axes, outermost first: ``("pp", "dp", "ep", "cp", "tp")``. Adjacent ranks differ in ``tp``
(the most communication-hungry axis stays inside a node), then ``cp`` (Ulysses' all-to-alls), then
``ep``, then ``dp``; pipeline stages are the outermost blocks.

Who holds what (see docs/parallelism.md):
- every (dp, ep) coordinate reads different data, so the loader's data-parallel size is dp x ep;
  the cp and tp ranks of a coordinate share its stream (cp ranks take a part of each sequence);
- dense parameters are replicated over dp x ep x cp (and sharded or replicated over tp by the TP
  plan), so their gradients are summed over the flattened ``dp_ep_cp`` axis;
- routed experts are sharded over ep (E/ep consecutive experts per rank) and replicated over dp,
  cp and tp (whose ranks route different tokens), so their gradients are summed over ``dp_cp_tp``;
- the pipeline axis holds different layers and never reduces gradients.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.distributed.device_mesh import init_device_mesh

from ..config import ModelConfig, ParallelConfig, TrainerConfig

MESH_AXES = ("pp", "dp", "ep", "cp", "tp")


def _fail(msg: str) -> None:
    raise ValueError(msg)


@dataclass
class ParallelDims:
    """Degrees of one run. Build with :meth:`from_config`, check with :meth:`validate`, then
    :meth:`build_mesh` (needs an initialized default process group)."""

    pp: int
    dp: int
    ep: int
    tp: int
    world_size: int
    cp: int = 1
    vpp: int = 1
    pp_schedule: str = "1F1B"
    mesh: Optional["torch.distributed.device_mesh.DeviceMesh"] = field(default=None, repr=False)
    _flat: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        """Resolve ``dp=-1`` to whatever the world size leaves after pp x ep x cp x tp."""
        cfg.validate()
        other = cfg.pp * cfg.ep * cfg.tp * cfg.cp
        dp = cfg.dp
        if dp == -1:
            if world_size % other:
                _fail(
                    f"world size {world_size} is not divisible by pp*ep*cp*tp = {cfg.pp}*{cfg.ep}*{cfg.cp}*{cfg.tp} = "
                    f"{other}; "
                    f"launch a multiple of {other} processes or change the degrees"
                )
            dp = world_size // other
        return cls(
            pp=cfg.pp,
            dp=dp,
            ep=cfg.ep,
            tp=cfg.tp,
            cp=cfg.cp,
            world_size=world_size,
            vpp=cfg.vpp,
            pp_schedule=cfg.pp_schedule,
        )

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------

    def num_microbatches(self, trainer: TrainerConfig) -> int:
        """Micro-batches per step on one data-parallel rank (= gradient accumulation steps)."""
        return microbatches_per_step(trainer, self.dp, self.ep)

    def validate(self, model: ModelConfig, trainer: Optional[TrainerConfig] = None) -> "ParallelDims":
        """Fail early, with the numbers and a fix, on a layout that cannot run this model (every
        cross-field check of the layout lives here; ``ParallelConfig.validate`` checks the section
        alone)."""
        product = self.pp * self.dp * self.ep * self.cp * self.tp
        if product != self.world_size:
            _fail(
                f"world size {self.world_size} != pp*dp*ep*cp*tp = {self.pp}*{self.dp}*{self.ep}*{self.cp}*{self.tp} = "
                f"{product}; set parallel.dp=-1 to infer dp, or launch {product} processes"
            )
        heads_split = self.tp * self.cp
        if heads_split > 1 and model.num_attention_heads % heads_split:
            _fail(
                f"model.num_attention_heads={model.num_attention_heads} is not divisible by tp x cp = {self.tp} x "
                f"{self.cp}: each tp rank holds heads/tp heads and Ulysses splits them again over cp; change "
                "parallel.tp or parallel.cp"
            )
        if self.tp > 1:
            for name in ("vocab_size", "intermediate_size"):
                v = getattr(model, name)
                if v % self.tp:
                    _fail(f"model.{name}={v} is not divisible by tensor parallel degree {self.tp}: change parallel.tp")
            shared = model.moe_intermediate_size * model.n_shared_experts
            if model.num_moe_layers and shared % self.tp:
                _fail(
                    f"shared expert width moe_intermediate_size*n_shared_experts = {shared} is not divisible "
                    f"by tensor parallel degree {self.tp}: change parallel.tp"
                )
        if model.num_moe_layers and model.n_routed_experts % self.ep:
            _fail(
                f"model.n_routed_experts={model.n_routed_experts} is not divisible by expert parallel degree {self.ep}: "
                "change parallel.ep"
            )
        if self.ep > 1 and model.num_moe_layers == 0:
            _fail(f"parallel.ep={self.ep} needs MoE layers, but the model has none (first_k_dense_replace = num_hidden_layers)")
        stages = self.pp * self.vpp
        if model.num_hidden_layers < stages:
            _fail(
                f"model.num_hidden_layers={model.num_hidden_layers} cannot fill pp*vpp = {self.pp}*{self.vpp} = {stages} "
                f"pipeline stages (at least one layer each): lower parallel.pp or parallel.vpp"
            )
        if trainer is not None:
            shards = self.tp * self.cp
            if shards > 1 and trainer.seq_len % shards:
                _fail(
                    f"trainer.seq_len={trainer.seq_len} is not divisible by tp x cp = {self.tp} x {self.cp} (context "
                    f"parallelism cuts each sequence over cp, tensor parallelism each cut over tp): make "
                    f"trainer.seq_len a multiple of {shards}"
                )
            n_micro = self.num_microbatches(trainer)
            if self.pp > 1 and n_micro < self.pp:
                _fail(
                    f"{self.pp_schedule} with pp={self.pp} needs at least {self.pp} micro-batches per step, got "
                    f"global_batch_size / (micro_batch_size * dp_size) = {trainer.global_batch_size} / "
                    f"({trainer.micro_batch_size} * {self.dp_size}) = {n_micro}: raise trainer.global_batch_size"
                )
            if self.pp > 1 and self.pp_schedule == "Interleaved1F1B" and n_micro % self.pp:
                _fail(
                    f"Interleaved1F1B needs the micro-batch count ({n_micro}) to be a multiple of pp={self.pp}: "
                    f"make trainer.global_batch_size a multiple of {self.pp * trainer.micro_batch_size * self.dp_size}"
                )
        return self

    # ------------------------------------------------------------------------------------------
    # mesh
    # ------------------------------------------------------------------------------------------

    def build_mesh(self, device_type: str) -> "torch.distributed.device_mesh.DeviceMesh":
        """The 5-D mesh (size-1 axes included, so every name always exists) and its flattened axes:
        ``dp_ep`` (data streams), ``dp_ep_cp`` (replicas of dense parameters), ``dp_cp_tp`` (replicas
        of an expert shard), ``dp_ep_cp_tp`` (every rank of a stage: all saw different tokens) and
        ``cp_tp`` (the ranks holding parts of one sequence). Stored on ``self.mesh`` and returned."""
        mesh = init_device_mesh(device_type, (self.pp, self.dp, self.ep, self.cp, self.tp), mesh_dim_names=MESH_AXES)
        # Keep the flattened meshes ourselves: slicing them back out of the root mesh is deprecated.
        self._flat = {
            name: mesh[tuple(name.split("_"))]._flatten(name)
            for name in ("dp_ep", "dp_ep_cp", "dp_cp_tp", "dp_ep_cp_tp", "cp_tp")
        }
        self.mesh = mesh
        return mesh

    def _require_mesh(self):
        if self.mesh is None:
            raise RuntimeError("ParallelDims.build_mesh(device_type) must be called first")
        return self.mesh

    @property
    def pp_mesh(self):
        return self._require_mesh()["pp"]

    @property
    def dp_mesh(self):
        """Pure data-parallel replicas."""
        return self._require_mesh()["dp"]

    @property
    def ep_mesh(self):
        return self._require_mesh()["ep"]

    @property
    def cp_mesh(self):
        return self._require_mesh()["cp"]

    @property
    def tp_mesh(self):
        return self._require_mesh()["tp"]

    @property
    def stream_mesh(self):
        """1-D flattened (dp, ep): the data streams (the loader's ranks)."""
        self._require_mesh()
        return self._flat["dp_ep"]

    @property
    def dense_dp_mesh(self):
        """1-D flattened (dp, ep, cp): the replicas of every dense parameter (their gradients are
        summed here), the loss's reduction and QK-Clip's MAX."""
        self._require_mesh()
        return self._flat["dp_ep_cp"]

    @property
    def expert_dp_mesh(self):
        """1-D flattened (dp, cp, tp): the replicas of one routed expert shard."""
        self._require_mesh()
        return self._flat["dp_cp_tp"]

    @property
    def token_mesh(self):
        """1-D flattened (dp, ep, cp, tp): every rank of one pipeline stage; expert-load sums and
        the router's gradient run here."""
        self._require_mesh()
        return self._flat["dp_ep_cp_tp"]

    @property
    def sequence_mesh(self):
        """1-D flattened (cp, tp): the ranks holding the parts of one sequence (the MoE's
        sequence-wise aux loss counts over them)."""
        self._require_mesh()
        return self._flat["cp_tp"]

    # ------------------------------------------------------------------------------------------
    # the loader's view
    # ------------------------------------------------------------------------------------------

    @property
    def dp_size(self) -> int:
        """Number of different data streams: dp x ep (cp, tp and pp ranks share their stream)."""
        return self.dp * self.ep

    @property
    def dp_rank(self) -> int:
        """This rank's data stream, the flattened (dp, ep) coordinate: ``dp_coord * ep + ep_coord``."""
        return self.stream_mesh.get_local_rank() if self.distributed else 0

    @property
    def cp_rank(self) -> int:
        """This rank's part of each sequence (the cp coordinate)."""
        return self.cp_mesh.get_local_rank() if self.distributed else 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def rank(self) -> int:
        """This process's global rank (0 in a single process)."""
        return torch.distributed.get_rank() if self.distributed else 0

    def group(self, mesh_name: str):
        """The process group of a (flattened) mesh with more than one rank, else None (no
        collective needed): ``dims.group("dense_dp_mesh")``."""
        if not self.distributed:
            return None
        mesh = getattr(self, mesh_name)
        return mesh.get_group() if mesh.size() > 1 else None


def microbatches_per_step(trainer: TrainerConfig, dp: int, ep: int) -> int:
    """Micro-batches per step on one data stream: ``global_batch_size / (micro_batch_size * dp * ep)``
    (every (dp, ep) coordinate reads its own data), or a ValueError that says what to change."""
    per_step = trainer.micro_batch_size * dp * ep
    if trainer.global_batch_size % per_step:
        _fail(
            f"trainer.global_batch_size={trainer.global_batch_size} is not divisible by trainer.micro_batch_size x "
            f"data streams (dp={dp} x ep={ep}) = {trainer.micro_batch_size} x {dp * ep} = {per_step}: make it a "
            f"multiple of {per_step}"
        )
    return trainer.global_batch_size // per_step


def backend_for(device_type: str) -> str:
    """NCCL on CUDA, gloo on CPU."""
    return "nccl" if device_type == "cuda" else "gloo"
