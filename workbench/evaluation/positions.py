"""Does the VLM know *where* things are (and *what*)? Four diagnostics, on held-out images.

* :func:`position_probe`: a linear probe (softmax regression) from each merged image token's feature to its row
  and to its column, fitted on 3/4 of the held-out images and scored on the rest. Qwen2-VL's vision tower has no
  absolute position embedding (2-D RoPE only), so a token knows where it is only if training taught it.
* :func:`identity_probe`: the same kind of probe from a table token to the card digit or the toy it lies on.
* :func:`box_errors`: how far the centre of the box the model writes for "Locate the card 7." / "Locate the
  teddy bear." lies from the true centre (0-1000 units of the table image), next to the error of always
  answering the mean true centre. A model that cannot locate anything scores near that baseline.
* :func:`binding_attention`: before a box can be right, the model must *look at* the named object. Teacher-forced
  on the true answer, at the ``(`` that writes the box's first coordinate: every head's attention per image token on
  the named card's (toy's) tokens divided by that on the other cards' (toys') tokens, for the heads that look at
  objects at all (more attention per object token than per image token). 1.0: no head prefers the named one.

    python -m workbench.evaluate positions --model data_samples/vlm [--images 120] [--boxes 30]
"""

from __future__ import annotations

import numpy as np
import torch

from ..vlm.corpus import TOKEN_CLASSES, CorpusGenerator, CorpusRenderer, token_grid
from ..world.catalog import OBJECTS
from ..world.grounding import parse_boxes

#: which held-out sample kind shows each image type (its one camera image)
IMAGE_KINDS = {"table": "objects", "board": "ocr"}


def _centre(text: str) -> np.ndarray | None:
    """Centre of the first box in ``text`` (0-1000 units), or None if it has none."""
    boxes = parse_boxes(text)
    return None if not boxes else np.array(boxes[0], float).reshape(2, 2).mean(0)


