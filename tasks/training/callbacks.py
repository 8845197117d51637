"""The Trainer callbacks of the train stage.

MLflow logging of the curve and the throughput, stopping on a signal at a step's end, and refusing a loss that is
not finite."""

from __future__ import annotations

import math
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from transformers import TrainerCallback

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.paths import (
    MODEL_DIR,
)
from tasks.tracking import mlflow_runs
from tasks.training import throughput


class MlflowLogger(TrainerCallback):
    """Each logging step to the pipeline's MLflow run, by id.

    Loss, learning rate, gradient norm, eval loss, tokens/s and MFU, and one readable line on stdout. The metrics
    are sent in batches, every FLUSH_SECONDS by a thread of their own while training goes on, and before each
    checkpoint and at the end with training waiting until MLflow holds them. After a resume, steps the run already
    holds are skipped, so no metric step is logged twice."""

    KEYS: ClassVar[dict[str, str]] = {
        "loss": "train/loss",
        "eval_loss": "train/eval_loss",
        "learning_rate": "train/learning_rate",
        "grad_norm": "train/grad_norm",
    }

    FLUSH_SECONDS = 5.0  # one request every few seconds, not one a logging step (docs/benchmarks.md, (c))

    def __init__(self, run_id: str, meter: throughput.Meter, max_steps: int):
        self.run_id, self.meter, self.max_steps = run_id, meter, max_steps
        self.logged: dict[str, int] = {}
        self.pending: list[tuple[int, int, dict[str, float]]] = []
        self.flushed_at = -math.inf  # the first logging step goes out at once: the UI shows the run started
        # One thread, so batches reach MLflow in order; training waits for it only before a checkpoint and at the end.
        self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
        self.sending: Future | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            keys = [*self.KEYS.values(), "train/tokens_per_second", "train/mfu"]
            self.logged = mlflow_runs.last_logged_steps(self.run_id, keys)

    def on_step_begin(self, args, state, control, **kwargs):
        self.meter.step_began()

    def on_step_end(self, args, state, control, **kwargs):
        self.meter.step_ended()
        if control.should_save:  # flushed before each checkpoint (see on_log)
            self.flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        check_finite(logs or {}, state.global_step)
        if not state.is_world_process_zero or not logs:
            return
        step = state.global_step
        metrics = {self.KEYS[key]: value for key, value in logs.items() if key in self.KEYS}
        if "loss" in logs:
            metrics.update(self.meter.interval())
            print(
                f"train: step {step}/{self.max_steps} loss {logs['loss']:.4f} lr {logs.get('learning_rate', 0):.2e} "
                f"{metrics.get('train/tokens_per_second', 0):.0f} tokens/s MFU {metrics.get('train/mfu', 0):.1%}"
            )
        if "eval_loss" in logs:
            print(f"train: step {step} eval_loss {logs['eval_loss']:.4f}")
        fresh = {key: value for key, value in metrics.items() if step > self.logged.get(key, -1)}
        if fresh:
            self.pending.append((step, int(time.time() * 1000), fresh))
        # A run resumed from a checkpoint logs only the steps after it: what came before must be sent first.
        if control.should_save:
            self.flush()
        elif time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS:
            self.flush(wait=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()
        self.sender.shutdown()

    def flush(self, wait: bool = True) -> None:
        """Send the pending steps: by the sending thread, and with wait until MLflow holds every step sent so far.

        A batch goes out only after the one before it is in; a send that failed raises here, in the training."""
        if self.pending:
            self._sent()
            self.sending = self.sender.submit(mlflow_runs.log_metric_steps, self.run_id, self.pending)
            self.pending = []
        if wait:
            self._sent()
        self.flushed_at = time.monotonic()

    def _sent(self) -> None:
        """Wait until the batch in flight is in MLflow (its error raised here)."""
        sending, self.sending = self.sending, None
        if sending is not None:
            sending.result()


class StopOnSignal(TrainerCallback):
    """SIGTERM during training ends it at the next step boundary with a checkpoint, so a rerun resumes there."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = signal.signal(signal.SIGTERM, self._note)

    def release(self) -> None:
        """After training, SIGTERM stops the stage at once again (saving and plotting are run_cli's to unwind)."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True


def check_finite(logs: dict[str, float], step: int) -> None:
    """Stop at the first logged loss that is nan or inf: nothing after it can be trusted or registered."""
    for key in ("loss", "eval_loss"):  # not grad_norm: fp16 loss scaling skips inf-gradient steps by design
        value = logs.get(key)
        if value is not None and not math.isfinite(value):
            raise PipelineError(
                f"train: {key} became {value} at step {step}; lower train.learning_rate, raise "
                "train.warmup_steps or keep train.max_grad_norm set (fp32 is the most stable precision); "
                f"{kept(MODEL_DIR)} and nothing was registered"
            )


def kept(model_dir: Path) -> str:
    """What a stopped or failed training left in model_dir, in words."""
    if (model_dir / "model.safetensors").exists():
        return f"{model_dir} keeps the previous model"
    return f"there is no model in {model_dir} yet"
