"""``AutopsyCallback``: a transformers ``TrainerCallback`` that records what replay needs.

It keeps the last ``keep_last`` training batches in host memory (a forward pre-hook on the model sees exactly
what the model got, micro-batches included) with the RNG state at the start of each step, and reads the true
per-step loss (the one HF's ``logging_nan_inf_filter`` replaces) and the gradient norm with one host sync per
step. When the loss or the grad norm goes non-finite, or the loss spikes, it writes the recorded batches to
``<output_dir>/autopsy/batches-step-<N>.safetensors``. With ``stop_on="nonfinite"`` it also saves the weights
as they were before the failing update (``autopsy/weights-before-step-<N>/``, safetensors) and stops training,
so ``autopsy replay <output_dir>`` has everything and no more compute is burnt on a dead run. The true
per-step losses go to ``autopsy/losses.jsonl``.

Step replay (``autopsy replay <output_dir> --from checkpoint-N``) needs every batch since checkpoint N: keep
``keep_last`` at least ``save_steps`` (a warning says so at train begin when it is not). Memory stays bounded by
``keep_last`` steps either way; each dump also holds the RNG state at the start of every recorded step and the
step of the last checkpoint saved (``last_checkpoint_step``).
"""

from __future__ import annotations

import collections
import json
import math
import warnings
from pathlib import Path
from typing import Any

from autopsy._optional import require
from autopsy.recording import LOSSES, batch_file, record_dir, weights_dir

__all__ = ["AutopsyCallback"]

_transformers = require("transformers", purpose="use AutopsyCallback")
_torch = require("torch", purpose="use AutopsyCallback")