def _fit_and_score(feats: list[np.ndarray], labels: list[np.ndarray], classes: int, steps: int) -> float:
    """Accuracy of a softmax regression (Adam, full batch, standardised features) fitted on the tokens of the first
    3/4 of the images and scored on the tokens of the rest: ``feats`` (tokens, hidden) and ``labels`` (tokens,) per
    image."""
    fit = len(feats) * 3 // 4
    x_train, x_test = np.concatenate(feats[:fit]), np.concatenate(feats[fit:])
    y_train, y_test = np.concatenate(labels[:fit]), np.concatenate(labels[fit:])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xe = (torch.from_numpy((x - mean) / std).float() for x in (x_train, x_test))
    layer = torch.nn.Linear(xt.shape[1], classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    target = torch.from_numpy(y_train)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(layer(xt), target).backward()
        opt.step()
    with torch.no_grad():
        return float((layer(xe).argmax(1).numpy() == y_test).mean())


def _token_features(model, processor, renderer: CorpusRenderer, kind: str, images: int, seed: int):
    """Merged image tokens and their labels for ``images`` held-out samples of ``kind`` (one camera image each):
    a list of ((tokens, hidden) float numpy features, (rows, cols) token map)."""
    from ..vlm.api import vision_tokens

    gen = CorpusGenerator("heldout", seed=seed)
    out = []
    for _ in range(images):
        (image,), (token_map,) = renderer(gen.sample(kind), labels=True)
        with torch.no_grad():
            f, _ = vision_tokens(model.model.visual, processor.image_processor, [image])
        out.append((f.float().numpy(), token_map))
    return out


def _check_images(images: int) -> None:
    if images < 4:
        raise ValueError(f"images must be at least 4 (3/4 fit the probe, 1/4 score it), got {images}")


def position_probe(model, processor, images: int = 120, seed: int = 5, steps: int = 300) -> dict:
    """Row and column accuracy of a linear probe on the merged image tokens of ``images`` held-out tables and as
    many boards (3/4 fit, 1/4 scored, split by image): ``{"table": {"row", "col", "grid", "chance_row",
    "chance_col", "images"}, "board": {...}}``."""
    _check_images(images)
    renderer = CorpusRenderer()
    out = {}
    try:
        for name, kind in IMAGE_KINDS.items():
            tokens = _token_features(model, processor, renderer, kind, images, seed)
            feats = [f for f, _ in tokens]
            rows, cols = zip(*(token_grid(*token_map.shape) for _, token_map in tokens))
            result = {"images": images, "grid": sorted({token_map.shape for _, token_map in tokens})}
            for axis, labels in (("row", rows), ("col", cols)):
                classes = int(max(lab.max() for lab in labels)) + 1
                result[axis] = _fit_and_score(feats, list(labels), classes, steps)
                result[f"chance_{axis}"] = 1 / classes
            out[name] = result
    finally:
        renderer.close()
    return out


def identity_probe(model, processor, images: int = 120, seed: int = 5, steps: int = 300) -> dict:
    """What, rather than where: accuracy of a linear probe from a table token's feature to the card digit (on
    ``images`` held-out card tables) or the toy (as many toy tables) under it, on the tokens that lie on one (3/4 of
    the images fit, 1/4 scored): ``{"card digit": {"accuracy", "tokens", "classes", "majority"}, "toy": {...}}``.
    A model that cannot tell the card 7 from the card 1 cannot ground "the card 7"."""
    _check_images(images)
    digits = [TOKEN_CLASSES.index(str(d)) for d in range(10)]
    toys = [TOKEN_CLASSES.index(name) for name in OBJECTS]
    renderer = CorpusRenderer()
    out = {}
    try:
        for name, kind, classes in (("card digit", "cards", digits), ("toy", "objects", toys)):
            feats, labels = [], []
            for f, token_map in _token_features(model, processor, renderer, kind, images, seed):
                on = np.isin(token_map.ravel(), classes)
                feats.append(f[on])
                labels.append(token_map.ravel()[on])
            scored = np.concatenate(labels[images * 3 // 4:])
            out[name] = {"accuracy": _fit_and_score(feats, labels, len(TOKEN_CLASSES), steps),
                         "tokens": int(len(scored)), "classes": len(classes),
                         "majority": float(np.bincount(scored).max() / len(scored)) if len(scored) else float("nan")}
    finally:
        renderer.close()
    return out


def box_errors(model, processor, per_kind: int = 30, seed: int = 321) -> dict:
    """Mean |dx|, |dy| (0-1000 units) between the centre of the box the model writes and the true centre, on
    ``per_kind`` held-out "ground_card" and "ground_toy" questions, beside the mean-centre baseline:
    ``{kind: {"error": [dx, dy], "mean_box_error": [dx, dy], "answered": n, "n": per_kind}}``."""
    from ..vlm.api import ask

    renderer = CorpusRenderer()
    out = {}
    try:
        for kind in ("ground_card", "ground_toy"):
            gen = CorpusGenerator("heldout", seed=seed)
            truth, said = [], []
            for _ in range(per_kind):
                s = gen.sample(kind)
                truth.append(_centre(s.answer))
                said.append(_centre(ask(model, processor, renderer(s), s.question, max_new_tokens=64)))
            answered = [(t, p) for t, p in zip(truth, said) if p is not None]
            t_all = np.array(truth)
            error = np.abs(np.array([t - p for t, p in answered])).mean(0) if answered else np.full(2, np.nan)
            out[kind] = {"error": error.round(1).tolist(),
                         "mean_box_error": np.abs(t_all - t_all.mean(0)).mean(0).round(1).tolist(),
                         "answered": len(answered), "n": per_kind}
    finally:
        renderer.close()
    return out


@torch.no_grad()
def binding_attention(model, processor, per_kind: int = 30, seed: int = 5) -> dict:
    """Per head, how much more attention the named object's image tokens get than the other objects' (per token),
    at the ``(`` that writes the first coordinate of the true box, on ``per_kind`` held-out "ground_card" and
    "ground_toy" questions (tables with one object, or whose named object no token centre falls on, are skipped):
    ``{kind: {"ratios": (layers, heads) list, "best": ratio, "best_head": [layer, head], "n": used}}``; ``best`` is
    taken over the heads that give object tokens more attention per token than image tokens on average."""
    from ..vlm.api import build_inputs

    box_start = processor.tokenizer.convert_tokens_to_ids("<|box_start|>")
    image = model.config.image_token_id
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights are returned by the eager kernel only
    renderer = CorpusRenderer()
    out = {}
    try:
        for kind, named, group in (("ground_card", "card", "cards"), ("ground_toy", "object", "toys")):
            gen = CorpusGenerator("heldout", seed=seed)
            own = other = overall = 0.0
            used = 0
            for _ in range(per_kind):
                s = gen.sample(kind)
                images, maps = renderer(s, labels=True)
                labels = maps[0].ravel()
                name = s.facts[named]
                target = labels == TOKEN_CLASSES.index(str(name))
                rest = np.isin(labels, [TOKEN_CLASSES.index(str(k)) for k in s.table[group] if k != name])
                if not target.any() or not rest.any():
                    continue
                batch = build_inputs(processor, images, s.question, answer=s.answer)
                ids = batch["input_ids"][0]
                q = int((ids == box_start).nonzero()[0]) + 1  # the "(" after <|box_start|>
                tokens = (ids == image).nonzero().ravel()
                att = torch.stack([a[0, :, q, tokens] for a in model(**batch, output_attentions=True).attentions])
                own = own + att[..., torch.from_numpy(target)].mean(-1)  # (layers, heads): per named token
                other = other + att[..., torch.from_numpy(rest)].mean(-1)
                overall = overall + att.mean(-1)
                used += 1
            if not used:
                out[kind] = {"ratios": [], "best": float("nan"), "best_head": [0, 0], "n": 0}
                continue
            ratios = (own / other.clamp(min=1e-12)).double().numpy()
            looking = ((own + other) / 2 >= overall).numpy()
            best = np.unravel_index(np.argmax(np.where(looking, ratios, -np.inf) if looking.any() else ratios),
                                    ratios.shape)
            out[kind] = {"ratios": ratios.round(2).tolist(), "best": round(float(ratios[best]), 2),
                         "best_head": [int(best[0]), int(best[1])], "n": used}
    finally:
        renderer.close()
        model.set_attn_implementation(previous)
    return out


def format_positions(result: dict, title: str) -> str:
    """A markdown table of whichever diagnostics ``result`` holds: ``{"probe": position_probe(...),
    "identity": identity_probe(...), "boxes": box_errors(...), "binding": binding_attention(...)}``."""
    lines = [title, "| measure | value | reference |", "|---|---|---|"]
    for name, r in result.get("probe", {}).items():
        grid = " / ".join(f"{h} x {w}" for h, w in r["grid"])
        for axis in ("row", "col"):
            lines.append(f"| linear probe, {name} token {axis} ({grid} grid, {r['images']} images) | "
                         f"{100 * r[axis]:.1f}% | chance {100 * r[f'chance_{axis}']:.1f}% |")
    for name, r in result.get("identity", {}).items():
        lines.append(f"| linear probe, which {name} a table token lies on ({r['tokens']} tokens scored, "
                     f"{r['classes']} classes) | {100 * r['accuracy']:.1f}% | majority {100 * r['majority']:.1f}% |")
    for kind, r in result.get("boxes", {}).items():
        dx, dy = r["error"]
        bx, by = r["mean_box_error"]
        lines.append(f"| {kind}: box-centre error in x, y ({r['answered']}/{r['n']} boxes written) | "
                     f"{dx:.0f}, {dy:.0f} | mean box: {bx:.0f}, {by:.0f} |")
    for kind, r in result.get("binding", {}).items():
        what = "card" if kind == "ground_card" else "toy"
        layer, head = r["best_head"]
        lines.append(f"| {kind}: attention on the named {what} / on the other {what}s, per token, best head "
                     f"(layer {layer}, head {head}; {r['n']} tables) | {r['best']:.2f}x | 1.00x: no preference |")
    return "\n".join(lines)
