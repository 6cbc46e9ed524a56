"""Atomic, resumable checkpoints around DeepSpeed's ``engine.save_checkpoint``.

A checkpoint folder counts only once its ``COMPLETE`` marker is there and still matches the
folder: rank 0 writes it (atomically) after every rank has finished writing, listing each file
with its size and checksum, so neither a crash mid-save nor a file cut short or altered later
leaves a checkpoint that ``--resume`` would load. Resuming on another process count or expert-parallel
size goes through DeepSpeed's universal checkpoint format (converted on the fly; expert-parallel
checkpoints by ``merge_expert_parallel``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from molora_ds.distributed import expert_parallel
from molora_ds.inject import molora_layers

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
META = "molora_meta.json"
UNIVERSAL_SUFFIX = "_universal"
# Recipe keys a checkpoint's state depends on: the adapter's shapes and layers, and what the optimizer
# state means. Any other change applies on resume (and is logged).
FIXED_ON_RESUME = (
    "model.name_or_path",
    "model.revision",
    "molora.num_experts",
    "molora.layer_experts",
    "molora.rank",
    "molora.target_modules",
    "molora.include_vision",
    "optim.method",
    "optim.precondition",
    "optim.gate_rescale",
    "molora.gate_rescale",
)


def _tag(step: int) -> str:
    return f"step{step:08d}"


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(tag_dir: Path) -> list[Path]:
    return [
        f
        for f in sorted(tag_dir.rglob("*"))
        if f.is_file() and f.name != COMPLETE and not f.name.endswith(".tmp")
    ]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(tag_dir: Path) -> None:
    """Write the ``COMPLETE`` marker: every file of the folder with its size and checksum, renamed into place.

    The files and the marker reach the disk before the rename, and the rename before we return:
    after a power loss the marker never names data that was still in the page cache.
    """
    manifest = {}
    for f in _files(tag_dir):
        _fsync(f)
        manifest[str(f.relative_to(tag_dir))] = {"size": f.stat().st_size, "blake2b": _digest(f)}
    tmp = tag_dir / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    os.replace(tmp, tag_dir / COMPLETE)
    _fsync(tag_dir)


def problem(tag_dir: Path, verify: bool = True) -> str | None:
    """Why ``tag_dir`` is not a checkpoint to resume from, or None. ``verify``: also compare every file's
    checksum (a same-size corruption would otherwise load, and train on to NaN losses)."""
    try:
        listed = json.loads((tag_dir / COMPLETE).read_text())
    except FileNotFoundError:
        return f"no {COMPLETE} marker (its save did not finish)"
    except (OSError, ValueError):
        return f"its {COMPLETE} marker is unreadable"
    if not isinstance(listed, dict) or not listed or not all(isinstance(v, dict) for v in listed.values()):
        return f"its {COMPLETE} marker lists no files with checksums"
    for name, want in listed.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want.get("size"):
            return f"{name} has {f.stat().st_size} bytes, {want.get('size')} were written"
    for name, want in listed.items() if verify else ():
        if _digest(tag_dir / name) != want.get("blake2b"):
            return f"{name} does not match its checksum (the file changed after it was written)"
    return None


def is_complete(tag_dir: Path) -> bool:
    """The marker exists and every file it lists is there with its recorded size (cheap: no checksums)."""
    return problem(tag_dir, verify=False) is None


def tags(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (conversions are never resume targets themselves)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step") and not p.name.endswith(UNIVERSAL_SUFFIX)]
    return sorted((p for p in found if p.is_dir()), key=lambda p: p.name)


def _complete_tags(root: Path) -> list[Path]:
    return [p for p in tags(root) if is_complete(p)]


def find_latest(root: Path) -> Path | None:
    done = _complete_tags(root)
    return done[-1] if done else None


def _newest_valid(root: Path, arg: str) -> tuple[Path | None, list[str]]:
    skipped = []
    for tag in reversed(tags(root)):
        why = problem(tag)
        if why is None:
            return tag, skipped
        skipped.append(f"skipped checkpoint {tag}: {why}")
    if skipped:
        raise ValueError(
            f"--resume {arg}: none of the {len(skipped)} checkpoints under {root} is valid "
            f"({'; '.join(s.split(': ', 1)[1] for s in skipped)}); move them aside to start over, or pass "
            "--overwrite"
        )
    return None, []


def resolve_resume(arg: str | None, ckpt_root: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and one line per newer checkpoint skipped (with why).

    ``auto``: the newest valid checkpoint under ``ckpt_root``, None when there is none yet; an error when
    checkpoints exist but none is valid (never a silent restart from step 0). A path: that checkpoint,
    or the newest valid one under a run or checkpoints folder.
    """
    if arg is None:
        return None, []
    if arg == "auto":
        return _newest_valid(ckpt_root, arg)
    path = Path(arg)
    if (path / COMPLETE).exists() or (path.name.startswith("step") and path.is_dir()):
        why = problem(path)
        if why:
            raise ValueError(f"--resume {arg}: not a valid checkpoint: {why}")
        return path, []
    for root in (path, path / "checkpoints"):
        if tags(root):
            return _newest_valid(root, arg)
    raise FileNotFoundError(
        f"--resume {arg}: no checkpoint there (a stepNNNNNNNN folder with a {COMPLETE} marker)"
    )


