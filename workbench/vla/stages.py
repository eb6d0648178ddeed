"""ChatVLA-2's training stages as configs, and the trainer that runs one stage (or a recipe of them).

=====================  =====================================================  ==========================
stage                  what it does                                           trained (default preset)
=====================  =====================================================  ==========================
knowledge_freezing     upcycle the pretrained VLM's MLPs into experts (each   nothing: it builds the
                       a copy), attach a fresh action expert + normaliser     policy; the vision tower and
                                                                              embeddings stay frozen
reasoning_alignment    co-train on the *general* image–text subset (no        experts, routers,
                       digits) mixed 1:3 with in-domain robot frames          action expert (attention
                       (diffusion), plus fresh in-domain first frames whose   frozen)
                       target is the reasoning text; loss = LM CE +
                       diffusion (+ router load balancing)
action_finetuning      the whole VLM frozen; the action expert learns to      action expert
                       follow the reasoning (diffusion)
=====================  =====================================================  ==========================

Recipes (:data:`RECIPES`) chain stages: ``chatvla2`` (all three, the default), ``two_stage`` (the camera-ready
paper's view: upcycling folded into co-training, then action fine-tuning), the ablations
``only_alignment`` / ``only_action``, and ``full_finetune``, the end-to-end VLA the paper argues against (one
stage: a dense backbone trained with the action expert on robot data only, no image–text mix, no frozen knowledge).
Robot data comes only from *in-domain* splits (checked).

CLI (each stage is one call; kill and rerun to resume from the newest checkpoint)::

    python -m workbench.train stage knowledge_freezing --init data_samples/vlm --data DATA --out runs/s1
    python -m workbench.train stage reasoning_alignment --init runs/s1 --data DATA --out runs/s2
    python -m workbench.train stage action_finetuning --init runs/s2 --data DATA --out runs/s3
    python -m workbench.train recipe chatvla2 --init data_samples/vlm --data DATA --out runs/chatvla2

The paper keeps attention "frozen or lightly trained" in co-training; here it is frozen. Short runs (300 steps from
the same stage-1 policy, a knowledge slice of 12 held-out questions per skill) measured why: with attention trained
at lr 1e-3, board solving fell from 7/12 to 1/12 and text arithmetic from 12/12 to 3/12; with attention frozen, 3/12
and 9/12 (the issue notes of session 4 have every variant). ``distil_rows`` adds a self-distillation term on the
other skills' questions (:class:`~workbench.vla.stage_data.DistilPool`); off by default
(docs/chatvla2_experiments.md has the short runs: it kept board reading but lost text arithmetic). The vision
tower is frozen in every default stage, so each frame's vision tokens are computed once and
cached; in action fine-tuning the whole VLM is frozen, so its per-frame summaries are cached too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import latest_checkpoint, load_checkpoint_state, save_checkpoint
from ..training import CsvLog, lr_at, optimizer_step, process_mean, refuse_changed_config, shard
from .moe import MoEConfig, MoEMLP, load_balancing_loss
from .policy import IMAGE_TEXT, ROBOT, ChatVLA2Policy, PolicyConfig, Summaries, load_policy, save_policy
from .stage_data import DistilPool, GeneralPool, ReasoningScenes, RobotFrames, distillation_loss

#: groups of parameters a stage may train (everything else is frozen)
PARTS = ("vision", "embeddings", "attention", "experts", "router", "action_expert")


def part_of(name: str) -> str:
    """Which of :data:`PARTS` a policy parameter belongs to."""
    if name.startswith("action_expert."):
        return "action_expert"
    if name.startswith("vlm.model.visual."):
        return "vision"
    if ".router." in name:
        return "router"
    if ".mlp." in name:
        return "experts"  # routed, shared and static experts (and a dense model's MLPs)
    if "embed_tokens" in name or name.startswith("vlm.lm_head"):
        return "embeddings"
    return "attention"  # attention projections and norms of the language model


def _is_number(value) -> bool:
    """An int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class StageConfig:
    """One training stage. Validated on creation; errors name the allowed values."""

    name: str
    upcycle: bool = False  # start from a pretrained VLM folder and upcycle it (the knowledge-freezing step)
    steps: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    train: tuple = ()  # parts of PARTS trained in this stage
    image_text_share: float = 0.0  # share of every batch drawn from the general image–text subset
    lm_loss: bool = False
    #: the robot frames whose reasoning carries the LM loss, by phase of the demonstration
    #: (:data:`~workbench.world.language.PHASES`); ``None``: every frame. The reasoning states the scene as it is at
    #: the start (where each card or toy lies), which stays true until the arm lifts what it grasped.
    lm_phases: tuple | None = None
    #: co-training: the reasoning's LM loss comes from this many fresh in-domain first frames a step
    #: (:class:`ReasoningScenes`: a pool of ``scene_pool`` scenes, new every ``scene_refresh`` steps) instead of the
    #: demonstration frames, which then carry the diffusion loss only (a step then has batch_size + reasoning_scenes
    #: rows); 0: the frames carry it
    reasoning_scenes: int = 0
    scene_pool: int = 200
    scene_refresh: int = 200
    #: share of the fresh math scenes whose reasoning is another task of the scene (another card on the table is the
    #: answer of another in-domain equation, :meth:`~workbench.world.env.TabletopEnv.counterfactual_task`): for a
    #: ``board_first`` policy, whose first turn (the board's equation) is context, not a target, these teach the
    #: second turn to follow the first turn's answer rather than re-read the board; 0: every scene's own reasoning
    counterfactual_boards: float = 0.0
    diffusion_loss: bool = True
    general_pool: int = 400  # image–text samples rendered and cached for the mix
    #: rows per step from a :class:`DistilPool` (the other skills' questions) whose loss is KL to the answer
    #: distributions of the model the stage starts from; 0 = no self-distillation term
    distil_rows: int = 0
    distil_pool: int = 400
    #: a ``board_first`` policy's first turn (``SOLVE_QUESTION`` with the robot's cameras) in this many fresh in-domain
    #: math scenes joins the distillation pool (:func:`~workbench.vla.stage_data.board_first_turns`); 0: none
    distil_scenes: int = 0
    checkpoint_every: int = 100
    seed: int = 0
    #: the learning rate of the trained VLM parts (experts, routers, ...) relative to ``lr``; the action expert
    #: trains at ``lr``
    vlm_lr_scale: float = 1.0
    #: the first ``kept_experts`` routed experts of every MoE layer stay the pretrained MLP (frozen) while the
    #: others and the routers train ("which experts train"); 0: every expert trains
    kept_experts: int = 0
    #: upcycling stages: the backbone's MoE variant, instead of the policy config's (``full_finetune``: dense)
    moe_variant: str | None = None

    def __post_init__(self):
        from .moe import VARIANTS

        if self.moe_variant is not None and (not self.upcycle or self.moe_variant not in VARIANTS):
            raise ValueError(f"moe_variant must be None or, in an upcycling stage, one of {list(VARIANTS)}; got "
                             f"{self.moe_variant!r} (upcycle={self.upcycle})")
        from ..world.language import PHASES

        self.train = tuple(self.train)
        if self.lm_phases is not None:
            self.lm_phases = tuple(self.lm_phases)
            if not self.lm_phases or not set(self.lm_phases) <= set(PHASES):
                raise ValueError(f"lm_phases must be None (every frame) or a non-empty subset of {list(PHASES)}; "
                                 f"got {list(self.lm_phases)}")
            if not self.lm_loss or self.caches_vlm:
                raise ValueError(f"lm_phases={list(self.lm_phases)} needs a stage with an LM loss that trains part of "
                                 f"the VLM; {self.name!r} has lm_loss={self.lm_loss} and trains {list(self.train)}")
        bad = [p for p in self.train if p not in PARTS]
        if bad:
            raise ValueError(f"unknown parts {bad}; expected a subset of {list(PARTS)}")
        for k in ("steps", "batch_size", "checkpoint_every", "general_pool", "distil_rows", "distil_pool",
                  "distil_scenes", "reasoning_scenes", "scene_pool", "scene_refresh", "kept_experts"):
            v = getattr(self, k)
            low = 0 if k in ("steps", "distil_rows", "distil_scenes", "reasoning_scenes", "kept_experts") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{k} must be an int >= {low}, got {v!r}")
        if self.reasoning_scenes:
            if not self.lm_loss or self.caches_vlm:
                raise ValueError(f"reasoning_scenes={self.reasoning_scenes} needs a stage with an LM loss that trains "
                                 f"part of the VLM; {self.name!r} has lm_loss={self.lm_loss} and trains "
                                 f"{list(self.train)}")
            if self.lm_phases is not None:
                raise ValueError("reasoning_scenes takes the reasoning's LM loss off the demonstration frames; "
                                 f"lm_phases={list(self.lm_phases)} (which frames carry it) would be ignored: set "
                                 "reasoning_scenes=0 (--reasoning-scenes 0) to use it")
            if self.reasoning_scenes > self.scene_pool:
                raise ValueError(f"reasoning_scenes ({self.reasoning_scenes}) must not exceed scene_pool "
                                 f"({self.scene_pool})")
        if not (_is_number(self.counterfactual_boards) and 0.0 <= self.counterfactual_boards <= 1.0):
            raise ValueError(f"counterfactual_boards must be a share in [0, 1], got {self.counterfactual_boards!r}")
        if self.counterfactual_boards and not self.reasoning_scenes:
            raise ValueError("counterfactual_boards changes the fresh reasoning scenes; set reasoning_scenes > 0")
        if self.distil_rows > self.distil_pool:
            raise ValueError(f"distil_rows ({self.distil_rows}) must not exceed distil_pool ({self.distil_pool})")
        if self.distil_scenes and not self.distil_rows:
            raise ValueError(f"distil_scenes={self.distil_scenes} adds to the distillation pool; set distil_rows > 0")
        if self.distil_rows and "vision" in self.train:
            raise ValueError("distil_rows needs a frozen vision tower (the pool's vision tokens are computed once)")
        if self.distil_rows and self.caches_vlm:
            raise ValueError(f"distil_rows={self.distil_rows} needs a stage that trains part of the VLM; "
                             f"{self.name!r} trains {list(self.train)}")
        if self.kept_experts and "experts" not in self.train:
            raise ValueError(f"kept_experts={self.kept_experts} keeps some experts frozen while the others train; "
                             f"stage {self.name!r} does not train experts (train={list(self.train)})")
        if not (_is_number(self.vlm_lr_scale) and self.vlm_lr_scale > 0):
            raise ValueError(f"vlm_lr_scale must be a number > 0, got {self.vlm_lr_scale!r}")
        if not 0.0 <= self.image_text_share < 1.0:
            raise ValueError(f"image_text_share must be in [0, 1), got {self.image_text_share}")
        if self.steps and not self.train:
            raise ValueError(f"stage {self.name!r} has {self.steps} steps but trains nothing (train=())")
        if self.steps and not (self.lm_loss or self.diffusion_loss):
            raise ValueError(f"stage {self.name!r} has no loss: set lm_loss and/or diffusion_loss")
        if self.image_text_share and not self.lm_loss:
            raise ValueError("image–text samples only carry an LM loss: set lm_loss=True or image_text_share=0")

    @property
    def caches_vlm(self) -> bool:
        """True when no VLM part is trained: per-frame VLM summaries can be cached."""
        return not (set(self.train) & {"vision", "embeddings", "attention", "experts", "router"})


