"""Checkpoints: DeepSpeed engine state (every rank writes its shard) + per-rank EMA + trainer state.

Layout ``<root>/step00001000/`` (DeepSpeed files, ``ema_rank{r}.safetensors``, ``trainer_rank{r}.pt``) and
``<root>/latest``, a one-line pointer. Ranks write into ``step00001000.partial/``, renamed to ``step00001000/`` only
after every rank has finished, and then ``latest`` is replaced atomically: neither ever names an incomplete checkpoint
(a kill during the write leaves a ``.partial`` folder, removed by the next write). Only the last ``keep_last``
checkpoints are kept.
With power EMAs (``train.power_ema``) a checkpoint also holds their running state and ``<root>/power_ema/step*/``
their snapshots (kept, not pruned), both as ``power_ema_rank{r}.safetensors`` (this rank's ZeRO-3 partitions, or
rank 0's full weights when every rank holds them) + ``power_ema.json`` (step, widths, exponents, full shapes),
which rank 0 writes once every rank has written its file.
This module is the only one that knows the layout: ``read_weights`` gives the full raw and EMA weights of any
checkpoint (any ZeRO stage and world size) to exporters and loaders without a DeepSpeed engine, and
``read_power_snapshots`` the power EMA snapshots a post-hoc reconstruction combines.
A module with frozen parameters (LoRA adapters over frozen base weights) is checkpointed without them: the
checkpoint holds the trained tensors (the adapters), and a resumed run has the frozen ones from where it got them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ldm.io import WeightsError, atomic_write_bytes, load_tensors, load_torch, read_state_dict, save_tensors
from ldm.train.distributed import barrier
from ldm.train.ema import EMA, consolidate_partitions
from ldm.train.power_ema import Snapshot, split_flat

POWER_DIR = "power_ema"  # <root>/power_ema/step*/: the snapshots
POWER_INFO = "power_ema.json"
PARTIAL = ".partial"  # <root>/step00001000.partial/: a checkpoint being written
TAG = re.compile(r"step\d{8}")


class CheckpointWriteError(RuntimeError):
    """A checkpoint this rank could not write (a full disk, a file system gone); the message names the last complete
    one."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def param_digest(module: torch.nn.Module) -> str | None:
    """SHA-256 of this rank's full parameters; ranks of a ZeRO 0-2 run must agree (None under ZeRO-3)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if hasattr(p, "ds_tensor"):
            return None
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def has_frozen(engine) -> bool:
    """True when some parameters are frozen (LoRA): checkpoints then hold only the trained ones."""
    return any(not p.requires_grad for p in engine.module.parameters())


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _free_space(path: Path) -> str:
    """Free space of the file system at `path` ("?" when it cannot be read): torch.save reports a full disk only as
    "unexpected pos"."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "?"


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


