"""Pretraining the tiny Qwen2-VL in phases, the way real VLMs are built (teach the vision side to see,
then teach the whole model to talk about what it sees) -- on samples that are *never repeated*.

1. **tokenizer** — a byte-level BPE trained on generated corpus text and the robot world's templates.
2. **see** — the vision tower and its merger learn, with a probe tied to the language model's token embeddings
   (:class:`ReadingHead`), to say for every merged image token what lies under it (a whiteboard character, a
   card digit, a toy, or background) -- in the language model's own terms: the token under a written ``7`` is
   pushed towards the embedding of the text token ``7``. Dense labels give each image 72-176 targets instead of
   one: a from-scratch ViT learns to read far faster this way than from the answer text alone.
3. **read** — the vision side is frozen (its features are computed without gradients: cheap) and the language
   model alone learns to read the board tokens in order, on whiteboard questions only (:data:`READ_WEIGHTS`)
   and many of them per step. Copying characters out of the image in reading order is the hard thing for the
   language side to learn, and mixed into every other kind of question it got too few examples to learn it:
   two runs of *answer* alone (500 and 1,000 steps, four board questions a step) read nothing.
4. **answer** — the whole model trains on questions of every kind (:data:`ANSWER_WEIGHTS`), the vision
   side at a lower learning rate and still under the dense loss (``dense_coef``), so it keeps seeing
   while the language model learns to read its tokens in context. Every step also gets a batch of
   text-only arithmetic facts (cheap: no image), so the fact table is seen many times.
5. **scenes** — the vision side is frozen again and the language model alone learns to talk about tables
   (:data:`SCENES_WEIGHTS`: toys, cards, grounding, placement; a few board questions so reading is kept), many
   questions per step -- *read* for scenes. Measured on the model after *answer* (24 held-out toy tables): the
   dense probe named the toy under 75-100% of each toy's image tokens, yet the model named the toys of 0 of 100
   held-out tables. The vision side sees the toys; the language side had not learned to read them (about 1,000
   questions per table skill in *answer*, against 58,000 board questions in *read*).

Every batch of every phase is drawn and rendered fresh (:class:`FreshBatches`: new equations, fonts
(:mod:`workbench.vlm.boards`), augmentations, layouts, arm poses) by a background worker process while the
model trains; nothing is cached, so nothing can be memorised (the first recipe's fixed 6,000-sample corpus
was: ``shared/DESIGN.md`` §4). In the phases whose vision side is frozen (*read*, *scenes*), ``scene_pool`` trades
some of that freshness for speed: questions (always new) are asked about a pool of scenes that is rendered, and whose
vision tokens are computed, once per ``scene_refresh`` steps (the tokens are what the frozen vision side would compute
anyway). Measured (issue 9 notes, session 8): *scenes* steps of 32 conversations took 2.35 s against 3.4 s fresh; on
whiteboards, whose questions repeat the same answer, the *read* loss rose about twofold after every refresh (the pool
was being memorised), so only tables are pooled (:data:`POOLED_KINDS`); boards are always new.
Batch ``i`` of a phase depends only on ``(seed, phase, i)``, so a resumed
run sees exactly the batches it would have seen.

A saved VLM can also continue with chosen phases (``init`` and ``phases``; e.g. *see* with the probe's *where* term,
``where_coef``, then *read* and *scenes*: docs/vlm_experiments.md, "Where the image tokens are"). ``keep_coef`` adds
to such a *see* a term that keeps the vision features near ``init``'s, so that the tokens learn where they are
without the language side losing what it reads. For boxes, two terms act where an answer writes one
(teacher-forced): ``bind_coef`` teaches head :data:`BIND_HEAD` of every layer after the first to look at the named
object's image tokens (:func:`binding_loss`, with the attention rows recomputed by :class:`HeadAttention`),
``locate_coef`` teaches the last layer's input to say that object's row and column (:func:`locate_loss`);
``scenes_weights`` asks more grounding questions in *scenes*, ``see_weights`` more boards in *see*.

Every phase checkpoints atomically to ``<work>/checkpoints`` every ``checkpoint_every`` steps and a
restarted run resumes from the newest checkpoint; ``<work>/log.csv`` logs losses and the held-out
knowledge rows (``eval_every``) against wall-clock time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import latest_checkpoint, load_checkpoint_state, save_checkpoint
from ..training import CsvLog, lr_at, optimizer_step, process_mean, refuse_changed_config
from .api import collate, encode_example, vision_tokens
from .corpus import (
    CARD_KINDS,
    TOKEN_CLASSES,
    TOY_KINDS,
    CorpusGenerator,
    CorpusRenderer,
    Sample,
    scene_family,
    token_grid,
)

#: relative frequency of each image question kind in an *answer* batch
ANSWER_WEIGHTS = {"ocr": 3, "solve": 3, "answer_card": 2, "cards": 2, "card_where": 1, "ground_card": 2,
                  "objects": 2, "colour": 1, "count": 1, "spatial": 2, "ground_toy": 2, "affordance": 2}
#: what a *see* batch shows: mostly whiteboards (the hard part), some tables
SEE_WEIGHTS = {"ocr": 4, "cards": 1, "objects": 1}
#: what a *read* batch asks: whiteboard questions only
READ_WEIGHTS = {"ocr": 1, "solve": 1}
#: what a *scenes* batch asks: table questions, and a few board questions so reading is kept
SCENES_WEIGHTS = {"ocr": 1, "solve": 1, "answer_card": 1, "cards": 2, "card_where": 1, "ground_card": 2,
                  "objects": 3, "colour": 2, "count": 2, "spatial": 2, "ground_toy": 2, "affordance": 2}
PHASES = ("see", "read", "answer", "scenes")
_WEIGHTS = {"see": SEE_WEIGHTS, "read": READ_WEIGHTS, "answer": ANSWER_WEIGHTS, "scenes": SCENES_WEIGHTS}
#: the kinds whose scenes ``scene_pool`` pools: tables only. Boards stay fresh: a board's questions all repeat its one
#: answer, and pooled boards were memorised (issue 9 notes, session 8); they are also cheap to render.
POOLED_KINDS = CARD_KINDS + TOY_KINDS
#: the kinds whose answer writes a box, and the fact naming the object the box is about (an affordance box is placed
#: relative to its target toy)
GROUNDED_KINDS = {"ground_card": "card", "ground_toy": "object", "affordance": "target"}
#: the head (of every layer after the first) that the binding term teaches to look at the named object
BIND_HEAD = 0
#: phases where the vision side trains (in the others after *see* it is frozen and computed without gradients)
VISION_TRAINS = ("see", "answer")


@dataclass
class PretrainConfig:
    """Sizes and schedule of a pretraining run (defaults: the recipe's; the shipped checkpoint adds eight
    continuations, listed in the README)."""

    preset: str = "tiny"
    vocab_size: int = 1024
    batch_size: int = 16  # answer phase: image questions per step
    see_batch_size: int = 32  # see phase: images per step
    see_steps: int = 700
    see_lr: float = 2e-3
    read_batch_size: int = 48  # read phase: board questions per step
    read_steps: int = 1200
    read_lr: float = 1.5e-3
    answer_steps: int = 700
    answer_lr: float = 1.5e-3
    scenes_batch_size: int = 48  # scenes phase: table (and a few board) questions per step
    scenes_steps: int = 400
    scenes_lr: float = 1e-3
    vision_lr_scale: float = 0.3  # answer phase: the vision side's learning rate, relative
    dense_coef: float = 0.3  # answer phase: weight of the see phase's dense loss (keeps the vision side seeing)
    where_coef: float = 0.0  # weight of the probe's *where* term (each token's row and column) in the dense loss
    # see phase of a continued VLM: weight of a term keeping the vision features near ``init``'s (their mean squared
    # change relative to init's mean squared feature), so that new terms (*where*) do not unlearn what it reads
    keep_coef: float = 0.0
    keep_on: str = "all"  # the images the *keep* term holds: "all", or "tables" (boards free to read better)
    # read/answer/scenes: weight of the *binding* term (:func:`binding_loss`): while an answer writes a box, head
    # :data:`BIND_HEAD` of every layer after the first is taught to look at the named object's image tokens
    bind_coef: float = 0.0
    # read/answer/scenes: weight of the *locate* term (:func:`locate_loss`): while an answer writes a box, the input of
    # the last decoder layer is taught to say (through a linear probe) the row and column of the named object
    locate_coef: float = 0.0
    # scenes: "kind=weight,..." overriding :data:`SCENES_WEIGHTS` entries (e.g. "ground_toy=6,ground_card=6")
    scenes_weights: str = ""
    # see: "kind=weight,..." overriding :data:`SEE_WEIGHTS` entries (e.g. "ocr=12": mostly boards, a few tables for
    # the *keep* term to hold; a table costs about 2.4 boards' tokens)
    see_weights: str = ""
    text_batch: int = 16  # read, answer and scenes phases: text-only arithmetic questions per step
    # share of training ``ocr`` boards showing a free equation (any numbers: :func:`.corpus.free_equation`)
    free_boards: float = 0.0
    # share of training board images shown as the image itself that have another width : height than 2 : 1
    # (:func:`.corpus.other_aspect`: 1 : 1 to 3 : 1), as a caller's square drawing or photo of a board
    other_shapes: float = 0.0
    # share of training board images shown as the image itself that are a photo of the board on a wall instead
    # (:func:`.boards.photograph`: perspective, mount, wall, uneven light), as a user's snapshot of a real board
    photos: float = 0.0
    same_table: float = 0.5  # chance that a table question reuses the previous item's table (one render, two items)
    turns: int = 1  # read/answer/scenes: up to this many questions about one scene in one conversation
    # scenes (vision frozen): table questions are asked about a pool of this many tables (boards are never pooled),
    # rendered once and their vision tokens computed once, replaced every ``scene_refresh`` steps (0: all new)
    scene_pool: int = 0
    scene_refresh: int = 100
    workers: int = 1  # background processes rendering batches (0: render in the training process)
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_per_skill: int = 8
    # see phase: held-out boards read by the dense probe (:func:`read_boards`) every ``eval_every`` steps and at its end
    eval_boards: int = 64
    seed: int = 0
    init: str = ""  # a saved VLM folder to continue from (its weights and processor) instead of a fresh model
    phases: str = ",".join(PHASES)  # the phases to run, comma-separated, in :data:`PHASES` order

    @property
    def phase_list(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.phases.split(","))

    def __post_init__(self):
        for name in ("vocab_size", "batch_size", "see_batch_size", "read_batch_size", "scenes_batch_size", "turns",
                     "scene_refresh", "checkpoint_every", "eval_every", "eval_per_skill"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("see_steps", "read_steps", "answer_steps", "scenes_steps", "text_batch", "workers",
                     "scene_pool", "eval_boards"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        for name in ("see_lr", "read_lr", "answer_lr", "scenes_lr"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("vision_lr_scale", "dense_coef", "same_table", "where_coef", "free_boards",
                     "other_shapes", "photos"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        chosen = self.phase_list
        if not chosen or any(p not in PHASES for p in chosen) or list(chosen) != sorted(set(chosen), key=PHASES.index):
            raise ValueError(f"phases must be distinct names from {list(PHASES)} in that order, comma-separated; "
                             f"got {self.phases!r}")
        if chosen[0] != "see" and not self.init:
            raise ValueError(f"phases {self.phases!r} skip 'see': they need init, a saved VLM to continue from")
        for name in ("keep_coef", "bind_coef", "locate_coef"):
            if not (isinstance(getattr(self, name), float | int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        self.phase_weights("see"), self.phase_weights("scenes")  # validate see_weights and scenes_weights
        if self.keep_on not in ("all", "tables"):
            raise ValueError(f"keep_on must be 'all' or 'tables', got {self.keep_on!r}")
        if self.keep_coef and not self.init:
            raise ValueError("keep_coef keeps the vision features near init's: it needs init, a saved VLM")
        if self.init and not os.path.isfile(os.path.join(self.init, "model.safetensors")):
            raise ValueError(f"init {self.init!r} is not a saved VLM folder (no model.safetensors)")

    def phase_weights(self, phase: str) -> dict[str, float]:
        """What a batch of ``phase`` asks: :data:`_WEIGHTS`, with ``see_weights`` applied to *see* and
        ``scenes_weights`` to *scenes*."""
        weights = dict(_WEIGHTS[phase])
        field = {"see": "see_weights", "scenes": "scenes_weights"}.get(phase)
        spec = getattr(self, field) if field else ""
        if not spec:
            return weights
        for part in spec.split(","):
            kind, _, value = part.partition("=")
            kind = kind.strip()
            try:
                weight = float(value)
            except ValueError:
                weight = -1.0
            if kind not in weights or weight < 0:
                raise ValueError(f"{field} must be 'kind=weight,...' with kinds from {list(_WEIGHTS[phase])} "
                                 f"and non-negative weights; got {spec!r}")
            weights[kind] = weight
        if not any(weights.values()):
            raise ValueError(f"{field} {spec!r} leave no kind to ask")
        return weights

    @classmethod
    def fast(cls, **kw) -> PretrainConfig:
        """A tiny run for tests and notebooks (seconds, not minutes)."""
        base = dict(vocab_size=400, batch_size=6, see_batch_size=6, read_batch_size=4, scenes_batch_size=4,
                    see_steps=4, read_steps=2, answer_steps=4, scenes_steps=2, text_batch=4,
                    checkpoint_every=2,
                    eval_every=1000, eval_per_skill=1, eval_boards=4, workers=0)
        return cls(**{**base, **kw})


def _qa(sample: Sample) -> tuple[str, str]:
    return sample.question, sample.answer


def bound_class(sample: Sample) -> int:
    """The :data:`TOKEN_CLASSES` index of the object a grounded answer's box is about (:data:`GROUNDED_KINDS`)."""
    return TOKEN_CLASSES.index(str(sample.facts[GROUNDED_KINDS[sample.kind]]))


