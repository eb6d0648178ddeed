"""Inside the model: where the VLM looks, which pixels decided its answer, and which experts fire where.

Works with the pretrained VLM and with a policy's MoE backbone (``policy.vlm``, ``policy.processor``); every
function returns data (numpy arrays, dataclasses) and the ``*_figure`` functions turn them into plotly figures,
so notebooks and the demo only call them.

    >>> probe = Probe(model, processor, [board], "Solve the equation on the whiteboard.")   # answers greedily
    >>> att = attention(probe)                    # (layers, heads, answer tokens, image tokens) + rollout
    >>> ig = attributions(probe, method="integrated_gradients")   # captum, per 16x16 cell of each image
    >>> route = routing(probe)                    # MoE backbones: experts per token, per image patch, load

**Shapes.** Each camera image of H x W pixels becomes ``(H/16) x (W/16)`` merged tokens (8-px patches, 2 x 2
merge); maps over an image have that shape, row-major as the vision tower emits them, so cell ``(r, c)`` covers
pixels ``[16r, 16r+16) x [16c, 16c+16)``.

**Attributions** (captum) are taken on the *pixels* of one image: :func:`patchify` re-implements the Qwen2-VL
image processor's normalisation and patch layout in torch (tested equal to the processor), so gradients reach
the camera image. The target is the log-probability of the chosen answer tokens (default: every answer token;
``target="answer digit"`` picks the token after the last ``=``). Integrated Gradients' completeness (the
attributions sum to f(input) - f(baseline)) is reported as ``delta``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .settings import use_all_cores

TOKEN_PX = 16


# ------------------------------------------------------------------------------------------------ the prompt
def patchify(image: torch.Tensor, patch: int = 8, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """(3, H, W) float pixels in [0, 255] -> the processor's ``pixel_values`` rows ((H/8)*(W/8), 3*2*8*8):
    rescale to [0, 1], normalise with mean = std = 0.5, then Qwen2-VL's merge-ordered patch layout (each still
    image repeated along time). H and W must be multiples of 16 (camera images are)."""
    c, h, w = image.shape
    if h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"image sides must be multiples of {patch * merge}, got {h}x{w}")
    x = (image / 255.0 - 0.5) / 0.5
    gh, gw = h // patch, w // patch
    p = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    p = p.unsqueeze(5).expand(*p.shape[:5], temporal, *p.shape[5:])  # (gh', gw', mh, mw, C, T, ph, pw)
    return p.reshape(gh * gw, c * temporal * patch * patch)


@dataclass
class Probe:
    """One prompt and its answer, ready to look inside: ``images`` (camera images, (H, W, 3) uint8),
    ``question``; ``answer`` (greedy ``ask`` if not given). ``inputs`` are the processor's tensors for prompt +
    answer (teacher forcing); ``answer_positions`` the positions whose logits predict each answer token;
    ``image_positions[i]`` the input positions of image i's tokens and ``grids[i]`` its (rows, cols)."""

    model: torch.nn.Module
    processor: object
    images: list
    question: str
    answer: str | None = None
    data_type: int | None = None  # MoE backbones: 0 image-text, 1 robot (what the routing context says)

    def __post_init__(self):
        from .vlm.api import answer_labels, ask, build_inputs, prepare_image

        self.images = [np.asarray(prepare_image(im, f"image {i}")) for i, im in enumerate(self.images)]
        if self.answer is None:
            with self.context():
                self.answer = ask(self.model, self.processor, self.images, self.question) or "."
        self.inputs = build_inputs(self.processor, self.images, self.question, self.answer)
        ids = self.inputs["input_ids"][0]
        labels = answer_labels(self.processor, ids)
        self.answer_ids = ids[labels != -100]  # the answer tokens and <|im_end|>
        self.answer_positions = (labels != -100).nonzero()[:, 0] - 1  # logits at t predict token t + 1
        image_token = self.model.config.image_token_id
        where = (ids == image_token).nonzero()[:, 0]
        self.grids = [(int(h) // 2, int(w) // 2) for _, h, w in self.inputs["image_grid_thw"].tolist()]
        sizes = [r * c for r, c in self.grids]
        self.image_positions = list(where.split(sizes)) if sizes else []
        self.tokens = [self.processor.tokenizer.decode([i]) for i in ids.tolist()]  # each input token as text

    @contextlib.contextmanager
    def context(self):
        """The MoE routing context (data type) around a forward, when the model has MoE layers."""
        from .vla.moe import moe_layers, routing_context

        if moe_layers(self.model) and self.data_type is not None:
            with routing_context(self.model, data_type=torch.tensor([self.data_type])):
                yield
        else:
            yield

    def answer_tokens(self) -> list[str]:
        """The answer's tokens as text (``<|im_end|>`` last)."""
        return [self.processor.tokenizer.decode([int(t)]) for t in self.answer_ids]

    def target_index(self, target: str | int | None) -> list[int]:
        """Which answer tokens an attribution explains: ``None`` all but ``<|im_end|>``; an int, that one;
        ``"answer digit"`` the first digit after the last ``=`` (e.g. the 7 of ``3 + 4 = 7``)."""
        n = len(self.answer_ids) - 1
        if target is None:
            return list(range(max(n, 1)))
        if isinstance(target, int):
            if not -n <= target < n:
                raise ValueError(f"target token {target} is out of range: the answer has {n} tokens")
            return [target % n]
        if target == "answer digit":
            toks = self.answer_tokens()[:n]
            eq = max((i for i, t in enumerate(toks) if "=" in t), default=-1)
            digits = [i for i in range(eq + 1, n) if toks[i].strip().isdigit()]
            if not digits:
                raise ValueError(f"the answer {self.answer!r} has no digit after '='")
            return digits[:1]
        raise ValueError(f"unknown target {target!r}; expected None, a token index or 'answer digit'")


def grid_map(values: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per-token values of one image (rows*cols,) -> (rows, cols)."""
    return np.asarray(values, dtype=np.float64).reshape(grid)


# ------------------------------------------------------------------------------------------------ attention
@dataclass
class Attention:
    """``weights``: (layers, heads, answer tokens, all input tokens) attention of each answer-predicting position;
    ``images[i]``: (layers, heads, answer tokens, rows, cols) the part over image i's tokens; ``rollout[i]``:
    (answer tokens, rows, cols) attention rollout (heads averaged, residual added, layers multiplied)."""

    weights: np.ndarray
    images: list[np.ndarray]
    rollout: list[np.ndarray]
    tokens: list[str]


@contextlib.contextmanager
def eager_attention(model):
    """Eager attention while inside (SDPA returns no weights), the model's own implementation after."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def attention(probe: Probe) -> Attention:
    """Attention of every answer token over every image token, per layer and head, and its rollout."""
    model = probe.model
    was_training = model.training
    model.eval()
    with eager_attention(model), probe.context():
        out = model(**probe.inputs, output_attentions=True)
    model.train(was_training)
    full = torch.stack([a[0] for a in out.attentions]).float()  # (L, H, T, T)
    rows = probe.answer_positions
    weights = full[:, :, rows]  # (L, H, A, T)
    images = [weights[..., pos].reshape(*weights.shape[:3], *grid).numpy()
              for pos, grid in zip(probe.image_positions, probe.grids)]
    # rollout: A_l' = 0.5 * mean_heads(A_l) + 0.5 * I, renormalised; R = A_L' ... A_1'
    T = full.shape[-1]
    eye = torch.eye(T)
    roll = eye
    for a in full.mean(1):
        a = 0.5 * a + 0.5 * eye
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    rollout = [roll[rows][:, pos].reshape(len(rows), *grid).numpy()
               for pos, grid in zip(probe.image_positions, probe.grids)]
    return Attention(weights.numpy(), images, rollout, probe.answer_tokens())


# ------------------------------------------------------------------------------------------------ attributions
def _log_prob_fn(probe: Probe, image_index: int, target: list[int]):
    """f(pixels (B, 3, H, W)) -> (B,) summed log-probability of the target answer tokens, image ``image_index``
    replaced by the given pixels (the other images fixed)."""
    model = probe.model
    fixed = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() for im in probe.images]
    base = {k: v for k, v in probe.inputs.items() if k not in ("pixel_values",)}
    positions = probe.answer_positions[target]
    wanted = probe.answer_ids[target]

    def f(pixels: torch.Tensor) -> torch.Tensor:
        b = pixels.shape[0]
        rows = []
        for k in range(b):
            rows += [patchify(pixels[k] if i == image_index else fixed[i]) for i in range(len(fixed))]
        batch = {key: (v.repeat(b, *[1] * (v.dim() - 1)) if key in ("input_ids", "attention_mask",
                                                                      "mm_token_type_ids") else v)
                 for key, v in base.items()}
        batch["image_grid_thw"] = base["image_grid_thw"].repeat(b, 1)
        with probe.context():
            logits = model(**batch, pixel_values=torch.cat(rows)).logits  # (B, T, V)
        logp = logits[:, positions].float().log_softmax(-1)  # (B, n, V)
        return logp.gather(-1, wanted[None, :, None].expand(b, -1, 1))[..., 0].sum(-1)

    return f


@dataclass
class Attribution:
    """``pixels``: (H, W) attribution of each pixel (channels summed); ``cells``: (rows, cols) summed per 16x16
    merged-token cell; ``normalised``: cells / max |cells| in [-1, 1]; ``delta``: Integrated Gradients'
    completeness gap (sum of attributions minus f(input) - f(baseline)); ``output``: f(input) and
    f(baseline), the target's log-probability."""

    method: str
    pixels: np.ndarray
    cells: np.ndarray
    normalised: np.ndarray
    output: tuple[float, float]
    delta: float | None = None


METHODS = ("integrated_gradients", "gradient_x_input", "occlusion")


def attributions(probe: Probe, method: str = "integrated_gradients", image_index: int = 0, target=None,
                 baseline: str | float = "median", n_steps: int = 128) -> Attribution:
    """Which pixels of image ``image_index`` made the model say the target answer tokens (captum).

    ``method``: ``integrated_gradients`` (captum ``IntegratedGradients``, Gauss-Legendre, ``n_steps``; the tiny
    model is far from smooth along the path, so completeness needs many steps; the test asserts a gap under 5% of
    f(x) - f(baseline) at 256),
    ``gradient_x_input`` (captum ``InputXGradient`` on input - baseline) or ``occlusion`` (captum ``Occlusion``:
    each 16x16 cell replaced by the baseline colour; attribution = drop of the target's log-probability).
    ``baseline``: ``"median"`` (the image's median colour: a blank board or empty table) or a grey level 0-255.
    """
    from captum.attr import InputXGradient, IntegratedGradients, Occlusion

    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; expected one of {list(METHODS)}")
    if not 0 <= image_index < len(probe.images):
        raise ValueError(f"image_index {image_index} is out of range: the prompt has {len(probe.images)} images")
    image = probe.images[image_index]
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None].contiguous()  # (1, 3, H, W)
    if baseline == "median":
        colour = torch.from_numpy(np.median(image.reshape(-1, 3), 0)).float()
        base = colour[None, :, None, None].expand_as(x).contiguous()
    elif isinstance(baseline, (int, float)) and 0 <= baseline <= 255:
        base = torch.full_like(x, float(baseline))
    else:
        raise ValueError(f"baseline must be 'median' or a grey level 0-255, got {baseline!r}")
    f = _log_prob_fn(probe, image_index, probe.target_index(target))
    model = probe.model
    was_training = model.training
    model.eval()
    delta = None
    try:
        with torch.no_grad():
            out = (float(f(x)[0]), float(f(base)[0]))
        if method == "integrated_gradients":
            attr, d = IntegratedGradients(f).attribute(x, baselines=base, n_steps=n_steps, method="gausslegendre",
                                                       internal_batch_size=8, return_convergence_delta=True)
            delta = float(d[0])
        elif method == "gradient_x_input":
            g = x - base
            attr = InputXGradient(lambda d: f(base + d)).attribute(g.requires_grad_())
        else:
            with torch.no_grad():
                attr = Occlusion(f).attribute(x, sliding_window_shapes=(3, TOKEN_PX, TOKEN_PX),
                                              strides=(3, TOKEN_PX, TOKEN_PX), baselines=base,
                                              perturbations_per_eval=8)
            attr = attr / (TOKEN_PX * TOKEN_PX * 3)  # Occlusion spreads each cell's effect over its pixels
    finally:
        model.train(was_training)
    pixels = attr[0].detach().sum(0).numpy()  # (H, W)
    h, w = pixels.shape
    cells = pixels.reshape(h // TOKEN_PX, TOKEN_PX, w // TOKEN_PX, TOKEN_PX).sum((1, 3))
    scale = np.abs(cells).max() or 1.0
    return Attribution(method, pixels, cells, cells / scale, out, delta)


# ------------------------------------------------------------------------------------------------ routing
@dataclass
class RoutingMaps:
    """What the routers of an MoE backbone did on the probe (L layers, T tokens, E experts, k = top-k).

    ``experts``: (L, T, k) chosen experts per token, most probable first; ``weights``: (L, T, k) their
    renormalised weights; ``probs``: (L, T, E) router probabilities; ``load``: (L, E) fraction of tokens that
    chose each expert (each token counts once per chosen expert, so rows sum to k); ``entropy``: (L,) mean
    router entropy in nats (log E when uniform); ``coactivation``: (L, E, E) how often two experts were chosen
    together; ``image_top1[i]``: (L, rows, cols) top-1 expert of each of image i's tokens."""

    experts: np.ndarray
    weights: np.ndarray
    probs: np.ndarray
    load: np.ndarray
    entropy: np.ndarray
    coactivation: np.ndarray
    image_top1: list[np.ndarray]
    tokens: list[str]


@torch.no_grad()
def routing(probe: Probe) -> RoutingMaps:
    """Route the probe's prompt + answer through the MoE backbone and collect per-layer routing data."""
    from .vla.moe import moe_layers
    from .vla.moe import routing as last_routing

    if not moe_layers(probe.model):
        raise ValueError("the model has no MoE layers: routing maps need a policy's backbone (policy.vlm)")
    model = probe.model
    was_training = model.training
    model.eval()
    with probe.context():
        model(**probe.inputs)
    model.train(was_training)
    records = last_routing(model)
    if any(r.experts is None for r in records):
        raise ValueError("this MoE variant has no router (static): there is no routing to map")
    experts = torch.stack([r.experts[0] for r in records]).numpy()  # (L, T, k)
    weights = torch.stack([r.weights[0] for r in records]).float().numpy()
    probs = torch.stack([r.logits[0].float().softmax(-1) for r in records]).numpy()  # (L, T, E)
    L, T, k = experts.shape
    E = probs.shape[-1]
    load = np.stack([np.bincount(experts[layer].ravel(), minlength=E) / T for layer in range(L)])
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(-1).mean(-1)
    co = np.zeros((L, E, E))
    for layer in range(L):
        for a in range(k):
            for b in range(a + 1, k):
                np.add.at(co[layer], (experts[layer, :, a], experts[layer, :, b]), 1)
        co[layer] = co[layer] + co[layer].T
    image_top1 = [experts[:, pos.numpy(), 0].reshape(L, *grid) for pos, grid in zip(probe.image_positions, probe.grids)]
    return RoutingMaps(experts, weights, probs, load, entropy, co, image_top1, probe.tokens)


def token_groups(tokens: list[str]) -> dict[str, np.ndarray]:
    """Boolean masks over a probe's tokens: ``image`` tokens, ``digit``, ``operator`` (+ - × ÷ =), ``word``."""
    t = [s.strip() for s in tokens]
    return {"image": np.array([s == "<|image_pad|>" for s in t]),
            "digit": np.array([s.isdigit() for s in t]),
            "operator": np.array([s in ("+", "-", "−", "×", "÷", "=") for s in t]),
            "word": np.array([s.isalpha() for s in t])}


def group_load(maps: RoutingMaps, mask: np.ndarray) -> np.ndarray:
    """(L, E) fraction of the masked tokens that chose each expert."""
    sel = maps.experts[:, mask]  # (L, n, k)
    E = maps.probs.shape[-1]
    n = max(int(mask.sum()), 1)
    return np.stack([np.bincount(layer.ravel(), minlength=E) / n for layer in sel])


# ------------------------------------------------------------------------------------------------ figures
def heatmap_figure(image: np.ndarray, cells: np.ndarray, title: str = "", signed: bool = False, opacity: float = 0.55):
    """plotly: ``cells`` ((rows, cols), one value per 16x16 merged token) as a translucent heat map over the
    camera image."""
    import plotly.graph_objects as go

    h, w = image.shape[:2]
    rows, cols = cells.shape
    fig = go.Figure(go.Image(z=image))
    fig.add_trace(go.Heatmap(z=cells, x0=TOKEN_PX / 2, dx=w / cols, y0=TOKEN_PX / 2, dy=h / rows, opacity=opacity,
                             colorscale="RdBu" if signed else "Inferno", zmid=0 if signed else None,
                             reversescale=signed, showscale=True))
    fig.update_layout(title=title, height=max(220, int(2.2 * h) + 60), width=max(360, int(2.2 * w) + 80),
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    fig.update_xaxes(visible=False, range=[0, w])
    fig.update_yaxes(visible=False, range=[h, 0])
    return fig


def expert_map_figure(image: np.ndarray, top1: np.ndarray, num_experts: int, title: str = ""):
    """plotly: the top-1 expert of each image token (one colour per expert) over the camera image."""
    import plotly.express as px
    import plotly.graph_objects as go

    h, w = image.shape[:2]
    rows, cols = top1.shape
    palette = px.colors.qualitative.Plotly + px.colors.qualitative.Set3
    scale = [[i / max(num_experts - 1, 1), palette[i % len(palette)]] for i in range(num_experts)]
    fig = go.Figure(go.Image(z=image))
    fig.add_trace(go.Heatmap(z=top1, x0=TOKEN_PX / 2, dx=w / cols, y0=TOKEN_PX / 2, dy=h / rows, opacity=0.5,
                             zmin=0, zmax=num_experts - 1, colorscale=scale,
                             colorbar={"title": "expert", "tickvals": list(range(num_experts))}))
    fig.update_layout(title=title, height=max(220, int(2.2 * h) + 60), width=max(360, int(2.2 * w) + 80),
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    fig.update_xaxes(visible=False, range=[0, w])
    fig.update_yaxes(visible=False, range=[h, 0])
    return fig


def matrix_figure(matrix: np.ndarray, title: str, x_title: str, y_title: str, x_labels=None, y_labels=None):
    """plotly heat map of a matrix (e.g. layer x expert load, expert co-activation)."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=matrix, x=x_labels, y=y_labels, colorscale="Viridis"))
    fig.update_layout(title=title, height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      xaxis_title=x_title, yaxis_title=y_title)
    return fig


# ------------------------------------------------------------------------------------------------ explorers
def explore_attention(probes: dict[str, Probe]):
    """ipywidgets: pick a board, a layer, a head and an answer token; shows that head's attention over the image
    and the attention rollout (outside a live kernel, e.g. under nbval, it renders once with the defaults)."""
    import ipywidgets as widgets

    cache: dict[str, Attention] = {}

    def get(name):
        if name not in cache:
            cache[name] = attention(probes[name])
        return cache[name]

    first = get(next(iter(probes)))
    layers, heads = first.weights.shape[:2]

    def show(board, layer, head, token):
        a, p = get(board), probes[board]
        token = min(token, len(a.tokens) - 1)
        heatmap_figure(p.images[0], a.images[0][layer, head, token],
                       f"layer {layer}, head {head}, token {a.tokens[token]!r}").show()
        heatmap_figure(p.images[0], a.rollout[0][token], f"rollout, token {a.tokens[token]!r}").show()

    return widgets.interactive(show, board=list(probes), layer=(0, layers - 1), head=(0, heads - 1),
                               token=(0, len(first.tokens) - 1))


def explore_routing(maps: dict[str, RoutingMaps], probes: dict[str, Probe]):
    """ipywidgets: pick a prompt, a layer and an image; shows the top-1 expert of every image patch and which
    experts were chosen together in that layer."""
    import ipywidgets as widgets

    first = next(iter(maps.values()))
    E = first.probs.shape[-1]

    def show(prompt, layer, image):
        m, p = maps[prompt], probes[prompt]
        image = min(image, len(p.images) - 1)
        expert_map_figure(p.images[image], m.image_top1[image][layer], E,
                          f"{prompt}: top-1 expert per patch, layer {layer}").show()
        matrix_figure(m.coactivation[layer], f"experts chosen together, layer {layer}", "expert", "expert").show()

    return widgets.interactive(show, prompt=list(maps), layer=(0, len(first.load) - 1),
                               image=(0, max(len(p.images) for p in probes.values()) - 1))


def explore_experts(maps: dict[str, RoutingMaps]):
    """ipywidgets: pick an expert; bars of the share of tokens choosing it, per layer, for each prompt."""
    import ipywidgets as widgets
    import plotly.graph_objects as go

    E = next(iter(maps.values())).probs.shape[-1]

    def show(expert):
        fig = go.Figure([go.Bar(name=which, x=[f"layer {layer}" for layer in range(len(m.load))], y=m.load[:, expert])
                         for which, m in maps.items()])
        fig.update_layout(title=f"expert {expert}: share of tokens choosing it", barmode="group", height=300)
        fig.show()

    return widgets.interactive(show, expert=(0, E - 1))


# ------------------------------------------------------------------------------------------------ pictures
def _titled(picture, title: str):
    """``picture`` with a white strip above it carrying ``title`` (unchanged when the title is empty)."""
    from PIL import Image, ImageDraw

    if not title:
        return picture
    canvas = Image.new("RGB", (picture.width, picture.height + 22), "white")
    canvas.paste(picture, (0, 22))
    ImageDraw.Draw(canvas).text((4, 4), title, fill=(0, 0, 0))
    return canvas


def overlay(image: np.ndarray, cells: np.ndarray, scale: int = 3, signed: bool = False, alpha: float = 0.55,
            title: str = ""):
    """A PIL picture: the camera image enlarged ``scale`` times with ``cells`` (one value per 16x16 token) as a
    colour overlay (``inferno``, or ``RdBu`` around 0 when ``signed``) and a title strip."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = image.shape[:2]
    if signed:
        m = np.abs(cells).max() or 1.0
        norm = (cells / m + 1) / 2
        colours = colormaps["RdBu_r"](norm)[..., :3]
    else:
        lo, hi = float(cells.min()), float(cells.max())
        colours = colormaps["inferno"]((cells - lo) / ((hi - lo) or 1.0))[..., :3]
    heat = Image.fromarray((colours * 255).astype(np.uint8)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    base = Image.fromarray(np.asarray(image)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    out = Image.blend(base, heat, alpha)
    return _titled(out, title)


def expert_overlay(image: np.ndarray, top1: np.ndarray, num_experts: int, scale: int = 3, title: str = ""):
    """A PIL picture: the top-1 expert of every image token as a colour (tab10) over the camera image."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    colours = colormaps["tab10"](top1 % 10)[..., :3]
    heat = Image.fromarray((colours * 255).astype(np.uint8)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    base = Image.fromarray(np.asarray(image)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    out = Image.blend(base, heat, 0.5)
    draw = ImageDraw.Draw(out)
    for r in range(top1.shape[0]):
        for c in range(top1.shape[1]):
            draw.text((c * TOKEN_PX * scale + 3, r * TOKEN_PX * scale + 2), str(int(top1[r, c])), fill=(255, 255, 255))
    return _titled(out, title)


def write_figures(out: str, vlm: str = "data_samples/vlm", policy: str = "data_samples/policy", seed: int = 0,
                  ig_steps: int = 128) -> list[str]:
    """The README's pictures of each view, for a held-out board (and, for routing, a robot episode's cameras):
    attention rollout of the answer digit, Integrated Gradients, occlusion, and the policy backbone's top-1 expert
    per patch over both cameras. Returns the PNG paths written in ``out``."""
    import os

    from .vla.observation import Observation
    from .vla.policy import ROBOT, load_policy
    from .vlm.api import load_vlm
    from .vlm.corpus import CorpusGenerator, CorpusRenderer
    from .world import make_env

    os.makedirs(out, exist_ok=True)
    model, processor = load_vlm(vlm)
    renderer = CorpusRenderer()
    gen = CorpusGenerator("heldout", seed=seed)
    for _ in range(50):  # the first held-out board the model solves
        s = gen.sample("solve")
        (board,) = renderer(s)
        probe = Probe(model, processor, [board], s.question)
        if probe.answer.replace(" ", "").endswith(f"={s.facts['answer']}"):
            break
    renderer.close()
    digit = probe.target_index("answer digit")[0]
    att = attention(probe)
    ig = attributions(probe, "integrated_gradients", target="answer digit", n_steps=ig_steps)
    occ = attributions(probe, "occlusion", target="answer digit")
    said = f"says {probe.answer!r}"
    pictures = {
        "attention_rollout.png": overlay(board, att.rollout[0][digit],
                                         title=f"attention rollout of the answer digit ({said})"),
        "integrated_gradients.png": overlay(board, ig.normalised, signed=True,
                                            title=f"Integrated Gradients, answer digit (gap {ig.delta:+.3f})"),
        "occlusion.png": overlay(board, occ.normalised, signed=True, title="occlusion of 16x16 cells, answer digit"),
    }
    pol = load_policy(policy)
    env = make_env("math_matching", "open_world")
    obs, info = env.reset(seed=seed)
    env.close()
    cams = Observation.coerce(obs)
    maps = routing(Probe(pol.vlm, pol.processor, pol.images(cams), info["instruction"], data_type=ROBOT))
    E = maps.probs.shape[-1]
    layer = len(maps.load) - 1
    pictures["experts_board.png"] = expert_overlay(cams.board, maps.image_top1[0][layer], E,
                                                   title=f"top-1 expert per patch, last layer (of {E})")
    pictures["experts_table.png"] = expert_overlay(cams.table, maps.image_top1[1][layer], E, scale=2,
                                                   title=f"top-1 expert per patch, last layer (of {E})")
    paths = []
    for name, picture in pictures.items():
        paths.append(os.path.join(out, name))
        picture.save(paths[-1])
    return paths


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m workbench.introspect",
                                 description="Write the README's pictures of attention, attributions and routing.")
    ap.add_argument("--out", default="notebooks/figures", help="folder for the PNGs")
    ap.add_argument("--vlm", default="data_samples/vlm")
    ap.add_argument("--policy", default="data_samples/policy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ig-steps", type=int, default=128)
    args = ap.parse_args(argv)
    use_all_cores()
    for path in write_figures(args.out, args.vlm, args.policy, args.seed, args.ig_steps):
        print("wrote", path)


if __name__ == "__main__":
    from .settings import run_cli

    run_cli(main)
