"""Learning curve: one model trained once, tested with anomalib's metrics every ``--eval-every`` optimizer steps.

It answers "does a longer budget help, and how fast?" without retraining per budget: a callback keeps a copy of
the torch model's weights at each multiple of ``--eval-every``; after training each copy is loaded back,
**validated** (``Engine.validate``: the post-processor's normalisation range and thresholds are recomputed from
that snapshot's own scores) and then tested through ``Engine.test`` with the harness's evaluator (image
AUROC/F1, pixel AUROC/AUPRO/AP). Without the validation every snapshot would be normalised and clamped with the
statistics of the final weights (``Engine.test`` does not re-validate one-class models), which ties clamped scores
and changes the AUROCs (issue #13: one AGPNet row moved from 0.744 to 0.609). Each row records the statistics it
was normalised with. Dataset, backbone, model arguments and the results format are the harness's (``harness.py``).

Example (offline, Magnetic Tile, Lite0)::

    python benchmarks/learning_curve.py --models AMINet --image-size 128 --max-steps 1500 --eval-every 300 \
        --threads 1 --workers 1 --model-args '{"AMINet": {"patch_size": 2}}' --name ami_net_mt_curve

``--save-snapshots`` also writes each snapshot as ``<work-dir>/<model>/snapshots/step_<N>.ckpt`` (state dict and
init args, the layout ``per_class.py --ckpt`` and ``nafrad_branches.py`` read), for diagnosing a curve afterwards.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import METRICS, build_datamodule, build_model, machine_info, parse, write_results


def main(argv: list[str] | None = None) -> int:
    """Train once, test every snapshot, write ``<name>.json`` and ``.md``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    every = 0
    if "--eval-every" in argv:
        at = argv.index("--eval-every")
        every = int(argv[at + 1])
        del argv[at : at + 2]
    save_snapshots = "--save-snapshots" in argv
    if save_snapshots:
        argv.remove("--save-snapshots")
    args = parse(argv)
    if len(args.models) != 1 or every <= 0 or args.max_steps <= 0:
        msg = "learning_curve.py needs exactly one --models entry, --max-steps N > 0 and --eval-every K > 0."
        raise SystemExit(msg)

    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed, workers=True)
    name = args.models[0]
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(Callback):
        """Copies of ``pl_module.model``'s weights at every ``every`` optimizer steps."""

        def on_train_batch_end(self, trainer, pl_module, *_args) -> None:
            step = int(trainer.global_step)
            if step % every == 0 and step not in snapshots:
                snapshots[step] = copy.deepcopy(pl_module.model.state_dict())

    datamodule = build_datamodule(args)
    model = build_model(name, args)
    engine = Engine(
        accelerator="gpu" if torch.cuda.is_available() and not args.cpu else "cpu",
        devices=1,
        max_steps=args.max_steps,
        default_root_dir=str(Path(args.work_dir) / name),
        logger=False,
        enable_progress_bar=False,
        deterministic=False,
        callbacks=[Snapshot()],
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_s = time.perf_counter() - start
    snapshots.setdefault(int(engine.trainer.global_step), copy.deepcopy(model.model.state_dict()))

    header = {
        "name": args.name or f"{name}_{args.dataset}_curve",
        "command": "python benchmarks/learning_curve.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine_info(),
        **{k: getattr(args, k) for k in ("dataset", "backbone", "image_size", "max_steps", "max_epochs", "max_time")},
        "seed": args.seed,
        "batch_size": args.batch_size,
        "eval_every": every,
        "model_args": args.model_args.get(name, {}),
    }
    rows = []
    for step in sorted(snapshots):
        model.model.load_state_dict(snapshots[step])
        if save_snapshots:
            save_snapshot(model, Path(args.work_dir) / name / "snapshots" / f"step_{step}.ckpt")
        start = time.perf_counter()
        engine.validate(model=model, datamodule=datamodule, verbose=False)  # this snapshot's own statistics
        results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        rows.append(
            {
                "model": f"{name} @ {step} steps",
                **{m: float(results[m]) for m in METRICS if m in results},
                "train_s": round(train_s * step / max(snapshots), 1),
                "test_s": round(time.perf_counter() - start, 1),
                "steps": step,
                **post_processor_stats(model),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        write_results(Path(args.results_dir), header, rows, note=_NOTE)
    return 0


def save_snapshot(model, path: Path) -> None:
    """The model's weights and init args in the checkpoint layout ``per_class.load_model`` reads."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)


def post_processor_stats(model) -> dict[str, float]:
    """The raw-score range and threshold the post-processor normalises this row with (``nan`` where unset)."""
    post = getattr(model, "post_processor", None)
    names = ("image_min", "image_max", "pixel_min", "pixel_max")
    if post is None or not all(hasattr(post, n) for n in names):
        return {}
    stats = {f"norm_{n}": float(getattr(post, n)) for n in names}
    if hasattr(post, "_image_threshold"):
        stats["norm_image_threshold"] = float(post._image_threshold)
    return stats


_NOTE = """
One training run; every row is the same run's weights at that step, validated (the post-processor's min/max and
thresholds recomputed from that snapshot's scores, recorded as `norm_*` in the JSON) and then tested on the full
test split. `train_s` is the run's training time pro-rated to the step (the run's total divided evenly).
"""


if __name__ == "__main__":
    sys.exit(main())
