"""What limits reading: the vision side alone, trained on fresh boards and read on held-out ones.

:func:`probe_reading` trains a fresh vision tower and merger (a :data:`~workbench.vlm.modeling.PRESETS` preset)
with the *see* phase's dense probe (:class:`~workbench.vlm.pretrain.ReadingHead`, tied to a fresh language model's
token embeddings, as in pretraining) on fresh, augmented **training** whiteboards for a wall-clock budget, then
reads **held-out** whiteboards (held-out font families and equations, ``CorpusGenerator("heldout")``) from the
probe alone: each character is read as the most frequent class among the merged tokens whose centres fall inside
it (no token inside: unread), and a board is read when every character is. ``board_scale`` upsamples each board
image before the vision tower (:class:`~workbench.vlm.corpus.CorpusRenderer`), so a character covers
``board_scale``² times as many tokens: comparing scales at equal wall time says whether the token grid or the
tower limits reading (``preset="small"`` has a bigger vision tower). The learning rate follows a cosine of the elapsed
share of the budget (not resumable: a diagnostic, not a training run). Evaluations are logged against minutes of
training (the evaluations' own time is left out of the budget).

    python -m workbench.vlm.probe --board-scale 1 --minutes 10 --out outputs/probe_scale1.json
    python -m workbench.vlm.probe --board-scale 2 --minutes 10 --out outputs/probe_scale2.json
    python -m workbench.vlm.probe --preset small --minutes 10 --out outputs/probe_small.json
    python -m workbench.vlm.probe --init data_samples/vlm --frozen --minutes 3 --out outputs/probe_shipped.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm.auto import tqdm

from ..training import lr_at
from .corpus import CorpusGenerator, CorpusRenderer
from .pretrain import ReadingHead, fresh_vlm, held_out_boards, read_boards, reading_loss, render_worker_init


class _Boards(torch.utils.data.IterableDataset):
    """Endless fresh training boards, ``batch`` at a time: (images, token label maps), rendered in a worker."""

    def __init__(self, batch: int, board_scale: int, seed: int):
        self.batch, self.board_scale, self.seed = batch, board_scale, seed

    def __iter__(self):
        gen, renderer = CorpusGenerator("train", seed=self.seed), CorpusRenderer(self.board_scale)
        while True:
            rendered = [renderer(gen.sample("ocr"), labels=True) for _ in range(self.batch)]
            yield [im for r in rendered for im in r[0]], [lab for r in rendered for lab in r[1]]


def _as_is(batch):
    return batch  # the images stay numpy arrays (the default would turn them into tensors)


def probe_reading(board_scale: int = 1, minutes: float = 10.0, batch: int = 32, lr: float = 2e-3,
                  preset: str = "tiny", eval_boards: int = 128, evals: int = 5, seed: int = 0,
                  init: str | None = None, frozen: bool = False, progress: bool = True) -> dict:
    """Train the vision side of a fresh ``preset`` model with the dense probe for ``minutes`` on fresh training
    boards shown at ``board_scale``, reading ``eval_boards`` held-out boards ``evals`` times along the way (and at
    the end). Returns the config, the curve ``[{"minutes", "step", ...read_boards figures}]`` and the final row.

    ``init``: start from a saved VLM's vision side and token embeddings instead of a fresh model (``preset`` is then
    ignored); ``frozen``: train the probe alone, leaving the vision side as it is — how readable its tokens are."""
    if minutes <= 0 or batch < 1 or eval_boards < 1 or evals < 1:
        raise ValueError("minutes must be > 0 and batch, eval_boards, evals >= 1; got "
                         f"{minutes}, {batch}, {eval_boards}, {evals}")
    torch.manual_seed(seed)
    if init:
        from .api import load_vlm

        model, processor = load_vlm(init)
    else:
        model, processor = fresh_vlm(preset, seed=seed, verbose=False)
    visual, embeddings = model.model.visual, model.get_input_embeddings().weight.detach()
    head = ReadingHead(processor.tokenizer, model.config.vision_config.hidden_size)
    visual.requires_grad_(not frozen)
    params = (list(visual.parameters()) if not frozen else []) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    tests = held_out_boards(eval_boards, board_scale)
    loader = iter(torch.utils.data.DataLoader(_Boards(batch, board_scale, seed), batch_size=None, num_workers=1,
                                              prefetch_factor=4, collate_fn=_as_is, worker_init_fn=render_worker_init))
    from .api import vision_tokens

    budget, curve, step, t0, evaluating = minutes * 60, [], 0, time.time(), 0.0
    next_eval = budget / evals
    bar = tqdm(total=round(budget), desc=f"probe x{board_scale}", unit="s", disable=not progress)
    while True:
        elapsed = time.time() - t0 - evaluating  # training time: the evaluations do not count
        if elapsed >= next_eval or elapsed >= budget:
            visual.eval()
            t_eval = time.time()
            row = {"minutes": round(elapsed / 60, 2), "step": step,
                   **read_boards(visual, head, embeddings, processor.image_processor, tests)}
            evaluating += time.time() - t_eval
            curve.append(row)
            if progress:
                tqdm.write(json.dumps(row))
            next_eval += budget / evals
            if elapsed >= budget:
                break
        visual.train(not frozen)
        images, labels = next(loader)
        feats, _ = vision_tokens(visual, processor.image_processor, images)
        loss = reading_loss(head(feats, embeddings), labels)
        for g in opt.param_groups:  # cosine over the budget's seconds, no warm-up
            g["lr"] = lr_at(int(elapsed), int(budget), lr, warmup_frac=0.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(round(time.time() - t0 - evaluating) - bar.n)
        bar.set_postfix(step=step, loss=f"{loss.item():.3f}")
    bar.close()
    config = {"board_scale": board_scale, "minutes": minutes, "batch": batch, "lr": lr,
              "preset": None if init else preset, "init": init, "frozen": frozen,
              "eval_boards": eval_boards, "seed": seed, "torch_threads": torch.get_num_threads(),
              "tokens_per_board": int(tests[0][1].size)}
    return {"config": config, "curve": curve, "final": curve[-1]}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workbench.vlm.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--board-scale", type=int, default=1, help="upsample board images by this factor (1, 2, ...)")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--eval-boards", type=int, default=128)
    ap.add_argument("--evals", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", help="start from this saved VLM's vision side (instead of a fresh --preset model)")
    ap.add_argument("--frozen", action="store_true", help="train the probe alone: how readable are init's tokens?")
    ap.add_argument("--out", help="write the result here (JSON)")
    args = ap.parse_args(argv)
    result = probe_reading(args.board_scale, args.minutes, args.batch, args.lr, args.preset, args.eval_boards,
                           args.evals, args.seed, args.init, args.frozen)
    print(f"| minutes | steps | token acc | char acc | board acc (N={args.eval_boards}) |\n|---|---|---|---|---|")
    for r in result["curve"]:
        print(f"| {r['minutes']:.1f} | {r['step']} | {r['token_accuracy']:.3f} | {r['char_accuracy']:.3f} | "
              f"{r['board_accuracy']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    from ..settings import run_cli

    run_cli(main)
