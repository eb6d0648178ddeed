"""What the ChatVLA-2 stages train on: in-domain robot frames (:class:`RobotFrames`), the general image–text
subset mixed into co-training (:class:`GeneralPool`), fresh first frames for the reasoning's LM loss
(:class:`ReasoningScenes`) and the questions of the other skills whose pretrained answers
co-training may be pulled towards (:class:`DistilPool`, :func:`distillation_loss`), all with their vision tokens
computed once by the frozen vision tower."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from .observation import CAMERA_ORDER
from .policy import IMAGE_TEXT, ROBOT, ChatVLA2Policy


class RobotFrames:
    """In-domain demonstration frames, tokenised once per episode, with cached vision tokens.

    ``item(i)`` is an :func:`~workbench.vlm.api.encode_example` dict (+ ``feats``) whose answer is the
    episode's reasoning; ``actions[i]`` (chunk, 4): commanded targets
    (:meth:`~workbench.dataset.DemonstrationDataset.target_chunk`, padded by holding the last), ``states[i]`` (4,).
    The frozen vision tower's tokens of every frame are saved under ``<root>/cache/`` (keyed by a hash of
    the vision weights), so later stages and reruns skip them."""

    def __init__(self, root: str, policy: ChatVLA2Policy, progress: bool = True, batch: int = 32):
        from ..dataset import DemonstrationDataset

        ds = DemonstrationDataset(root, chunk_size=policy.action_expert.config.chunk_size)
        splits = set(ds.hf["split"])
        if splits != {"in_domain"}:
            raise ValueError(f"robot training data must be in-domain only; {root} has splits {sorted(splits)}")
        self.episode = np.asarray(ds.hf["episode_index"])
        self.phase = np.asarray(ds.hf["phase"])  # the demonstration's phase at each frame ("reach", "grasp", ...)
        self.states = torch.tensor(np.asarray(ds.hf["observation.state"], np.float32))
        # the action expert predicts commanded targets
        self.actions = torch.tensor(np.stack([ds.target_chunk(i)[0] for i in range(len(ds))]))
        self.board, self.table = self._vision_tokens(ds, policy, root, progress, batch)
        self.encoded = {}
        for ep in np.unique(self.episode):
            row = ds.hf[int(np.argmax(self.episode == ep))]
            images = [row[f"observation.images.{c}"].convert("RGB") for c in CAMERA_ORDER]
            self.encoded[int(ep)] = policy.encode_reasoning(images, row["instruction"], row["reasoning"])
        longest = max(map(reasoning_tokens, self.encoded.values()))
        if longest > policy.config.max_reasoning_tokens:
            raise ValueError(f"{root}'s longest reasoning is {longest} tokens but the policy generates at most "
                             f"{policy.config.max_reasoning_tokens} (max_reasoning_tokens in its policy_config.json): "
                             "it would be cut short at run time; continue a policy built with a larger limit")

    @staticmethod
    def _vision_tokens(ds, policy, root, progress, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames, 72, H) board and (frames, 176, H) table tokens, float16, from the cache or computed."""
        import hashlib

        from safetensors.torch import load_file, save_file

        from ..vlm.api import vision_tokens

        visual, ip = policy.vlm.model.visual.eval(), policy.processor.image_processor
        digest = hashlib.sha1(b"".join(p.detach().float().numpy().tobytes() for p in visual.parameters()))
        path = os.path.join(root, "cache", f"vision-{digest.hexdigest()[:12]}-{len(ds)}.safetensors")
        if os.path.isfile(path):
            t = load_file(path)
            return t["board"], t["table"]
        out: dict[str, list] = {c: [] for c in CAMERA_ORDER}
        with torch.no_grad():
            for start in tqdm(range(0, len(ds), batch), desc="caching vision tokens", disable=not progress):
                rows = ds.hf[start:start + batch]
                n = len(rows["episode_index"])
                images = [rows[f"observation.images.{c}"][j].convert("RGB") for j in range(n) for c in CAMERA_ORDER]
                tokens, per_image = vision_tokens(visual, ip, images)
                split = tokens.half().split(per_image)
                for k, c in enumerate(CAMERA_ORDER):
                    out[c] += split[k::len(CAMERA_ORDER)]
        tensors = {c: torch.stack(v) for c, v in out.items()}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a killed run leaves no half-written cache
        return tensors["board"], tensors["table"]

    def __len__(self) -> int:
        return len(self.episode)

    def item(self, i: int) -> dict:
        return {**self.encoded[int(self.episode[i])], "feats": [self.board[i].float(), self.table[i].float()]}

    def __repr__(self) -> str:
        return f"RobotFrames(frames={len(self)}, episodes={len(self.encoded)})"


