"""Sharded, atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

The folder layout is in :mod:`k2train.checkpoint_layout`. A save writes into ``.tmp-step-N`` and
renames it, so a crash leaves either the old state or a ``.tmp`` folder that the next resume
deletes. Resume walks the checkpoints newest first and skips, with a warning, any that lacks its
marker, its ``.metadata`` or a byte of a shard.

Model and optimizer are keyed by parameter FQN (not by position), so a checkpoint saved under one
layout (DP size, TP/EP sharding as DTensors, pipeline stages) loads under another: each process asks
DCP for the FQNs (and DTensor shards) it holds. Everything else is per rank and loaded by rank;
a process without a file of its own (world size changed) takes rank 0's and is told so.
Works in one process without a process group and in multi-process (gloo/NCCL) runs.
"""

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .checkpoint_layout import (DONE_FILE, EXTRA_DIR, LATEST_FILE, META_FILE, MODEL_KEY, OPTIM_KEY, extra_name,
                                git_revision, latest_valid, list_checkpoints, mark_complete, resolve_checkpoint,
                                step_dir_name, write_json)
from .config import CheckpointConfig
from .parallel.expert_parallel import ExpertParallelExperts

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Python, numpy, torch CPU and (if present) CUDA generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# model / optimizer <-> FQN-keyed flat dicts
# ---------------------------------------------------------------------------------------------


def _parts(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


def _ep_meshes(model) -> dict[int, Any]:
    """id(param) -> 1-D DeviceMesh of its expert-parallel group, for every EP-sharded expert stack.

    EP holds each rank's experts as plain ``[E/ep, ...]`` tensors under the full stack's name; for
    DCP they become DTensors sharded on dim 0, so the checkpoint stores the whole ``[E, ...]`` stack
    and any other layout (EP size, a single process) can read its own slice.
    """
    out: dict[int, Any] = {}
    meshes: dict[int, Any] = {}
    for part in _parts(model):
        for mod in part.modules():
            if isinstance(mod, ExpertParallelExperts) and mod.ep_size > 1:
                if id(mod.group) not in meshes:
                    dev = mod.w_gate.device.type
                    meshes[id(mod.group)] = DeviceMesh.from_group(mod.group, dev)
                for p in mod.parameters(recurse=False):
                    out[id(p)] = meshes[id(mod.group)]
    return out


def _as_sharded(t: torch.Tensor, mesh) -> torch.Tensor:
    # from_local without a check aliases ``t``: DCP loads in place into the parameter itself.
    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False)


