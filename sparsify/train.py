"""The training loop: one function, :func:`train`, that reads top to bottom.

    run_dir = train(load_recipe("recipes/quickstart.yaml"))

Everything a user's input can break (recipe, data, model, techniques vs the model) is checked before the run
directory is created. Then the loop runs; each compression technique is called explicitly where it acts:

    loss = distiller.loss(...)          the loss terms (distillation)
    loss = lengthdrop.loss(...)         + sub-models at sampled lengths, distilled from the full model
    pruner.mask_gradients()             after backward, before the optimizer step (taylor scores accumulate here)
    optimizer.step(); pruner.step()     masks applied right after every optimizer step (obs updates the weights)
    quantizer.step()                    fake quantization on from its start step, observers frozen after warm-up

A recipe with ``data.task: embedding`` trains a sentence-embedding model (:mod:`sparsify.sentence`) on unlabelled
text: its "logits" are the pooled sentence embedding, the distiller's ``embedding`` term pulls them towards the
teacher's, and evaluation reports the mean cosine to the teacher on held-out text (and, with ``data.pairs``, the
pair ROC-AUC); the loop is the same. ``token-classification`` and ``question-answering`` train those heads
(entity F1; SQuAD exact match / F1), again through the same loop.

A quantization recipe with ``mode: ptq`` trains nothing: the observers are calibrated on training batches and
the model is evaluated and saved (0 optimizer steps).

Schedules count optimizer steps; ``training.epochs`` is converted with the data size, the gradient
accumulation and the number of processes. The same recipe runs on one process or under ``accelerate launch``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, Sampler

from sparsify.checkpoint import checkpoint_dirs, read_checkpoint, resume_checkpoint, write_checkpoint
from sparsify.config import FieldError
from sparsify.data import collator, load_task_data
from sparsify.errors import SparsifyError
from sparsify.evaluation import evaluate, evaluate_qa, evaluate_tokens
from sparsify.machine import cpu_info
from sparsify.metrics import main_metric
from sparsify.modeling import load_classifier, load_tokenizer
from sparsify.recipe import EMBEDDING, QUESTION_ANSWERING, TOKEN_CLASSIFICATION, TOKEN_HEADS, Recipe, check_output_dir, \
    check_run_inputs, load_recipe, recipe_error
from sparsify.schedules import rewind_schedule
from sparsify.sentence import embed_batches, embedding_metrics, load_embedder, require_pooling
from sparsify.techniques import TECHNIQUES


class EpochSampler(Sampler):
    """A shuffled order that depends only on (seed, epoch): every process and every resume agrees on it.

    With ``lengths`` and ``group`` > 0, batches hold examples of similar length (less padding, so fewer tokens per
    step): the shuffled order is cut into groups of ``group`` batches, each group is sorted by length and cut into
    batches, and the batches of a group are shuffled, so a step sees one random group's length band.
    """

    def __init__(self, n: int, seed: int, *, lengths=None, batch_size: int = 1, group: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0
        self.lengths = None if not group else torch.as_tensor(lengths)
        self.batch_size, self.group = batch_size, group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        if self.lengths is None:
            return iter(order.tolist())
        span = self.batch_size * self.group  # a multiple of batch_size: batches never straddle two groups
        out = []
        for chunk in order.split(span):
            chunk = chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices]
            batches = chunk.split(self.batch_size)
            out.extend(batches[i] for i in torch.randperm(len(batches), generator=g).tolist())
        return iter(torch.cat(out).tolist())

    def __len__(self):
        return self.n


def build_techniques(recipe: Recipe) -> dict:
    """Technique instances by kind, in recipe order."""
    return {cfg.kind: TECHNIQUES[cfg.kind].load()(cfg) for cfg in recipe.techniques}


@contextmanager
def _blame(recipe: Recipe, kind: str):
    """Turn a technique's FieldError into a recipe error at its key (file, line, key path)."""
    try:
        yield
    except FieldError as err:
        index = next((i for i, t in enumerate(recipe.techniques) if t.kind == kind), None)
        if getattr(err, "from_root", False) or index is None:
            raise recipe_error(recipe, err.field, str(err)) from None
        raise recipe_error(recipe, ("techniques", index) + err.field, str(err)) from None