class Checkpointer:
    def __init__(self, root: str | Path, rank: int, keep_last: int = 2, power_every: int | None = None):
        """``power_every``: optimizer steps between power EMA snapshots (None: never; the last step always)."""
        self.root, self.rank, self.keep_last, self.power_every = Path(root), rank, keep_last, power_every

    def latest(self) -> str | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        tag = pointer.read_text().strip()
        if not (self.root / tag).is_dir():
            raise FileNotFoundError(f"{pointer} names {tag}, which does not exist")
        return tag

    def save(self, engine, ema: EMA, step: int, trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it (DeepSpeed's save has barriers inside).

        Every rank writes into ``<tag>.partial``, which rank 0 renames to ``<tag>`` once all have finished, then points
        ``latest`` at it: a folder named ``step*`` is always whole, and files of a write that was killed (another world
        size's shards among them) never mix into a later one. A write that fails (a full disk) raises
        CheckpointWriteError after removing what it wrote; the previous checkpoint stays as it was.
        """
        tag = tag_for(step)
        partial, folder = self.root / (tag + PARTIAL), self.root / tag
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a write that was killed
        barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=partial.name, client_state={"step": step}, save_latest=False,
                                   exclude_frozen_parameters=has_frozen(engine))
            save_tensors(ema.state_dict(), partial / f"ema_rank{self.rank}.safetensors")
            digest = param_digest(engine.module)
            torch.save({**trainer_state, "rng": rng_state(), "param_digest": digest},
                       partial / f"trainer_rank{self.rank}.pt")
            if ema.power is not None:
                self._save_power(partial, ema)
        except Exception as e:  # noqa: BLE001 - re-raised with what it means for the run
            shutil.rmtree(partial, ignore_errors=True)  # frees the space; the other ranks fail at their next collective
            raise CheckpointWriteError(f"checkpoint {tag} could not be written under {self.root} (rank {self.rank}, "
                                       f"{_free_space(self.root)} free there now): "
                                       f"{str(e).splitlines()[0] or type(e).__name__}; the last complete checkpoint "
                                       f"is {self.latest() or 'none'}") from e
        self._check_ranks_agree(digest)
        barrier()
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # the same step written before (a resume from an earlier one)
            os.replace(partial, folder)
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.root / "latest")
            self._prune()
        barrier()
        return folder

    def save_power_snapshot(self, ema: EMA, step: int, last: int) -> Path | None:
        """Collective: a snapshot of the power EMAs every ``power_every`` steps and at the ``last`` one (else None).

        A step snapshotted before (by a run that resumed from an earlier checkpoint) is replaced whole."""
        if ema.power is None or not (step == last or self.power_every and step % self.power_every == 0):
            return None
        folder = self.root / POWER_DIR / tag_for(step)
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        barrier()
        self._save_power(folder, ema)
        return folder

    def _save_power(self, folder: Path, ema: EMA) -> None:
        """Collective: this rank's power EMA file (rank 0 alone when the weights are replicated), then the info."""
        power, writers = ema.power, _world() if ema.partitioned else 1
        if self.rank < writers:
            save_tensors(power.flat_state(), folder / f"power_ema_rank{self.rank}.safetensors")
        barrier()
        if self.rank == 0:
            info = {"step": power.step, "sigma_rels": power.sigma_rels, "gammas": power.gammas, "ranks": writers,
                    "partitioned": ema.partitioned, "shapes": {n: list(s) for n, s in ema.shapes().items()}}
            atomic_write_bytes(folder / POWER_INFO, json.dumps(info, indent=1).encode())

    @staticmethod
    def _check_ranks_agree(digest: str | None) -> None:
        """Replicated parameters that differ across ranks mean a broken run: stop before it goes on."""
        if digest is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return
        digests: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"parameters differ across ranks: {digests}")

    def _prune(self) -> None:
        """Keep the last ``keep_last`` checkpoints; remove the partial folders of writes that were killed."""
        tags = sorted(p.name for p in self.root.glob("step*") if p.is_dir() and TAG.fullmatch(p.name))
        for old in tags[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(self.root / old, ignore_errors=True)
        for stale in self.root.glob(f"step*{PARTIAL}"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, ema: EMA, tag: str | None = None) -> dict[str, Any] | None:
        """Restore engine, EMA, RNG and trainer state from ``tag`` (default: latest); None when nothing to load.

        A checkpoint written by another number of processes is loaded too: DeepSpeed's ZeRO partitions go
        through a universal checkpoint (converted once, beside the original), the EMA is consolidated and
        re-partitioned, and the trainer state of rank 0 stands for the new ranks. The returned state keeps
        the writer's ``world_size`` so the trainer can re-place its data position.
        """
        tag = tag or self.latest()
        if tag is None:
            return None
        folder = self.root / tag
        saved = load_torch(folder / "trainer_rank0.pt", trusted=True)  # our own file
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        old_world, old_stage = saved.get("world_size", world), saved.get("zero_stage", 0)
        stage = engine.zero_optimization_stage()
        if old_stage != stage and 0 in (old_stage, stage):
            raise RuntimeError(f"checkpoint {folder} was written with ZeRO stage {old_stage} but this run uses stage "
                               f"{stage}: resume with train.zero_stage={old_stage} (or any stage 1-3 from 1-3)")
        if (old_world, old_stage) != (world, stage) and old_stage > 0:
            self._load_universal(engine, folder)
        else:
            try:
                path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=not has_frozen(engine))
            except (OSError, RuntimeError, EOFError) as e:
                raise WeightsError(f"checkpoint {folder} is truncated or corrupt: {str(e).splitlines()[0]}") from None
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
        if old_world == world:
            ema.load_state_dict(load_tensors(folder / f"ema_rank{self.rank}.safetensors"))
            state = load_torch(folder / f"trainer_rank{self.rank}.pt", trusted=True)
        else:
            ema.load_full_state_dict(self._full_ema(folder, ema, old_world, old_stage))
            state = saved
        self._load_power(folder, ema, int(state["step"]))
        set_rng_state(state.pop("rng"))
        state.pop("param_digest", None)
        return state

    def _load_power(self, folder: Path, ema: EMA, step: int) -> None:
        """Restore the power EMAs of a checkpoint (re-partitioned when its world size or ZeRO layout differs) and drop
        the snapshots taken after it: the run goes on from here and writes its own."""
        has = (folder / POWER_INFO).is_file()
        if ema.power is None or not has:
            if ema.power is not None or has:
                raise RuntimeError(f"train.power_ema: checkpoint {folder} was written {'with' if has else 'without'} "
                                   "power EMAs and this run is configured the other way; a power EMA averages from "
                                   "step 1, so it cannot start or stop mid-run")
            return
        info, snapshots = _read_power(folder)
        if info["sigma_rels"] != ema.power.sigma_rels:
            raise RuntimeError(f"train.power_ema: checkpoint {folder} tracks {info['sigma_rels']}, this run "
                               f"{ema.power.sigma_rels}")
        if info["partitioned"] == ema.partitioned and info["ranks"] == (_world() if ema.partitioned else 1):
            mine = split_flat(load_tensors(folder / f"power_ema_rank{self.rank if ema.partitioned else 0}.safetensors"))
            emas = [mine[s] for s in info["sigma_rels"]]
        else:  # another world size or ZeRO layout: consolidate, then keep this rank's part
            emas = [ema.partition(dict(s.tensors())) for s in snapshots]
        ema.power.load_state_dict({"step": step, "sigma_rels": info["sigma_rels"], "emas": emas})
        if self.rank == 0:
            for later in (self.root / POWER_DIR).glob("step*"):
                if later.name > tag_for(step):
                    shutil.rmtree(later, ignore_errors=True)

    def _load_universal(self, engine, folder: Path) -> None:
        """Load ZeRO-partitioned state written by another world size via DeepSpeed's universal checkpoint."""
        universal = folder / "universal"
        if self.rank == 0 and not (universal / "done").exists():
            convert_to_universal(folder, universal)
        barrier()
        # DeepSpeed reads the flag only while loading; it is set for this one load so that later loads
        # (rollbacks to checkpoints this run writes) take the ordinary path
        engine._config.load_universal_checkpoint = True
        try:
            path, _ = engine.load_checkpoint(str(folder), tag="universal", load_module_strict=not has_frozen(engine))
        finally:
            engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal}")

    @staticmethod
    def _full_ema(folder: Path, ema: EMA, old_world: int, old_stage: int) -> dict[str, torch.Tensor]:
        """Full EMA weights from a checkpoint's per-rank files (ZeRO-3 partitions consolidated)."""
        if old_stage != 3:
            return load_tensors(folder / "ema_rank0.safetensors")  # replicated: every rank's file is whole
        parts = [load_tensors(folder / f"ema_rank{r}.safetensors") for r in range(old_world)]
        return {n: consolidate_partitions([p[n] for p in parts], getattr(param, "ds_shape", param.shape))
                for n, param in ema.named}


def convert_to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed checkpoint folder -> universal checkpoint (``ds_to_universal``), written beside it atomically."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(tmp / "universal"), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints a line per stage and progress bars
        ds_to_universal(args)
    (tmp / "universal" / "done").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp / "universal", out)
    shutil.rmtree(tmp, ignore_errors=True)


