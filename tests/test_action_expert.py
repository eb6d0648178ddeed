"""The diffusion action expert: config, normaliser, adaLN-Zero init, reasoning injection, padded chunks,
determinism, overfitting and save/load. Small configs keep the whole file to a few seconds on a CPU."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.vla.action_expert import ActionExpert, ActionExpertConfig, ActionNormalizer

SMALL = dict(obs_dim=16, reasoning_dim=8, hidden=32, depth=4, heads=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stats(root):
    with open(os.path.join(root, "data_samples", "demos", "meta", "stats.json")) as f:
        return json.load(f)


def make(stats=None, **kw):
    torch.manual_seed(0)
    cfg = ActionExpertConfig(**{**SMALL, **kw})
    return ActionExpert(cfg, ActionNormalizer.from_stats(stats) if stats else None)


def inputs(cfg, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(obs=torch.randn(B, cfg.obs_dim, generator=g), state=torch.rand(B, cfg.state_dim, generator=g),
                reasoning=torch.randn(B, cfg.reasoning_dim, generator=g))


def perturb(model, scale=0.1):
    """Move every parameter off its (partly zero) init, as training would."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kw, match", [
    (dict(reasoning_injection="middle"), "reasoning_injection must be one of .*latter_half"),
    (dict(beta_schedule="cosine"), "beta_schedule must be one of .*squaredcos_cap_v2"),
    (dict(prediction_type="x0"), "prediction_type must be one of .*epsilon"),
    (dict(hidden=30, heads=4), "divisible by heads"),
    (dict(depth=0), "depth must be a positive int"),
    (dict(num_inference_steps=200), "num_inference_steps"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        ActionExpertConfig(**kw)


def test_config_dict_round_trip():
    cfg = ActionExpertConfig(depth=3, reasoning_injection="all")
    assert ActionExpertConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.chunk_size == 16 and cfg.reasoning_blocks == (0, 1, 2)
    with pytest.raises(ValueError, match="unknown ActionExpertConfig keys \\['widht'\\]"):
        ActionExpertConfig.from_dict({"widht": 3})


def test_normalizer_round_trip_and_stats(stats):
    n = ActionNormalizer.from_stats(stats)
    lo, hi = torch.tensor(stats["action"]["min"]), torch.tensor(stats["action"]["max"])
    torch.testing.assert_close(n.normalize_action(torch.stack([lo, hi])), torch.tensor([[-1.0] * 4, [1.0] * 4]))
    a = lo + (hi - lo) * torch.rand(5, 16, 4)
    torch.testing.assert_close(n.unnormalize_action(n.normalize_action(a)), a)
    s = torch.tensor(stats["observation.state"]["max"])
    torch.testing.assert_close(n.normalize_state(s), torch.ones(4))
    assert set(n.state_dict()) == {"action_min", "action_max", "state_min", "state_max"}
    with pytest.raises(ValueError, match="observation.state"):
        ActionNormalizer.from_stats({"action": stats["action"]})


def test_normalizer_constant_dimension():
    n = ActionNormalizer([0.0, 0.5], [1.0, 0.5], [0.0], [1.0])  # grip never changes
    out = n.normalize_action(torch.tensor([[0.5, 0.5]]))
    assert torch.isfinite(out).all() and out[0, 1] == 0
    torch.testing.assert_close(n.unnormalize_action(out), torch.tensor([[0.5, 0.5]]))


def test_shapes(stats):
    m = make(stats)
    x = inputs(m.config)
    noisy = torch.randn(3, 16, 4)
    assert m(noisy, torch.tensor([0, 50, 99]), **x).shape == (3, 16, 4)
    a = m.sample(**x)
    assert a.shape == (3, 16, 4)
    lo, hi = m.normalizer.action_min, m.normalizer.action_max
    assert (a >= lo - 1e-6).all() and (a <= hi + 1e-6).all()  # clip_sample keeps actions within the data range
    with pytest.raises(ValueError, match="obs must have shape"):
        m.sample(torch.randn(3, 5), x["state"])


def test_adaln_zero_init():
    m = make()
    x = inputs(m.config)
    out = m(torch.randn(3, 16, 4), torch.tensor([1, 2, 3]), **x)
    assert torch.equal(out, torch.zeros_like(out))
    h, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in m.blocks:
        assert torch.equal(block(h, c), h)


@pytest.mark.parametrize("mode, blocks", [("latter_half", (2, 3)), ("former_half", (0, 1)), ("all", (0, 1, 2, 3)),
                                          ("off", ())])
def test_reasoning_injection_selects_blocks(mode, blocks):
    m = make(reasoning_injection=mode)
    assert m.reasoning_blocks == blocks and (m.reasoning_proj is None) == (mode == "off")
    perturb(m)
    outs = []
    hooks = [b.register_forward_hook(lambda mod, args, out: outs.append(out)) for b in m.blocks]
    x = inputs(m.config)
    noisy, t = torch.randn(3, 16, 4), torch.tensor([5, 50, 95])
    final_a = m(noisy, t, **x)
    final_b = m(noisy, t, **{**x, "reasoning": torch.randn(3, m.config.reasoning_dim)})
    for h in hooks:
        h.remove()
    a, b = outs[:4], outs[4:]
    first = blocks[0] if blocks else 4
    for i in range(4):  # blocks before the first reasoning block cannot see it; from there on, all do
        assert torch.equal(a[i], b[i]) == (i < first), f"block {i}"
    assert torch.equal(final_a, final_b) == (mode == "off")
    no_reasoning = m(noisy, t, x["obs"], x["state"])  # reasoning=None: observation embedding everywhere
    assert torch.equal(no_reasoning, final_a) == (mode == "off")


def test_sampling_reproduces_chunks_that_end_in_padding():
    """Training and sampling see the same whole chunk. (A version that hid padded steps from attention in
    training fitted chunks like these to a tiny loss, yet sampled them wrongly.)"""
    m = make(depth=2, hidden=64)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(4, 16, 4, generator=g) * 2 - 1
    ends = torch.tensor([16, 10, 5, 2])  # real steps per chunk; the rest holds the last real one
    held = real.clone()
    for i, e in enumerate(ends):
        held[i, e:] = real[i, e - 1]
    obs, state = torch.randn(4, 16, generator=g), torch.rand(4, 4, generator=g)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    for _ in range(300):
        loss, _ = m.compute_loss(held.repeat(4, 1, 1), obs.repeat(4, 1), state.repeat(4, 1), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = m.sample(obs, state, generator=torch.Generator().manual_seed(0))
    err = (a - held).abs().mean((1, 2))  # per chunk
    assert err.max() < 0.25, err
    assert (a[2, 5:] - held[2, 4]).abs().mean() < 0.25  # the held tail is sampled as held


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_is_the_mse_to_each_prediction_types_target(prediction_type):
    """The loss, recomputed by hand from the same noise and timesteps, with each target written out
    (v-prediction: v = sqrt(abar) * noise - sqrt(1 - abar) * x0)."""
    m = make(prediction_type=prediction_type)
    perturb(m, 0.05)
    actions, x = torch.rand(2, 16, 4), inputs(m.config, B=2)
    loss, terms = m.compute_loss(actions, **x, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x0 = m.normalizer.normalize_action(actions)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, m.config.num_train_timesteps, (2,), generator=g)
    abar = m.scheduler.alphas_cumprod[t].view(-1, 1, 1)
    target = {"epsilon": noise, "sample": x0, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0}
    with torch.no_grad():
        pred = m(m.scheduler.add_noise(x0, noise, t), t, x["obs"], x["state"], x["reasoning"])
    assert loss.item() == pytest.approx(((pred - target[prediction_type]) ** 2).mean().item(), rel=1e-5)
    assert loss.requires_grad and terms["diffusion"] == pytest.approx(loss.item())


def test_sample_deterministic_under_generator(stats):
    m = make(stats)
    perturb(m, 0.05)
    x = inputs(m.config)
    a = m.sample(**x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, m.sample(**x, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, m.sample(**x, generator=torch.Generator().manual_seed(1)))


def test_overfits_four_chunks():
    m = make(depth=2, hidden=64)
    g = torch.Generator().manual_seed(0)
    actions = torch.rand(4, 16, 4, generator=g) * 2 - 1
    obs, state = torch.randn(4, 16, generator=g), torch.rand(4, 4, generator=g)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(200):
        loss, _ = m.compute_loss(actions.repeat(4, 1, 1), obs.repeat(4, 1), state.repeat(4, 1), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    a = m.sample(obs, state, generator=torch.Generator().manual_seed(0))  # each obs gets back its own chunk
    own, others = ((a - actions) ** 2).mean(), ((a - actions.roll(1, 0)) ** 2).mean()
    assert own < 0.5 * others, (own, others)


def test_safetensors_round_trip(stats, tmp_path):
    m = make(stats)
    perturb(m, 0.05)
    save_file(m.state_dict(), str(tmp_path / "expert.safetensors"))
    fresh = make()  # identity normaliser until the bounds are loaded
    fresh.load_state_dict(load_file(str(tmp_path / "expert.safetensors")))
    torch.testing.assert_close(fresh.normalizer.action_max, torch.tensor(stats["action"]["max"]))
    x = inputs(m.config)
    assert torch.equal(m.sample(**x, generator=torch.Generator().manual_seed(3)),
                       fresh.sample(**x, generator=torch.Generator().manual_seed(3)))
