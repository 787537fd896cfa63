"""Trainer callbacks of the recipe: watch the fine-tune while it runs.

- EarlyStoppingCallback (transformers' own) when `early_stopping_patience` is set; with
  `load_best_model_at_end: true` the Trainer then restores the best checkpoint, so the saved M_SFT is the best one.
- OverfitGuard: warns when eval loss has risen `overfit_warning_patience` evaluations in a row while train loss fell.
- SampleGenerations: greedy answers to a few fixed held-out prompts at each evaluation -> output_dir/samples.jsonl
  (and a text table in TensorBoard / W&B / Trackio when one of them is in `report_to`).
- StopOnSignal: on a stop signal (SIGTERM, SIGUSR1: `stop_signals`), the current optimizer step ends, every rank
  agreeing, a checkpoint is saved and training stops; sft.py then exits with run_dir.PREEMPTED_EXIT.
- Curves: at the end of training, output_dir/loss_curves.png, metrics.jsonl and metrics.csv from state.log_history.

Trackers themselves (`report_to: tensorboard | wandb | trackio`) and progress bars are transformers' own.
"""

import csv
import json
import logging
import os
import signal

from transformers import EarlyStoppingCallback, ProgressCallback, TrainerCallback

import generation

logger = logging.getLogger("recipes.callbacks")


def sample_rows(eval_rows, n: int, fmt) -> list[dict]:
    """The held-out conversations answered at each evaluation: picked by (source, row), then read, with the prompt
    rendered as training renders it."""
    if eval_rows is None or not n:
        return []
    where = [{**r, "i": i} for i, r in enumerate(eval_rows.select_columns(["source", "row"]).to_list())]
    return [{**eval_rows[p["i"]], "prompt": fmt.prompt_messages(eval_rows[p["i"]]["prompt"])}
            for p in pick_sample_rows(where, n)]


def exit_preempted(trainer, stop, lock) -> None:
    """After StopOnSignal ended training: the main process records the checkpoint (run_dir.preempted) and releases
    the run lock before the barrier (a launcher may kill it once the others have exited); every rank exits 75."""
    import run_dir

    if trainer.accelerator.is_main_process:
        print(run_dir.preempted(trainer.args.output_dir, stop.received, stop.stopped_at, trainer.args.save_only_model),
              flush=True)
        if lock:
            lock.release()
    trainer.accelerator.wait_for_everyone()
    raise SystemExit(run_dir.PREEMPTED_EXIT)


def build(trainer, recipe_args, eval_rows) -> list:
    cbs = []
    if recipe_args.early_stopping_patience:
        cbs.append(
            EarlyStoppingCallback(
                early_stopping_patience=recipe_args.early_stopping_patience,
                early_stopping_threshold=recipe_args.early_stopping_threshold,
            )
        )
    if recipe_args.overfit_warning_patience and recipe_args.overfit_warning_patience > 0:
        cbs.append(OverfitGuard(recipe_args.overfit_warning_patience))
    if recipe_args.num_sample_prompts and eval_rows:
        cbs.append(
            SampleGenerations(
                trainer, pick_sample_rows(eval_rows, recipe_args.num_sample_prompts), recipe_args.sample_max_new_tokens
            )
        )
    cbs.append(Curves())
    # transformers' ProgressCallback opens a second, nested bar at every evaluation: keep the training bar only.
    if trainer is not None and trainer.pop_callback(ProgressCallback) is not None:
        cbs.append(TrainingBarOnly())
    return cbs