def _check_resumed_recipe(saved_path: Path, recipe: Recipe) -> None:
    """A resumed run computes what it started computing. Both recipes are compared resolved (keys that a newer
    version added count at their defaults); only ``training.threads`` (how fast, not what) may change, with a
    warning; any other difference is refused."""
    try:
        saved = yaml.safe_load(load_recipe(saved_path).to_yaml())
    except SparsifyError as err:
        raise SparsifyError(f"--resume: the run's recipe no longer loads ({err}); start a new output_dir") from None
    current = yaml.safe_load(recipe.to_yaml())
    before, after = saved["training"].pop("threads", None), current["training"].pop("threads", None)
    if saved != current:
        raise SparsifyError(
            f"--resume: the recipe differs from {saved_path}, the one this run started with; resume with the same "
            "recipe and --set values (training.threads may change), or start a new output_dir"
        )
    if before != after:
        print(f"warning: --resume with training.threads {before} -> {after}: the same computation, but sums in "
              "another order can differ in the last bits", file=sys.stderr)


def _prepare_run_dir(recipe: Recipe, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from. Refuses to mix two runs in one directory."""
    check_output_dir(recipe)
    run_dir = Path(recipe.output_dir)
    ckpts = checkpoint_dirs(run_dir)
    if resume:
        if not ckpts:
            raise SparsifyError(f"--resume: no checkpoint in {run_dir}/checkpoints; start the run without --resume")
        if (run_dir / "recipe.yaml").is_file():
            _check_resumed_recipe(run_dir / "recipe.yaml", recipe)
        return run_dir, resume_checkpoint(run_dir)  # the newest intact one
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise SparsifyError(
                f"output_dir {run_dir} already holds a run; use --resume to continue it, --overwrite to replace it, "
                "or --set output_dir=..."
            )
    return run_dir, None


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Run a recipe; returns the run directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    tc = recipe.training
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    _reset_accelerate_state(tc.mixed_precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        mixed_precision=tc.mixed_precision,
        log_with="tensorboard",
        project_dir=str(Path(recipe.output_dir)),
        step_scheduler_with_optimizer=False,
        # without a GPU, a distributed launch (accelerate launch --multi_gpu / torchrun) runs on CPU with gloo
        cpu=not torch.cuda.is_available(),
    )
    set_seed(tc.seed)
    run_dir, resume_from = _prepare_run_dir(recipe, resume, overwrite)  # first: a wrong --resume fails at once

    # -- 1. inputs: tokenizer, data, models, techniques. Nothing is written before they all check out. --
    tokenizer = _located(recipe, ("model", "name_or_path"), load_tokenizer, recipe.model.name_or_path, recipe.model.revision)
    data = load_task_data(recipe.data, tokenizer, recipe)
    task = recipe.data.metric_task
    techniques = build_techniques(recipe)
    pruner, distiller = techniques.get("pruning"), techniques.get("distillation")
    lengthdrop = techniques.get("length_adaptive")
    quantizer = techniques.get("quantization")
    ptq = quantizer is not None and quantizer.config.mode == "ptq"
    embedding = task == EMBEDDING  # a sentence-embedding model: its "logits" are its pooled embedding, no labels
    head = task if task in TOKEN_HEADS else "sequence-classification"
    model, teacher, teacher_tokenizer = _load_models(recipe, data, accelerator, embedding=embedding, head=head)
    check_run_inputs(recipe, data, model, teacher)  # output_dir, num_labels, max_length vs positions
    originals = data.train  # training_fit and calibration read these, never the augmented copies
    if recipe.data.augment is not None:  # unlabelled noisy copies, labelled by the teacher through distillation
        data.train = _augmented(recipe, data, tokenizer, model)
        accelerator.print(f"data.augment: {len(data.train) - len(originals)} augmented copies added to "
                          f"{len(originals)} training examples")

    collate = collator(tokenizer, task)
    lengths = [len(ids) for ids in data.train["input_ids"]] if tc.group_by_length else None
    sampler = EpochSampler(len(data.train), tc.seed, lengths=lengths, batch_size=tc.batch_size,
                           group=tc.group_by_length)
    # Own generators: a DataLoader otherwise draws a seed from the global RNG each time it is iterated, which
    # would shift the dropout RNG stream of a resumed run.
    train_dl = DataLoader(data.train, batch_size=tc.batch_size, sampler=sampler, collate_fn=collate,
                          generator=torch.Generator().manual_seed(tc.seed))
    eval_dl = DataLoader(data.eval, batch_size=tc.eval_batch_size, shuffle=False, collate_fn=collate,
                         generator=torch.Generator().manual_seed(tc.seed))
    train_dl, eval_dl = accelerator.prepare(train_dl, eval_dl)
    holdout_dl = None
    if data.holdout is not None:  # data.holdout_samples: training examples kept out, to select the model on
        holdout_dl = accelerator.prepare(DataLoader(data.holdout, batch_size=tc.eval_batch_size, shuffle=False,
                                                    collate_fn=collate))
    steps_per_epoch = math.ceil(len(train_dl) / tc.gradient_accumulation_steps)
    total_steps = tc.steps if tc.steps is not None else math.ceil(tc.epochs * steps_per_epoch)
    if ptq:
        total_steps = 0  # post-training quantization: calibration instead of training

    # each technique checks itself against the models; a problem is reported against its recipe key
    if pruner is not None:  # taylor / obs scores read calibration batches: the same examples on every process
        calibration = calibration_batches(originals, collate, pruner.config.calibration_samples, tc.batch_size,
                                          seed=tc.seed)
        with _blame(recipe, "pruning"):
            pruner.prepare(model, steps_per_epoch=steps_per_epoch, total_steps=total_steps, calibration=calibration)
    if distiller is not None:
        with _blame(recipe, "distillation"):
            distiller.prepare(model, teacher, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer)
        if distiller.config.teacher_cache:  # teacher outputs kept across runs, keyed by teacher, data and terms
            from sparsify.techniques.distillation.cache import data_fingerprint

            loaded = distiller.attach_cache(distiller.config.teacher_cache, data_fingerprint(data.train),
                                            write=accelerator.is_main_process)
            accelerator.print(f"teacher cache {distiller.config.teacher_cache}: {loaded} of {len(data.train)} "
                              "training examples stored")
    if lengthdrop is not None:
        with _blame(recipe, "length_adaptive"):
            lengthdrop.prepare(model, steps_per_epoch=steps_per_epoch, total_steps=total_steps, seed=tc.seed)
    if quantizer is not None:  # last: fake quantization wraps the forward of the final modules, masks inside
        with _blame(recipe, "quantization"):
            quantizer.prepare(model, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                              masks=(lambda: pruner.masks) if pruner is not None else None)

    accelerator.wait_for_everyone()  # every process has looked at the directory before the main one writes

    # -- 2. the run directory: resolved recipe, TensorBoard. --
    if accelerator.is_main_process:
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # --overwrite
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    accelerator.wait_for_everyone()
    accelerator.init_trackers("tensorboard", config=_hparams(recipe))

    # -- 3. optimizer, schedule, and (when resuming) the checkpoint. --
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n)]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n)]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if distiller is not None and distiller.parameters():
        groups.append({"params": distiller.parameters(), "weight_decay": tc.weight_decay})
    if quantizer is not None and quantizer.parameters():  # LSQ scales
        groups.append({"params": quantizer.parameters(), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=tc.learning_rate, eps=tc.adam_epsilon)
    warmup = tc.warmup_steps if tc.warmup_steps is not None else round(tc.warmup_ratio * total_steps)
    if tc.lr_schedule == "rewind":  # restarts at every mask update, then decays to 0 over the recovery
        scheduler = rewind_schedule(optimizer, updates=pruner.update_steps() if pruner is not None else [],
                                    total=total_steps, warmup=warmup, floor=tc.rewind_floor)
    else:
        scheduler = get_scheduler(tc.lr_schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    plain_model = accelerator.unwrap_model(model)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "elapsed": 0.0, "best": None, "evals": []}
    if resume_from is not None:
        technique_states, state = read_checkpoint(resume_from, model=plain_model, optimizer=optimizer,
                                                  scheduler=scheduler, rank=accelerator.process_index)
        for kind, technique in techniques.items():
            technique.load_state_dict(technique_states[kind])
        accelerator.print(f"resuming from {resume_from} (optimizer step {state['step']} of {total_steps})")
    if ptq and not quantizer.frozen:
        accelerator.print(f"post-training quantization: calibrating on {quantizer.config.num_calibration_batches} "
                          "training batches, no training")
        quantizer.calibrate(model, train_dl)

    best_metric = tc.metric_for_best or (("holdout_" if holdout_dl is not None else "") + main_metric(task))
    reference = pairs = teacher_metrics = None
    if embedding:  # held-out texts: the teacher's embeddings, once; labelled pairs: the teacher's own score
        pairs = _pair_loaders(data.pairs, collate, tc, accelerator)
        on_teacher = _on_device(teacher)
        reference = embed_batches(teacher, eval_dl, accelerator=accelerator, forward=on_teacher)
        teacher_metrics = embedding_metrics(teacher, eval_dl, reference, pairs, accelerator=accelerator,
                                            forward=on_teacher)

    def evaluate_model(forward=None, outputs=None) -> dict:
        """The task's metrics on the eval split (an embedding model: cosine to the teacher, pair ROC-AUC; a token
        classifier: entity F1; QA: SQuAD exact match and F1)."""
        if embedding:
            return embedding_metrics(model, eval_dl, reference, pairs, accelerator=accelerator, forward=forward,
                                     embeddings_out=outputs)
        if head == TOKEN_CLASSIFICATION:
            return evaluate_tokens(model, eval_dl, data.label_names, accelerator=accelerator, forward=forward,
                                   logits_out=outputs)
        if head == QUESTION_ANSWERING:
            return evaluate_qa(model, eval_dl, data.answers, accelerator=accelerator, forward=forward,
                               logits_out=outputs)
        return evaluate(model, eval_dl, task, is_regression=data.is_regression, accelerator=accelerator,
                        forward=forward, logits_out=outputs)

    def run_eval(step: int) -> dict:
        metrics = evaluate_model()
        if holdout_dl is not None:
            held = evaluate(model, holdout_dl, task, is_regression=data.is_regression, accelerator=accelerator)
            metrics.update({f"holdout_{k}": v for k, v in held.items()})
        if lengthdrop is not None and lengthdrop.eval_forward() is not None:  # also at the recipe's length_config
            at_length = evaluate_model(forward=lengthdrop.eval_forward())
            metrics.update({f"length_config_{k}": v for k, v in at_length.items()})
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        state["evals"].append({"step": step, **metrics})
        eligible = (pruner is None or pruner.finished(step)) and (quantizer is None or quantizer.frozen)
        if tc.select_best and eligible and best_metric in metrics:
            if state["best"] is None or metrics[best_metric] > state["best"][best_metric]:
                state["best"] = {"step": step, **metrics}
                _save_model(accelerator, plain_model, tokenizer, run_dir / "best", quantizer)
        return metrics

    def save_checkpoint(step: int) -> None:
        state["elapsed"] += time.monotonic() - started
        if distiller is not None:
            distiller.flush_cache()  # the teacher outputs computed so far survive a kill too
        write_checkpoint(run_dir, step, model=plain_model, optimizer=optimizer, scheduler=scheduler,
                         techniques={k: t.state_dict() for k, t in techniques.items()}, trainer_state=state,
                         rank=accelerator.process_index, is_main=accelerator.is_main_process,
                         barrier=accelerator.wait_for_everyone, keep=tc.keep_checkpoints)
        state["elapsed"] -= time.monotonic() - started

    # -- 4. the loop. --
    accelerator.print(
        f"training {recipe.model.name_or_path} on {len(data.train)} examples: {total_steps} optimizer steps "
        f"({steps_per_epoch} per epoch x {accelerator.num_processes} process(es), batch {tc.batch_size} x "
        f"accumulation {tc.gradient_accumulation_steps}); techniques: {', '.join(techniques) or 'none (dense)'}"
    )
    started = time.monotonic()
    step, epoch = state["step"], state["epoch"]
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and accelerator.is_local_main_process))
    model.train()
    running_loss, running_terms, micro = 0.0, {}, 0
    while step < total_steps:
        skip = state["batches_in_epoch"]
        batches = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        batches.set_epoch(epoch)  # accelerate's loaders pass their own epoch counter to the sampler on each pass
        for batch in batches:
            with accelerator.accumulate(model):
                inputs = {k: v for k, v in batch.items() if k != "idx"}
                if distiller is not None:
                    outputs = model(**inputs, **distiller.student_forward_kwargs())
                    loss, terms = distiller.loss(batch, outputs, inputs.get("labels", inputs.get("start_positions")))
                else:
                    outputs = model(**inputs)
                    loss, terms = outputs.loss, {}
                if lengthdrop is not None:  # + the smallest and random sub-models, distilled from these outputs
                    loss, length_terms = lengthdrop.loss(model, inputs, outputs, loss, step=step)
                    terms = {**terms, **length_terms}
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if pruner is not None:
                        pruner.mask_gradients()  # pruned weights get no update (and no share of the clipped norm)
                    if tc.max_grad_norm is not None:
                        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                    tc.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state["batches_in_epoch"] += 1
            running_loss += loss.item()
            for k, v in terms.items():
                running_terms[k] = running_terms.get(k, 0.0) + float(v)
            micro += 1
            if not accelerator.sync_gradients:
                continue

            # one optimizer step done
            step += 1
            state["step"] = step
            logs = pruner.step(step, optimizer) if pruner is not None else {}
            if quantizer is not None:
                logs.update(quantizer.step(step))  # after the masks: switches on / freezes when due
            bar.update(1)
            if step % tc.log_every == 0 or step == total_steps:
                logs.update({"train/loss": running_loss / micro, "train/lr": scheduler.get_last_lr()[0]})
                logs.update({f"train/{k}": v / micro for k, v in running_terms.items()})
                bar.set_postfix(loss=f"{running_loss / micro:.4f}")
                running_loss, running_terms, micro = 0.0, {}, 0
            if logs:
                accelerator.log(logs, step=step)
            due = tc.eval_every is not None and step % tc.eval_every == 0
            if tc.eval_on_mask_update and logs.get("sparsity/mask_updated"):
                due = True  # the damage of this mask update, before any recovery
            if due and step != total_steps:
                metrics = run_eval(step)
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if tc.save_every is not None and step % tc.save_every == 0 and step != total_steps:
                save_checkpoint(step)
            if step >= total_steps:
                break
        else:
            epoch += 1
            state["epoch"], state["batches_in_epoch"] = epoch, 0
    bar.close()

    # -- 5. the end: last evaluation, final checkpoint, final model, metrics. --
    final = run_eval(step)
    save_checkpoint(step)
    for technique in techniques.values():
        technique.finalize(plain_model)
    chosen = final
    if tc.select_best and state["best"] is not None and state["best"]["step"] != step:
        chosen = state["best"]
    elapsed = state["elapsed"] + time.monotonic() - started
    if accelerator.is_main_process:
        _save_final_models(accelerator, plain_model, tokenizer, run_dir, quantizer, lengthdrop,
                           chosen_is_last=chosen is final)
    parity = None
    if quantizer is not None and quantizer.frozen and quantizer.config.exportable:
        # the fake-quant model against its int8 conversion (what the export reads), on the eval split
        from sparsify.techniques.quantization.parity import conversion_parity

        parity = conversion_parity(quantizer, plain_model, lambda outputs: evaluate_model(outputs=outputs),
                                   is_regression=data.is_regression, embeddings=embedding,
                                   spans=head == QUESTION_ANSWERING)
        parity["step"] = step
        if "span_agreement" in parity:
            accelerator.print(f"int8 conversion vs fake quantization: {parity['span_agreement']:.2%} of "
                              f"{parity['examples']} eval answer spans agree")
        if "label_agreement" in parity:
            accelerator.print(f"int8 conversion vs fake quantization: {parity['label_agreement']:.2%} of "
                              f"{parity['examples']} eval labels agree, largest logit difference "
                              f"{parity['max_abs_logit_diff']:.3g}")
        if "min_cosine" in parity:
            accelerator.print(f"int8 conversion vs fake quantization: lowest cosine of the {parity['examples']} "
                              f"eval embeddings {parity['min_cosine']:.6f}")
    fit = None
    if tc.fit_samples:  # how well the final model fits training data (and its teacher) against dev: under/overfit
        fit = train_fit(model, teacher, originals, collate, tc.fit_samples, tc.eval_batch_size, seed=tc.seed,
                        device=accelerator.device)
        accelerator.print("fit on " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in fit.items()))
    if accelerator.is_main_process:
        summary = {
            "task": task,
            "metrics": {k: v for k, v in chosen.items() if k != "step"},
            "model_step": chosen.get("step", step),
            "last_model": "last" if chosen is not final else "model",
            "final_step_metrics": final,
            "best": state["best"],
            "selected_on": best_metric if tc.select_best else None,
            "holdout_examples": len(data.holdout) if data.holdout is not None else 0,
            "optimizer_steps": step,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "num_processes": accelerator.num_processes,
            "wall_time_s": round(elapsed, 1),
            "threads": torch.get_num_threads(),
            "cpu": cpu_info(),  # wall times compare only on the same CPU
            "evals": state["evals"],
        }
        if parity is not None:
            summary["conversion_parity"] = parity
        if teacher_metrics is not None:
            summary["teacher_metrics"] = teacher_metrics  # the teacher's own pair_roc_auc, to compare with
        if quantizer is not None and quantizer.signround_stats is not None:
            summary["signround"] = quantizer.signround_stats
        if quantizer is not None and quantizer.teq_stats is not None:
            summary["teq"] = quantizer.teq_stats
        if fit is not None:
            summary["train_fit"] = fit
        if pruner is not None:
            summary["mask_update_seconds"] = [round(v, 3) for v in pruner.update_seconds]
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    if pruner is not None and accelerator.is_main_process:
        # measured from the zeros of the saved model, not remembered from the masks
        from sparsify.sparsity import load_report_weights, sparsity_report

        weights = load_report_weights(run_dir / "model")
        report = sparsity_report({n: weights[n + ".weight"] for n in pruner.blocks}, pruner.blocks,
                                 source=str(run_dir / "model"))
        report["target"] = pruner.config.final_sparsity
        (run_dir / "sparsity.json").write_text(json.dumps(report, indent=1))
        summary_sparsity = report["total"]["sparsity"]
        accelerator.print(f"sparsity of the pruned layers (measured): {summary_sparsity:.4f}, "
                          f"block pattern {'kept' if report['total']['follows_block'] else 'BROKEN'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"done: {best_metric} {chosen.get(best_metric, float('nan')):.4f} in {elapsed:.0f} s -> {run_dir}")
    return run_dir


def _augmented(recipe: Recipe, data, tokenizer, model):
    """The training data followed by its augmented copies (sparsify.augment), or one error line on data.augment."""
    from sparsify.augment import augment_examples

    cfg = recipe.data.augment
    if data.is_regression:
        raise recipe_error(recipe, ("data", "augment"), "the copies' task loss is skipped through an ignored class "
                           "label, and a regression task has no classes: remove data.augment")
    seed = cfg.seed if cfg.seed is not None else recipe.training.seed
    try:
        return augment_examples(data.train, tokenizer, model.get_input_embeddings().weight, cfg, seed=seed)
    except SparsifyError as e:
        raise recipe_error(recipe, ("data", "augment"), str(e)) from None


def _sample(n_examples: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return torch.randperm(n_examples, generator=g)[:min(n, n_examples)].sort().values.tolist()


def calibration_batches(dataset, collate, n: int, batch_size: int, seed: int):
    """A function returning ``n`` training examples (a fixed random sample) as batches, the same on every
    process and every call: what taylor / obs pruning scores read."""
    chosen = _sample(len(dataset), n, seed)

    def batches():
        for a in range(0, len(chosen), batch_size):
            yield collate([dataset[i] for i in chosen[a:a + batch_size]])

    return batches


@torch.no_grad()
def train_fit(model, teacher, dataset, collate, n: int, batch_size: int, seed: int, device) -> dict:
    """Accuracy on ``n`` training examples (a fixed random sample) and, with a teacher, the agreement of the
    argmax with the teacher's and the teacher's own accuracy there: a student far better on training data than on
    dev overfits (augmentation may help); one that also disagrees with its teacher on training data underfits."""
    was_training = model.training
    model.eval()
    hits = agree = teacher_hits = total = 0
    for batch in calibration_batches(dataset, collate, n, batch_size, seed)():
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("idx", "labels")}
        labels = batch["labels"].to(device)
        if labels.dim() != 1 or labels.is_floating_point():
            return {}  # regression: no argmax to compare
        pred = model(**inputs).logits.argmax(-1)
        hits += int((pred == labels).sum())
        total += len(labels)
        if teacher is not None:
            t_dev = next(teacher.parameters()).device
            t_pred = teacher(**{k: v.to(t_dev) for k, v in inputs.items()}).logits.argmax(-1).to(device)
            agree += int((pred == t_pred).sum())
            teacher_hits += int((t_pred == labels).sum())
    model.train(was_training)
    fit = {"examples": total, "train_accuracy": hits / max(1, total)}
    if teacher is not None:
        fit.update(teacher_agreement=agree / max(1, total), teacher_train_accuracy=teacher_hits / max(1, total))
    return fit


def _on_device(module):
    """``forward(model, inputs)`` that moves the inputs to ``module``'s device first (a teacher may sit elsewhere)."""
    device = next(module.parameters()).device
    return lambda m, inputs: m(**{k: v.to(device) for k, v in inputs.items()})