def read_meta(tag_dir: Path) -> dict:
    path = tag_dir / META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); resume from another checkpoint") from None


def check_stage(tag_dir: Path, stage: int) -> None:
    """DeepSpeed loads a checkpoint (universal ones included) only under the ZeRO stage that
    wrote it; otherwise it fails deep inside with a bare AssertionError, after the model loaded."""
    saved = read_meta(tag_dir).get("zero_stage")
    if saved is not None and saved != stage:
        raise ValueError(
            f"--resume: {tag_dir} was saved under ZeRO-{saved}, this run uses ZeRO-{stage}; DeepSpeed cannot "
            f"load a checkpoint into another stage: resume with a config of stage {saved} (e.g. "
            f"ds_configs/zero{saved}.json)"
        )


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "extra":
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def recipe_changes(tag_dir: Path, recipe: dict) -> list[str]:
    """``key: old -> new`` for each recipe value that differs from the checkpoint's; an error for those
    that cannot apply to its state, and for a checkpoint already past ``train.max_steps``."""
    meta = read_meta(tag_dir)
    new = _flatten(json.loads(json.dumps(recipe)))  # tuples as lists, as the saved copy has them
    # A checkpoint written before recipes were saved has nothing to compare.
    old = _flatten(meta.get("recipe", new))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    fixed = [k for k in changed if k in FIXED_ON_RESUME]
    if fixed:
        diffs = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in fixed)
        raise ValueError(
            f"--resume: {tag_dir} cannot continue with a changed {diffs} (the adapter's shape or the optimizer's "
            "state depend on it); restore the old value, or start a new run (--overwrite or another --output-dir)"
        )
    if new["train.max_steps"] < meta["step"]:
        raise ValueError(
            f"--resume: {tag_dir} is at step {meta['step']}, past train.max_steps={new['train.max_steps']}; "
            f"raise train.max_steps above {meta['step']} to train on"
        )
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def check_expert_parallel(tag_dir: Path, size: int, world: int, stage: int) -> None:
    """Another expert-parallel layout (EP size or process count) resumes through the merged form
    (``merge_expert_parallel``), which reads ZeRO-1/2's partitions: ZeRO-0 keeps each EP rank's whole
    optimizer in a file of its own, which nothing merges."""
    meta = read_meta(tag_dir)
    saved = (meta.get("expert_parallel_size", 1), meta["world_size"])
    if max(saved[0], size) > 1 and saved != (size, world) and stage not in (1, 2):
        raise ValueError(
            f"--resume: {tag_dir} was saved with expert_parallel_size={saved[0]} on {saved[1]} processes, this "
            f"run has {size} on {world}: under ZeRO-{stage} resume an expert-parallel run on the same layout "
            "(ZeRO-1 and 2 resume on another; its exported adapter loads anywhere)"
        )


def _client_state(meta: dict) -> dict:
    """Our metadata, and the universal-format marker for a run without expert parallelism: with it,
    DeepSpeed's MoE save path writes that key itself and refuses ours."""
    state = {"molora": meta}
    if meta.get("expert_parallel_size", 1) == 1:
        state["universal_checkpoint_info"] = {"universal_checkpoint_version": 0.2}
    return state


