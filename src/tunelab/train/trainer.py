"""A thin `Trainer` subclass: tunelab computes the loss from logits, and counts trained tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..constants import LOSS_POSITIONS
from ..model.adapters import check_whole
from ..model.loss import (
    causal_lm_loss,
    install_labelled_forward,
    summed_loss,
    supports_labelled_loss,
    trained_positions,
)
from . import checkpoints, distributed
from .guards import LossGuard


def discard_gradients(model) -> None:
    """Zero the step's gradients, keeping the tensors: under fp16 the GradScaler then still finds them to
    check for infs (with gradients set to None it refuses to step: "No inf checks were recorded")."""
    model.zero_grad(set_to_none=False)


class TokenCounter:
    """Trained tokens seen in training steps, for the tokens/s figure in metrics.jsonl and the run summary.

    Counts may be device tensors; they are read (one host sync) only when a log line asks. Every rank
    calls `take` at the same log step: it returns the count of all ranks together.
    """

    def __init__(self):
        self.trained = 0
        self._taken = 0

    def take(self) -> int:
        n, self.trained = int(self.trained), 0
        self._taken += n
        return int(distributed.total(n))

    @property
    def seen(self) -> int:
        """This process's trained tokens so far."""
        return self._taken + int(self.trained)


class WholeGlobalBatches(torch.utils.data.Sampler):
    """The inner sampler's indices, then fillers (None) up to a whole number of global batches.

    accelerate deals per-device batches to the ranks in turn and, when the epoch's last round is
    short, completes it with samples from the epoch's start, which are then trained twice. Filler
    samples complete it instead: they have no label, so the loss and its normaliser are exactly those
    of the real samples, and every sample is trained once per epoch across the ranks.
    """

    def __init__(self, inner: torch.utils.data.Sampler, multiple: int):
        self.inner = inner
        self.multiple = multiple

    def __len__(self) -> int:
        return -(-len(self.inner) // self.multiple) * self.multiple

    def __iter__(self):
        n = 0
        for index in self.inner:
            n += 1
            yield index
        yield from [None] * (len(self) - n)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


class _JudgeLosses(TrainerCallback):
    """Hands the step's micro-step losses to the loss guard just before the optimizer steps.

    Judged here, once per optimizer step, rather than after each micro-step: reading a loss makes the
    host wait for the GPU, and doing that every micro-step stalls the queue of kernels.
    """

    def __init__(self, trainer: "TunelabTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._judge_losses()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._skip_step = False  # a GradScaler may have skipped the step without calling ours


class TunelabTrainer(Trainer):
    def __init__(self, *args, token_counter: TokenCounter | None = None, loss_guard: LossGuard | None = None, **kwargs):
        self.token_counter = token_counter or TokenCounter()
        self.loss_guard = loss_guard or LossGuard()
        self._skip_step = False
        self._losses: list[torch.Tensor] = []
        self.signals = None  # a guards.SignalCheckpoint, when one is installed
        self._whole_batches: WholeGlobalBatches | None = None
        super().__init__(*args, compute_loss_func=self._loss, **kwargs)
        self.add_callback(_JudgeLosses(self))
        self.labelled_loss = supports_labelled_loss(self.model)
        if self.labelled_loss:
            install_labelled_forward(self.model)
        # Labels are never passed to the model (remote-code forwards may choke on extra kwargs), and
        # the trained-token count must skip position 0, which a shifted loss never predicts.
        self.model_accepts_loss_kwargs = False
        self._loss_shifts_labels = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._losses.append(loss.detach())
        # a non-finite loss is kept out of the logged mean without reading it on the host
        return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))

    def _judge_losses(self) -> None:
        if not self._losses:
            return
        # every rank judges the same numbers (the mean over ranks), so all skip or stop together; a signal
        # received by any rank rides along, so that all ranks stop after the same step
        local = torch.stack(self._losses).float()
        flag = torch.tensor([float(bool(self.signals and self.signals.received))], device=local.device)
        *losses, signalled = distributed.mean(torch.cat([local, flag])).tolist()
        self._losses = []
        if self.signals and signalled > 0:
            self.signals.agreed = True
        verdicts = [self.loss_guard.check(v, self.state.global_step + 1, self.args.output_dir) for v in losses]
        if "skip" in verdicts:
            discard_gradients(self.model_wrapped)
            self._skip_step = True

    def create_optimizer(self, *args, **kwargs):
        """The optimizer's step is skipped after a bad loss under `on_bad_loss: skip` (momentum included)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        step = optimizer.step

        def guarded_step(*a, **k):
            if self._skip_step:
                self._skip_step = False
                optimizer.zero_grad(set_to_none=True)
                return None
            return step(*a, **k)

        optimizer.step = guarded_step
        return optimizer

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args and getattr(state, "fsdp_plugin", None) is None and distributed.active():
            # accelerate turns FSDP on for accelerators only; torch's FSDP2 runs on CPU processes over gloo
            # as well, which is how tunelab's multi-process runs are tested without a GPU
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if self.accelerator.mixed_precision != "no":
                plugin.set_mixed_precision(self.accelerator.mixed_precision)
            state.fsdp_plugin = plugin
            state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs
            self.is_fsdp_enabled = True

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            # transformers would read every sample to learn its length; the dataset knows them all already
            sampler = LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                dataset=dataset,
                lengths=dataset.lengths,
            )
        else:
            sampler = super()._get_train_sampler(train_dataset)
        if sampler is None or self.args.world_size <= 1:
            return sampler
        if type(sampler) is torch.utils.data.RandomSampler:  # what accelerate makes of it, as one process gets
            from accelerate.data_loader import SeedableRandomSampler

            sampler = SeedableRandomSampler(data_source=sampler.data_source, data_seed=self.args.data_seed)
        self._whole_batches = WholeGlobalBatches(sampler, self.args.per_device_train_batch_size * self.args.world_size)
        return self._whole_batches

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            # a loader draws a seed from the global RNG each time it starts; a resumed stream starts at
            # another step than the uninterrupted run did, so that draw would shift every dropout mask after
            base = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper iterates the loader it holds
            base.generator = torch.Generator().manual_seed(self.args.seed)
        return loader

    def _run_epoch(self, *args, **kwargs):
        # a mid-epoch resume puts accelerate's batch skipper above the per-rank batch sampler, and its
        # set_epoch stops there: the resumed epoch would replay epoch 0's order. Told here, whatever wraps it.
        if self._whole_batches is not None:
            self._whole_batches.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def rank_share_loader(self, dataset) -> torch.utils.data.DataLoader:
        """This rank's share of `dataset`, each sample once over all ranks; fillers (None) even out the rounds,
        since every rank must run as many batches (sharded forwards are collective)."""
        rank, world, size = distributed.rank(), distributed.world_size(), self.args.per_device_eval_batch_size
        share = list(range(rank, len(dataset), world))
        rounds = -(-len(dataset) // (world * size))
        share += [None] * (rounds * size - len(share))
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, share), batch_size=size, collate_fn=self.data_collator
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Mean cross-entropy per trained token over the whole eval set, each rank's share summed once.

        transformers averages per-batch means (so the figure moves with the batch size) and, under DDP,
        completes the last round with repeated samples; here every held-out token counts once, so the
        eval loss is the same for any batch size or number of processes, and equals `tunelab eval`'s.
        """
        loader = self.rank_share_loader(eval_dataset if eval_dataset is not None else self.eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.args.device)  # read once, at the end
        count = torch.zeros((), dtype=torch.long, device=self.args.device)
        with torch.no_grad():
            for batch in loader:
                inputs = self._prepare_inputs(batch)
                positions = inputs.pop(LOSS_POSITIONS, None)
                labels = inputs.pop("labels")
                if "position_ids" in inputs:
                    inputs["use_cache"] = False
                with self.autocast_smart_context_manager():
                    summed, n = summed_loss(model, inputs, labels, positions, self.labelled_loss)
                total += summed.double()
                count += n
        model.train(was_training)
        total, count = float(distributed.total(total)), int(distributed.total(count))
        metrics = {
            f"{metric_key_prefix}_loss": total / count if count else float("nan"),
            f"{metric_key_prefix}_tokens": count,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model, trial):
        """transformers' checkpoint, written into a staging folder and published whole, then pruned."""
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        staging = run_dir / f"{checkpoints.STAGING}{step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()
        limit = self.args.save_total_limit
        self._get_output_dir = lambda trial=None: str(staging)
        self.args.save_total_limit = None  # pruning waits until the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
            self.args.save_total_limit = limit
        staged = staging / f"{checkpoints.PREFIX}{step}"
        distributed.barrier()  # every rank's files (its RNG state, shards) are written before rank 0 publishes
        if self.args.should_save:
            self.loss_guard.save(staged)
            if hasattr(self.train_dataset, "save_position"):  # a stream: where the next step's data starts
                args = self.args
                consumed = step * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                self.train_dataset.save_position(staged, consumed)
            checkpoints.save_world(staged, self.args.world_size)
            checkpoints.publish(staged, run_dir / f"{checkpoints.PREFIX}{step}")
            shutil.rmtree(staging, ignore_errors=True)
            checkpoints.prune(run_dir, limit, protect=self.state.best_model_checkpoint)
        distributed.barrier()

    def _save(self, output_dir=None, state_dict=None):
        """Every save (checkpoint or final) checks that what it writes is whole, before writing anything."""
        if state_dict is not None:
            # a state dict gathered from shards on CPU can hold collective results that do not own their storage
            # (safetensors cannot write those); plain copies of them save like any tensor
            state_dict = {k: v.clone() if type(v) is not torch.Tensor else v for k, v in state_dict.items()}
        if self.args.should_save:
            check_whole(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), state_dict)
        super()._save(output_dir, state_dict)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        positions = inputs.pop(LOSS_POSITIONS, None)
        if "position_ids" in inputs:  # packed rows: a cache would turn the block-diagonal mask off
            inputs["use_cache"] = False
        if return_outputs or not self.labelled_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.token_counter.trained += (
                positions.numel() if positions is not None else trained_positions(inputs["labels"])
            )
        body = {k: v for k, v in inputs.items() if k != "labels"}
        loss = model(
            **body, tunelab_labels=inputs["labels"], tunelab_num_items=num_items_in_batch, tunelab_positions=positions
        ).loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss

    def _loss(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if self.model.training:
            self.token_counter.trained += trained_positions(labels)
        return causal_lm_loss(logits, labels, num_items_in_batch)