class HeadAttention:
    """Rows of head :data:`BIND_HEAD`'s attention weights in every decoder layer after the first, recomputed (with
    gradients) from what each layer's attention was given during a forward pass inside ``with``: any attention
    kernel can run the pass. Asking the eager kernel for every weight instead made *scenes* steps 4x slower
    (measured once, by a throwaway script: 4.7 s against 1.2 s for the language model's forward and backward at
    batch 32; 1.3 s with this tap).

    ``rows(layer, b, start, end)``: (end - start, L) weights of queries ``start..end-1`` of batch row ``b`` over
    the keys (causal: zero after the query), ``layer`` counting from 0 over the tapped layers."""

    def __init__(self, model):
        self.attention = [layer.self_attn for layer in model.model.language_model.layers[1:]]
        self.seen: list[tuple] = []
        self._hooks = []

    def __enter__(self):
        self.seen = []
        self._hooks = [a.register_forward_pre_hook(self._keep, with_kwargs=True) for a in self.attention]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()

    def _keep(self, module, args, kwargs):
        self.seen.append((module, kwargs.get("hidden_states", args[0] if args else None),
                          kwargs["position_embeddings"]))

    def rows(self, layer: int, b: int, start: int, end: int) -> torch.Tensor:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

        attn, hidden, (cos, sin) = self.seen[layer]
        d = attn.head_dim
        kv = BIND_HEAD // attn.num_key_value_groups
        q = attn.q_proj(hidden[b, start:end])[:, BIND_HEAD * d:(BIND_HEAD + 1) * d]
        k = attn.k_proj(hidden[b, :end])[:, kv * d:(kv + 1) * d]
        q = q * cos[b, start:end] + rotate_half(q) * sin[b, start:end]  # the layer's rotary embedding (M-RoPE)
        k = k * cos[b, :end] + rotate_half(k) * sin[b, :end]
        scores = (q @ k.T) * attn.scaling
        causal = torch.arange(end)[None] > torch.arange(start, end)[:, None]
        return scores.masked_fill(causal, float("-inf")).softmax(-1)