class AutopsyCallback(_transformers.TrainerCallback):  # type: ignore[name-defined]  # a module loaded at run time
    """Record the last batches, the true loss and the RNG state; save them when training goes wrong.

    Parameters (keyword-only):
      keep_last: how many steps of batches to keep in memory.
      stop_on: ``"nonfinite"`` stops training at the first non-finite loss or grad norm (after saving the
        weights from before that update); ``None`` keeps training.
      spike_factor: a finite loss above ``spike_factor`` x the median of the recent losses is a spike
        (10x: far outside per-batch noise at any logging interval); ``None`` turns spike dumps off.
      max_dumps: at most this many batch files per run (the first non-finite step is always written).
      save_weights: also save the pre-update weights without stopping (default: only with ``stop_on``).
      output_dir: where ``autopsy/`` goes (default: the Trainer's output_dir).
    """

    def __init__(
        self,
        *,
        keep_last: int = 8,
        stop_on: str | None = None,
        spike_factor: float | None = 10.0,
        max_dumps: int = 3,
        save_weights: bool | None = None,
        output_dir: str | None = None,
    ) -> None:
        if stop_on not in (None, "nonfinite"):
            from autopsy.errors import UsageError

            raise UsageError(f"stop_on={stop_on!r}: use None or 'nonfinite'")
        self.keep_last = int(keep_last)
        self.stop_on = stop_on
        self.spike_factor = spike_factor
        self.max_dumps = int(max_dumps)
        self.save_weights = bool(stop_on) if save_weights is None else bool(save_weights)
        self.output_dir = output_dir
        self.steps: collections.deque = collections.deque(maxlen=self.keep_last)
        self.history: collections.deque = collections.deque(maxlen=50)  # recent finite losses, for spikes
        self.first_bad_step: int | None = None
        self.dumps: list[Path] = []
        self._current: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._pending: list[dict[str, Any]] = []
        self._dir: Path | None = None
        self.last_checkpoint_step: int | None = None

    # hooks on the model ---------------------------------------------------------------------------------
    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not module.training or self._current is None:
            return
        mb = {k: v.detach().to("cpu", copy=True) for k, v in kwargs.items() if _torch.is_tensor(v)}
        if args and _torch.is_tensor(args[0]) and "input_ids" not in mb:
            mb["input_ids"] = args[0].detach().to("cpu", copy=True)
        self._current["micro"].append(mb)

    def _post(self, module: Any, args: tuple, output: Any) -> None:
        if not module.training or self._current is None:
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is not None:
            self._current["losses"].append(loss.detach().float().reshape(-1).mean())

    # trainer events -------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._dir = record_dir(self.output_dir or args.output_dir)
        save_steps = getattr(args, "save_steps", None)
        strategy = str(getattr(getattr(args, "save_strategy", None), "value", getattr(args, "save_strategy", "")))
        if (
            strategy == "steps"
            and isinstance(save_steps, (int, float))
            and save_steps >= 1
            and self.keep_last < save_steps
        ):
            warnings.warn(
                f"AutopsyCallback(keep_last={self.keep_last}) keeps fewer steps than save_steps={int(save_steps)}: "
                f"step replay from the last checkpoint may miss batches; pass keep_last={int(save_steps)}",
                stacklevel=2,
            )
        if model is not None and not self._handles:
            self._handles = [
                model.register_forward_pre_hook(self._pre, with_kwargs=True),
                model.register_forward_hook(self._post),
            ]

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        rng = {"torch_cpu": _torch.get_rng_state()}
        if _torch.cuda.is_available():
            for i, s in enumerate(_torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda{i}"] = s
        self._current = {"step": state.global_step + 1, "micro": [], "losses": [], "rng": rng}
        self.steps.append(self._current)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        cur = self._current
        if cur is None:
            return
        vals = []
        loss = _torch.stack(cur["losses"]).mean() if cur["losses"] else None
        grads = [p.grad for p in (model.parameters() if model is not None else []) if p.grad is not None]
        gnorm = (
            _torch.linalg.vector_norm(
                _torch.stack([_torch.linalg.vector_norm(g.detach(), dtype=_torch.float32) for g in grads])
            )
            if grads
            else None
        )
        parts = [t.to(grads[0].device if grads else "cpu") for t in (loss, gnorm) if t is not None]
        if parts:
            vals = _torch.stack(parts).cpu().tolist()  # the one host sync per step
        it = iter(vals)
        cur["loss"] = next(it) if loss is not None else math.nan
        cur["grad_norm"] = next(it) if gnorm is not None else math.nan
        self._pending.append({"step": cur["step"], "loss": cur["loss"], "grad_norm": cur["grad_norm"]})
        nonfinite = not (math.isfinite(cur["loss"]) or loss is None) or not (
            math.isfinite(cur["grad_norm"]) or gnorm is None
        )
        if nonfinite and self.first_bad_step is None:
            self.first_bad_step = cur["step"]
            self._dump(reason="nonfinite", step=cur["step"], force=True)
            if self.save_weights and model is not None:
                self._save_weights(model, cur["step"])
            self._flush()
            if self.stop_on == "nonfinite":
                control.should_training_stop = True
            return
        if nonfinite:
            return
        if self.spike_factor and len(self.history) >= 5:
            med = sorted(self.history)[len(self.history) // 2]
            if med > 0 and cur["loss"] > self.spike_factor * med:
                self._dump(reason="spike", step=cur["step"])
        self.history.append(cur["loss"])

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_checkpoint_step = int(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()
        for h in self._handles:
            h.remove()
        self._handles = []

    # output ---------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending or self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        with (self._dir / LOSSES).open("a", encoding="utf-8") as fh:
            for rec in self._pending:
                fh.write(
                    json.dumps(
                        {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in rec.items()}
                    )
                    + "\n"
                )
        self._pending = []

    def _dump(self, *, reason: str, step: int, force: bool = False) -> Path | None:
        from autopsy.replay.batch import save_batches

        if self._dir is None or (len(self.dumps) >= self.max_dumps and not force):
            return None
        batches = {s["step"]: s["micro"] for s in self.steps if s["micro"]}
        cur = self.steps[-1]
        meta = {
            "reason": reason,
            "first_bad_step": str(step) if reason == "nonfinite" else "",
            "trigger_step": str(step),
            "losses": json.dumps(
                {
                    str(s["step"]): (s.get("loss") if math.isfinite(s.get("loss", math.nan)) else str(s.get("loss")))
                    for s in self.steps
                }
            ),
            "grad_norm": str(cur.get("grad_norm")),
            "rng_step": str(cur["step"]),
            "last_checkpoint_step": "" if self.last_checkpoint_step is None else str(self.last_checkpoint_step),
        }
        step_rng = {s["step"]: s["rng"] for s in self.steps if s["micro"]}
        path = save_batches(
            batch_file(self._dir.parent, step), batches, metadata=meta, rng=cur["rng"], step_rng=step_rng
        )
        self.dumps.append(path)
        return path

    def _save_weights(self, model: Any, step: int) -> None:
        assert self._dir is not None  # set at train begin
        target = weights_dir(self._dir.parent, step)
        inner = getattr(model, "module", model)
        inner.save_pretrained(str(target), safe_serialization=True)