class TrainingBarOnly(ProgressCallback):
    """transformers' progress bar for training steps, without the per-evaluation bar."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass


# --------------------------------------------------------------------------------------------- log history


def train_and_eval_losses(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, eval_loss) pairs, in logging order."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "eval_loss" not in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return train, evals


def best_eval(evals: list[tuple[int, float]]) -> tuple[int, float] | None:
    """(step, eval_loss) of the lowest eval loss; the first one on ties."""
    return min(evals, key=lambda e: e[1]) if evals else None


# --------------------------------------------------------------------------------------------- overfitting


def _mean_loss(train: list[tuple[int, float]], lo: float, hi: float) -> float | None:
    vals = [loss for step, loss in train if lo < step <= hi]
    return sum(vals) / len(vals) if vals else None


def overfit_warning(log_history: list[dict], patience: int) -> tuple[int, str] | None:
    """(turning step, message) when eval loss rose `patience` evaluations in a row while train loss fell.

    "Train loss fell" compares the mean training loss logged since the previous evaluation with the mean
    logged in the interval that ended at the start of the rise (or, when nothing was logged before it,
    e.g. with eval_on_start, the interval just after it). The turning step is the step of the lowest eval loss.
    """
    train, evals = train_and_eval_losses(log_history)
    if len(evals) < patience + 1:
        return None
    window = evals[-patience - 1 :]
    if not all(b[1] > a[1] for a, b in zip(window, window[1:])):
        return None
    start = window[0][0]
    before_start = evals[-patience - 2][0] if len(evals) > patience + 1 else float("-inf")
    before = _mean_loss(train, before_start, start)
    if before is None:
        before = _mean_loss(train, start, window[1][0])
    now = _mean_loss(train, evals[-2][0], evals[-1][0])
    if before is None or now is None or not now < before:
        return None
    turn_step, turn_loss = best_eval(evals)
    message = (
        f"Overfitting warning: eval_loss has risen for {patience} evaluations in a row "
        f"({window[0][1]:.4f} at step {start} -> {window[-1][1]:.4f} at step {window[-1][0]}) while training loss "
        f"fell ({before:.4f} -> {now:.4f}). It turned at step {turn_step} (best eval_loss {turn_loss:.4f}). "
        "Set early_stopping_patience with load_best_model_at_end: true to stop and keep that checkpoint, or lower "
        "learning_rate / num_train_epochs."
    )
    return turn_step, message


class OverfitGuard(TrainerCallback):
    """Logs one warning per turning point; it never stops training (EarlyStoppingCallback does that)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.warned_at: set[int] = set()
        self.training_ended = False

    def on_evaluate(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.training_ended:
            return
        found = overfit_warning(state.log_history, self.patience)
        if found and found[0] not in self.warned_at:
            self.warned_at.add(found[0])
            logger.warning(found[1])

    def on_train_end(self, args, state, control, **kwargs):
        self.training_ended = True


# --------------------------------------------------------------------------------------------- samples


def pick_sample_rows(eval_rows: list[dict], n: int) -> list[dict]:
    """A deterministic mix of `n` held-out rows: round-robin over sources (e.g. red-team, benign), in row order."""
    by_source: dict[str, list[dict]] = {}
    for row in sorted(eval_rows, key=lambda r: (str(r.get("source")), r.get("row", 0))):
        by_source.setdefault(str(row.get("source")), []).append(row)
    picked, queues = [], [list(rows) for rows in by_source.values()]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def _zero3_or_fsdp(trainer) -> bool:
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    return bool(plugin and plugin.zero_stage == 3)


class SampleGenerations(TrainerCallback):
    """Greedy answers of the model being trained to fixed held-out prompts, at every evaluation.

    Answers generated after training (sft.py evaluates again when the last evaluation was not at the last step, or
    with load_best_model_at_end: the saved M_SFT) carry "final": true.
    """

    def __init__(self, trainer, rows: list[dict], max_new_tokens: int, batch_size: int = 8):
        self.trainer = trainer
        self.rows = rows
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.training_ended = False
        # Sharded weights need every rank in each forward pass; generating on rank 0 alone would hang.
        self.disabled = _zero3_or_fsdp(trainer)
        if self.disabled:
            logger.warning("Sample generations are off under ZeRO-3/FSDP (weights are sharded across processes).")

    def on_evaluate(self, args, state, control, **kwargs):
        if self.disabled or not state.is_world_process_zero:
            return
        trainer = self.trainer
        answers = generation.generate_local(
            trainer.model,
            trainer.processing_class,
            [r["prompt"] for r in self.rows],
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        records = []
        for row, answer in zip(self.rows, answers):
            user = next(m["content"] for m in reversed(row["prompt"]) if m["role"] == "user")
            rec = {"step": state.global_step, "prompt": user, "answer": answer, "source": row.get("source")}
            if self.training_ended:
                rec["final"] = True
            records.append(rec)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "samples.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        send_samples_to_trackers(trainer.callback_handler.callbacks, state.global_step, records)

    def on_train_end(self, args, state, control, **kwargs):
        self.training_ended = True


def samples_markdown(records: list[dict]) -> str:
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | answer |", "|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['answer'])} |" for r in records]
    return "\n".join(lines)


