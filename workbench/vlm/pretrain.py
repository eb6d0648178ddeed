"""Pretraining the tiny Qwen2-VL in phases, the way real VLMs are built (teach the vision side to see,
then teach the language side to talk about what it sees).

1. **corpus** — render ``corpus_size`` training samples (images + dense token labels), cached on disk.
2. **tokenizer** — a byte-level BPE trained on the corpus text and the robot world's templates.
3. **see** — the vision tower and its merger learn, with a linear probe head, to say for every merged
   image token what lies under it (a whiteboard character, a card digit, a toy, or background). Dense
   labels give each image 72-176 targets instead of one: the bet for a from-scratch ViT to learn to read
   in CPU budgets (end-to-end training alone did not in the VLM issue's planning probes: 0.5% exact match
   after 1,200 steps). The shipped model's reading is still below target (README).
4. **answer** — the vision side is frozen; its merged tokens are computed once and cached, and the
   language model learns every question kind of the corpus on top of them (cheap: no vision pass).

Every phase checkpoints atomically to ``<work>/checkpoints`` every ``checkpoint_every`` steps and a
restarted run resumes from the newest checkpoint; ``<work>/log.csv`` logs losses and evaluations.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import latest_checkpoint, load_checkpoint_state, save_checkpoint
from ..training import CsvLog, lr_at, optimizer_step
from .api import collate, encode_example, vision_tokens
from .corpus import TOKEN_CLASSES, CorpusGenerator, CorpusRenderer, Sample

ANSWER_WEIGHTS = {"ocr": 2, "solve": 3, "arithmetic": 2, "cards": 3, "card_where": 1, "answer_card": 2,
                  "objects": 2, "colour": 1, "count": 1, "spatial": 2}


@dataclass
class PretrainConfig:
    """Sizes and schedule of a pretraining run (defaults: the shipped checkpoint's recipe)."""

    preset: str = "tiny"
    corpus_size: int = 6000
    vocab_size: int = 1024
    batch_size: int = 32
    see_steps: int = 900
    see_lr: float = 3e-3
    answer_steps: int = 1500
    answer_lr: float = 2e-3
    # per answer batch: new whiteboard (ocr/solve) and text-arithmetic questions drawn on the fly. Off in
    # the shipped recipe: 12 + 6 of 32 raised OCR and arithmetic but cost the table skills (README).
    fresh_board: int = 0
    fresh_text: int = 0
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_per_skill: int = 20
    seed: int = 0

    def __post_init__(self):
        for name in ("corpus_size", "vocab_size", "batch_size", "checkpoint_every", "eval_every", "eval_per_skill"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("see_steps", "answer_steps", "fresh_board", "fresh_text"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        if self.fresh_board + self.fresh_text >= self.batch_size:
            raise ValueError(f"fresh_board + fresh_text ({self.fresh_board + self.fresh_text}) must be smaller than "
                             f"batch_size ({self.batch_size}): part of every batch comes from the cached corpus")
        for name in ("see_lr", "answer_lr"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")

    @classmethod
    def fast(cls, **kw) -> PretrainConfig:
        """A tiny run for tests and notebooks (seconds, not minutes)."""
        base = dict(corpus_size=48, vocab_size=400, batch_size=8, see_steps=6, answer_steps=6, checkpoint_every=4,
                    eval_every=1000, eval_per_skill=2, fresh_board=2, fresh_text=1)
        return cls(**{**base, **kw})


def _qa(sample: Sample) -> tuple[str, str]:
    return sample.question, sample.answer


# ------------------------------------------------------------------------------------------- corpus
class Corpus:
    """Rendered training samples: ``samples[i]`` uses ``images[j]`` for ``j in image_ids[i]``;
    ``labels[j]`` is image j's (H/16, W/16) token-class map."""

    def __init__(self, samples: list[Sample], image_ids: list[list[int]], images: list[np.ndarray],
                 labels: list[np.ndarray]):
        self.samples, self.image_ids, self.images, self.labels = samples, image_ids, images, labels

    @classmethod
    def build(cls, size: int, seed: int, progress: bool = True) -> Corpus:
        gen = CorpusGenerator("train", seed=seed)
        kinds = list(ANSWER_WEIGHTS)
        samples = gen.samples(size, kinds=kinds, weights=[ANSWER_WEIGHTS[k] for k in kinds])
        renderer = CorpusRenderer()
        image_ids, images, labels = [], [], []
        for s in tqdm(samples, desc="rendering corpus", disable=not progress):
            imgs, maps = renderer(s, labels=True)
            image_ids.append(list(range(len(images), len(images) + len(imgs))))
            images += imgs
            labels += maps
        renderer.close()
        return cls(samples, image_ids, images, labels)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        shapes = sorted({im.shape for im in self.images})
        arrays = {}
        for k, shape in enumerate(shapes):
            idx = [j for j, im in enumerate(self.images) if im.shape == shape]
            arrays[f"index{k}"] = np.array(idx, np.int64)
            arrays[f"images{k}"] = np.stack([self.images[j] for j in idx]) if idx else np.zeros((0, *shape), np.uint8)
            arrays[f"labels{k}"] = np.stack([self.labels[j] for j in idx])
        tmp = os.path.join(folder, ".corpus.tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, os.path.join(folder, "corpus.npz"))
        with open(os.path.join(folder, "samples.jsonl"), "w") as f:
            for s, ids in zip(self.samples, self.image_ids):
                f.write(json.dumps({**dataclasses.asdict(s), "image_ids": ids}, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: str) -> Corpus:
        with np.load(os.path.join(folder, "corpus.npz"), allow_pickle=False) as z:
            # read each array once (every z[name] access decompresses the whole array again)
            arrays = {name: z[name] for name in z.files}
        n = sum(len(v) for name, v in arrays.items() if name.startswith("index"))
        images: list = [None] * n
        labels: list = [None] * n
        for key in (name for name in arrays if name.startswith("index")):
            k = key[len("index"):]
            imgs, labs = arrays[f"images{k}"], arrays[f"labels{k}"]
            for pos, j in enumerate(arrays[key]):
                images[j], labels[j] = imgs[pos], labs[pos]
        samples, image_ids = [], []
        with open(os.path.join(folder, "samples.jsonl")) as f:
            for line in f:
                d = json.loads(line)
                image_ids.append(d.pop("image_ids"))
                d["views"] = tuple(d["views"])
                samples.append(Sample(**d))
        return cls(samples, image_ids, images, labels)

    def texts(self) -> list[str]:
        return [t for s in self.samples for t in (s.question, s.answer)]


# ------------------------------------------------------------------------------------------- training
class Pretrainer:
    """Runs (or resumes) the phases of :mod:`workbench.vlm.pretrain` in ``work_dir``."""

    def __init__(self, config: PretrainConfig, work_dir: str, progress: bool = True):
        from accelerate import Accelerator

        self.cfg, self.work, self.progress = config, work_dir, progress
        os.makedirs(work_dir, exist_ok=True)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.log = CsvLog(os.path.join(work_dir, "log.csv"), ["phase", "step", "loss", "lr", "metric", "value"])
        cfg_path = os.path.join(work_dir, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                saved = json.load(f)
            if saved != dataclasses.asdict(config):
                raise ValueError(f"{work_dir} holds a run with a different config ({cfg_path}); "
                                 "use a new work folder or the same settings")
        else:
            with open(cfg_path, "w") as f:
                json.dump(dataclasses.asdict(config), f, indent=2)

    # -- pieces --------------------------------------------------------------------------------
    def corpus(self) -> Corpus:
        folder = os.path.join(self.work, "corpus")
        if os.path.isfile(os.path.join(folder, "samples.jsonl")) and os.path.isfile(os.path.join(folder, "corpus.npz")):
            return Corpus.load(folder)
        corpus = Corpus.build(self.cfg.corpus_size, self.cfg.seed, self.progress)
        corpus.save(folder)
        return corpus

    def fresh_model(self, corpus: Corpus):
        from .modeling import build_model
        from .processing import build_processor, tokenizer_texts

        processor = build_processor(corpus.texts() + tokenizer_texts(200, seed=self.cfg.seed), self.cfg.vocab_size)
        model = build_model(processor.tokenizer, self.cfg.preset, seed=self.cfg.seed, verbose=self.progress)
        return model, processor

    def _checkpoint(self, phase, step, model, processor, optimizer, head=None):
        from .api import save_vlm

        extra = {f"head.{k}": v for k, v in head.state_dict().items()} if head is not None else None
        save_checkpoint(self.work, self._global_step(phase, step), lambda d: save_vlm(model, processor, d + "/vlm"),
                        optimizer, {"phase": phase, "phase_step": step}, extra)

    def _step(self, phase, step, loss, opt, params, total, peak_lr, bar) -> None:
        """One optimizer update with the scheduled learning rate, then progress bar and log."""
        lr = lr_at(step, total, peak_lr)
        optimizer_step(self.accelerator, loss, opt, params, lr)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        self.log(phase=phase, step=step + 1, loss=round(loss.item(), 5), lr=lr)

    def _global_step(self, phase, step):
        return step if phase == "see" else self.cfg.see_steps + step

    # -- phases --------------------------------------------------------------------------------
    def run(self):
        """All phases, resuming from the newest checkpoint if there is one. Returns (model, processor)."""
        from .api import load_vlm

        torch.manual_seed(self.cfg.seed)
        corpus = self.corpus()
        ckpt = latest_checkpoint(self.work)
        state, extra = ({}, {}) if ckpt is None else load_checkpoint_state(ckpt)
        if ckpt is None:
            model, processor = self.fresh_model(corpus)
        else:
            model, processor = load_vlm(os.path.join(ckpt, "vlm"))
            if self.progress:
                print(f"resuming from {ckpt} ({state['phase']} step {state['phase_step']})")
        phase, done = state.get("phase", "see"), state.get("phase_step", 0)
        if phase == "see":
            self.see(model, processor, corpus, start=done, ckpt=ckpt, extra=extra)
            done = 0
        self.answer(model, processor, corpus, start=done if phase == "answer" else 0,
                    ckpt=ckpt if phase == "answer" else None)
        return model, processor

    def see(self, model, processor, corpus: Corpus, start=0, ckpt=None, extra=None):
        cfg = self.cfg
        visual = model.model.visual
        # a linear probe on the merged tokens (the tokens the language model will read)
        head = torch.nn.Linear(model.config.vision_config.hidden_size, len(TOKEN_CLASSES))
        if extra:
            head.load_state_dict({k[len("head."):]: v for k, v in extra.items()})
        params = list(visual.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.see_lr, weight_decay=0.01)
        if ckpt is not None:
            load_checkpoint_state(ckpt, opt)
        visual, head, opt = self.accelerator.prepare(visual, head, opt)
        weight = torch.ones(len(TOKEN_CLASSES), device=self.device)
        weight[0] = 0.2  # background is most tokens
        ip = processor.image_processor
        bar = tqdm(range(start, cfg.see_steps), desc="see", disable=not self.progress, initial=start,
                   total=cfg.see_steps)
        visual.train()
        for step in bar:
            rng = np.random.default_rng([cfg.seed, 1, step])
            idx = rng.choice(len(corpus.images), min(cfg.batch_size, len(corpus.images)), replace=False)
            feats, _ = vision_tokens(visual, ip, [corpus.images[j] for j in idx])
            labels = torch.from_numpy(np.concatenate([corpus.labels[j].ravel() for j in idx])).to(self.device)
            loss = F.cross_entropy(head(feats), labels, weight=weight)
            self._step("see", step, loss, opt, params, cfg.see_steps, cfg.see_lr, bar)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.see_steps:
                self._checkpoint("see", step + 1, model, processor, opt, head)
        return head

    @torch.no_grad()
    def image_features(self, model, processor, corpus: Corpus, batch: int = 64) -> list[torch.Tensor]:
        """Merged vision tokens of every corpus image (frozen vision side): [(tokens, hidden)]."""
        visual = model.model.visual.eval()
        out = []
        for i in tqdm(range(0, len(corpus.images), batch), desc="caching image features",
                      disable=not self.progress):
            feats, per_image = vision_tokens(visual, processor.image_processor, corpus.images[i:i + batch])
            out += list(feats.split(per_image))
        return out

    def answer(self, model, processor, corpus: Corpus, start=0, ckpt=None):
        cfg = self.cfg
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
        feats = self.image_features(model, processor, corpus)
        encoded = [encode_example(processor, [corpus.images[j] for j in ids], *_qa(s))
                   for s, ids in tqdm(list(zip(corpus.samples, corpus.image_ids)), desc="tokenizing",
                                      disable=not self.progress)]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.answer_lr, weight_decay=0.01)
        if ckpt is not None:
            load_checkpoint_state(ckpt, opt)
        model, opt = self.accelerator.prepare(model, opt)
        pad = processor.tokenizer.pad_token_id
        model.train()
        bar = tqdm(range(start, cfg.answer_steps), desc="answer", disable=not self.progress, initial=start,
                   total=cfg.answer_steps)
        renderer = CorpusRenderer() if cfg.fresh_board else None
        for step in bar:
            items = self._answer_batch(step, model, processor, corpus, encoded, feats, renderer)
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v
                     for k, v in collate(items, pad).items()}
            out = model(**batch)
            self._step("answer", step, out.loss, opt, params, cfg.answer_steps, cfg.answer_lr, bar)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.answer_steps:
                self._checkpoint("answer", step + 1, model, processor, opt)
            if (step + 1) % cfg.eval_every == 0:
                self.evaluate(model, processor, step + 1)
                model.train()
        if renderer is not None:
            renderer.close()

    def _answer_batch(self, step, model, processor, corpus, encoded, feats, renderer) -> list[dict]:
        """One answer-phase batch: cached corpus samples plus freshly drawn whiteboard and text-arithmetic
        questions (a new generator per step: deterministic, so a resumed run sees the same batches)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 2, step])
        n_cached = cfg.batch_size - cfg.fresh_board - cfg.fresh_text
        idx = rng.choice(len(encoded), min(n_cached, len(encoded)), replace=False)
        items = [{**encoded[i], "feats": [feats[j] for j in corpus.image_ids[i]]} for i in idx]
        gen = CorpusGenerator("train", seed=int(rng.integers(2**31)))
        fresh = [gen.sample(k) for k in rng.choice(["ocr", "solve"], cfg.fresh_board)]
        if fresh:
            with torch.no_grad():
                images = [renderer(s)[0] for s in fresh]
                tokens, per_image = vision_tokens(model.model.visual.eval(), processor.image_processor, images)
            for s, im, f in zip(fresh, images, tokens.split(per_image)):
                items.append({**encode_example(processor, [im], *_qa(s)), "feats": [f]})
        for _ in range(cfg.fresh_text):
            items.append({**encode_example(processor, [], *_qa(gen.sample("arithmetic"))), "feats": []})
        return items

    def evaluate(self, model, processor, step: int) -> dict:
        from ..evaluate import evaluate_knowledge

        result = evaluate_knowledge(model, processor, self.cfg.eval_per_skill, progress=False)
        for r in result["rows"]:
            self.log(phase="eval", step=step, metric=r["key"], value=round(r["accuracy"], 4))
        return result

