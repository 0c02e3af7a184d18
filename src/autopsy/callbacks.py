"""``AutopsyCallback``: a transformers ``TrainerCallback`` that records what replay needs.

It keeps the last ``keep_last`` training batches in host memory (a forward pre-hook on the model sees exactly
what the model got, micro-batches included) with the RNG state at the start of each step, and reads the true
per-step loss (the one HF's ``logging_nan_inf_filter`` replaces) and the **pre-clip** gradient norm with one host sync
per step. When the loss or the grad norm goes non-finite, or the loss spikes, it writes the recorded batches to
``<output_dir>/autopsy/batches-step-<N>.safetensors``. With ``stop_on="nonfinite"`` it also saves the weights
as they were before the failing update (``autopsy/weights-before-step-<N>/``, safetensors) and stops training,
so ``autopsy replay <output_dir>`` has everything and no more compute is burnt on a dead run. The true
per-step losses and norms go to ``autopsy/losses.jsonl``; how the run computes (weights' dtype, autocast, attention
implementation and kernels, a quantized base) to ``autopsy/run.json`` at train begin, so replay computes the same way.

The pre-clip norm: transformers calls ``on_pre_optimizer_step`` after ``clip_grad_norm_`` has scaled the gradients,
so the norm is taken earlier, by a post-accumulate-grad hook on each trainable parameter: on the micro-batch that
completes the step (``accelerate``'s ``GradientState.sync_gradients``), each parameter's gradient norm is kept on the
device as its accumulation ends, and the step's norm is the norm of those, as ``clip_grad_norm_`` computes it. Under
fp16 mixed precision the gradients are still scaled then: the norm is divided by the loss scale, and a non-finite
norm is a step the scaler skips, not a failure.

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
from autopsy.recording import LOSSES, batch_file, record_dir, weights_dir, write_run_meta

__all__ = ["AutopsyCallback"]

_transformers = require("transformers", purpose="use AutopsyCallback")
_torch = require("torch", purpose="use AutopsyCallback")


def _gradient_state() -> Any:
    try:
        from accelerate.state import GradientState

        return GradientState()
    except Exception:
        return None


def _run_meta(args: Any, model: Any) -> dict[str, Any]:
    """How the run computes (written to run.json at train begin)."""
    from autopsy._version import __version__
    from autopsy.replay.precision import recorded_backends

    cfg = getattr(model, "config", None)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    quant = getattr(cfg, "quantization_config", None)
    if quant is not None and hasattr(quant, "to_dict"):
        quant = quant.to_dict()
    return {
        "autopsy": __version__,
        "transformers": _transformers.__version__,
        "torch": _torch.__version__,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "sdpa_backends": recorded_backends(),
        "weights_dtype": str(param.dtype).replace("torch.", "") if param is not None else None,
        "config_dtype": str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "").replace(
            "torch.", ""
        )
        or None,
        "autocast": "float16" if getattr(args, "fp16", False) else "bfloat16" if getattr(args, "bf16", False) else None,
        "quantization": quant if isinstance(quant, dict) else None,
        "gradient_accumulation_steps": getattr(args, "gradient_accumulation_steps", None),
        "gradient_checkpointing": getattr(args, "gradient_checkpointing", None),
        "max_grad_norm": getattr(args, "max_grad_norm", None),
        "device": str(param.device) if param is not None else None,
        "grad_norm": "pre_clip",
    }


class AutopsyCallback(_transformers.TrainerCallback):  # type: ignore[name-defined]  # a module loaded at run time
    """Record the last batches, the true loss, the pre-clip grad norm and the RNG state; save them when training
    goes wrong.

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
        self._norms: dict[int, Any] = {}  # id(param) -> its gradient's norm on the step's last micro-batch
        self._sync: Any = None
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

    def _grad(self, p: Any) -> None:
        """A parameter's gradient is complete for this backward: keep its norm when the step is complete."""
        if self._sync is not None and not self._sync.sync_gradients:
            return  # an accumulation micro-batch: the step's gradient is not complete yet
        if p.grad is not None:
            self._norms[id(p)] = _torch.linalg.vector_norm(p.grad.detach()).float()

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
            self._handles += [
                p.register_post_accumulate_grad_hook(self._grad) for p in model.parameters() if p.requires_grad
            ]
            self._sync = _gradient_state()
            if state is None or getattr(state, "is_world_process_zero", True):
                write_run_meta(self._dir.parent, _run_meta(args, model))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        rng = {"torch_cpu": _torch.get_rng_state()}
        if _torch.cuda.is_available():
            for i, s in enumerate(_torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda{i}"] = s
        self._current = {"step": state.global_step + 1, "micro": [], "losses": [], "rng": rng}
        self._norms = {}
        self.steps.append(self._current)

    def _step_values(self, model: Any, optimizer: Any) -> tuple[float, float, bool]:
        """The step's true loss and pre-clip grad norm (one host sync), and whether the norm is the pre-clip one."""
        cur = self._current
        assert cur is not None
        micro = cur["micro"]
        loss = None
        if cur["losses"]:
            stacked = _torch.stack([v.to(cur["losses"][0].device) for v in cur["losses"]])
            # HF: losses normalized by the step's num_items_in_batch add up to the step's mean
            loss = stacked.sum() if any("num_items_in_batch" in mb for mb in micro) else stacked.mean()
        pre_clip = bool(self._norms)
        if pre_clip:
            norms = list(self._norms.values())
        else:  # no hook fired (a wrapped or sharded model): the gradients as they are now, after clipping
            norms = [
                _torch.linalg.vector_norm(p.grad.detach()).float() for p in model.parameters() if p.grad is not None
            ]
        dev = norms[0].device if norms else (loss.device if loss is not None else "cpu")
        gnorm = _torch.linalg.vector_norm(_torch.stack([n.to(dev) for n in norms])) if norms else None
        parts = [t.to(dev) for t in (loss, gnorm) if t is not None]
        vals = iter(_torch.stack(parts).cpu().tolist() if parts else [])  # the one host sync per step
        loss_v = next(vals) if loss is not None else math.nan
        gn_v = next(vals) if gnorm is not None else math.nan
        scaler = getattr(optimizer, "scaler", None)
        if pre_clip and scaler is not None and hasattr(scaler, "get_scale") and math.isfinite(gn_v):
            gn_v /= float(scaler.get_scale())  # fp16: the gradients were still scaled by the loss scale
        return loss_v, gn_v, pre_clip

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        cur = self._current
        if cur is None:
            return
        cur["loss"], cur["grad_norm"], pre_clip = self._step_values(model, optimizer)
        rec = {
            "step": cur["step"],
            "loss": cur["loss"],
            "grad_norm" if pre_clip else "grad_norm_after_clip": cur["grad_norm"],
        }
        # fp16: the loss scaler skips a step whose gradients overflowed (the loss scale then halves): no failure
        skipped = getattr(optimizer, "scaler", None) is not None and math.isfinite(cur["loss"])
        if skipped and not math.isfinite(cur["grad_norm"]):
            rec["skipped"] = True
        self._pending.append(rec)
        nonfinite = not math.isfinite(cur["loss"]) or (pre_clip and not skipped and not math.isfinite(cur["grad_norm"]))
        if nonfinite and self.first_bad_step is None:
            self.first_bad_step = cur["step"]
            self._dump(reason="nonfinite", step=cur["step"], force=True)
            if self.save_weights and model is not None:
                self._save_weights(model, cur["step"])  # the update of this step has not run yet
            self._flush()
            if self.stop_on == "nonfinite":
                control.should_training_stop = True
            return
        if nonfinite or not math.isfinite(cur["loss"]):
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
                clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in rec.items()}
                fh.write(json.dumps(clean) + "\n")
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
