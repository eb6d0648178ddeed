"""Training entry points (one CLI call per stage).

    python -m workbench.train vlm --work outputs/vlm_run --out data_samples/vlm [--fast]

``vlm``: pretrain the tiny Qwen2-VL (phases in :mod:`workbench.vlm.pretrain`). Kill it at any time
and run the same command again: it resumes from the newest checkpoint in ``--work``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time


def main(argv=None):
    from .vlm.pretrain import PretrainConfig

    ap = argparse.ArgumentParser(prog="python -m workbench.train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vlm", help="pretrain the VLM")
    v.add_argument("--work", default="outputs/vlm_run", help="run folder: corpus cache, checkpoints, log.csv")
    v.add_argument("--out", default="outputs/vlm", help="where the final model + processor are saved")
    v.add_argument("--fast", action="store_true", help="a seconds-long run with tiny sizes (CI, smoke tests)")
    for f in dataclasses.fields(PretrainConfig):
        v.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = ap.parse_args(argv)

    import torch

    from .evaluate import evaluate_knowledge, format_table
    from .vlm.api import save_vlm
    from .vlm.pretrain import Pretrainer

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
                 if getattr(args, f.name) is not None}
    try:
        cfg = PretrainConfig.fast(**overrides) if args.fast else PretrainConfig(**overrides)
    except ValueError as exc:
        ap.error(str(exc))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    trainer = Pretrainer(cfg, args.work)
    model, processor = trainer.run()
    train_minutes = (time.time() - t0) / 60
    save_vlm(model, processor, args.out)
    result = evaluate_knowledge(model, processor, cfg.eval_per_skill, progress=False)
    print(format_table(result, f"Knowledge after pretraining (held-out, {cfg.eval_per_skill} per skill)"))
    summary = {"config": dataclasses.asdict(cfg), "wall_minutes_this_invocation": round(train_minutes, 2),
               "knowledge": result["rows"]}
    with open(os.path.join(args.work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"saved {args.out}; log {os.path.join(args.work, 'log.csv')}")


if __name__ == "__main__":
    main()