class ReasoningScenes:
    """Fresh in-domain first frames (both tasks in turn) with their reasoning, for the reasoning's LM loss in
    co-training: the demonstrations hold 100 scenes per task, whose reasoning texts the language side fits instead of
    learning to read a new scene (docs/chatvla2_experiments.md, "Fresh reasoning scenes"), so here
    each step's reasoning rows come from a pool of ``size`` scenes that is replaced by new ones every ``refresh``
    steps (``pool(block)``: block ``b`` serves steps ``[b * refresh, (b + 1) * refresh)``). A scene is
    :meth:`TabletopEnv.reset` under a seed of its own (drawn from ``seed`` and the block, above the evaluation's
    seeds) with a reasoning of the dataset's kind (:func:`~workbench.world.language.episode_reasoning`, its phrasing
    drawn from the block's stream); its vision tokens are computed once. Items are
    :func:`~workbench.vlm.api.encode_example` dicts (+ ``feats``). A scene whose reasoning is longer than the
    policy generates is replaced by the next one (``skipped`` counts them). ``counterfactual``: the share of math
    scenes given the reasoning of another task of the scene (``counterfactuals`` counts them; see
    :attr:`~workbench.vla.stages.StageConfig.counterfactual_boards`)."""

    def __init__(self, policy: ChatVLA2Policy, size: int, refresh: int, seed: int = 0, progress: bool = True,
                 counterfactual: float = 0.0):
        if counterfactual and not policy.config.board_first:
            raise ValueError("counterfactual boards need a board_first policy (built with --board-first): otherwise "
                             "the other equation would be a target, a misreading taught")
        self.policy, self.size, self.refresh, self.seed, self.progress = policy, size, refresh, seed, progress
        self.counterfactual = counterfactual
        self._block: tuple[int, list[dict]] | None = None
        self._envs: dict = {}
        self.skipped = self.counterfactuals = 0

    def pool(self, block: int) -> list[dict]:
        if self._block is None or self._block[0] != block:
            self._block = (block, self._render(block))
        return self._block[1]

    def _render(self, block: int) -> list[dict]:
        from ..world import language
        from ..world.catalog import TASKS
        from ..world.env import TabletopEnv

        rng = np.random.default_rng([self.seed, 23, block])
        items, attempt = [], 0
        bar = tqdm(total=self.size, desc=f"reasoning scenes (block {block})", disable=not self.progress)
        while len(items) < self.size:
            if attempt >= 2 * self.size:
                raise RuntimeError(f"{self.skipped} of {attempt} scenes had a reasoning longer than the policy's "
                                   f"max_reasoning_tokens ({self.policy.config.max_reasoning_tokens})")
            task = TASKS[attempt % len(TASKS)]
            attempt += 1
            if task not in self._envs:
                self._envs[task] = TabletopEnv(task, "in_domain", cameras=CAMERA_ORDER)
            images, info = fresh_scene(self._envs[task], rng)
            truth = info
            if self.counterfactual and task == "math_matching" and rng.random() < self.counterfactual:
                truth = self._envs[task].unwrapped.counterfactual_task(rng)[0]
                self.counterfactuals += 1
            item = self.policy.encode_reasoning(images, info["instruction"], language.episode_reasoning(truth, rng))
            if reasoning_tokens(item) > self.policy.config.max_reasoning_tokens:
                self.skipped += 1
                continue
            items.append({**item, "feats": frozen_vision_tokens(self.policy, images)})
            bar.update()
        bar.close()
        return items

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs = {}

    def __repr__(self) -> str:
        return (f"ReasoningScenes(size={self.size}, refresh={self.refresh}, skipped={self.skipped}, "
                f"counterfactuals={self.counterfactuals})")


def fresh_scene(env, rng: np.random.Generator) -> tuple[list, dict]:
    """A new scene of ``env`` (a :class:`~workbench.world.env.TabletopEnv` with the policy's cameras) under a seed drawn
    from ``rng`` in [2²⁰, 2³¹): far above the evaluation's seeds (10000…), so training never sees an evaluated scene.
    Returns the camera images in :data:`CAMERA_ORDER` and the scene's ``info``."""
    obs, info = env.reset(seed=int(rng.integers(2**20, 2**31 - 1)))
    return [obs[c] for c in CAMERA_ORDER], info