@contextmanager
def _without_frozen_aliases(module: torch.nn.Module) -> Iterator[None]:
    """While saving, the module's state dict leaves out every frozen parameter under any name.

    DeepSpeed's ``exclude_frozen_parameters`` drops frozen weights by the names ``named_parameters()``
    gives, which lists a tied weight once: its alias (a tied lm_head, 113 MB for SmolLM2) stayed.
    Entries are matched by storage; empty ones (ZeRO-3 partitions) are left to DeepSpeed."""
    frozen = {
        p.untyped_storage().data_ptr() for p in module.parameters() if not p.requires_grad and p.numel()
    }

    def drop(_module, state: dict, _prefix, _metadata) -> None:
        for key in [k for k, v in state.items() if v.numel() and v.untyped_storage().data_ptr() in frozen]:
            del state[key]

    handle = module.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def save(engine, root: Path, step: int, meta: dict, keep_last: int, experts=None) -> Path:
    """Collective: every rank writes its shards, then rank 0 marks the folder complete.

    ``experts``: the run's ``expert_parallel.ExpertGroup`` under expert parallelism, else None.
    """
    tag = _tag(step)
    rank = dist.get_rank()
    if rank == 0:
        # Leftovers of a save that a kill interrupted, or of a run resumed from an older step: the
        # conversion of a replaced checkpoint would be stale.
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
    dist.barrier()
    with _without_frozen_aliases(engine.module):
        engine.save_checkpoint(
            str(root),
            tag=tag,
            client_state=_client_state(meta),
            save_latest=False,
            # Only what training changes: the frozen base (18 GB for GLM-4-9B under ZeRO 0-2) comes
            # from its own files at every start, and must not eat the preemption signal's margin.
            exclude_frozen_parameters=True,
        )
    if experts is not None:
        save_expert_shards(engine.module, root / tag, experts)
    dist.barrier()
    if rank == 0:
        (root / tag / META).write_text(json.dumps(meta, indent=2))
        mark_complete(root / tag)
        for old in _complete_tags(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)
    dist.barrier()
    return root / tag


def _shard_file(tag_dir: Path, experts) -> Path:
    return tag_dir / f"expert_shard_{experts.rank:03d}_of_{experts.size:03d}.pt"


def save_expert_shards(model, tag_dir: Path, experts) -> None:
    """Write this rank's expert weights (the model's working copy) if it is its shard's writer.

    DeepSpeed saves expert parameters in no model file (its own MoE experts go to per-expert files
    this layer does not have), and on load restores only ZeRO's fp32 master copy: without this file the
    first step after a resume would run on the initial experts.
    """
    if experts.writes_shard:
        state = {
            f"{name}.{n}": p.detach().cpu()
            for name, m in molora_layers(model).items()
            for n, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B))
        }
        torch.save(state, _shard_file(tag_dir, experts))


def load_expert_shards(model, tag_dir: Path, experts) -> None:
    state = torch.load(_shard_file(tag_dir, experts), weights_only=True)
    with torch.no_grad():
        for name, m in molora_layers(model).items():
            m.lora_A.copy_(state[f"{name}.lora_A"])
            m.lora_B.copy_(state[f"{name}.lora_B"])


def to_universal(tag_dir: Path) -> Path:
    """Convert (once, on rank 0) to DeepSpeed's universal format for loading on another process count or
    expert-parallel size: ``merge_expert_parallel`` for an expert-parallel checkpoint, DeepSpeed's own
    conversion otherwise."""
    out = tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    if dist.get_rank() == 0 and not is_complete(out):
        shutil.rmtree(out, ignore_errors=True)
        meta = read_meta(tag_dir)
        log.info("converting %s to a universal checkpoint for another layout", tag_dir)
        if meta.get("expert_parallel_size", 1) > 1:
            merge_expert_parallel(tag_dir, out, meta["expert_parallel_size"], meta["world_size"])
        else:
            cmd = [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(tag_dir),
                "--output_folder",
                str(out),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ)
        if meta.get("zero_stage") in (1, 2):  # the stages whose universal load slices expert tensors
            _fit_any_expert_layout(out)
        shutil.copy(tag_dir / META, out / META)
        mark_complete(out)
    dist.barrier()
    return out