STAGES: dict[str, StageConfig] = {
    "knowledge_freezing": StageConfig("knowledge_freezing", upcycle=True),
    "reasoning_alignment": StageConfig(
        "reasoning_alignment", steps=1200, batch_size=16, lr=1e-3, image_text_share=0.25, lm_loss=True,
        train=("experts", "router", "action_expert"), checkpoint_every=200, reasoning_scenes=8, scene_pool=200,
        scene_refresh=200),
    "action_finetuning": StageConfig("action_finetuning", steps=20000, batch_size=64, lr=1e-3,
                                     train=("action_expert",), checkpoint_every=500),
}

#: the end-to-end VLA the paper argues against: a dense backbone, all of it trained (but the vision tower, whose
#: tokens are cached on 2 CPU cores) on robot data only, reasoning and actions at once, no image–text mix
FULL_FINETUNE = StageConfig("full_finetune", upcycle=True, moe_variant="dense", steps=3000, batch_size=16, lr=1e-3,
                            lm_loss=True, train=("embeddings", "attention", "experts", "action_expert"),
                            checkpoint_every=200)

RECIPES: dict[str, tuple[StageConfig, ...]] = {
    "chatvla2": (STAGES["knowledge_freezing"], STAGES["reasoning_alignment"], STAGES["action_finetuning"]),
    "full_finetune": (FULL_FINETUNE,),
    "two_stage": (dataclasses.replace(STAGES["reasoning_alignment"], upcycle=True), STAGES["action_finetuning"]),
    "only_alignment": (STAGES["knowledge_freezing"], STAGES["reasoning_alignment"]),
    "only_action": (STAGES["knowledge_freezing"], STAGES["action_finetuning"]),
}