def _pair_loaders(pairs, collate, tc, accelerator):
    """``(first, second, labels)`` of an embedding task's labelled pairs as loaders, or None."""
    if pairs is None:
        return None
    first, second, labels = pairs
    loaders = [accelerator.prepare(DataLoader(side, batch_size=tc.eval_batch_size, shuffle=False, collate_fn=collate))
               for side in (first, second)]
    return loaders[0], loaders[1], labels


def _reset_accelerate_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state; a second run in the same process (a notebook, the tests) with
    another mixed-precision setting must start from a clean one."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _located(recipe, key, fn, *args, **kwargs):
    """Call a loader; a user error is reported against the recipe key it came from."""
    try:
        return fn(*args, **kwargs)
    except SparsifyError as e:
        raise recipe_error(recipe, key, str(e)) from None


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "norm" in name.lower()


def _load_models(recipe: Recipe, data, accelerator, *, embedding: bool, head: str):
    """The student (a classifier of ``head``, or a sentence embedder; fewer layers with ``model.layers``) and the
    teacher with its tokenizer (None, None without one), on the accelerator's device; a problem is reported
    against its recipe key."""
    if embedding:  # the teacher's pooling first: a student without one takes it
        teacher_pooling = _located(recipe, ("teacher", "name_or_path"), require_pooling, recipe.teacher.name_or_path)
        model = _located(recipe, ("model", "name_or_path"), load_embedder, recipe.model.name_or_path,
                         revision=recipe.model.revision, dropout=recipe.model.dropout, pooling_from=teacher_pooling)
    else:
        model = _located(recipe, ("model", "name_or_path"), load_classifier, recipe.model.name_or_path,
                         num_labels=data.num_labels, label_names=data.label_names, revision=recipe.model.revision,
                         is_regression=data.is_regression, dropout=recipe.model.dropout, head=head)
    if recipe.model.layers is not None:
        from sparsify.student import shallow_student

        try:
            with _blame(recipe, "distillation"):
                model = shallow_student(model, list(recipe.model.layers))
        except (ValueError, IndexError) as e:
            raise recipe_error(recipe, ("model", "layers"), str(e)) from None
    model.to(accelerator.device)
    teacher = teacher_tokenizer = None
    if recipe.teacher is not None:
        tcfg = recipe.teacher
        teacher_tokenizer = _located(recipe, ("teacher", "name_or_path"), load_tokenizer, tcfg.name_or_path, tcfg.revision)
        if embedding:
            teacher = _located(recipe, ("teacher", "name_or_path"), load_embedder, tcfg.name_or_path,
                               revision=tcfg.revision, dtype=getattr(torch, tcfg.dtype), who="teacher")
        else:
            teacher = _located(recipe, ("teacher", "name_or_path"), load_classifier, tcfg.name_or_path,
                               num_labels=data.num_labels, label_names=data.label_names, revision=tcfg.revision,
                               is_regression=data.is_regression, dtype=getattr(torch, tcfg.dtype), head=head)
        teacher.to(tcfg.device or accelerator.device)
    return model, teacher, teacher_tokenizer