def _load_pickle(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's own files, as it loads them


def merge_expert_parallel(tag_dir: Path, out: Path, ep: int, world: int) -> None:
    """The merged form of an expert-parallel ZeRO-1/2 checkpoint, in DeepSpeed's universal layout.

    Each rank's ZeRO file holds its partition of every param group: the fp32 weights and the optimizer
    state of the same flat shape (Adam's moments; the step is one scalar per group). A parameter's
    fragments, concatenated in its group's rank order, are its flattened tensor: for a replicated one
    over all ranks; for an expert shard over its EDP group (``expert_parallel.shard_ranks``), and the
    ep shards then stack on the expert dimension. DeepSpeed's ``ds_to_universal`` would concatenate
    every rank's expert fragments as one tensor's (it refuses these checkpoints).
    """
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    files = {
        int(re.search(r"zero_pp_rank_(\d+)_", f.name)[1]): f
        for f in tag_dir.glob("*zero_pp_rank_*optim_states.pt")
    }
    if sorted(files) != list(range(world)):
        raise ValueError(
            f"{tag_dir} holds ZeRO files of ranks {sorted(files)}, its metadata says {world} processes"
        )
    parts = [_load_pickle(files[r])["optimizer_state_dict"] for r in range(world)]
    shapes = _load_pickle(tag_dir / "mp_rank_00_model_states.pt")["param_shapes"]
    for g, group in enumerate(parts[0]["base_optimizer_state"]["param_groups"]):
        flat = parts[0]["single_partition_of_fp32_groups"][g]
        state = parts[0]["base_optimizer_state"]["state"].get(g, {})
        keys = ["fp32", *(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)]
        if group.get("moe"):
            owners = [expert_parallel.shard_ranks(i, ep, world) for i in range(ep)]
        else:
            owners = [list(range(world))]
        for name, shape in shapes[g].items():
            folder = out / "zero" / name
            folder.mkdir(parents=True)
            for key in keys:
                full = torch.cat(
                    [
                        torch.cat([_fragment(parts[r], g, name, key) for r in ranks]).view(shape)
                        for ranks in owners
                    ]
                )
                torch.save({PARAM: full, CAT_DIM: 0}, folder / f"{key}.pt")
            if "step" in state:
                torch.save(state["step"], folder / "step.pt")
    sharded = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings")
    common = {k: v for k, v in parts[0].items() if k not in sharded}
    common["param_groups"] = parts[0]["base_optimizer_state"]["param_groups"]
    torch.save(common, out / "zero" / "optimizer_state.pt")
    shutil.copy(tag_dir / "mp_rank_00_model_states.pt", out)


def _fragment(part: dict, g: int, name: str, key: str) -> torch.Tensor:
    """The piece of parameter ``name``'s ``key`` (``fp32`` or an optimizer state) in one rank's ZeRO partition."""
    at = part["param_slice_mappings"][g].get(name)
    if at is None:  # none of this parameter in this rank's partition
        return torch.empty(0)
    flat = (
        part["single_partition_of_fp32_groups"][g]
        if key == "fp32"
        else part["base_optimizer_state"]["state"][g][key]
    )
    return flat.narrow(0, at.start, at.numel)


def _fit_any_expert_layout(universal_dir: Path) -> None:
    """Let a universal checkpoint load on any expert-parallel size: its expert tensors tagged as such
    (DeepSpeed then slices them by EP rank), and its param groups without ``name`` and ``moe``, which
    its load would copy over the loading run's own (ZeRO looks its EDP group up by that name)."""
    path = universal_dir / "zero" / "optimizer_state.pt"
    common = _load_pickle(path)
    groups = common["param_groups"]
    shapes = _load_pickle(universal_dir / "mp_rank_00_model_states.pt")["param_shapes"]
    for group, names in zip(groups, shapes):
        if expert_parallel.group_label(group) != "experts":
            continue
        for name in names:
            for f in (universal_dir / "zero" / name).glob("*.pt"):
                if f.name != "step.pt":
                    saved = torch.load(f, weights_only=False)
                    saved |= expert_parallel.universal_expert_tags(saved["param"].shape[0])
                    torch.save(saved, f)
    common["param_groups"] = [{k: v for k, v in g.items() if k not in ("name", "moe")} for g in groups]
    torch.save(common, path)


def load(engine, tag_dir: Path, experts=None) -> dict:
    """Load model, optimizer and scheduler state; returns our metadata. ``experts`` as in ``save``."""
    # Not strict: the checkpoint holds the trainable parameters only (see ``save``).
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    if experts is not None and not tag_dir.name.endswith(UNIVERSAL_SUFFIX):
        # The universal load sets the working weights from the fp32 ones itself.
        load_expert_shards(engine.module, tag_dir, experts)
    if tag_dir.name.endswith(UNIVERSAL_SUFFIX) and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(engine.optimizer.optimizer, tag_dir)
    return read_meta(tag_dir)


def _repair_zero3_universal_load(optimizer, universal_dir: Path) -> None:
    """Undo two slips of DeepSpeed's (0.19) ZeRO-3 universal load, which the other stages lack.

    - It copies ``param_groups[0]``'s settings into every group: the router group would come
      back named "experts", with the experts' lr (x300 at the paper's defaults) until the
      scheduler's next step, and the metrics would merge the two groups.
    - It gives every param group's Adam state one shared ``step`` tensor; ZeRO-3 steps the
      groups one after the other, so that tensor advanced once per group and optimizer step,
      and the bias corrections drifted (losses off by ~1e-4 within 5 steps on the tiny recipe).
    """
    # Tensors and plain containers, plus two DeepSpeed classes it pickles; nothing else may load. Python
    # 3.11.2 pickles the ZeroStageEnum member by name, as getattr(ZeroStageEnum, "weights") (3.11.7 by
    # value), so getattr is allowed too: it only reaches attributes of the globals allowed here.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, getattr]):
        saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", weights_only=True)
    groups = saved["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(
            f"{universal_dir} has {len(groups)} param groups, the optimizer {len(optimizer.param_groups)}"
        )
    for group, want in zip(optimizer.param_groups, groups):
        params = group["params"]
        group.clear()
        group.update({k: v for k, v in want.items() if k != "params"}, params=params)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