def grounded_boxes(input_ids: torch.Tensor, items: list[dict], box_start: int, box_end: int, image_token: int):
    """Every box the answers of a collated batch write, on an object whose image tokens are labelled: yields
    ``(b, start, end, keys, (row, col))``: batch row, the positions ``start..end-1`` from ``<|box_start|>`` to the
    last coordinate, the positions of the named object's image tokens and the middle of them in the image's
    merged-token grid (``item["bind"]``: its class per box, in order;
    ``item["token_maps"]``: the image's token labels). Items with other than one image are skipped."""
    for b, item in enumerate(items):
        classes = item.get("bind") or []
        if not classes or len(item["token_maps"]) != 1:
            continue
        ids = input_ids[b]
        starts, ends = (ids == box_start).nonzero().ravel(), (ids == box_end).nonzero().ravel()
        if not len(starts) == len(ends) == len(classes):
            raise ValueError(f"item {b}: {len(classes)} grounded answers but {len(starts)} boxes in its tokens")
        tokens = (ids == image_token).nonzero().ravel()
        grid = np.asarray(item["token_maps"][0])
        labels = torch.as_tensor(grid.ravel())
        if len(labels) != len(tokens):
            raise ValueError(f"item {b}: {len(labels)} token labels for {len(tokens)} image tokens")
        for cls, start, end in zip(classes, starts.tolist(), ends.tolist()):
            keys = tokens[labels == cls]
            if len(keys):  # else the object lies between token centres
                rows, cols = np.nonzero(grid == cls)
                yield b, start, end, keys, (int(np.median(rows)), int(np.median(cols)))