def read_weights(root: str | Path, tag: str | None = None) -> tuple[dict, dict, str]:
    """(raw, EMA, tag): the full fp32 weights of a checkpoint under ``root`` (default: latest), whatever ZeRO stage
    and world size wrote it, read from its files alone (no engine, no process group). Reads only."""
    root = Path(root)
    tag = tag or Checkpointer(root, rank=0).latest()
    if tag is None or not (root / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or 'latest'} under {root}")
    folder = root / tag
    state = load_torch(folder / "trainer_rank0.pt", trusted=True)  # our own file
    if list(folder.glob("zero_pp_rank_*_model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            raw = get_fp32_state_dict_from_zero_checkpoint(str(root), tag)
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise WeightsError(f"checkpoint {folder} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    else:  # ZeRO stage 0: the module state is stored whole
        raw = load_torch(folder / "mp_rank_00_model_states.pt", trusted=True)["module"]
    raw = {k: v.float() for k, v in raw.items()}
    ranks = [load_tensors(folder / f"ema_rank{r}.safetensors") for r in range(state["world_size"])]
    if state["zero_stage"] == 3:
        ema = {k: consolidate_partitions([r[k] for r in ranks], raw[k].shape) for k in raw}
    else:
        ema = ranks[0]
    return raw, ema, tag


def _read_power(folder: Path) -> tuple[dict[str, Any], list[Snapshot]]:
    """A folder's power EMA info and one lazily read, consolidated ``Snapshot`` per tracked width."""
    try:
        info = json.loads((folder / POWER_INFO).read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder / POWER_INFO}: unreadable ({e})") from None

    def load(sigma_rel: float) -> dict[str, torch.Tensor]:
        prefix = f"{sigma_rel!r}/"
        parts = []
        for r in range(info["ranks"]):
            flat = read_state_dict(folder / f"power_ema_rank{r}.safetensors", (prefix,))
            parts.append({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)})
        if not info["partitioned"]:
            return parts[0]
        return {n: consolidate_partitions([p[n] for p in parts], torch.Size(shape)) for n, shape in info["shapes"].items()}

    return info, [Snapshot(g, int(info["step"]), load=functools.partial(load, s))
                  for s, g in zip(info["sigma_rels"], info["gammas"])]


def read_power_snapshots(root: str | Path, tag: str | None = None) -> tuple[list[Snapshot], str]:
    """(snapshots, tag): the power EMA snapshots of a run up to its checkpoint ``tag`` (default: latest), i.e. the
    periodic ones taken before that step and the checkpoint's own power EMAs at it, each read (and its ZeRO-3
    partitions consolidated) only when its tensors are asked for. Reads only."""
    root = Path(root)
    tag = tag or Checkpointer(root, rank=0).latest()
    if tag is None or not (root / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or 'latest'} under {root}")
    if not (root / tag / POWER_INFO).is_file():
        raise FileNotFoundError(f"checkpoint {root / tag} has no power EMAs: the run was trained without "
                                "train.power_ema")
    info, current = _read_power(root / tag)
    earlier = []
    for folder in sorted((root / POWER_DIR).glob("step*")):
        if (folder / POWER_INFO).is_file() and folder.name < tag:
            earlier += _read_power(folder)[1]
    return earlier + current, tag