def set_trainable(policy: ChatVLA2Policy, parts, kept_experts: int = 0) -> dict[str, dict[str, int]]:
    """Freeze everything but ``parts``, and of the routed experts the first ``kept_experts`` of every layer;
    returns {part: {"trainable": n, "frozen": n}} parameter counts."""
    if kept_experts:
        routed = {len(m.experts) for m in policy.vlm.modules() if isinstance(m, MoEMLP) and m.router is not None}
        if not routed or kept_experts >= min(routed):
            raise ValueError(f"kept_experts={kept_experts} must be below the routed experts per layer "
                             f"({sorted(routed) or 'none: the backbone has no routed experts'})")
    table = {p: {"trainable": 0, "frozen": 0} for p in PARTS}
    for name, param in policy.named_parameters():
        part = part_of(name)
        expert = re.search(r"\.mlp\.experts\.(\d+)\.", name)
        train = part in parts and not (expert and int(expert.group(1)) < kept_experts)
        param.requires_grad_(train)
        table[part]["trainable" if train else "frozen"] += param.numel()
    return table


def format_parts(table: dict) -> str:
    lines = [f"{'part':<14}{'trainable':>11}{'frozen':>11}"]
    lines += [f"{p:<14}{c['trainable']:>11,}{c['frozen']:>11,}" for p, c in table.items() if sum(c.values())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- trainer
class StageTrainer:
    """Runs one :class:`StageConfig` from ``init`` (a VLM folder for upcycling stages, else a policy folder)
    into ``out`` (the final policy) with checkpoints, ``log.csv`` and ``summary.json`` in ``out + '.run'``."""

    def __init__(self, stage: StageConfig, init: str, data: str, out: str, policy_config: PolicyConfig | None = None,
                 progress: bool = True):
        from accelerate import Accelerator

        self.stage, self.init, self.data, self.out, self.progress = stage, init, data, out, progress
        self.policy_config = policy_config or PolicyConfig()
        self.run_dir = out.rstrip("/") + ".run"
        os.makedirs(self.run_dir, exist_ok=True)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.main = self.accelerator.is_main_process  # logs, checkpoints and saves (see workbench.training)
        self.log = CsvLog(os.path.join(self.run_dir, "log.csv"),
                          ["stage", "step", "loss", "lm", "diffusion", "distil", "aux", "lr"], enabled=self.main)

    def initial_policy(self, ckpt: str | None) -> ChatVLA2Policy:
        """The policy to train: from checkpoint ``ckpt`` (resume), else built from ``init``."""
        from ..dataset import load_meta
        from ..vlm.api import load_vlm

        if ckpt is not None:
            return load_policy(os.path.join(ckpt, "policy"))
        if self.stage.upcycle:
            vlm, processor = load_vlm(self.init)
            config = self.policy_config
            if self.stage.moe_variant is not None:
                config = dataclasses.replace(config, moe={**config.moe, "variant": self.stage.moe_variant})
            return ChatVLA2Policy.from_vlm(vlm, processor, load_meta(self.data).stats, config)
        return load_policy(self.init)

    def teacher(self) -> ChatVLA2Policy:
        """The model this stage starts from, as it was before any of the stage's steps, also when resuming: built
        from ``init`` under the stage's seed (an upcycling stage draws the same routers as its student did), with
        the global RNG left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.stage.seed)
            return self.initial_policy(None)

    def run(self) -> ChatVLA2Policy:
        st = self.stage
        if self.main:
            refuse_changed_config(os.path.join(self.run_dir, "run_config.json"),
                                  {"stage": dataclasses.asdict(st), "policy": self.policy_config.to_dict(),
                                   "init": os.path.abspath(self.init), "data": os.path.abspath(self.data)},
                                  "stage run")
        self.accelerator.wait_for_everyone()
        torch.manual_seed(st.seed)  # initialisation of a fresh policy only: each step's noise has its own generator
        t0 = time.time()
        ckpt = latest_checkpoint(self.run_dir)
        policy = self.initial_policy(ckpt)
        parts = set_trainable(policy, st.train, st.kept_experts)
        if self.progress:
            print(f"stage {st.name}: {st.steps} steps\n{format_parts(parts)}")
        start = load_checkpoint_state(ckpt)[0]["step"] if ckpt else 0
        self.log.rewind(lambda row: int(row["step"]) <= start)  # steps after the checkpoint are redone
        if st.steps > start:
            (self.train_cached if st.caches_vlm else self.train_joint)(policy, start, ckpt)
        if not self.main:
            return policy
        this = {**dataclasses.asdict(st), "init": self.init, "data": self.data}
        save_policy(policy, self.out, extra={"stages": [*stages_of(self.init), this]})
        summary = {"stage": dataclasses.asdict(st), "parameters": parts, "init": self.init, "data": self.data,
                   "wall_minutes_this_invocation": round((time.time() - t0) / 60, 2)}
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return policy

    # -- the two loops ---------------------------------------------------------------------------
    def _optimizer(self, policy, ckpt):
        named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        groups: list = params
        if self.stage.vlm_lr_scale != 1.0:
            vlm = [p for n, p in named if part_of(n) != "action_expert"]
            groups = [{"params": [p for n, p in named if part_of(n) == "action_expert"]},
                      {"params": vlm, "lr_scale": self.stage.vlm_lr_scale}]
        opt = torch.optim.AdamW(groups, lr=self.stage.lr, weight_decay=0.01)
        if ckpt is not None:
            load_checkpoint_state(ckpt, opt)
        return params, opt

    def _update(self, policy, step, terms: dict, params, opt, bar) -> None:
        lr = lr_at(step, self.stage.steps, self.stage.lr)
        loss = sum(terms.values())
        optimizer_step(self.accelerator, loss, opt, params, lr)
        vals = {k: round(process_mean(self.accelerator, v), 5) for k, v in terms.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in vals.items()})
        self.log(stage=self.stage.name, step=step + 1, loss=round(sum(vals.values()), 5), lr=lr, **vals)
        if (step + 1) % self.stage.checkpoint_every == 0 or step + 1 == self.stage.steps:
            if self.main:
                save_checkpoint(self.run_dir, step + 1, lambda d: save_policy(policy, os.path.join(d, "policy")),
                                opt, {"stage": self.stage.name})
            self.accelerator.wait_for_everyone()

    def _noise(self, policy, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusion noise and timesteps of the *global* batch of ``step`` (each process keeps its rows)."""
        return policy.action_expert.draw_noise(batch, step_noise(self.stage, step))

    def _bar(self, start: int):
        st = self.stage
        return tqdm(range(start, st.steps), desc=st.name, initial=start, total=st.steps,
                    disable=not (self.progress and self.main))

    def train_joint(self, policy: ChatVLA2Policy, start: int, ckpt) -> None:
        """VLM parts are trained: every step runs the language model (vision tokens from the cache)."""
        st = self.stage
        if st.distil_scenes and not policy.config.board_first:
            raise ValueError(f"distil_scenes={st.distil_scenes} holds the first turn of a board_first policy; the one "
                             f"in {self.init} reasons in one turn (board_first is set by --board-first in stage 1)")
        for name in ("distil_rows", "reasoning_scenes"):  # rows each process keeps an equal share of
            if getattr(st, name) % self.accelerator.num_processes:
                raise ValueError(f"{name} ({getattr(st, name)}) must be a multiple of the number of processes "
                                 f"({self.accelerator.num_processes})")
        frames = RobotFrames(self.data, policy, self.progress)
        pool = GeneralPool(st.general_pool, policy, st.seed, self.progress) if st.image_text_share else None
        distil = (DistilPool(st.distil_pool, policy, self.teacher(), st.seed, self.progress, scenes=st.distil_scenes)
                  if st.distil_rows else None)
        if distil is not None:
            if len(distil) < st.distil_rows:
                raise ValueError(f"distil_rows={st.distil_rows} but the starting model knew an answer token in only "
                                 f"{len(distil)} of {distil.candidates} questions: {distil!r}")
            if self.main and self.progress:
                print(distil)
        scenes = (ReasoningScenes(policy, st.scene_pool, st.scene_refresh, st.seed, self.progress,
                                  counterfactual=st.counterfactual_boards)
                  if st.reasoning_scenes else None)
        try:
            self._co_train(policy, start, ckpt, frames, pool, distil, scenes)
        finally:
            if scenes is not None:
                scenes.close()

    def _co_train(self, policy, start, ckpt, frames, pool, distil, scenes) -> None:
        """The co-training steps of :meth:`train_joint` on its data sources (``pool``, ``distil``, ``scenes``: None
        when off)."""
        from ..vlm.api import collate

        st = self.stage
        params, opt = self._optimizer(policy, ckpt)
        moe = MoEConfig.from_dict(policy.config.moe)
        n_gen = round(st.batch_size * st.image_text_share) if pool else 0
        n_rob = st.batch_size - n_gen
        # (frames,) bool: the frames whose reasoning carries the LM loss (none when fresh scenes carry it); None: every
        # frame
        lm_frame = (torch.zeros(len(frames), dtype=torch.bool) if scenes is not None
                    else None if st.lm_phases is None else torch.from_numpy(np.isin(frames.phase, st.lm_phases)))
        pad = policy.processor.tokenizer.pad_token_id
        policy.train()
        bar = self._bar(start)
        for step in bar:
            rng = np.random.default_rng([st.seed, step])
            rob_all = rng.choice(len(frames), n_rob, replace=False)
            gen_all = rng.choice(len(pool), n_gen) if n_gen else np.zeros(0, int)
            noise, timesteps = (shard(x, self.accelerator) for x in self._noise(policy, step, n_rob))
            rob, gen = shard(rob_all, self.accelerator), shard(gen_all, self.accelerator)
            seen = []  # fresh scenes: reasoning rows (robot data, LM loss only) after the frames
            if scenes is not None:
                block = scenes.pool(step // st.scene_refresh)
                seen = [block[j] for j in shard(rng.choice(len(block), st.reasoning_scenes, replace=False),
                                                self.accelerator)]
            items = [frames.item(i) for i in rob] + seen + [pool.items[j] for j in gen]
            batch = collate(items, pad)
            data_type = torch.tensor([ROBOT] * (len(rob) + len(seen)) + [IMAGE_TEXT] * len(gen))
            lm_rows = None if lm_frame is None else torch.cat([lm_frame[rob], torch.ones(len(seen) + len(gen),
                                                                                         dtype=torch.bool)])
            feats, lm = policy.features(batch, data_type, with_lm_loss=st.lm_loss, n_robot=len(rob), lm_rows=lm_rows)
            terms = {}
            if st.lm_loss:
                terms["lm"] = lm
            if st.diffusion_loss:
                terms["diffusion"] = policy.action_expert.compute_loss(
                    frames.actions[rob], feats.obs, frames.states[rob], feats.reasoning, noise=noise,
                    timesteps=timesteps)[0]
            if moe.variant != "dense" and moe.aux_loss_coef > 0:  # the routing of the co-training batch
                terms["aux"] = moe.aux_loss_coef * load_balancing_loss(policy.vlm)
            if distil is not None:
                pick = shard(rng.choice(len(distil), st.distil_rows, replace=False), self.accelerator)
                terms["distil"] = distillation_loss(policy, [distil.items[j] for j in pick], pad)
            self._update(policy, step, terms, params, opt, bar)

    def train_cached(self, policy: ChatVLA2Policy, start: int, ckpt) -> None:
        """The VLM is frozen: its per-frame summaries are computed once; only the action side trains."""
        from ..vlm.api import collate

        st = self.stage
        frames = RobotFrames(self.data, policy, self.progress)
        pad = policy.processor.tokenizer.pad_token_id
        policy.eval()
        cache = []
        with torch.no_grad():
            for i in tqdm(range(0, len(frames), 32), desc="caching VLM summaries", disable=not self.progress):
                idx = range(i, min(i + 32, len(frames)))
                cache += policy.vlm_summaries(collate([frames.item(j) for j in idx], pad)).rows()
        params, opt = self._optimizer(policy, ckpt)
        policy.train()
        bar = self._bar(start)
        for step in bar:
            rng = np.random.default_rng([st.seed, step])
            idx_all = rng.choice(len(frames), min(st.batch_size, len(frames)), replace=False)
            noise, timesteps = (shard(x, self.accelerator) for x in self._noise(policy, step, len(idx_all)))
            idx = shard(idx_all, self.accelerator)
            feats = policy.condition(Summaries.stack([cache[i] for i in idx]))
            terms = {"diffusion": policy.action_expert.compute_loss(
                frames.actions[idx], feats.obs, frames.states[idx], feats.reasoning, noise=noise,
                timesteps=timesteps)[0]}
            self._update(policy, step, terms, params, opt, bar)


def stages_of(path: str) -> list[dict]:
    """The stages that made the policy folder at ``path``, first to last (``policy_config.json``'s ``stages``: each
    stage's config with its ``init`` and ``data``); [] for a VLM folder. A folder written before stages were listed
    gives its last stage only (``stage``)."""
    from .policy import is_policy_folder

    if not is_policy_folder(path):
        return []
    with open(os.path.join(path, "policy_config.json")) as f:
        meta = json.load(f)
    return meta.get("stages") or ([meta["stage"]] if "stage" in meta else [])


def step_noise(stage: StageConfig, step: int) -> torch.Generator:
    """The diffusion noise and timesteps of training step ``step``: a generator seeded by (stage seed, step) alone,
    so a run resumed at any checkpoint draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(np.random.default_rng([stage.seed, step, 17]).integers(2**62)))


def run_recipe(name: str, init: str, data: str, out: str, policy_config: PolicyConfig | None = None,
               progress: bool = True, **overrides) -> ChatVLA2Policy:
    """Every stage of ``RECIPES[name]`` in turn: stage k writes ``out/<k>_<stage>``; the last is also
    copied to ``out/policy``. ``overrides`` (e.g. ``steps`` per stage name) are applied by stage name:
    ``{"action_finetuning": {"steps": 100}}``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {list(RECIPES)}")
    src, policy = init, None
    for k, stage in enumerate(RECIPES[name]):
        stage = dataclasses.replace(stage, **overrides.get(stage.name, {}))
        dst = os.path.join(out, f"{k + 1}_{stage.name}")
        policy = StageTrainer(stage, src, data, dst, policy_config, progress).run()
        src = dst
    final = os.path.join(out, "policy")
    save_policy(policy, final, extra={"recipe": name, "stages": stages_of(src)})
    copy_training_logs(out, final)
    return policy


def copy_training_logs(recipe_dir: str, policy_dir: str) -> None:
    """Put each trained stage's ``log.csv`` beside the final policy as ``training/<stage>.csv``."""
    import shutil

    os.makedirs(os.path.join(policy_dir, "training"), exist_ok=True)
    for run in sorted(d for d in os.listdir(recipe_dir) if d.endswith(".run")):
        log = os.path.join(recipe_dir, run, "log.csv")
        if os.path.isfile(log):
            stage = run[: -len(".run")].split("_", 1)[1]
            shutil.copy(log, os.path.join(policy_dir, "training", f"{stage}.csv"))


__all__ = ["PARTS", "RECIPES", "STAGES", "DistilPool", "GeneralPool", "RobotFrames", "StageConfig", "StageTrainer",
           "copy_training_logs", "format_parts", "part_of", "run_recipe", "set_trainable", "step_noise"]