def _save_final_models(accelerator, model, tokenizer, run_dir: Path, quantizer, lengthdrop, *,
                       chosen_is_last: bool) -> None:
    """``model/``: the chosen model (the last step's, or a copy of ``best/``); with another step chosen, the last
    step's model in ``last/`` too: the unselected reading, and the start of a next stage that must not depend on a
    choice made on the eval split. The recipe's length_config, if any, goes with each."""
    for name in ("model", "last"):
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)
    if chosen_is_last:
        _save_model(accelerator, model, tokenizer, run_dir / "model", quantizer)
    else:
        shutil.copytree(run_dir / "best", run_dir / "model")
        _save_model(accelerator, model, tokenizer, run_dir / "last", quantizer)
    if lengthdrop is not None:
        for name in ("model", "last"):
            if (run_dir / name).exists():
                lengthdrop.save_length_config(run_dir / name)


def _save_model(accelerator, model, tokenizer, path: Path, quantizer=None) -> None:
    if accelerator.is_main_process:
        if path.exists():
            shutil.rmtree(path)
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        if quantizer is not None and quantizer.frozen and quantizer.config.exportable:
            # int8 weights + scales and the frozen activation parameters: quantization.{json,safetensors}, which
            # the export reads from the model directory
            from sparsify.techniques.quantization.convert import convert_activations, save_converted

            save_converted(path, quantizer.convert(model), convert_activations(quantizer), quantizer.embedding_name,
                           quantizer.config.embedding_bits)


def _hparams(recipe: Recipe) -> dict:
    """Flat scalar recipe values for TensorBoard's hparams view."""
    flat = {}

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(obj, (list, tuple)):
            flat[prefix[:-1]] = json.dumps(obj)
        elif isinstance(obj, (int, float, str, bool)):
            flat[prefix[:-1]] = obj
    data = recipe.model_dump(mode="json")
    data["techniques"] = {t.kind: t.model_dump(mode="json") for t in recipe.techniques}
    walk(data, "")
    return flat
