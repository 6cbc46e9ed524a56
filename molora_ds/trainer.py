"""The training run: one ``Trainer`` whose ``__init__`` reads as the story of a run."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import yaml
from deepspeed.utils import safe_get_full_fp32_param
from torch.nn import functional as F
from tqdm import tqdm

from molora_ds import checkpoint
from molora_ds.data.formats import load_splits
from molora_ds.data.multiple_choice import tokenize_mc
from molora_ds.data.vision import StepBatches, step_loader, vision_prompt
from molora_ds.distributed import expert_parallel
from molora_ds.distributed.env import setup_env
from molora_ds.ds_config import bf16_enabled, finalize, plan_batches, zero_stage
from molora_ds.eval import logits_at, mc_accuracy
from molora_ds.inject import (
    adapter_state_dict,
    apply_molora,
    aux_loss,
    count_parameters,
    molora_layers,
    save_adapter,
)
from molora_ds.metrics import MetricsLogger
from molora_ds.models.loading import load_model, load_processor
from molora_ds.optim import GradientPreconditioner, build_optimizer
from molora_ds.preemption import StopRequests
from molora_ds.recipe import Recipe

log = logging.getLogger("molora_ds")


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(
        self, recipe: Recipe, ds_config: dict, output_dir: Path, resume_from: Path | None = None
    ) -> None:
        self.recipe, self.run_dir, self.resume_from = recipe, Path(output_dir), resume_from
        # The device first, from the launcher's local rank, before anything touches CUDA.
        self.env = setup_env()
        # Signals from here on ask for a checkpoint at the end of a step (none is lost while the model loads).
        self.stop = StopRequests(watch_launcher=self.env.launcher == "torch")
        self.device = self.env.bind_device()
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo", verbose=False
        )
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        train = recipe.train

        self.micro, self.accum = plan_batches(train, self.world, ds_config)
        self.ds_config = finalize(ds_config, self.micro, self.accum, self.world)

        # Model and adapters: under ZeRO-3 the base model loads partitioned (it needs the final
        # DeepSpeed config); the adapters are seeded right before they are drawn, so that their
        # initialisation does not depend on how the model was loaded (zero.Init draws differently).
        self.model, self.tokenizer = load_model(recipe.model, self.ds_config)
        self.processor = load_processor(recipe.model)  # vision-language models only, else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        torch.manual_seed(train.seed)
        self.layer_names = apply_molora(self.model, recipe.molora)
        ep = recipe.molora.expert_parallel_size
        layers = molora_layers(self.model)
        self.experts = None
        if ep > 1:  # auto mode decides per layer for the most tokens a micro-batch can hold
            tokens = self.micro * recipe.data.max_len
            self.experts = expert_parallel.shard_experts(
                self.model, layers, ep, recipe.molora.expert_parallel_mode, tokens
            )
            dispatched = sum(layer.dispatch for layer in layers.values())
            self._log(
                f"expert parallelism over {ep} ranks ({recipe.molora.expert_parallel_mode}, {tokens} tokens per "
                f"micro-batch): {len(layers) - dispatched} layers gather their experts, {dispatched} dispatch tokens"
            )
        # from_pretrained returns a model in eval mode, a config-built one is in train mode: say which,
        # so that the base model's own dropout does not depend on the loader.
        self.model.train()
        self.trainable, self.total = count_parameters(self.model)

        # Data: a fixed order per epoch, so a step number alone says which examples it sees.
        data = recipe.data
        self.vision = vision_prompt(self.processor) if self.processor is not None else None
        self.train_set, self.eval_set = load_splits(data, train.seed, vision=self.vision is not None)
        self.train_tok = tokenize_mc(self.train_set, self.tokenizer, data.max_len, data.prompt, self.vision)
        images = self.processor.image_processor if "image" in self.train_tok.column_names else None
        self.batches = StepBatches(
            self.train_tok, train.global_batch, self.micro, self.accum, self.world, self.rank,
            train.seed, self.pad_id, images,
        )  # fmt: skip
        self._steps, self._next_step = None, None
        if images is not None:
            self._log(
                f"{len(self.train_tok)} training rows with an image, {self.vision.image_tokens} image tokens each"
            )

        # Optimizer. Under DeepSpeed the preconditioner runs in gradient hooks (see
        # molora_ds.optim.zero), since ZeRO hands the optimizer flat partitions. No scheduler object:
        # each step's lr is the recipe's times train.lr_factor(step), set in train_step.
        optim = recipe.optim
        partitioned = zero_stage(self.ds_config) >= 1 or bf16_enabled(self.ds_config)
        self.optimizer = build_optimizer(
            self.model, precondition_in_step=False, partitioned=partitioned, **dataclasses.asdict(optim)
        )
        # By label: DeepSpeed renames the expert-parallel group in initialize.
        self.base_lrs = {expert_parallel.group_label(g): g["lr"] for g in self.optimizer.param_groups}

        # Resume target first: another process count or expert-parallel size needs the universal format,
        # set before initialize.
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.resume_from:
            saved = checkpoint.read_meta(self.resume_from)
            if (saved["world_size"], saved.get("expert_parallel_size", 1)) != (self.world, ep):
                self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=self.ds_config
        )
        self.preconditioner = (
            GradientPreconditioner(self.engine.module, optim.reg) if optim.riemannian else None
        )

        self.step = 0
        if self.resume_from:
            tag = self.resume_from
            if self.ds_config.get("checkpoint", {}).get("load_universal"):
                tag = checkpoint.to_universal(tag)
            self.step = checkpoint.load(self.engine, tag, self.experts)["step"]
            self._log(f"resumed from {tag} at step {self.step}")
        self.saved_step = self.step  # the newest checkpoint holds this step (or there is none: step 0)

        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0, resume_step=self.step)
        self.bad_steps = 0
        if self.rank == 0:
            self._write_run_files()
        self._log(
            f"{recipe.model.name_or_path}: {len(self.layer_names)} MoLoRA layers, {self.trainable:,} trainable of "
            f"{self.total:,} params; {self.world} processes x micro-batch {self.micro} x accumulation "
            f"{self.accum} = global batch {train.global_batch}; ZeRO-{zero_stage(self.ds_config)}"
            f"{', bf16' if bf16_enabled(self.ds_config) else ', fp32'}; {optim.name}"
        )

    # ----------------------------------------------------------------- helpers
    def _log(self, msg: str) -> None:
        if self.rank == 0:
            log.info(msg)

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))

    def _all_ranks_any(self, flag: bool | torch.Tensor) -> bool:
        t = torch.as_tensor(flag, dtype=torch.float32, device=self.device).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of global step ``step`` (``StepBatches``: a slice of a per-epoch
        permutation); with images, built ahead and their images decoded in DataLoader workers."""
        if step != self._next_step:  # the first step, or a resume moved it: (re)start the loader there
            workers = self.recipe.data.image_workers if self.batches.image_processor is not None else 0
            self._steps = iter(step_loader(self.batches, step, workers))
        self._next_step = step + 1
        return next(self._steps)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ----------------------------------------------------------------- training
    def train_step(self) -> dict:
        """One optimizer step over the global batch; the loss is the mean over all its target tokens.

        The host waits for the device a fixed few times a step (the target count that scales the loss,
        the all-ranks non-finite flag before the update, the logged loss and grad norms), never per
        micro-batch.
        """
        t0, cpu0 = time.perf_counter(), time.process_time()
        batches = self._micro_batches(self.step)
        # Counted and indexed on the CPU copies: nothing here waits for the device.
        counts = torch.tensor(
            [
                sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
                sum(int(b["attention_mask"].sum()) for b in batches),
            ],
            dtype=torch.float64,
        )
        keeps = [(b["labels"][:, 1:] != -100).any(dim=0).nonzero().flatten() for b in batches]
        counts = counts.to(self.device)
        dist.all_reduce(counts)
        targets, tokens = counts.tolist()
        # DeepSpeed averages over ranks and accumulation steps; undo both so that the gradient is the
        # one of sum(token losses) / targets, on any process count.
        scale = self.world * self.accum / targets
        # A function of the step number: a skipped step uses its lr slot as it uses its data. (DeepSpeed
        # would not step a scheduler after a ZeRO-1/2 overflow but would on ZeRO-0: it is not asked.)
        factor = self.recipe.train.lr_factor(self.step)
        groups = self.optimizer.param_groups
        for g in groups:
            g["lr"] = self.base_lrs[expert_parallel.group_label(g)] * factor
        lrs = {f"lr/{expert_parallel.group_label(g)}": g["lr"] for g in groups}  # the lr this step uses
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for i, (batch, keep) in enumerate(zip(batches, keeps)):
            batch, keep = self._to_device(batch), keep.to(self.device)
            # Dropout masks depend only on (seed, step, micro-batch of the global batch): exact resume
            # needs no saved RNG state, and another process count with the same micro-batch size
            # draws the same masks (seeding by rank would not).
            micro_index = i * self.world + self.rank
            torch.manual_seed((self.recipe.train.seed * 1_000_003 + self.step) * 1_000_033 + micro_index)
            # Position t predicts token t + 1: only positions followed by a target need logits.
            targets_at = batch["labels"][:, 1:]
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if "pixel_values" in batch:  # in the model's dtype: LLaVA does not cast them
                inputs["pixel_values"] = batch["pixel_values"].to(self.engine.module.dtype)
            logits = logits_at(self.engine, inputs, keep)
            token_loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets_at[:, keep].flatten(), reduction="sum"
            )
            loss = token_loss * scale
            extra = aux_loss(self.engine.module)
            if extra is not None:
                # Per micro-batch: DeepSpeed's backward divides it by the accumulation count and the
                # reduction averages over ranks, i.e. it is the mean over the global batch's micro-batches.
                loss = loss + extra
            bad |= ~torch.isfinite(loss)
            self.engine.backward(loss)
            if i == len(batches) - 1:
                if self.preconditioner is not None:
                    bad |= self.preconditioner.failed()
                # One decision for all ranks: a rank that skipped alone would leave the others' update
                # and counters out of step with it.
                skipped = self._all_ranks_any(bad)
                self.optimizer.skip_step = skipped
            self.engine.step()
            loss_sum += token_loss.detach().double()
        self.optimizer.skip_step = False
        if self.preconditioner is not None:
            self.preconditioner.new_step()  # the parameters changed: inverses are stale
        dist.all_reduce(loss_sum)
        seconds = time.perf_counter() - t0
        self.step += 1
        row = {"step": self.step, "loss": loss_sum.item() / targets}
        row |= lrs
        # A skipped step computed no norms: NaN, not the previous step's (nor a missing key at step 1).
        norms = {} if skipped else getattr(self.optimizer, "grad_norms", {})
        labels = [expert_parallel.group_label(g) for g in groups]
        row |= {f"grad_norm/{name}": norms.get(name, math.nan) for name in labels}
        # cpu_seconds: this process's CPU time (all its threads); unlike wall time, other jobs on a shared
        # machine barely change it
        row |= {
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu0,
        }
        row["skipped"] = int(skipped)
        return row

    def fit(self) -> dict:
        train = self.recipe.train
        results = {}
        if self.recipe.eval.before and self.step == 0:
            results["accuracy_before"] = self.evaluate()
        bar = tqdm(
            total=train.max_steps, initial=self.step, disable=self.rank != 0, desc="train", dynamic_ncols=True
        )
        status = "finished"
        while self.step < train.max_steps:
            # Checked before each step, so that a signal during the first evaluation stops the run too.
            if self._all_ranks_any(self.stop.requested()):
                status = "preempted"
                if self.step != self.saved_step:
                    self.save()
                why = self.stop.reason or "a stop request on another rank"
                self._log(f"{why}: exiting at step {self.step}, resume with --resume auto")
                break
            row = self.train_step()
            self.metrics.step(row, self._expert_load() if self.step % train.log_every == 0 else None)
            if row["skipped"]:
                self.bad_steps += 1
                self._log(f"step {row['step']}: non-finite loss, step skipped ({self.bad_steps} so far)")
                if self.bad_steps >= train.max_bad_steps:
                    raise NonFiniteLossError(
                        f"loss was non-finite in {self.bad_steps} steps (last at step {row['step']}); "
                        "lower optim.lr, check the data, or raise train.max_bad_steps"
                    )
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if self.step % train.log_every == 0 and self.rank == 0:
                bar.write(
                    f"step {self.step}/{train.max_steps} loss {row['loss']:.4f} lr {row['lr/experts']:.2e} "
                    f"|g| experts {row['grad_norm/experts']:.3g} router {row['grad_norm/router']:.3g} "
                    f"{row['tokens_per_s']:.0f} tok/s"
                )
            if self.step % train.save_every == 0 or self.step == train.max_steps:
                self.save()
        bar.close()
        if status == "finished":
            if self.recipe.eval.after:
                results["accuracy_after"] = self.evaluate()
            self.export_adapter()
        results |= {"status": status, "step": self.step, "skipped_steps": self.bad_steps}
        results["trainable_params"] = self.trainable
        if self.rank == 0:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
        self.metrics.close()
        # No rank exits before rank 0 has written its files: launchers end the others once one has
        # exited (srun --kill-on-bad-exit after a torchrun forwarded a signal), and a job script decides
        # on requeueing from results.json.
        dist.barrier()
        return results

    def evaluate(self) -> dict:
        ev = self.recipe.eval
        t0 = time.perf_counter()
        res = mc_accuracy(
            self.engine.module,
            self.tokenizer,
            self.eval_set,
            ev.method,
            ev.batch_size,
            self.recipe.data.max_len,
            prompt=self.recipe.data.prompt,
            vision=self.vision,
            image_processor=self.processor.image_processor if self.processor is not None else None,
        )
        self._log(
            f"eval ({ev.method}, {res['n']} questions): accuracy {res['accuracy']:.4f} "
            f"in {time.perf_counter() - t0:.0f} s"
        )
        self.metrics.scalars({"eval/accuracy": res["accuracy"]}, self.step)
        return res

    def _expert_load(self) -> dict[str, list[float]]:
        """Each layer's share of routing slots per expert since the last call, over all ranks."""
        layers = molora_layers(self.engine.module)
        slots = [m.pop_routed_slots().to(self.device, torch.float64) for m in layers.values()]
        flat = torch.cat(slots)
        dist.all_reduce(flat)  # one collective for all layers
        shares = [c / c.sum().clamp_min(1) for c in flat.split([len(c) for c in slots])]
        return {n: s.tolist() for n, s in zip(layers, shares)}

    def save(self) -> None:
        meta = {"step": self.step, "world_size": self.world, "zero_stage": zero_stage(self.ds_config)}
        meta["expert_parallel_size"] = self.recipe.molora.expert_parallel_size
        meta["recipe"] = self.recipe.to_dict()  # a resume compares its own recipe with it (recipe_changes)
        keep = self.recipe.train.keep_last
        path = checkpoint.save(self.engine, self.ckpt_root, self.step, meta, keep, self.experts)
        self.saved_step = self.step
        self._log(f"checkpoint: {path}")

    def export_adapter(self) -> Path:
        """fp32 adapter weights (gathered from ZeRO partitions: collective) as safetensors + JSON."""
        params = dict(self.engine.module.named_parameters())
        # None under ZeRO-0 without bf16: no optimizer wraps the parameters, which are then the fp32 weights.
        full = {n: safe_get_full_fp32_param(params[n]) for n in adapter_state_dict(self.engine.module)}
        state = {n: (params[n].detach() if p is None else p) for n, p in full.items()}
        if self.experts is not None:  # one file usable without expert parallelism
            state = {
                n: expert_parallel.gather_full(t, self.experts)
                if expert_parallel.is_expert_shard(params[n])
                else t
                for n, t in state.items()
            }
        state = {n: t.cpu() for n, t in state.items()}
        out = self.run_dir / "adapter"
        if self.rank == 0:
            save_adapter(out, state, dataclasses.replace(self.recipe.molora, expert_parallel_size=1))
            self._log(f"adapter: {out}")
        dist.barrier()
        return out
