"""`make mutation`: put realistic bugs into a scratch copy of src/, one at a time, and run the tests that guard each.

Every mutation must make at least one of its tests fail; one that survives means a defect that the
suite would let through, so the run fails and names it. The list starts with the mutations that once
escaped the suite and one per module that matters; every new feature adds the mutations of what it
builds. A mutation whose text is no longer in its file fails too, so the list cannot rot silently.

    python scripts/mutation.py [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # under src/tunelab/
    find: str  # must occur exactly once
    replace: str
    tests: tuple[str, ...]  # pytest paths or node ids that must catch it


MUTATIONS = [
    # --- once escaped the suite -----------------------------------------------------------------------------
    Mutation(
        "adapter never applied at inference",
        "infer/load.py",
        "            self.model.set_adapter(variant.peft_name)\n            yield self.model",
        "            with self.model.disable_adapter():\n                yield self.model",
        ("tests/infer/test_adapter_applied.py",),
    ),
    Mutation(
        "chat: adapter layers switched off",
        "infer/chat.py",
        "        im.model.generation_config.eos_token_id = variant.stop_ids or None\n",
        "        im.model.generation_config.eos_token_id = variant.stop_ids or None\n"
        "        if variant.peft_name is not None:\n            im.model.base_model.disable_adapter_layers()\n",
        ("tests/infer/test_adapter_applied.py",),
    ),
    Mutation(
        "accumulation normalised per micro-batch (plain-head path)",
        "train/trainer.py",
        "return causal_lm_loss(logits, labels, num_items_in_batch)",
        "return causal_lm_loss(logits, labels, None)",
        ("tests/train/test_accumulation.py",),
    ),
    Mutation(
        "accumulation normalised per micro-batch",
        "train/trainer.py",
        "tunelab_num_items=num_items_in_batch, tunelab_positions=positions",
        "tunelab_num_items=None, tunelab_positions=positions",
        ("tests/train/test_accumulation.py",),
    ),
    Mutation(
        "bf16/fp16 export proof that cannot fail",
        "export/merge.py",
        "TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}",
        "TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e9, torch.bfloat16: 1e9}",
        ("tests/export/test_export_tolerance.py",),
    ),
    Mutation(
        "cache key without system",
        "config.py",
        '"A system prompt put first in every conversation that has none.", group="data", data=True',
        '"A system prompt put first in every conversation that has none.", group="data"',
        ("tests/data/test_cache_keys.py", "tests/data/test_cache.py"),
    ),
    Mutation(
        "checkpoint files fsynced after the rename",
        "train/checkpoints.py",
        '    for root, _, files in os.walk(staged):\n        for name in files:\n            _fsync(Path(root) / name)\n    _fsync(staged)\n    old = None\n    if final.exists():  # saved again at the same step, e.g. by an interrupt right after a scheduled save\n        old = final.with_name(f"{STAGING}{final.name}-old")\n        shutil.rmtree(old, ignore_errors=True)\n        os.replace(final, old)\n    os.replace(staged, final)\n    _fsync(final.parent)\n',
        '    _fsync(staged)\n    old = None\n    if final.exists():  # saved again at the same step, e.g. by an interrupt right after a scheduled save\n        old = final.with_name(f"{STAGING}{final.name}-old")\n        shutil.rmtree(old, ignore_errors=True)\n        os.replace(final, old)\n    os.replace(staged, final)\n    for root, _, files in os.walk(final):\n        for name in files:\n            _fsync(Path(root) / name)\n    _fsync(final.parent)\n',
        ("tests/train/test_checkpoint_order.py",),
    ),
    # --- precision (GPU paths, CPU proxies) -----------------------------------------------------------------
    Mutation(
        "precision: full fine-tuning without fp32 master weights",
        "train/setup.py",
        'weights = torch.float32 if cfg.finetuning_type == "full" and not cfg.pure_bf16 else dtype',
        "weights = dtype",
        ("tests/train/test_precision.py",),
    ),
    Mutation(
        "precision: the loss runs outside the model's forward (outside autocast)",
        "train/trainer.py",
        "        loss = model(\n"
        '            **body, tunelab_labels=inputs["labels"], tunelab_num_items=num_items_in_batch, tunelab_positions=positions\n'
        "        ).loss\n",
        "        from ..model.loss import labelled_loss\n\n        loss = labelled_loss(model, inputs, num_items_in_batch)\n",
        ("tests/train/test_precision.py",),
    ),
    Mutation(
        "precision: bf16 picked on GPUs that only emulate it",
        "model/loader.py",
        "return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)",
        "return torch.cuda.is_available() and torch.cuda.is_bf16_supported()",
        ("tests/train/test_precision.py",),
    ),
    Mutation(
        "precision: several GPUs wrap the model in DataParallel",
        "train/arguments.py",
        "        return min(super().n_gpu, 1)",
        "        return super().n_gpu",
        ("tests/train/test_precision.py",),
    ),
    Mutation(
        "precision: a skipped fp16 step leaves the GradScaler no gradients to check",
        "train/trainer.py",
        "    model.zero_grad(set_to_none=False)",
        "    model.zero_grad(set_to_none=True)",
        ("tests/train/test_guards.py",),
    ),
    Mutation(
        "precision: pure_bf16 rounds updates to nearest",
        "train/optim.py",
        "    rounded = ((bits + noise) & -65536).view(torch.float32)",
        "    rounded = src.to(torch.bfloat16).float()",
        ("tests/train/test_optim.py",),
    ),
    Mutation(
        "precision: pure_bf16 keeps peft's fp32 adapters",
        "train/setup.py",
        "        if p.requires_grad and p.dtype != torch.bfloat16:",
        "        if False:",
        ("tests/train/test_optim.py",),
    ),
    Mutation(
        "speed: the loss guard reads each micro-step's loss",
        "train/trainer.py",
        "        self._losses.append(loss.detach())\n",
        "        self._losses.append(loss.detach())\n        float(loss)\n",
        ("tests/train/test_host_syncs.py",),
    ),
    Mutation(
        "speed: the loss gathers with a device boolean mask",
        "model/loss.py",
        "    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)",
        "    picked = hidden[:, :-1][labels[:, 1:].to(hidden.device) != IGNORE_INDEX]",
        ("tests/train/test_host_syncs.py",),
    ),
    Mutation(
        "distributed: a short last round completed with repeated samples",
        "train/trainer.py",
        "        return self._whole_batches\n",
        "        return sampler\n",
        ("tests/train/test_distributed.py::test_two_processes_train_like_one_with_the_same_global_batch",),
    ),
    Mutation(
        "distributed: a resume with another number of processes goes ahead",
        "train/checkpoints.py",
        "    if before != processes:\n",
        "    if False:\n",
        ("tests/train/test_distributed.py::test_ctrl_c_stops_every_rank_after_the_same_step_saves_once_and_resumes",),
    ),
    Mutation(
        "memory: eval builds the full logits",
        "eval/evaluate.py",
        "    labelled = supports_labelled_loss(im.model)",
        "    labelled = False",
        ("tests/eval/test_evaluate.py",),
    ),
    Mutation(
        "memory: a sweep keeps each finished run alive",
        "sweep.py",
        "        _release_memory()  # the next run must not find the last one's model still held",
        "        pass",
        ("tests/test_sweep.py::test_a_finished_run_is_freed_before_the_next_one_trains",),
    ),
    Mutation(
        "memory: export merges on the GPU by default",
        "export/merge.py",
        '    device: str = "cpu",\n) -> ExportReport:',
        '    device: str = "cuda",\n) -> ExportReport:',
        ("tests/export/test_merge.py::test_export_merges_on_the_cpu_even_with_a_gpu_visible",),
    ),
    Mutation(
        "qlora: the base is loaded unquantized",
        "model/loader.py",
        '        kwargs["quantization_config"] = _quantization(quant_bits, compute)',
        "        pass",
        ("tests/model/test_qlora.py",),
    ),
    # --- one per module ------------------------------------------------------------------------------------
    Mutation(
        "mask: one token past the answer trained",
        "data/encode.py",
        "i, j = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)",
        "i, j = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b) + 1",
        ("tests/data/test_encode.py",),
    ),
    Mutation(
        "mask: control token straddling an answer trained",
        "data/encode.py",
        "if i and offsets[i - 1][1] > a and ids[i - 1] not in self._markup_ids:",
        "if i and offsets[i - 1][1] > a:",
        ("tests/data/test_encode.py",),
    ),
    Mutation(
        "control-token text in messages read as control tokens",
        "data/literal.py",
        "return pattern.sub(self._swap, value) if pattern is not None and self._special.holds(value) else value",
        "return value",
        ("tests/data/test_token_stream.py",),
    ),
    Mutation(
        "packing: positions do not restart per sample",
        "data/packing.py",
        "        positions += range(len(s.input_ids))",
        "        positions += range(len(positions), len(positions) + len(s.input_ids))",
        ("tests/data/test_packing.py",),
    ),
    Mutation(
        "packing: first label of a sample kept",
        "data/packing.py",
        "        labels += [IGNORE_INDEX] + s.labels[1:]",
        "        labels += s.labels",
        ("tests/data/test_packing.py",),
    ),
    Mutation(
        "loss: head gradient off by the target term",
        "model/loss.py",
        "grad[torch.arange(len(y), device=y.device), y] -= 1",
        "grad[torch.arange(len(y), device=y.device), y] -= 0.5",
        ("tests/model/test_loss.py",),
    ),
    Mutation(
        "loss: Liger called with its arguments swapped",
        "model/loss.py",
        "out = fused(weight, hidden, targets)",
        "out = fused(hidden, weight, targets)",
        ("tests/model/test_loss.py",),
    ),
    Mutation(
        "resume: a cut-off checkpoint is picked",
        "train/checkpoints.py",
        "and (p / LAST_WRITTEN).is_file()]",
        "]",
        ("tests/train/test_resume.py::test_a_cut_off_checkpoint_is_never_picked_and_is_cleared",),
    ),
    Mutation(
        "quirks: end-of-turn ids not made stop ids",
        "model/quirks.py",
        "ids = list(dict.fromkeys([*eot_ids, *current]))",
        "ids = list(dict.fromkeys(current))",
        ("tests/model/test_quirks.py",),
    ),
    Mutation(
        "loader: get_input_embeddings repair skipped",
        "model/loader.py",
        "found = [n for n in [_remote_code_note(model, path), fix_input_embeddings(model)] if n]",
        "found = [n for n in [_remote_code_note(model, path)] if n]",
        ("tests/model/test_remote_code.py",),
    ),
    Mutation(
        "inference: a base model's end-of-turn ids are not stop ids",
        "infer/load.py",
        "stops = list(dict.fromkeys([*saved, *Encoder(tokenizer).eot_ids]))",
        "stops = list(dict.fromkeys(saved))",
        ("tests/infer/test_chat.py",),
    ),
    Mutation(
        "loggers: SwanLab run never finished (offline curves lost)",
        "train/run.py",
        "    finally:\n        _finish_loggers(cfg)\n",
        "    finally:\n        pass\n",
        ("tests/train/test_output_dir.py::test_swanlab_offline_run_holds_the_logged_losses",),
    ),
    Mutation(
        "sweep: every point trains the file's values",
        "sweep.py",
        'cfg = load_config(config_path, {**values, "output_dir": str(folder), "resume_from_checkpoint": "auto"})',
        'cfg = load_config(config_path, {"output_dir": str(folder), "resume_from_checkpoint": "auto"})',
        ("tests/test_sweep.py",),
    ),
    Mutation(
        "config: allowed values not checked",
        "config.py",
        'if meta["choices"] and value is not None and value not in meta["choices"]:',
        "if False:",
        ("tests/test_config.py",),
    ),
    Mutation(
        "export: prompt proof ignored",
        "export/merge.py",
        "    if not report.prompts_identical:\n",
        "    if False:\n",
        ("tests/export/test_merge.py",),
    ),
    Mutation(
        "metrics: BLEU without brevity penalty",
        "eval/metrics.py",
        "brevity = 1.0 if c > r else math.exp(1 - r / c)",
        "brevity = 1.0",
        ("tests/eval/test_metrics.py",),
    ),
    Mutation(
        "readers: JSONL line numbers off by one",
        "data/readers.py",
        "        lines, first_line, first_byte, byte = [], 1, 0, 0\n",
        "        lines, first_line, first_byte, byte = [], 0, 0, 0\n",
        ("tests/data/test_readers.py",),
    ),
    # --- sharding engines (issue 13) ------------------------------------------------------------------------
    Mutation(
        "engines: the head loss reads a sharded weight outside the head's call",
        "model/loss.py",
        "    loss = _as_head_forward(lm.get_output_embeddings(), picked, targets, float(softcap), chunk)",
        "    loss = _head_loss(picked, lm.get_output_embeddings().weight, targets, float(softcap), chunk)",
        ("tests/train/test_distributed.py::test_two_processes_train_like_one_with_the_same_global_batch",),
    ),
    Mutation(
        "engines: every fsdp2 rank reads the weights",
        "train/engines.py",
        'return engine.name == "fsdp2" and not distributed.is_main()',
        'return engine.name == "fsdp2" and distributed.rank() < 0',
        ("tests/train/test_distributed.py::test_two_processes_train_like_one_with_the_same_global_batch",),
    ),
    Mutation(
        "engines: a gathered state dict is saved unchecked",
        "model/adapters.py",
        "    tensors = dict(model.named_parameters()) if state_dict is None else state_dict",
        "    tensors = dict(model.named_parameters())",
        ("tests/model/test_adapters.py::test_weights_that_are_not_whole_are_refused_before_anything_is_written",),
    ),
    Mutation(
        "engines: auto never shards",
        "train/engines.py",
        "    if fits_one_device is False:",
        "    if fits_one_device is None and False:",
        (
            "tests/train/test_engines.py::test_auto_picks_ddp_when_the_model_fits_one_device_else_fsdp2",
            "tests/model/test_estimate.py::test_each_engine_splits_what_it_shards_and_estimate_says_what_fits_a_gpu",
        ),
    ),
    Mutation(
        "engines: ZeRO-3 saves shards",
        "train/engines.py",
        '"stage3_gather_16bit_weights_on_model_save": True,',
        '"stage3_gather_16bit_weights_on_model_save": False,',
        ("tests/train/test_engines.py::test_the_deepspeed_configuration_is_accepted_by_deepspeed_itself",),
    ),
    Mutation(
        "distributed: a mid-epoch resume replays epoch 0's order",
        "train/trainer.py",
        '            self._whole_batches.set_epoch(kwargs["epoch"])',
        "            pass",
        ("tests/train/test_engines.py::test_a_run_resumes_from_its_checkpoint_to_the_uninterrupted_weights",),
    ),
    Mutation(
        "distributed: every rank evaluates the whole eval set",
        "train/trainer.py",
        "        share = list(range(rank, len(dataset), world))",
        "        share = list(range(0, len(dataset)))",
        ("tests/train/test_distributed.py::test_two_processes_train_like_one_with_the_same_global_batch",),
    ),
    Mutation(
        "estimate: fsdp2 keeps the whole optimizer state",
        "model/estimate.py",
        '    states = 0 if offload != "none" else states // n',
        '    states = 0 if offload != "none" else states',
        ("tests/model/test_estimate.py::test_each_engine_splits_what_it_shards_and_estimate_says_what_fits_a_gpu",),
    ),
    # --- tool-call and reasoning data -----------------------------------------------------------------------
    Mutation(
        "reasoning: last keeps every turn's thinking",
        "data/reasoning.py",
        'set(assistants[-1:]) if rule == "last"',
        'set(assistants) if rule == "last"',
        ("tests/data/test_reasoning.py", "tests/data/test_fuzz_agents.py"),
    ),
    Mutation(
        "turns: a turn the whole rendering changes trains there anyway",
        "data/turns.py",
        "            if full.startswith(cut[:closed]):",
        "            if full.startswith(cut[:start]):",
        ("tests/data/test_reasoning.py", "tests/data/test_tools.py"),
    ),
    Mutation(
        "turns: the think block the template writes after the prompt is not trained",
        "data/turns.py",
        "            start = common_prefix(prompt, cut)",
        "            start = common_prefix(prompt, cut)\n"
        '            start = cut.find(messages[i].get("content") or "\\x00", start) if '
        '(messages[i].get("content") or "\\x00") in cut[start:] else start',
        ("tests/data/test_reasoning.py",),
    ),
    Mutation(
        "tools: a call to a tool the record does not define passes",
        "data/tools.py",
        "                if names and name not in names:",
        "                if False:",
        ("tests/data/test_tools.py",),
    ),
    Mutation(
        "tools: arguments left as a JSON string (quoted twice by tojson templates)",
        "data/tools.py",
        '    out = {"type": "function", "function": {"name": name, "arguments": args}}',
        '    out = {"type": "function", "function": {"name": name, "arguments": raw}}',
        ("tests/data/test_tools.py",),
    ),
    Mutation(
        "drop: the empty think block of thinking-off is trained",
        "data/encode.py",
        'if reasoning == "drop" and thinking.has_switch(tokenizer) else {}',
        "if False else {}",
        ("tests/data/test_reasoning.py",),
    ),
    Mutation(
        "chat: --no-think ignored",
        "infer/load.py",
        '    return {"enable_thinking": think}',
        "    return {}",
        ("tests/infer/test_replies.py",),
    ),
    Mutation(
        "replies: Llama-style parameters not read as arguments",
        "infer/replies.py",
        'fn.get("arguments", fn.get("parameters"))',
        'fn.get("arguments")',
        ("tests/infer/test_replies.py",),
    ),
    # --- serving ----------------------------------------------------------------------------------------------
    Mutation(
        "serve: every request answered by the first model",
        "serve/app.py",
        "        return self.models[name]",
        "        return next(iter(self.models.values()))",
        ("tests/serve/test_server.py",),
    ),
    Mutation(
        "serve: a client that left keeps its row generating",
        "serve/batcher.py",
        "        stay = [i for i, r in enumerate(batch.rows) if not r.job.cancelled]",
        "        stay = list(range(len(batch.rows)))",
        ("tests/serve/test_batcher.py", "tests/serve/test_server.py"),
    ),
    Mutation(
        "serve: one batch for every model (the first job's adapter answers all)",
        "serve/batcher.py",
        "            groups.setdefault(job.variant.label, []).append(job)",
        '            groups.setdefault("all", []).append(job)',
        ("tests/serve/test_batcher.py::test_a_batch_of_base_and_two_adapters_answers_as_each_alone_and_as_generate",),
    ),
    Mutation(
        "serve: running batches of different models merged",
        "serve/batcher.py",
        "                    if k.variant is batch.variant\n",
        "                    if True\n",
        ("tests/serve/test_batcher.py",),
    ),
    Mutation(
        "serve: the prompt mask right-aligned wrongly on left-padded rows",
        "serve/batcher.py",
        "            mask[row, width - len(prompt) :] = 1",
        "            mask[row, : len(prompt)] = 1",
        ("tests/serve/test_batcher.py::test_a_batch_of_base_and_two_adapters_answers_as_each_alone_and_as_generate",),
    ),
    Mutation(
        "serve: a row generates one token past its max_tokens",
        "serve/batcher.py",
        "        if len(job.tokens) >= job.max_tokens:",
        "        if len(job.tokens) > job.max_tokens:",
        ("tests/serve/test_batcher.py::test_each_row_stops_at_its_own_max_tokens_or_earliest_stop_string",),
    ),
    Mutation(
        "serve: the model's repetition_penalty ignored",
        "serve/batcher.py",
        "        if penalty == 1.0:\n            return logits",
        "        if True:\n            return logits",
        ("tests/serve/test_batcher.py::test_the_models_repetition_penalty_applies_as_generate_applies_it",),
    ),
    Mutation(
        "serve: several stop strings cut at the last one found",
        "serve/textstream.py",
        "                    hit = start if hit is None else min(hit, start)",
        "                    hit = start if hit is None else max(hit, start)",
        ("tests/serve/test_batcher.py::test_each_row_stops_at_its_own_max_tokens_or_earliest_stop_string",),
    ),
    Mutation(
        "serve: no row joins a running batch (a short request waits for long ones)",
        "serve/batcher.py",
        "                    self._admit(self._take())\n                    self._merge()",
        "                    self._admit(self._take()) if not self._live else None\n                    self._merge()",
        ("tests/serve/test_batcher.py::test_a_short_request_is_not_held_behind_long_ones",),
    ),
    Mutation(
        "serve: the API key is not checked",
        "serve/app.py",
        "        if server.api_key and not key_matches(",
        "        if False and not key_matches(",
        ("tests/serve/test_server.py",),
    ),
    Mutation(
        "serve: the key checked only when an Authorization header is sent",
        "serve/app.py",
        '        if server.api_key and not key_matches(request.headers.get("authorization"), server.api_key):',
        '        if server.api_key and request.headers.get("authorization") is not None and not key_matches(\n'
        '            request.headers.get("authorization"), server.api_key\n        ):',
        ("tests/serve/test_guard.py::test_every_route_but_the_page_and_health_needs_the_key",),
    ),
    Mutation(
        "serve: the Bearer scheme compared case-sensitively",
        "serve/guard.py",
        'scheme.lower() == "bearer"',
        'scheme == "Bearer"',
        ("tests/serve/test_guard.py::test_the_key_is_bearer_in_any_case_and_nothing_else",),
    ),
    Mutation(
        "serve: any Host answered (DNS rebinding)",
        "serve/guard.py",
        '        if "*" not in self.hosts and (host is None',
        "        if False and (host is None",
        ("tests/serve/test_guard.py::test_a_rebinding_host_is_refused_and_loopback_names_are_answered",),
    ),
    Mutation(
        "serve: a foreign Origin answered",
        "serve/guard.py",
        '            if origin.lower() != f"{scheme}://{host}".lower():',
        "            if False:",
        ("tests/serve/test_guard.py::test_a_foreign_origin_is_refused_and_the_page_own_origin_is_answered",),
    ),
    Mutation(
        "serve: a post that is not JSON answered (forms, no-cors fetches)",
        "serve/guard.py",
        '            if media != "application/json":',
        '            if media not in ("application/json", "text/plain", ""):',
        ("tests/serve/test_guard.py::test_a_post_that_is_not_json_is_refused_before_anything_runs",),
    ),
    Mutation(
        "serve: the guard lets everything through",
        "serve/guard.py",
        "        refusal = self._refusal(scope, headers)",
        "        refusal = None",
        ("tests/serve/test_cross_site.py",),
    ),
    Mutation(
        "serve: a chunked body read past the limit",
        "serve/guard.py",
        "            if seen > self.max_bytes:\n                return None",
        "            if False:\n                return None",
        ("tests/serve/test_guard.py::test_a_10_mb_body_is_refused_at_once_and_small_requests_go_on_meanwhile",),
    ),
    Mutation(
        "serve: a non-streamed request keeps generating after its client left",
        "serve/app.py",
        "            if await request.is_disconnected():\n                return None",
        "            if False:\n                return None",
        ("tests/serve/test_guard.py::test_a_client_that_leaves_a_non_streamed_request_frees_its_rows",),
    ),
    Mutation(
        "serve: a chat prompt tokenized on the event loop",
        "serve/app.py",
        "            prompt = await run_in_threadpool(served.encoder.prompt_ids, conversation)",
        "            prompt = served.encoder.prompt_ids(conversation)",
        ("tests/serve/test_guard.py::test_a_huge_prompt_is_tokenized_off_the_event_loop_while_others_are_answered",),
    ),
    Mutation(
        "serve: an empty stop string kept",
        "serve/protocol.py",
        "        return [s for s in stops if s]",
        "        return list(stops)",
        ("tests/serve/test_guard.py::test_an_empty_stop_string_is_ignored_rather_than_ending_every_answer",),
    ),
    Mutation(
        "serve: an answer that calls a tool finishes as 'stop'",
        "serve/app.py",
        '        finish = "tool_calls"\n',
        "        finish = finish\n",
        ("tests/serve/test_messages.py",),
    ),
    Mutation(
        "page: a model id inserted as HTML",
        "serve/ui.html",
        '    label.append(box, " " + m.id);',
        '    label.append(box); label.insertAdjacentHTML("beforeend", " " + m.id);',
        ("tests/serve/test_ui.py::test_a_model_id_that_is_html_shows_as_text_and_runs_nothing",),
    ),
    Mutation(
        "page: trust_remote_code accepted in a posted YAML",
        "serve/ui.py",
        '    "trust_remote_code": "runs the model\'s own Python code on this machine",\n',
        "",
        (
            "tests/serve/test_ui_routes.py::test_each_forbidden_key_is_a_400_naming_it_before_anything_is_written_or_started",
        ),
    ),
    Mutation(
        "serve: the command line's --allowed-host dropped",
        "serve/run.py",
        "trusted_hosts(o.host, o.allowed_hosts)",
        "trusted_hosts(o.host)",
        ("tests/serve/test_guard.py::test_the_command_line_opens_what_its_flags_name_and_nothing_else",),
    ),
    Mutation(
        "page: a posted YAML may train on data outside the runs folder",
        "serve/ui.py",
        "            if isinstance(spec, str) and Path(spec).exists() and not Path(spec).resolve().is_relative_to(root):",
        "            if False:",
        (
            "tests/serve/test_ui_routes.py::test_each_forbidden_key_is_a_400_naming_it_before_anything_is_written_or_started",
        ),
    ),
    Mutation(
        "page: a run's data report honours its trust_remote_code",
        "serve/ui.py",
        "        if cfg.trust_remote_code:\n            raise refused(",
        "        if False:\n            raise refused(",
        ("tests/serve/test_ui_routes.py::test_the_data_report_never_runs_a_runs_own_code",),
    ),
    Mutation(
        "page: symlinks out of the runs folder followed",
        "serve/ui.py",
        "        return path.resolve() == path\n",
        "        return True\n",
        ("tests/serve/test_ui_routes.py::test_a_symlink_out_of_the_runs_folder_is_not_served",),
    ),
    Mutation(
        "page: the trainer outlives a killed server",
        "serve/jobs.py",
        "            preexec_fn=_die_with_parent(),\n",
        "",
        ("tests/serve/test_ui_routes.py::test_a_killed_server_takes_its_job_with_it",),
    ),
    # --- data at scale ----------------------------------------------------------------------------------------
    Mutation(
        "pool: results taken as they finish, not in order",
        "data/pool.py",
        "                    yield pending.popleft().get()\n            while pending:",
        "                    yield pending.pop().get()\n            while pending:",
        ("tests/data/test_pool.py",),
    ),
    Mutation(
        "pool: the last chunk's samples numbered from 0",
        "data/samples.py",
        '        arrays["conv"] = arrays["conv"] + self.n_conversations\n',
        '        arrays["conv"] = arrays["conv"] + self.n_conversations * (file == 0)\n',
        ("tests/data/test_samples.py", "tests/data/test_pool.py"),
    ),
    Mutation(
        "cache: built by both of two racing processes",
        "data/cache.py",
        "            fcntl.flock(handle, fcntl.LOCK_EX)",
        "            pass",
        ("tests/data/test_cache.py",),
    ),
    Mutation(
        "cache: token ids gathered in memory while encoding",
        "data/dataset.py",
        "                encoding = encode_all(cfg, encoder, spill)",
        "                encoding = encode_all(cfg, encoder, None)",
        ("tests/data/test_scale.py",),
    ),
    Mutation(
        "samples: a label where the mask says prompt",
        "data/samples.py",
        "            np.where(trained, ids, IGNORE_INDEX).tolist(),\n            bool(flags & TRUNCATED),",
        "            ids.tolist(),\n            bool(flags & TRUNCATED),",
        ("tests/data/test_samples.py",),
    ),
    Mutation(
        "stream: a resumed stream starts the chunk over",
        "data/stream.py",
        "                skip = position.sample if chunk_no == position.chunk else 0",
        "                skip = 0",
        ("tests/data/test_stream.py", "tests/train/test_streaming.py"),
    ),
    Mutation(
        "stream: the saved position counts from the resume, not the run's start",
        "data/stream.py",
        "        k = consumed - self.start.served  # samples served by this iteration",
        "        k = consumed  # samples served by this iteration",
        ("tests/data/test_stream.py", "tests/train/test_streaming.py"),
    ),
    Mutation(
        "stream: the loader's seed drawn from the global RNG",
        "train/trainer.py",
        "            base.generator = torch.Generator().manual_seed(self.args.seed)",
        "            pass",
        ("tests/train/test_streaming.py",),
    ),
    # --- a run answers as it was trained (issue 24) ---------------------------------------------------------
    Mutation(
        "peft: what peft wrapped not checked",
        "model/adapters.py",
        "    if extra_params or stray:\n",
        "    if extra_params:\n",
        ("tests/train/test_archs.py",),
    ),
    Mutation(
        "moe: short target names on a MoE",
        "model/adapters.py",
        "    if _has_moe_internals(model):\n        return list(chosen)\n",
        "",
        ("tests/train/test_archs.py::test_moe_trains_without_touching_experts",),
    ),
    Mutation(
        "reasoning: R1 turn trained without its native think block",
        "data/encode.py",
        "            return thinking.native_turn(prompt, text, reasoning) or text\n",
        "            return text\n",
        ("tests/data/test_reasoning.py",),
    ),
    Mutation(
        "defaults: the trained system prompt not applied at inference",
        "data/conversation.py",
        '            messages = [Message("system", system), *messages]\n',
        "            pass\n",
        ("tests/test_trained_prompt.py",),
    ),
    Mutation(
        "messages: a leading think block not split from the content",
        "data/formats.py",
        "        thought, msg.content = split_think(msg.content)\n",
        "        thought = None\n",
        ("tests/serve/test_messages.py", "tests/data/test_formats.py"),
    ),
    Mutation(
        "pool: workers keep the trainer's SIGTERM handler",
        "data/pool.py",
        '.get_context("fork").Pool(workers, _worker_signals) as pool:',
        '.get_context("fork").Pool(workers) as pool:',
        ("tests/data/test_pool.py::test_workers_end_on_sigterm_whatever_handler_the_trainer_installed",),
    ),
    Mutation(
        "replies: every call in a reply numbered from one",
        "infer/replies.py",
        "            group = _json_calls(block, len(found) + 1)\n",
        "            group = _json_calls(block)\n",
        ("tests/infer/test_replies.py",),
    ),
    Mutation(
        "run folder: a newer tunelab's keys silently dropped",
        "run_folder.py",
        "    newer = sorted(k for k in data if k not in FIELDS)\n    if newer:\n",
        "    data = {k: v for k, v in data.items() if k in FIELDS}\n    if False:\n",
        ("tests/train/test_setup.py",),
    ),
    Mutation(
        "tools: a result linked to the first pending call whatever its tool_call_id",
        "data/tools.py",
        "            call = match or pending[0]\n",
        "            call = pending[0]\n",
        ("tests/data/test_tools.py",),
    ),
    Mutation(
        "tools: definitions not shielded, control-token text in them read as control tokens",
        "data/encode.py",
        "shield.wrap(messages), shield.wrap(conv.tools), lost",
        "shield.wrap(messages), conv.tools, lost",
        ("tests/data/test_tools.py",),
    ),
    # --- preference training (dpo, kto) ----------------------------------------------------------------------
    Mutation(
        "LoRA reference with the adapters still on",
        "model/preference.py",
        "        with adapters_off(model):\n            return batch_logps(model, batch)",
        "        return batch_logps(model, batch)",
        (
            "tests/model/test_logps.py",
            "tests/train/test_preference_run.py::test_each_pair_loss_trains_and_logs_the_reward_metrics",
        ),
    ),
    Mutation(
        "chosen and rejected swapped in the batch",
        "data/pairs.py",
        "sequences = [s.chosen for s in samples] + [_second(s) for s in samples]",
        "sequences = [_second(s) for s in samples] + [s.chosen for s in samples]",
        (
            "tests/eval/test_preference_eval.py",
            "tests/train/test_preference_run.py::test_dpo_raises_the_chosen_answers_margin",
        ),
    ),
    Mutation(
        "chosen and rejected swapped in the eval only",
        "eval/preference.py",
        "            chosen.append(logps[:half].double().cpu())\n            rejected.append(logps[half:].double().cpu())",
        "            chosen.append(logps[half:].double().cpu())\n            rejected.append(logps[:half].double().cpu())",
        ("tests/eval/test_preference_eval.py",),
    ),
    Mutation(
        "prompt tokens scored",
        "data/pairs.py",
        "            labels[row, :n] = torch.tensor(s.labels)",
        "            labels[row, :n] = torch.tensor(s.input_ids)",
        ("tests/eval/test_preference_eval.py",),
    ),
    Mutation(
        "beta applied twice",
        "model/pref_losses.py",
        "    logits = beta * margin\n    return -(1.0 - label_smoothing)",
        "    logits = beta * beta * margin\n    return -(1.0 - label_smoothing)",
        ("tests/model/test_pref_trl.py", "tests/model/test_pref_losses.py"),
    ),
    Mutation(
        "KTO labels flipped",
        "data/pairs.py",
        "torch.tensor([bool(s.label) for s in samples])",
        "torch.tensor([not s.label for s in samples])",
        ("tests/train/test_preference_run.py::test_kto_trains_on_unpaired_answers_and_logs_its_kl",),
    ),
    Mutation(
        "per-row log-prob gradient sign (LoRA head path)",
        "model/loss.py",
        "    grad = -torch.exp(logits - lse[:, None])\n    grad[torch.arange(len(targets), device=targets.device), targets] += 1",
        "    grad = torch.exp(logits - lse[:, None])\n    grad[torch.arange(len(targets), device=targets.device), targets] -= 1",
        ("tests/model/test_logps.py",),
    ),
]


def scratch_copy() -> Path:
    """The repo's code and tests in a temporary folder, with ../shared beside it as in a checkout."""
    top = Path(tempfile.mkdtemp(prefix="tunelab-mutation-"))
    work = top / "main"
    work.mkdir()
    for name in ("src", "tests", "examples", "pyproject.toml", "README.md", "scripts"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.exists():
            shutil.copy2(source, work / name)
    shared = ROOT.parent / "shared"
    if shared.exists():
        (top / "shared").symlink_to(shared.resolve())
    return work


def run_tests(work: Path, tests: tuple[str, ...], timeout: int) -> tuple[str, float]:
    """'caught', 'SURVIVED' or 'error'; the scratch src/ comes first on the path, before the installed one."""
    env = {**os.environ, "PYTHONPATH": str(work / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", *tests],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "error (timeout)", time.perf_counter() - started
    seconds = time.perf_counter() - started
    if done.returncode == 1:
        return "caught", seconds
    if done.returncode == 0:
        return "SURVIVED", seconds
    return f"error (pytest exit {done.returncode}: {done.stdout.strip().splitlines()[-1:]})", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only mutations whose name contains one of these words")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutation")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(w in m.name for w in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name}: src/tunelab/{m.file} -> {', '.join(m.tests)}")
        return 0
    work = scratch_copy()
    print(f"scratch copy: {work}", flush=True)
    rows, failed = [], 0
    try:
        for m in chosen:
            path = work / "src" / "tunelab" / m.file
            original = path.read_text(encoding="utf-8")
            if original.count(m.find) != 1:
                verdict, seconds = f"STALE (text found {original.count(m.find)} times)", 0.0
            else:
                path.write_text(original.replace(m.find, m.replace), encoding="utf-8")
                try:
                    verdict, seconds = run_tests(work, m.tests, args.timeout)
                finally:
                    path.write_text(original, encoding="utf-8")
            failed += verdict != "caught"
            rows.append((m, verdict, seconds))
            print(f"{verdict:>10}  {m.name}  ({seconds:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)
    print("\n| mutation | file | caught by | verdict | seconds |\n|---|---|---|---|---|")
    for m, verdict, seconds in rows:
        print(f"| {m.name} | src/tunelab/{m.file} | {', '.join(m.tests)} | {verdict} | {seconds:.0f} |")
    print(f"\n{len(rows) - failed} of {len(rows)} mutations caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
