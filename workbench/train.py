"""Training entry points (one CLI call per stage).

    python -m workbench.train vlm --work outputs/vlm_run --out data_samples/vlm [--fast]

    python -m workbench.train stage reasoning_alignment --init runs/s1 --data outputs/robot_data --out runs/s2
    python -m workbench.train recipe chatvla2 --init data_samples/vlm --data outputs/robot_data --out runs/chatvla2
    python -m workbench.train package --policy runs/chatvla2/policy --out data_samples/policy

``vlm``: pretrain the tiny Qwen2-VL (phases in :mod:`workbench.vlm.pretrain`). ``stage``: one ChatVLA-2
training stage; ``recipe``: a chain of stages (:mod:`workbench.vla.stages`). Kill any of them and run the
same command again: it resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from .settings import use_all_cores


def main(argv=None):
    from .vlm.pretrain import PretrainConfig

    ap = argparse.ArgumentParser(prog="python -m workbench.train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vlm", help="pretrain the VLM")
    v.add_argument("--work", default="outputs/vlm_run", help="run folder: checkpoints, log.csv, config.json")
    v.add_argument("--out", default="outputs/vlm", help="where the final model + processor are saved")
    v.add_argument("--fast", action="store_true", help="a seconds-long run with tiny sizes (CI, smoke tests)")
    for f in dataclasses.fields(PretrainConfig):
        v.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    from .vla.stages import RECIPES, STAGES, StageConfig

    for name, helptext in (("stage", "run one ChatVLA-2 training stage"), ("recipe", "run a chain of stages")):
        a = sub.add_parser(name, help=helptext)
        a.add_argument("name", choices=list(STAGES if name == "stage" else RECIPES))
        a.add_argument("--init", required=True, help="pretrained VLM folder (upcycling stages) or policy folder")
        a.add_argument("--data", required=True, help="in-domain demonstration dataset (python -m workbench.dataset)")
        a.add_argument("--out", required=True, help="policy folder to write (checkpoints and log.csv in OUT.run)")
        a.add_argument("--moe-variant", default=None, help="MoE variant for upcycling (dense, dynamic, static, ...)")
        a.add_argument("--num-experts", type=int, default=None)
        a.add_argument("--top-k", type=int, default=None)
        a.add_argument("--reasoning-injection", default=None, help="latter_half | all | former_half | off")
        a.add_argument("--no-reasoning-boxes", action="store_true",
                       help="upcycling: the action expert reads the reasoning's hidden states only, not its boxes")
        a.add_argument("--board-first", action="store_true",
                       help="upcycling: for whiteboard instructions the backbone first solves the board (a question "
                            "it was pretrained on) and reasons on from its answer, which robot data does not train")
        a.add_argument("--seed", type=int, default=None)
        a.add_argument("--steps", type=int, default=None, help="override the steps of every trained stage")
        a.add_argument("--batch-size", type=int, default=None)
        a.add_argument("--general-pool", type=int, default=None, help="image–text samples rendered for the mix")
        a.add_argument("--distil-rows", type=int, default=None,
                       help="rows per step pulled towards the starting model's answers on the other skills' questions "
                            "(stages that train part of the VLM)")
        a.add_argument("--distil-pool", type=int, default=None, help="questions rendered for those rows")
        a.add_argument("--distil-scenes", type=int, default=None,
                       help="board_first policies: the first turn in this many fresh in-domain math scenes (both "
                            "cameras) joins those questions")
        if name == "stage":
            a.add_argument("--train", default=None, help="comma-separated parts to train instead of the stage's "
                           "(vision, embeddings, attention, experts, router, action_expert)")
            a.add_argument("--lr", type=float, default=None, help="peak learning rate instead of the stage's")
            a.add_argument("--vlm-lr-scale", type=float, default=None,
                           help="the trained VLM parts' learning rate relative to --lr (the action expert's)")
            a.add_argument("--kept-experts", type=int, default=None,
                           help="the first N routed experts of every MoE layer stay the pretrained MLP (frozen)")
            a.add_argument("--lm-phases", default=None, help="comma-separated demonstration phases whose frames carry "
                           "the reasoning's LM loss (reach, grasp, ...), or 'all'")
            a.add_argument("--reasoning-scenes", type=int, default=None,
                           help="co-training: rows a step of fresh in-domain first frames that carry the reasoning's "
                                "LM loss instead of the demonstration frames")
            a.add_argument("--scene-pool", type=int, default=None, help="fresh scenes rendered at a time")
            a.add_argument("--scene-refresh", type=int, default=None, help="steps before the scenes are replaced")
            a.add_argument("--counterfactual-boards", type=float, default=None,
                           help="share of the fresh math scenes whose reasoning picks another card, the answer of "
                                "another equation stated in the first turn (board_first policies)")
    k = sub.add_parser("package", help="copy a trained policy (float16 weights) and its training logs")
    k.add_argument("--policy", required=True, help="trained policy folder (e.g. RECIPE_OUT/policy)")
    k.add_argument("--out", required=True, help="where to write it (e.g. data_samples/policy)")
    args = ap.parse_args(argv)


    if args.what == "package":
        return _package(args.policy, args.out)
    if args.what in ("stage", "recipe"):
        use_all_cores()
        return _main_vla(ap, args, StageConfig)

    from .evaluation.knowledge import evaluate_knowledge, format_table
    from .vlm.api import save_vlm
    from .vlm.pretrain import Pretrainer

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
                 if getattr(args, f.name) is not None}
    try:
        cfg = PretrainConfig.fast(**overrides) if args.fast else PretrainConfig(**overrides)
    except ValueError as exc:
        ap.error(str(exc))
    use_all_cores()
    t0 = time.time()
    trainer = Pretrainer(cfg, args.work)
    model, processor = trainer.run()
    train_minutes = (time.time() - t0) / 60
    if not trainer.accelerator.is_main_process:
        return None
    save_vlm(model, processor, args.out)
    result = evaluate_knowledge(model, processor, cfg.eval_per_skill, progress=False)
    print(format_table(result, f"Knowledge after pretraining (held-out, {cfg.eval_per_skill} per skill)"))
    summary = {"config": dataclasses.asdict(cfg), "wall_minutes_this_invocation": round(train_minutes, 2),
               "knowledge": result["rows"]}
    with open(os.path.join(args.work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"saved {args.out}; log {os.path.join(args.work, 'log.csv')}")


def _package(src: str, out: str) -> None:
    import shutil

    from .vla.policy import load_policy, save_policy

    policy = load_policy(src)
    with open(os.path.join(src, "policy_config.json")) as f:
        extra = {k: v for k, v in json.load(f).items()
                 if k not in ("policy", "vlm_config", "action_expert", "weights_dtype", "weights_sha256")}
    save_policy(policy, out, extra={**extra, "packaged_from": src}, half=True)
    if os.path.isdir(os.path.join(src, "training")):
        shutil.copytree(os.path.join(src, "training"), os.path.join(out, "training"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out} ({size / 2**20:.1f} MB)")


def _main_vla(ap, args, StageConfig):
    from .vla.moe import MoEConfig
    from .vla.policy import PolicyConfig
    from .vla.stages import RECIPES, STAGES, StageTrainer, run_recipe

    moe = {k: v for k, v in (("variant", args.moe_variant), ("num_experts", args.num_experts),
                              ("top_k", args.top_k)) if v is not None}
    train = getattr(args, "train", None)
    stage_over = {k: v for k, v in (("seed", args.seed), ("batch_size", args.batch_size),
                                    ("general_pool", args.general_pool), ("lr", getattr(args, "lr", None)),
                                    *((k, getattr(args, k, None)) for k in ("reasoning_scenes", "scene_pool",
                                                                            "scene_refresh", "vlm_lr_scale",
                                                                            "kept_experts", "counterfactual_boards")),
                                    ("train", tuple(p.strip() for p in train.split(",")) if train else None))
                  if v is not None}
    phases = getattr(args, "lm_phases", None)
    if phases is not None:
        stage_over["lm_phases"] = None if phases == "all" else tuple(p.strip() for p in phases.split(","))
    try:
        pcfg = PolicyConfig(moe=MoEConfig(**moe).to_dict(), action={"reasoning_injection": args.reasoning_injection}
                            if args.reasoning_injection else {}, reasoning_boxes=not args.no_reasoning_boxes,
                            board_first=args.board_first)
        stages = [STAGES[args.name]] if args.what == "stage" else list(RECIPES[args.name])
        distil = {k: v for k, v in (("distil_rows", args.distil_rows), ("distil_pool", args.distil_pool),
                                    ("distil_scenes", args.distil_scenes)) if v is not None}

        def takes_distil(s: StageConfig) -> bool:  # a recipe's stages that train part of the VLM; a stage: always
            return args.what == "stage" or not StageConfig(**{**dataclasses.asdict(s), **stage_over}).caches_vlm

        if distil and not any(map(takes_distil, stages)):
            raise ValueError(f"--distil-rows/--distil-pool/--distil-scenes apply to stages that train part of the "
                             f"VLM; recipe {args.name!r} has none")
        per_stage = {s.name: {**stage_over, **(distil if takes_distil(s) else {}),
                              **({"steps": args.steps} if args.steps is not None and s.steps else {})}
                     for s in stages}
        for s in stages:
            checked = StageConfig(**{**dataclasses.asdict(s), **per_stage[s.name]})  # validate early
            if not checked.reasoning_scenes and {"scene_pool", "scene_refresh"} & set(per_stage[s.name]):
                raise ValueError("--scene-pool/--scene-refresh size the fresh scenes of --reasoning-scenes, which "
                                 f"stage {s.name!r} does not use (reasoning_scenes=0)")
        built = [o for o, v in (("--moe-variant", args.moe_variant), ("--num-experts", args.num_experts),
                                ("--top-k", args.top_k), ("--reasoning-injection", args.reasoning_injection),
                                ("--no-reasoning-boxes", args.no_reasoning_boxes), ("--board-first", args.board_first))
                 if v not in (None, False)]
        if built and not any(s.upcycle for s in stages):
            raise ValueError(f"{', '.join(built)} shape(s) the policy an upcycling stage builds; {args.what} "
                             f"{args.name!r} continues the policy in --init and would ignore it")
        from .dataset import load_meta

        load_meta(args.data)  # a clear error if --data is not a dataset folder
        if not os.path.isdir(args.init):
            raise FileNotFoundError(f"--init {args.init!r} is not a folder (a pretrained VLM or a policy)")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        ap.error(str(exc))
    t0 = time.time()
    if args.what == "stage":
        stage = dataclasses.replace(STAGES[args.name], **per_stage[args.name])
        StageTrainer(stage, args.init, args.data, args.out, pcfg).run()
    else:
        run_recipe(args.name, args.init, args.data, args.out, pcfg, **per_stage)
    print(f"saved {args.out} in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    from .settings import run_cli

    run_cli(main)