def binding_loss(rows, boxes, layers: int) -> torch.Tensor | None:
    """Teaches the model to *look at* what it locates. For every box an answer writes (teacher-forced), at each
    position from ``<|box_start|>`` to the last coordinate: minus the log of the attention that head
    :data:`BIND_HEAD` of each tapped layer gives the image tokens of the named object. Mean over boxes, positions
    and layers; None if there is no box.

    ``rows``: :meth:`HeadAttention.rows` (or any ``(layer, b, start, end) -> (end - start, keys)`` weights) over
    ``layers`` layers; ``boxes``: :func:`grounded_boxes`. Why: before this term the model's table tokens knew where
    they were (a linear probe read their row 93% of the time) but its boxes were no better than always writing the
    mean box, and no head looked at the named object much more than at the others: the coordinates' loss alone did
    not find the route (docs/vlm_experiments.md, "Binding a box to the named object")."""
    losses = [-torch.log(rows(layer, b, start, end)[:, keys].sum(-1) + 1e-6).mean()
              for b, start, end, keys, _ in boxes for layer in range(layers)]
    return torch.stack(losses).mean() if losses else None


def locate_loss(probe: torch.nn.Module, hidden: torch.Tensor, boxes) -> torch.Tensor | None:
    """Teaches the model to carry *where* the object it looks at is. At each position that writes a box: the
    cross-entropy of the named object's token row, plus that of its column (the middle of its labelled tokens in
    the merged-token grid), predicted by ``probe`` (a linear map to :attr:`ReadingHead.MAX_GRID` row then column
    logits) from ``hidden`` (batch, L, D), the input of the last decoder layer: the coordinates are then one layer
    and the output head away. ``boxes``: :func:`grounded_boxes`. None if there is no box."""
    n = ReadingHead.MAX_GRID
    losses = []
    for b, start, end, _, (row, col) in boxes:
        logits = probe(hidden[b, start:end])
        target = torch.full((end - start,), row), torch.full((end - start,), col)
        losses.append(F.cross_entropy(logits[:, :n], target[0]) + F.cross_entropy(logits[:, n:], target[1]))
    return torch.stack(losses).mean() if losses else None