def frozen_vision_tokens(policy: ChatVLA2Policy, images) -> list[torch.Tensor]:
    """The frozen vision tower's merged tokens of each of ``images``, one (tokens, hidden) tensor per image (none for
    no image), computed without gradients."""
    from ..vlm.api import vision_tokens

    if not len(images):
        return []
    with torch.no_grad():
        tokens, per_image = vision_tokens(policy.vlm.model.visual.eval(), policy.processor.image_processor, images)
    return list(tokens.split(per_image))


def reasoning_tokens(item: dict) -> int:
    """The labelled tokens of an :func:`~workbench.vlm.api.encode_example` item: its reasoning + ``<|im_end|>``."""
    return int((item["labels"] != -100).sum())


class ImageTextPool:
    """Image–text samples of the given corpus ``kinds``, rendered once with the *training* generator (training fonts,
    training equations, training layouts) and their vision tokens cached: ``items`` are
    :func:`~workbench.vlm.api.encode_example` dicts (+ ``feats``)."""

    def __init__(self, size: int, policy: ChatVLA2Policy, kinds, seed: int, progress: bool = True,
                 desc: str = "image–text pool"):
        from ..vlm.api import encode_example
        from ..vlm.corpus import CorpusGenerator, CorpusRenderer

        self.kinds = tuple(kinds)
        self.samples = samples = CorpusGenerator("train", seed=seed).samples(size, kinds=self.kinds)
        renderer = CorpusRenderer()
        self.items = []
        for s in tqdm(samples, desc=desc, disable=not progress):
            images = renderer(s)  # none for text-only questions (arithmetic)
            item = encode_example(policy.processor, images, s.question, s.answer)
            self.items.append({**item, "feats": frozen_vision_tokens(policy, images)})
        renderer.close()

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(samples={len(self)}, kinds={self.kinds})"


class GeneralPool(ImageTextPool):
    """The general image–text subset mixed into co-training (no number reading, no arithmetic; its only digits are
    box coordinates: :data:`~workbench.vlm.corpus.GENERAL_KINDS`); trained with the LM loss on its answers."""

    def __init__(self, size: int, policy: ChatVLA2Policy, seed: int = 0, progress: bool = True):
        from ..vlm.corpus import GENERAL_KINDS, check_general

        super().__init__(size, policy, GENERAL_KINDS, seed + 7, progress)
        assert all(check_general(s) for s in self.samples)


class DistilPool(ImageTextPool):
    """Questions of every *other* knowledge skill (reading and solving boards, text arithmetic, cards and their
    positions and boxes: the corpus kinds outside :data:`~workbench.vlm.corpus.GENERAL_KINDS`), with the answer
    distributions of the model the stage starts from (``teacher``), for a self-distillation term: the student is
    pulled towards what the pretrained model said, not towards the corpus answers, so co-training teaches no new
    reading or arithmetic, it only slows forgetting.

    Only what the teacher *knew* is kept: an answer token counts when the teacher's most likely token there (teacher-
    forced on the corpus answer) is the corpus token (``items[i]["known"]``, a bool per answer token; the closing
    ``<|im_end|>`` never counts, since a teacher fed the answer always predicts it), and a question with no such
    token is dropped: matching the teacher where it was wrong would preserve its mistakes and its doubts.
    (This did not cure what the term costs text arithmetic: in 300-step runs it fell to 16–28% with every token,
    with known tokens and the closing token, and with known tokens only, against 72–76% without the term; leaving the
    closing token out made every measured row worse. docs/chatvla2_experiments.md has the figures.) ``candidates``
    questions are rendered and at most ``size`` kept; the ``repr`` counts them by kind.

    ``scenes``: a ``board_first`` policy's first turn in that many fresh in-domain math scenes
    (:func:`board_first_turns`: the robot's cameras and ``SOLVE_QUESTION``) join the questions, held the same way
    (``turns``: those kept, which ``items`` ends with). The other questions show the board alone; the policy asks
    about it with both cameras, a turn the robot data leaves untrained.

    ``items[i]["teacher"]``: (answer tokens, vocab) float32 log-probabilities at the positions whose next token is
    an answer token: a vocabulary-wide row per answer token, small with the tiny tokenizer's 690 tokens; a
    150k-token vocabulary would need top-k storage instead."""

    def __init__(self, size: int, policy: ChatVLA2Policy, teacher: ChatVLA2Policy, seed: int = 0,
                 progress: bool = True, batch: int = 16, candidates: int | None = None, scenes: int = 0):
        from ..vlm.corpus import GENERAL_KINDS, KINDS

        super().__init__(candidates or 2 * size, policy, [k for k in KINDS if k not in GENERAL_KINDS], seed + 11,
                         progress, desc="distillation pool")
        for it in self.items:
            it["data_type"] = IMAGE_TEXT
        self.candidates = len(self.items)
        self.items = self._with_teacher(teacher, self.items, policy, batch)
        keep = [j for j, it in enumerate(self.items) if it["known"].any()][:size]
        self.items, self.samples = [self.items[j] for j in keep], [self.samples[j] for j in keep]
        turns = self._with_teacher(teacher, board_first_turns(policy, scenes, seed, progress), policy, batch)
        self.candidates += len(turns)
        self.turns = [it for it in turns if it["known"].any()]  # after the questions in ``items``
        self.items += self.turns

    @staticmethod
    def _with_teacher(teacher: ChatVLA2Policy, items: list[dict], policy: ChatVLA2Policy, batch: int) -> list[dict]:
        """``items`` with the teacher's answer log-probabilities (``teacher``) and the tokens it knew (``known``)."""
        pad = policy.processor.tokenizer.pad_token_id
        end = policy.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")  # labelled too, and always "known"
        teacher.eval()
        with torch.no_grad():
            for i in range(0, len(items), batch):
                chunk = items[i:i + batch]
                for it, lp, tokens in zip(chunk, *_answer_log_probs(teacher, chunk, pad)):
                    it["teacher"], it["known"] = lp, known_tokens(lp, tokens, end)
        return items

    def __repr__(self) -> str:
        kept = dict(Counter(s.kind for s in self.samples))
        if self.turns:
            kept["board_first_turn"] = len(self.turns)
        return f"DistilPool(kept={len(self)} of {self.candidates} questions, by kind={kept})"