def send_samples_to_trackers(callbacks: list, step: int, records: list[dict]) -> list[str]:
    """Text tables for the trackers transformers already opened; returns the names of those written to.

    Trainer.log only carries numbers, so text goes through each tracker's own public module, to the run that
    transformers' callback opened.
    """
    from transformers.integrations import TensorBoardCallback, TrackioCallback, WandbCallback

    sent = []
    columns = ["step", "prompt", "answer"]
    for cb in callbacks:
        try:
            if isinstance(cb, TensorBoardCallback) and getattr(cb, "tb_writer", None) is not None:
                cb.tb_writer.add_text("samples", samples_markdown(records), step)
                sent.append("tensorboard")
            elif isinstance(cb, WandbCallback):
                import wandb

                if wandb.run is not None:
                    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in records])
                    wandb.log({"samples": table, "train/global_step": step})
                    sent.append("wandb")
            elif isinstance(cb, TrackioCallback):
                import trackio

                trackio.log({"samples": trackio.Table(data=[{c: r[c] for c in columns} for r in records])})
                sent.append("trackio")
        except Exception as e:  # noqa: BLE001 - a tracker hiccup must not kill training; samples.jsonl has it all
            logger.warning(f"could not send samples to {type(cb).__name__}: {type(e).__name__}: {e}")
    return sent


# --------------------------------------------------------------------------------------------- preemption


class StopOnSignal(TrainerCallback):
    """Preemption-safe training: a stop signal ends the run after the current optimizer step, with a checkpoint.

    The handler only records the signal. At the end of each optimizer step every rank adds up what it received
    (one all-reduce of a single number), so all ranks stop at the same step even when one alone was signalled; the
    Trainer then saves checkpoint-N (`should_save`) and leaves its loop (`should_training_stop`). The handlers
    are installed when training begins (before, a signal ends the process as usual: nothing trained is lost) and
    the previous ones are restored when it ends.
    """

    def __init__(self, accelerator, names: list[str]):
        self.accelerator, self.names = accelerator, names
        self.received: str | None = None
        self.stopped_at: int | None = None
        self.previous: dict = {}

    def _record(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
        for name in self.names:
            self.previous[name] = signal.signal(signal.Signals[name], self._record)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.names:
            return
        import torch

        flag = torch.tensor([1.0 if self.received else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0:
            self.received = self.received or "a stop signal on another process"
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the time left before a hard kill goes to the checkpoint
            if state.is_world_process_zero:
                print(f"\nReceived {self.received}: step {state.global_step} finished on every process; saving "
                      f"checkpoint-{state.global_step} and stopping.", flush=True)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the checkpoint is saved: no evaluation, no second save of it
            control.should_evaluate = False
            control.should_save = False

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            return  # keep recording: a second signal while the run exits must not kill it half way
        for name, handler in self.previous.items():
            signal.signal(signal.Signals[name], handler)
        self.previous = {}


# --------------------------------------------------------------------------------------------- curves


def write_metrics(log_history: list[dict], output_dir: str) -> tuple[str, str]:
    """metrics.jsonl (one logged dict per line) and metrics.csv (union of keys, step first)."""
    jsonl, csv_path = os.path.join(output_dir, "metrics.jsonl"), os.path.join(output_dir, "metrics.csv")
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(h) + "\n" for h in log_history)
    keys = ["step"]
    for h in log_history:
        keys += [k for k in h if k not in keys]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for h in log_history:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in h.items()})
    return jsonl, csv_path


def plot_losses(log_history: list[dict], path: str) -> tuple[int, float] | None:
    """Training and validation loss against step, the best (lowest eval_loss) step marked; returns that best."""
    # The object-oriented Agg canvas: no pyplot, so no global backend switch and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, evals = train_and_eval_losses(log_history)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", alpha=0.8)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", color="tab:orange")
    best = best_eval(evals)
    if best:
        ax.axvline(best[0], color="tab:green", linestyle="--", linewidth=1)
        label = f"best: step {best[0]} ({best[1]:.4f})"
        ax.plot([best[0]], [best[1]], "*", color="tab:green", markersize=14, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title("CAI SFT loss" if train or evals else "CAI SFT loss (nothing logged)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return best


class Curves(TrainerCallback):
    """At the end of training (main process): loss_curves.png, metrics.jsonl, metrics.csv in output_dir."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        write_metrics(state.log_history, args.output_dir)
        best = plot_losses(state.log_history, os.path.join(args.output_dir, "loss_curves.png"))
        where = f"; best eval_loss {best[1]:.4f} at step {best[0]}" if best else ""
        print(f"Wrote loss_curves.png, metrics.jsonl, metrics.csv to {args.output_dir}{where}")