# ------------------------------------------------------------------------------------------- data
class FreshBatches(torch.utils.data.IterableDataset):
    """Batches ``start, start + 1, ...`` of a phase, each drawn and rendered fresh: a list of
    ``{"sample", "images", "token_maps"}``; in the *read* and *answer* phases each item also carries its tokenized
    form and the batch ends with ``text_batch`` text-only arithmetic items (no images).

    Batch ``i`` depends only on ``(seed, phase, i)``: a resumed run sees the batches it would have seen.
    ``shard=(rank, processes)``: every process draws the whole batch's samples (cheap) but renders and returns only
    its share, items ``rank, rank + processes, ...`` (:func:`~workbench.training.shard`).

    With ``cfg.scene_pool`` (phases whose vision side is frozen), a question's first scene is drawn from the pool of
    batch ``i``'s block (``i // cfg.scene_refresh``): ``scene_pool`` tables (:data:`POOLED_KINDS`) drawn from the
    block's seed, each rendered once (kept while the block lasts); the item says which (``"scene": (block, index)``),
    so the trainer computes its vision tokens once too. The questions are new every time. (Two-image ``answer_card``
    questions, and a first question that does not suit its pooled scene, get a new scene as without a pool.)"""

    def __init__(self, phase: str, cfg: PretrainConfig, processor=None, start: int = 0, stop: int | None = None,
                 shard: tuple[int, int] = (0, 1)):
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {list(PHASES)}")
        self.phase, self.cfg, self.processor, self.start, self.shard = phase, cfg, processor, start, shard
        self.stop = stop if stop is not None else getattr(cfg, f"{phase}_steps")
        self.pooled = bool(cfg.scene_pool) and phase not in VISION_TRAINS
        self.weights = cfg.phase_weights(phase)
        self._renderer = None
        self._pool: tuple[int, list[Sample], dict] | None = None  # (block, scenes, renders kept for the block)

    def scenes(self, block: int) -> list[Sample]:
        """The pooled scenes of ``block`` (a sample each, of kinds drawn with the phase's weights)."""
        if self._pool is None or self._pool[0] != block:
            weights = {k: w for k, w in self.weights.items() if k in POOLED_KINDS and w > 0}
            kinds, p = list(weights), np.array(list(weights.values()), float)
            rng = np.random.default_rng([self.cfg.seed, PHASES.index(self.phase), block, 1])
            gen = CorpusGenerator("train", seed=int(rng.integers(2**31)))
            self._pool = (block, [gen.sample(str(k)) for k in rng.choice(kinds, self.cfg.scene_pool, p=p / p.sum())],
                          {})
        return self._pool[1]

    def _pooled_conversation(self, gen, rng, kind: str, block: int):
        """A conversation about a pooled scene of ``block`` that suits ``kind``, and its key (None: a new scene)."""
        scenes = self.scenes(block)
        fits = [j for j, s in enumerate(scenes) if kind in scene_family(s.kind)]
        if not fits:
            return gen.conversation(kind, self.cfg.turns, self.weights), None
        j = fits[rng.integers(len(fits))]
        conv = gen.conversation(kind, self.cfg.turns, self.weights, about=scenes[j])
        first = conv[0]
        same = first.table is scenes[j].table and first.board is scenes[j].board
        return conv, ((block, j) if same else None)

    def _render(self, sample: Sample, key):
        if key is None:
            return self._renderer(sample, labels=True)
        kept = self._pool[2]
        if key[1] not in kept:
            kept[key[1]] = self._renderer(sample, labels=True)
        return kept[key[1]]

    def batch(self, i: int) -> list[dict]:
        cfg = self.cfg
        if self._renderer is None:
            self._renderer = CorpusRenderer()
        rng = np.random.default_rng([cfg.seed, PHASES.index(self.phase), i])
        gen = CorpusGenerator("train", seed=int(rng.integers(2**31)), free_boards=cfg.free_boards,
                              other_shapes=cfg.other_shapes, photos=cfg.photos)
        weights = self.weights
        kinds = list(weights)
        p = np.array([weights[k] for k in kinds], float)
        items = []
        n = cfg.batch_size if self.phase == "answer" else getattr(cfg, f"{self.phase}_batch_size")
        talk = self.phase != "see"
        rank, processes = self.shard
        for idx, k in enumerate(rng.choice(kinds, n, p=p / p.sum())):
            key = None
            if self.pooled and k in POOLED_KINDS:
                conv, key = self._pooled_conversation(gen, rng, str(k), i // cfg.scene_refresh)
            else:
                same = bool(rng.random() < cfg.same_table)
                conv = gen.conversation(str(k), cfg.turns, weights, same) if talk else [gen.sample(str(k), same)]
            if idx % processes != rank:
                continue
            s = conv[0]
            images, labels = self._render(s, key)
            item = {"sample": s, "images": images, "token_maps": labels, "scene": key}
            if talk:
                item.update(encode_example(self.processor, images, *_qa(s), follow_ups=[_qa(f) for f in conv[1:]]))
                item["bind"] = [bound_class(t) for t in conv if t.kind in GROUNDED_KINDS]
            items.append(item)
        if talk:
            for idx in range(cfg.text_batch):
                s = gen.sample("arithmetic")
                if idx % processes != rank:
                    continue
                items.append({"sample": s, "images": [], "token_maps": [],
                              **encode_example(self.processor, [], *_qa(s))})
        return items

    def __iter__(self):
        for i in range(self.start, self.stop):
            yield self.batch(i)


def _loader(dataset: FreshBatches, workers: int):
    if workers == 0:
        return iter(dataset)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4,
                                            persistent_workers=False, worker_init_fn=render_worker_init))


def render_worker_init(_):
    torch.set_num_threads(1)  # the worker renders (numpy / PIL / PyBullet); the cores belong to training