def board_first_turns(policy: ChatVLA2Policy, n: int, seed: int, progress: bool = True) -> list[dict]:
    """The first turn of a ``board_first`` policy in ``n`` fresh in-domain math scenes: the robot's cameras,
    :data:`~workbench.world.language.SOLVE_QUESTION` and the scene's solved equation (as
    :meth:`ChatVLA2Policy.conversation` cuts it from the scene's reasoning), as
    :func:`~workbench.vlm.api.encode_example` dicts (+ ``feats``, ``data_type`` = robot). The robot data never trains
    this turn (it is context), so co-training may drift from what the starting model answered there; these let
    :class:`DistilPool` hold it."""
    from ..vlm.api import encode_example
    from ..world import language
    from ..world.env import TabletopEnv

    if not n:
        return []
    if not policy.config.board_first:
        raise ValueError("board-first turns need a board_first policy (built with --board-first)")
    rng = np.random.default_rng([seed, 29])
    env, items = TabletopEnv("math_matching", "in_domain", cameras=CAMERA_ORDER), []
    try:
        for _ in tqdm(range(n), desc="board-first turns", disable=not progress):
            images, info = fresh_scene(env, rng)
            question, answer, _ = policy.conversation(info["instruction"], language.episode_reasoning(info, rng))
            item = encode_example(policy.processor, images, question, answer)
            items.append({**item, "feats": frozen_vision_tokens(policy, images), "data_type": ROBOT})
    finally:
        env.close()
    return items


def known_tokens(log_probs: torch.Tensor, tokens: torch.Tensor, end_token_id: int) -> torch.Tensor:
    """(answer tokens,) bool: where the most likely token of ``log_probs`` (answer tokens, vocab) is the answer's own
    token, never at the closing ``end_token_id``."""
    return (log_probs.argmax(-1) == tokens) & (tokens != end_token_id)


def _answer_log_probs(model: ChatVLA2Policy, items: list[dict], pad_token_id: int):
    from ..vlm.api import collate

    return model.answer_log_probs(collate(items, pad_token_id), torch.tensor([it["data_type"] for it in items]))


def distillation_loss(policy: ChatVLA2Policy, items: list[dict], pad_token_id: int) -> torch.Tensor:
    """KL(teacher || policy) at the answer tokens the teacher knew (:class:`DistilPool`), averaged per question,
    then over questions (a one-token arithmetic answer weighs as much as a long reading): 0 while the policy still
    answers as the teacher did."""
    per_question = [(it["teacher"].exp() * (it["teacher"] - lp)).sum(-1)[it["known"]].mean()
                    for it, lp in zip(items, _answer_log_probs(policy, items, pad_token_id)[0])]
    return torch.stack(per_question).mean()  # each question counts once, whatever the length of its answer