def model_state(model: nn.Module | Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers (router biases) of all model parts (pipeline stages)
    by FQN; DTensors stay sharded, EP expert slices become DTensors. The tensors alias the
    module's, so loading into them is in place."""
    out = {}
    for part in _parts(model):
        ep = _ep_meshes(part)
        sd = get_model_state_dict(part)
        if ep:
            by_name = dict(part.named_parameters())
            for name, t in sd.items():
                p = by_name.get(name)
                if p is not None and id(p) in ep:
                    sd[name] = _as_sharded(t, ep[id(p)])
        out.update(sd)
    return out


def _param_fqns(model) -> dict[int, str]:
    return {id(p): n for part in _parts(model) for n, p in part.named_parameters()}


def optimizer_state(optimizer: torch.optim.Optimizer, model) -> dict[str, Any]:
    """The optimizer's state keyed ``state.<fqn>.<key>`` plus ``hparams.<fqn>`` (its group's
    hyperparameters). A ZeRO-1 rank holds the state of the params it owns only; DCP merges them."""
    fqn = _param_fqns(model)
    ep = _ep_meshes(model)
    out: dict[str, Any] = {}
    for group in optimizer.param_groups:
        hp = json.dumps({k: v for k, v in group.items() if _is_hparam(v)})  # a string: DCP must not flatten it
        for p in group["params"]:
            out[f"hparams.{fqn[id(p)]}"] = hp
            for k, v in optimizer.state.get(p, {}).items():
                if id(p) in ep and torch.is_tensor(v) and v.shape == p.shape:
                    v = _as_sharded(v, ep[id(p)])
                out[f"state.{fqn[id(p)]}.{k}"] = v
    return out


def _is_hparam(v) -> bool:
    # Scalars (lr, betas, weight decay, ...) only: not the params, name lists or functions of a group.
    if isinstance(v, (tuple, list)):
        return len(v) <= 8 and all(isinstance(x, (int, float)) for x in v)
    return isinstance(v, (int, float, bool, str)) or v is None


def _optimizer_targets(optimizer, model, stored: dict) -> dict[str, Any]:
    """Tensors for DCP to load this rank's optimizer state into, shaped like the checkpoint's.

    State shaped like its parameter is allocated like the parameter (so DTensor params get
    DTensor state with the same sharding); scalars (``step``) as plain tensors.
    """
    owns = getattr(optimizer, "_owns", lambda p: True)  # ZeRO-1: only the params this rank updates
    fqn = _param_fqns(model)
    ep = _ep_meshes(model)
    out: dict[str, Any] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = fqn[id(p)]
            key = f"{OPTIM_KEY}.hparams.{name}"
            if key in stored:
                out[key] = None
            if not owns(p):
                continue
            prefix = f"{OPTIM_KEY}.state.{name}."
            for skey, smd in stored.items():
                if not skey.startswith(prefix) or "." in skey[len(prefix):]:
                    continue
                if isinstance(smd, TensorStorageMetadata):
                    dt = smd.properties.dtype
                    if id(p) in ep and len(smd.size) == p.ndim and smd.size[0] == p.shape[0] * ep[id(p)].size():
                        out[skey] = _as_sharded(torch.zeros_like(p, dtype=dt), ep[id(p)])
                    elif tuple(smd.size) == tuple(p.shape):
                        out[skey] = torch.zeros_like(p, dtype=dt)
                    else:
                        out[skey] = torch.zeros(smd.size, dtype=dt, device=p.device if p.device.type != "meta" else "cpu")
                else:
                    out[skey] = None
    return out


def _check_shapes(folder: Path, targets: dict[str, Any], stored: dict) -> None:
    """Refuse a checkpoint of another model (before DCP fails deep inside with a size mismatch)."""
    differ = [(k, list(stored[k].size), list(v.shape)) for k, v in targets.items()
              if torch.is_tensor(v) and isinstance(stored[k], TensorStorageMetadata) and tuple(stored[k].size) != tuple(v.shape)]
    if differ:
        k, saved, now = differ[0]
        raise ValueError(
            f"checkpoint {folder} was saved from another model: {len(differ)} tensors differ in shape, e.g. {k}: "
            f"saved {saved}, this config {now}. Resume with the model config it was saved with (\"model_config\" in "
            f"{folder / META_FILE}), or start a new run: trainer.checkpoint.resume=false or another trainer.output_dir")


def _local_if_ep(v, p):
    # EP state was wrapped as a DTensor for DCP; the optimizer keeps the plain local slice.
    return v.to_local() if isinstance(v, DTensor) and not isinstance(p, DTensor) else v


def _check_param_groups(folder: Path, optimizer, model, loaded: dict[str, Any]) -> None:
    """Refuse another optimizer's state (e.g. MuonClip's momentum for a matrix AdamW now updates)."""
    fqn = _param_fqns(model)
    moved = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            hp = loaded.get(f"{OPTIM_KEY}.hparams.{fqn[id(p)]}")
            saved = json.loads(hp) if hp else {}
            if any(k in saved and saved[k] != group.get(k) for k in ("kind", "name")):
                moved.append((fqn[id(p)], saved.get("name"), saved.get("kind"), group.get("name"), group.get("kind")))
    if moved:
        name, old, old_kind, new, new_kind = moved[0]
        raise ValueError(
            f"checkpoint {folder} holds another optimizer's state: {len(moved)} parameters are in other param groups, "
            f"e.g. {name} was in {old!r} ({old_kind}), this config puts it in {new!r} ({new_kind}). Resume with the "
            f"optimizer it was saved with (\"config\" in {folder / META_FILE}), or keep only its weights with a fresh "
            f"optimizer: trainer.checkpoint.load_path={folder} trainer.checkpoint.resume=false")


def _apply_optimizer_state(optimizer, model, loaded: dict[str, Any]) -> None:
    fqn = _param_fqns(model)
    sd = optimizer.state_dict()
    groups = sd["param_groups"]
    params = []
    for group in optimizer.param_groups:
        params.extend(group["params"])
    state: dict[int, dict] = {}
    for i, p in enumerate(params):
        prefix = f"{OPTIM_KEY}.state.{fqn[id(p)]}."
        entry = {k[len(prefix):]: _local_if_ep(v, p) for k, v in loaded.items() if k.startswith(prefix)}
        if entry:
            state[i] = entry
    for g_sd, group in zip(groups, optimizer.param_groups):
        hp = loaded.get(f"{OPTIM_KEY}.hparams.{fqn[id(group['params'][0])]}") if group["params"] else None
        if hp:
            for k, v in json.loads(hp).items():
                if k in g_sd:
                    g_sd[k] = tuple(v) if isinstance(g_sd[k], tuple) else v
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------
# the manager
# ---------------------------------------------------------------------------------------------


class CheckpointManager:
    """Save and resume a training run's state under ``folder`` (the checkpoint root).

    ``state`` (for :meth:`save` and :meth:`load_latest`) maps names to objects:
    ``"model"``: the module or list of pipeline-stage modules; ``"optimizer"``: a
    ``torch.optim.Optimizer`` (needs ``"model"``); any other name: an object with
    ``state_dict()``/``load_state_dict()`` or a plain dict (updated in place on load), saved per rank.
    RNG states are added automatically. ``step`` and ``tokens_seen`` of a ``"train"`` dict, the
    resolved config and the wandb run id also go to ``meta.json`` for humans and tools.
    """

    def __init__(
        self,
        folder: str | Path,
        cfg: CheckpointConfig,
        job_config: Optional[dict] = None,
        process_group=None,
    ):
        self.folder = Path(folder)
        self.cfg = cfg
        self.job_config = job_config
        self.process_group = process_group
        self.wandb_run_id: Optional[str] = None
        self.loaded_meta: Optional[dict] = None
        self._pending = None  # (future, tmp folder, final folder, meta) of an async save
        self._git = git_revision()

    # -- process topology ----------------------------------------------------------------------

    def _dist(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank(self.process_group) if self._dist() else 0

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size(self.process_group) if self._dist() else 1

    def _barrier(self) -> None:
        if self._dist():
            torch.distributed.barrier(group=self.process_group)

    def _broadcast(self, obj):
        if not self._dist():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.process_group)
        return box[0]

    # -- save --------------------------------------------------------------------------------

    def _split(self, state: dict) -> tuple[dict, dict]:
        """-> (flat DCP dict of tensors keyed by FQN, per-rank extras)."""
        flat: dict[str, Any] = {}
        extras: dict[str, Any] = {"rng": rng_state()}
        model = state.get(MODEL_KEY)
        for name, obj in state.items():
            if name == MODEL_KEY:
                flat.update({f"{MODEL_KEY}.{k}": v for k, v in model_state(obj).items()})
            elif name == OPTIM_KEY:
                if model is None:
                    raise ValueError("checkpoint state has an 'optimizer' but no 'model': FQN keys need the model")
                flat.update({f"{OPTIM_KEY}.{k}": v for k, v in optimizer_state(obj, model).items()})
            else:
                extras[name] = obj.state_dict() if hasattr(obj, "state_dict") else dict(obj)
        return flat, extras

    def save(self, step: int, state: dict, blocking: Optional[bool] = None) -> Path:
        """Write checkpoint ``step``; every rank calls it. Returns the final folder.

        Non-blocking (``blocking=False`` or ``cfg.async_save``) stages the tensors to CPU, returns,
        and completes (marker, rename, ``latest``) in :meth:`wait`, which the next save or
        :meth:`close` calls.
        """
        self.wait()
        blocking = (not self.cfg.async_save) if blocking is None else blocking
        final_dir = self.folder / step_dir_name(step)
        tmp = self.folder / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / EXTRA_DIR).mkdir(parents=True)
        self._barrier()
        flat, extras = self._split(state)
        torch.save(extras, tmp / EXTRA_DIR / extra_name(self.rank))
        train = state.get("train", {})
        meta = {
            "step": step,
            "tokens_seen": train.get("tokens_seen") if isinstance(train, dict) else None,
            "world_size": self.world_size,
            "git_revision": self._git,
            "torch_version": torch.__version__,
            "wandb_run_id": self.wandb_run_id,
            "config": self.job_config,
            "model_config": (self.job_config or {}).get("model") or _model_cfg_of(state.get(MODEL_KEY)),
        }
        writer = FileSystemWriter(str(tmp))
        if blocking:
            dcp.save(flat, storage_writer=writer, process_group=self.process_group)
            self._finish(tmp, final_dir, meta)
        else:
            future = dcp.async_save(flat, storage_writer=writer, process_group=self.process_group)
            self._pending = (future, tmp, final_dir, meta)
        return final_dir

    def wait(self) -> None:
        """Complete a pending asynchronous save (no-op if none)."""
        if self._pending is None:
            return
        future, tmp, final_dir, meta = self._pending
        self._pending = None
        future.result()
        self._finish(tmp, final_dir, meta)

    def close(self) -> None:
        self.wait()

    def _finish(self, tmp: Path, final_dir: Path, meta: dict) -> None:
        self._barrier()  # every rank's shard and extras are on disk
        if self.rank == 0:
            write_json(tmp / META_FILE, meta)
            mark_complete(tmp)
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.rename(tmp, final_dir)
            write_json(self.folder / LATEST_FILE, final_dir.name)
            log.info("saved checkpoint %s", final_dir)
            self._retain()
        self._barrier()

    def _retain(self) -> None:
        """Delete checkpoints beyond the newest ``keep_last``, keeping every ``keep_every``-th step."""
        done = [(s, p) for s, p in list_checkpoints(self.folder) if (p / DONE_FILE).exists()]
        keep = {s for s, _ in done[-self.cfg.keep_last:]}
        if self.cfg.keep_every > 0:
            keep |= {s for s, _ in done if s % self.cfg.keep_every == 0}
        for s, p in done:
            if s not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # -- load --------------------------------------------------------------------------------

    def load_latest(self, state: dict) -> Optional[int]:
        """Restore ``state`` from the newest valid checkpoint; return its step, or None if there is none.

        Incomplete or corrupt checkpoints are reported and skipped; leftover ``.tmp-*`` folders
        of interrupted saves are deleted.
        """
        found = None
        if self.rank == 0:
            for p in self.folder.glob(".tmp-step-*"):
                log.warning("removing interrupted save %s", p)
                shutil.rmtree(p, ignore_errors=True)
            found = latest_valid(self.folder)
            found = None if found is None else str(found[1])
        found = self._broadcast(found)
        if found is None:
            return None
        return self.load(Path(found), state)

    def load(self, folder: Path, state: dict) -> int:
        """Restore ``state`` from one checkpoint folder (every rank calls it); returns its step."""
        folder = Path(folder)
        reader = FileSystemReader(str(folder))
        stored = reader.read_metadata().state_dict_metadata
        model = state.get(MODEL_KEY)
        targets: dict[str, Any] = {}
        if model is not None:
            targets.update({f"{MODEL_KEY}.{k}": v for k, v in model_state(model).items()})
            missing = [k for k in targets if k not in stored]
            if missing:
                raise ValueError(f"checkpoint {folder} lacks {len(missing)} model tensors, e.g. {missing[:3]}")
            _check_shapes(folder, targets, stored)
        if OPTIM_KEY in state:
            opt_targets = _optimizer_targets(state[OPTIM_KEY], model, stored)
            if not any(k.startswith(f"{OPTIM_KEY}.state.") for k in stored):
                log.warning("checkpoint %s holds no optimizer state (a weights-only import, or saved before the first "
                            "step): the optimizer starts fresh", folder)
                opt_targets = {}
            targets.update(opt_targets)
        dcp.load(targets, storage_reader=reader, process_group=self.process_group)
        # The model targets alias the parameters and buffers: DCP has loaded them in place.
        if OPTIM_KEY in state and any(k.startswith(f"{OPTIM_KEY}.state.") for k in targets):
            _check_param_groups(folder, state[OPTIM_KEY], model, targets)
            _apply_optimizer_state(state[OPTIM_KEY], model, targets)

        extra_path = folder / EXTRA_DIR / extra_name(self.rank)
        if not extra_path.exists() and set(state) - {MODEL_KEY, OPTIM_KEY}:
            log.warning("%s has no per-rank state for rank %d (world size changed?): using rank 0's", folder, self.rank)
            extra_path = folder / EXTRA_DIR / extra_name(0)
        extras = torch.load(extra_path, weights_only=False) if extra_path.exists() else {}
        for name, obj in state.items():
            if name in (MODEL_KEY, OPTIM_KEY):
                continue
            if name not in extras:
                log.warning("checkpoint %s has no %r state: keeping the current one", folder, name)
            elif hasattr(obj, "load_state_dict"):
                obj.load_state_dict(extras[name])
            else:
                obj.clear()
                obj.update(extras[name])
        if "rng" in extras:
            set_rng_state(extras["rng"])
        meta_path = folder / META_FILE
        self.loaded_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.wandb_run_id = self.loaded_meta.get("wandb_run_id") or self.wandb_run_id
        step = int(self.loaded_meta.get("step", 0))
        log.info("resumed from %s (step %d)", folder, step)
        return step


def _model_cfg_of(model) -> Optional[dict]:
    parts = _parts(model) if model is not None else []
    cfg = getattr(parts[0], "cfg", None) if parts else None
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


def load_model_weights(path: str | Path, model) -> int:
    """Load only the model (e.g. a ``from-hf`` import, or another run's checkpoint) into ``model``;
    ``path`` is a checkpoint folder or root. Returns the checkpoint's step."""
    folder = resolve_checkpoint(path)
    mgr = CheckpointManager(folder.parent, CheckpointConfig())
    state = {MODEL_KEY: model}
    # Restore nothing else: keep this process's RNG.
    rng = rng_state()
    step = mgr.load(folder, state)
    set_rng_state(rng)
    return step