# ------------------------------------------------------------------------------------------- the probe
class ReadingHead(torch.nn.Module):
    """The dense probe of the *see* phase, tied to the language model's own token embeddings.

    Each merged image token gets a score per :data:`TOKEN_CLASSES` class: the cosine between its feature and the
    class vector, times a learned scale. The class vector of a whiteboard character that is one token of the
    tokenizer (digits, operators) *is* that token's input embedding; background and toys have vectors of their own.
    So the vision side learns to put the token under a written ``7`` where the language model keeps ``7``: the
    language model can then read the board by copying, instead of learning a second alphabet (the first recipe,
    with an untied probe, left the language side to learn the mapping from scratch and read almost nothing).
    """

    def __init__(self, tokenizer, dim: int):
        super().__init__()
        ids = []
        for cls in TOKEN_CLASSES:
            # as answers write it: digits alone, operators after a space (" +", " ×": one token each)
            spelled = cls if cls.isdigit() else " " + cls
            enc = tokenizer.encode(spelled, add_special_tokens=False) if len(cls) == 1 else []
            ids.append(enc[0] if len(enc) == 1 else -1)
        self.register_buffer("token_ids", torch.tensor(ids))
        self.free = torch.nn.Parameter(torch.randn(len(TOKEN_CLASSES), dim) * 0.02)
        self.scale = torch.nn.Parameter(torch.tensor(10.0))
        self.where = torch.nn.Linear(dim, 2 * self.MAX_GRID)  # row logits, then column logits
        # the *locate* term's probe (:func:`locate_loss`), on the language model's hidden states (merged image tokens
        # are the language model's width)
        self.locate = torch.nn.Linear(dim, 2 * self.MAX_GRID)

    #: the largest merged-token grid side the *where* term labels (the table camera's is 11 x 16)
    MAX_GRID = 32

    def forward(self, feats: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) merged image tokens, (V, D) the LM's input embeddings -> (N, classes) logits."""
        tied = self.token_ids >= 0
        vectors = torch.where(tied[:, None], embeddings[self.token_ids.clamp(min=0)], self.free)
        return self.scale * F.normalize(feats, dim=-1) @ F.normalize(vectors, dim=-1).T

    def where_loss(self, feats: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Cross-entropy of each token's row plus that of its column, from its feature alone: (N, D) merged image
        tokens in row-major order, ``grids`` the (rows, cols) of each image. Qwen2-VL's vision tower has no absolute
        position embedding and the language model's M-RoPE gives image columns only its lowest frequencies
        (``tiny``: at most 0.003 rad per column); without this term the tokens of the recipe's model hardly say
        where they are (docs/vlm_experiments.md, "Where the image tokens are"). Off by default
        (``where_coef=0``): the recipe does not use it; the shipped model's second continuation does (with
        ``keep_coef``)."""
        if any(max(g) > self.MAX_GRID for g in grids):
            raise ValueError(f"image token grids {grids} exceed {self.MAX_GRID} tokens a side")
        rows, cols = (torch.from_numpy(np.concatenate(axis)).to(feats.device)
                      for axis in zip(*(token_grid(h, w) for h, w in grids)))
        logits = self.where(feats)
        return F.cross_entropy(logits[:, :self.MAX_GRID], rows) + F.cross_entropy(logits[:, self.MAX_GRID:], cols)


def reading_loss(logits: torch.Tensor, maps: list[np.ndarray]) -> torch.Tensor:
    """The dense probe's cross-entropy of *what* lies under each merged token: (N, classes) logits of
    :class:`ReadingHead`, ``maps`` the images' token label maps (:class:`~workbench.vlm.corpus.CorpusRenderer`, N
    tokens in all, row-major); background, most tokens, weighs 0.2."""
    labels = torch.from_numpy(np.concatenate([lab.ravel() for lab in maps])).to(logits.device)
    weight = torch.ones(len(TOKEN_CLASSES), device=logits.device)
    weight[0] = 0.2
    return F.cross_entropy(logits, labels, weight=weight)


def read_boards(visual, head, embeddings, image_processor, boards: list[tuple], batch: int = 32) -> dict:
    """Read ``boards`` ([(image, labels, owners, text)], as :func:`held_out_boards` makes) with the probe: token
    accuracy (non-background tokens), character accuracy (majority vote per character) and board accuracy."""
    tok_right = tok_n = char_right = char_n = board_right = 0
    with torch.no_grad():
        for start in range(0, len(boards), batch):
            chunk = boards[start:start + batch]
            feats, per_image = vision_tokens(visual, image_processor, [b[0] for b in chunk])
            pred = head(feats, embeddings).argmax(-1).split(per_image)
            for (_, labels, owners, text), p in zip(chunk, pred):
                p, labels, owners = p.numpy(), labels.ravel(), owners.ravel()
                fg = labels > 0
                tok_right, tok_n = tok_right + int((p[fg] == labels[fg]).sum()), tok_n + int(fg.sum())
                chars = text.replace(" ", "")
                right = 0
                for i, ch in enumerate(chars):
                    votes = p[owners == i]
                    right += bool(len(votes)) and TOKEN_CLASSES[np.bincount(votes).argmax()] == ch
                char_right, char_n = char_right + right, char_n + len(chars)
                board_right += right == len(chars)
    return {"token_accuracy": tok_right / max(1, tok_n), "char_accuracy": char_right / max(1, char_n),
            "board_accuracy": board_right / len(boards), "boards": len(boards)}


def held_out_boards(n: int, board_scale: int = 1, seed: int = 1234) -> list[tuple]:
    """``n`` held-out whiteboards (font families and equations never in training): (image, labels, owners, text)."""
    gen, renderer = CorpusGenerator("heldout", seed=seed), CorpusRenderer(board_scale)
    out = []
    for _ in range(n):
        s = gen.sample("ocr")
        images, labels, owners = renderer(s, labels=True, owners=True)
        out.append((images[0], labels[0], owners[0], s.board["text"]))
    renderer.close()
    return out


# ------------------------------------------------------------------------------------------- training
def fresh_vlm(preset: str = "tiny", vocab_size: int = 1024, seed: int = 0, verbose: bool = True):
    """A freshly initialised model of ``preset`` and its processor (a tokenizer trained on the project's texts)."""
    from .modeling import build_model
    from .processing import build_processor, tokenizer_texts

    processor = build_processor(tokenizer_texts(3000, seed=seed), vocab_size)
    return build_model(processor.tokenizer, preset, seed=seed, verbose=verbose), processor


class Pretrainer:
    """Runs (or resumes) the phases of :mod:`workbench.vlm.pretrain` in ``work_dir``."""

    def __init__(self, config: PretrainConfig, work_dir: str, progress: bool = True):
        from accelerate import Accelerator

        self.cfg, self.work, self.progress = config, work_dir, progress
        os.makedirs(work_dir, exist_ok=True)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        main = self.accelerator.is_main_process
        self.log = CsvLog(os.path.join(work_dir, "log.csv"), ["phase", "step", "loss", "lr", "metric", "value"],
                          enabled=main)
        if main:
            refuse_changed_config(os.path.join(work_dir, "config.json"), dataclasses.asdict(config), "pretraining run")
        self.accelerator.wait_for_everyone()

    # -- pieces --------------------------------------------------------------------------------
    def fresh_model(self):
        return fresh_vlm(self.cfg.preset, self.cfg.vocab_size, self.cfg.seed, verbose=self.progress)

    def _checkpoint(self, phase, step, model, processor, optimizer, head):
        from .api import save_vlm

        if self.accelerator.is_main_process:
            extra = {f"head.{k}": v for k, v in head.state_dict().items()}
            save_checkpoint(self.work, self._global_step(phase, step),
                            lambda d: save_vlm(model, processor, d + "/vlm"), optimizer,
                            {"phase": phase, "phase_step": step}, extra)
        self.accelerator.wait_for_everyone()

    def _global_step(self, phase, step):
        chosen = self.cfg.phase_list
        before = chosen[:chosen.index(phase)]
        return sum(getattr(self.cfg, f"{p}_steps") for p in before) + step

    def _bar(self, phase, start, total):
        return tqdm(range(start, total), desc=phase, initial=start, total=total,
                    disable=not (self.progress and self.accelerator.is_main_process))

    def _batches(self, phase, processor=None, start=0):
        acc = self.accelerator
        return _loader(FreshBatches(phase, self.cfg, processor, start=start,
                                    shard=(acc.process_index, acc.num_processes)), self.cfg.workers)

    # -- phases --------------------------------------------------------------------------------
    def run(self):
        """All phases, resuming from the newest checkpoint if there is one. Returns (model, processor)."""
        from .api import load_vlm

        torch.manual_seed(self.cfg.seed)
        ckpt = latest_checkpoint(self.work)
        state, extra = ({}, {}) if ckpt is None else load_checkpoint_state(ckpt)
        chosen = self.cfg.phase_list
        if ckpt is None:
            model, processor = load_vlm(self.cfg.init) if self.cfg.init else self.fresh_model()
        else:
            model, processor = load_vlm(os.path.join(ckpt, "vlm"))
            if self.progress:
                print(f"resuming from {ckpt} ({state['phase']} step {state['phase_step']})")
        head = ReadingHead(processor.tokenizer, model.config.vision_config.hidden_size)
        if extra:  # a checkpoint written before the *locate* probe existed has none: it starts fresh
            missing, _ = head.load_state_dict({k[len("head."):]: v for k, v in extra.items()}, strict=False)
            if any(not k.startswith("locate.") for k in missing):
                raise ValueError(f"checkpoint {ckpt} lacks the probe's {missing}: not a pretraining checkpoint?")
        phase, done = state.get("phase", chosen[0]), state.get("phase_step", 0)
        # steps logged after the checkpoint are redone: drop them so that no step is logged twice
        order = {p: i for i, p in enumerate(PHASES)}
        at = self._global_step(phase, done)
        self.log.rewind(lambda row: int(row["step"]) <= at if row["phase"] == "eval"  # eval rows: global steps
                        else (order[row["phase"]], int(row["step"])) <= (order[phase], done))
        for p in chosen[chosen.index(phase):]:
            if p == "see":
                self.see(model, processor, head, start=done, ckpt=ckpt)
            else:
                self.talk(p, model, processor, head, start=done, ckpt=ckpt)
            done, ckpt = 0, None
        return model, processor

    def _dense_loss(self, model, head, feats, items) -> torch.Tensor:
        """The probe's loss on every merged image token: cross-entropy of *what* lies under it (background
        down-weighted) plus ``where_coef`` times that of *where* it is (:meth:`ReadingHead.where_loss`)."""
        maps = [lab for it in items for lab in it["token_maps"]]
        what = reading_loss(head(feats, model.get_input_embeddings().weight), maps)
        if not self.cfg.where_coef:
            return what
        return what + self.cfg.where_coef * head.where_loss(feats, [lab.shape for lab in maps])

    def _init_vision(self):
        """``init``'s vision side, frozen (the *keep* term's reference); None when the term is off."""
        from .api import load_vlm

        if not self.cfg.keep_coef:
            return None
        reference = load_vlm(self.cfg.init)[0].model.visual.eval()
        return reference.requires_grad_(False)

    def see(self, model, processor, head, start=0, ckpt=None):
        cfg = self.cfg
        visual = model.model.visual
        reference = self._init_vision()
        params = list(visual.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.see_lr, weight_decay=0.01)
        if ckpt is not None:
            load_checkpoint_state(ckpt, opt)
        boards = held_out_boards(cfg.eval_boards) if cfg.eval_boards and self.accelerator.is_main_process else []
        visual.train()
        bar = self._bar("see", start, cfg.see_steps)
        batches = self._batches("see", start=start)
        for step in bar:
            items = next(batches)
            images = [im for it in items for im in it["images"]]
            feats, per_image = vision_tokens(visual, processor.image_processor, images)
            loss = self._dense_loss(model, head, feats, items)
            if reference is not None:
                loss = loss + cfg.keep_coef * self._keep_loss(reference, processor, items, feats, per_image)
            lr = lr_at(step, cfg.see_steps, cfg.see_lr)
            optimizer_step(self.accelerator, loss, opt, params, lr)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            self.log(phase="see", step=step + 1, loss=round(process_mean(self.accelerator, loss), 5), lr=lr)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.see_steps:
                self._checkpoint("see", step + 1, model, processor, opt, head)
            if boards and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.see_steps):
                visual.eval()
                read = read_boards(visual, head, model.get_input_embeddings().weight, processor.image_processor,
                                   boards)
                for name in ("token", "char", "board"):
                    self.log(phase="eval", step=self._global_step("see", step + 1), metric=f"see_{name}_reading",
                             value=round(read[f"{name}_accuracy"], 4))
                visual.train()

    def _keep_loss(self, reference, processor, items, feats, per_image) -> torch.Tensor:
        """The *keep* term: the mean squared change of the held images' features from ``reference``'s (init's),
        relative to their mean squared reference feature; ``keep_on="tables"`` holds only the table images."""
        held = [self.cfg.keep_on == "all" or view == "table" for it in items for view in it["sample"].views]
        if not any(held):
            return feats.new_zeros(())
        images = [im for it in items for im in it["images"]]
        with torch.no_grad():
            ref, _ = vision_tokens(reference, processor.image_processor, [im for im, h in zip(images, held) if h])
        mine = torch.cat([f for f, h in zip(feats.split(per_image), held) if h])
        return F.mse_loss(mine, ref) / ref.pow(2).mean()

    def talk(self, phase, model, processor, head, start=0, ckpt=None):
        """A phase after *see*: the language model learns to answer (the vision side too, in :data:`VISION_TRAINS`)."""
        cfg = self.cfg
        steps, peak = getattr(cfg, f"{phase}_steps"), getattr(cfg, f"{phase}_lr")
        train_vision = phase in VISION_TRAINS
        visual = model.model.visual
        locate = list(head.locate.parameters())  # trains with the language model
        vision_params = list(visual.parameters()) + [p for p in head.parameters() if all(p is not q for q in locate)]
        ids = {id(p) for p in vision_params}
        lm_params = [p for p in model.parameters() if id(p) not in ids] + (locate if cfg.locate_coef else [])
        groups = [{"params": lm_params}]
        if train_vision:
            groups.append({"params": vision_params, "lr_scale": cfg.vision_lr_scale})
        params = [p for g in groups for p in g["params"]]
        opt = torch.optim.AdamW(groups, lr=peak, weight_decay=0.01)
        if ckpt is not None:
            load_checkpoint_state(ckpt, opt)
        pad = processor.tokenizer.pad_token_id
        marks = (*processor.tokenizer.convert_tokens_to_ids(["<|box_start|>", "<|box_end|>"]),
                 model.config.image_token_id)
        tap = HeadAttention(model) if cfg.bind_coef or cfg.locate_coef else contextlib.nullcontext()
        model.train()
        bar = self._bar(phase, start, steps)
        batches = self._batches(phase, processor, start)
        # the current pool's scenes' vision tokens (the vision side is frozen where a pool is used)
        kept: dict[tuple[int, int], list[torch.Tensor]] = {}
        kept_block = None
        for step in bar:
            items = next(batches)
            with_images = [it for it in items if it["images"]]
            text_only = [it for it in items if not it["images"]]
            new, keys = [], set()  # the items whose images need the vision side (a pooled scene: once)
            for it in with_images:
                key = it.get("scene")
                if key is not None:  # (block, index); a worker's DataLoader hands it over as a list
                    key = it["scene"] = tuple(int(v) for v in key)
                    if key[0] != kept_block:  # a new pool: forget the old one's tokens
                        kept, kept_block = {}, key[0]
                if key is None or (key not in kept and key not in keys):
                    new.append(it)
                    keys.add(key)
            feats, per_image = None, []
            if new:
                with torch.set_grad_enabled(train_vision):
                    feats, per_image = vision_tokens(visual, processor.image_processor,
                                                     [im for it in new for im in it["images"]])
            per_item = iter(feats.split(per_image) if new else ())
            for it in new:
                it["feats"] = [next(per_item) for _ in it["images"]]
                if it.get("scene") is not None:
                    kept[it["scene"]] = it["feats"]
            for it in with_images:
                it.setdefault("feats", kept.get(it.get("scene")))
            batch = collate(with_images, pad)
            with tap:
                lm_loss = model(**batch).loss
            if text_only:  # short sequences: their own forward, so they are not padded to image length;
                # the two means are combined per answer token, as one batch would be
                n_img, n_txt = (sum(int((it["labels"] != -100).sum()) for it in part)
                                for part in (with_images, text_only))
                text_loss = model(**collate(text_only, pad)).loss
                lm_loss = (lm_loss * n_img + text_loss * n_txt) / (n_img + n_txt)
            loss, terms = lm_loss, {}
            if train_vision:
                terms["dense"] = self._dense_loss(model, head, feats, with_images)
            if cfg.bind_coef or cfg.locate_coef:
                boxes = list(grounded_boxes(batch["input_ids"], with_images, *marks))
                if cfg.bind_coef:
                    terms["bind"] = binding_loss(tap.rows, boxes, len(tap.attention))
                if cfg.locate_coef:
                    terms["locate"] = locate_loss(head.locate, tap.seen[-1][1], boxes)
            terms = {k: v for k, v in terms.items() if v is not None}
            for name, term in terms.items():
                loss = loss + getattr(cfg, f"{name}_coef") * term
            lr = lr_at(step, steps, peak)
            optimizer_step(self.accelerator, loss, opt, params, lr)
            # the log has one metric column: the last of the dense, bind and locate terms that is on
            metric = list(terms.items())[-1] if terms else None
            bar.set_postfix(lm=f"{lm_loss.item():.3f}", **{k: f"{v.item():.3f}" for k, v in terms.items()})
            self.log(phase=phase, step=step + 1, loss=round(process_mean(self.accelerator, lm_loss), 5), lr=lr,
                     **({} if metric is None else
                        {"metric": metric[0], "value": round(process_mean(self.accelerator, metric[1]), 5)}))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                self._checkpoint(phase, step + 1, model, processor, opt, head)
            if (step + 1) % cfg.eval_every == 0:
                self.evaluate(model, processor, self._global_step(phase, step + 1))
                model.train()

    def evaluate(self, model, processor, step: int) -> dict | None:
        """The held-out knowledge rows (``eval_per_skill`` each), logged; on the main process only (None elsewhere)."""
        from ..evaluation.knowledge import evaluate_knowledge

        result = None
        if self.accelerator.is_main_process:
            result = evaluate_knowledge(model, processor, self.cfg.eval_per_skill, progress=False)
            for r in result["rows"]:
                self.log(phase="eval", step=step, metric=r["key"], value=round(r["accuracy"], 4))
        self.accelerator.wait_for_everyone()
        return result

