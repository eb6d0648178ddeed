"""The mixture-of-experts language model: config, upcycling, routing, load balancing, dispatch, save/rebuild."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_model, save_model
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from workbench.vla.moe import (
    MoEConfig,
    MoEMLP,
    count_moe_parameters,
    dispatch,
    load_balancing_loss,
    moe_config_of,
    routing,
    routing_context,
    upcycle,
)
from workbench.vlm.api import build_inputs, load_vlm
from workbench.world.writing import render_card, render_text

LAYERS, HIDDEN, INTERMEDIATE = 4, 128, 512  # the shipped tiny checkpoint
EXPERT = 3 * HIDDEN * INTERMEDIATE  # gate, up, down projections


@pytest.fixture(scope="module")
def pretrained(root):
    return load_vlm(os.path.join(root, "data_samples", "vlm"))


@pytest.fixture(scope="module")
def board():
    return render_text("3+4=?", "sans", size=(128, 64))


@pytest.fixture(scope="module")
def inputs(pretrained, board):
    """A real two-camera image + text training example (batch of 1)."""
    return build_inputs(pretrained[1], [board, render_card(7)], "Which card answers the equation?", "7")


def fresh(model, **kwargs):
    """An upcycled copy of ``model``; seeded so that routers are reproducible."""
    torch.manual_seed(0)
    return upcycle(copy.deepcopy(model), MoEConfig(**kwargs))


def test_config_round_trips_through_json():
    cfg = MoEConfig(variant="shared_dynamic", num_experts=4, top_k=1, aux_loss_coef=0.0)
    assert MoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "sparse"}, "expected one of .*'dynamic'"),
    ({"num_experts": 0}, "num_experts must be a positive int"),
    ({"top_k": 1.5}, "top_k must be a positive int"),
    ({"num_experts": 4, "top_k": 5}, r"top_k \(5\) must be <= num_experts \(4\)"),
    ({"aux_loss_coef": -0.1}, "aux_loss_coef must be a finite number >= 0"),
    ({"router_init_std": float("nan")}, "router_init_std"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_config_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match="unknown MoEConfig keys \\['experts'\\]"):
        MoEConfig.from_dict({"experts": 8})


def test_dense_variant_leaves_model_unchanged(pretrained):
    model = copy.deepcopy(pretrained[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert upcycle(model, MoEConfig(variant="dense")) is model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert moe_config_of(model) is None and count_moe_parameters(model)["active"] == sum(
        p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", ["dynamic", "shared_dynamic", "static", "static_dynamic"])
def test_fresh_upcycle_computes_what_the_dense_model_did(pretrained, inputs, variant):
    model = pretrained[0]
    moe = fresh(model, variant=variant)
    assert all(isinstance(layer.mlp, MoEMLP) for layer in moe.model.language_model.layers)
    with torch.no_grad(), routing_context(moe, inputs["attention_mask"], data_type=torch.tensor([1])):
        # float32 rounding of a different summation order grows with the logits (|logit| ~ 10 on the shipped VLM)
        torch.testing.assert_close(moe(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_routing_shapes_and_weights(pretrained, inputs):
    moe = fresh(pretrained[0], num_experts=4, top_k=2)
    with torch.no_grad():
        moe(**inputs)
    B, T = inputs["input_ids"].shape
    records = routing(moe)
    assert len(records) == LAYERS
    for r in records:
        assert r.logits.shape == (B, T, 4) and r.logits.dtype == torch.float32
        assert r.experts.shape == (B, T, 2) and r.experts.dtype == torch.long
        assert r.weights.shape == (B, T, 2) and r.weights.dtype == torch.float32
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(B, T))
        assert torch.equal(r.experts, r.logits.topk(2).indices) and r.static is None and r.mask.all()


def test_aux_loss_is_top_k_under_uniform_routing_and_reaches_the_router(pretrained, inputs):
    moe = fresh(pretrained[0], top_k=2, router_init_std=0.0)  # zero router: uniform probabilities
    assert load_balancing_loss(moe).item() == 0  # no forward yet
    moe(**inputs)
    loss = load_balancing_loss(moe)
    assert abs(loss.item() - 2) < 1e-4
    loss.backward()
    assert all(layer.mlp.router.weight.grad is not None for layer in moe.model.language_model.layers)


def test_padding_is_left_out_of_the_aux_loss(pretrained):
    torch.manual_seed(0)
    layer = MoEMLP(pretrained[0].model.language_model.layers[0].mlp, MoEConfig(num_experts=4, router_init_std=1.0))
    x, pad = torch.randn(1, 10, HIDDEN), torch.randn(1, 5, HIDDEN)
    with torch.no_grad():
        y = layer(x)
        want = layer.last_routing.load_balancing_loss()
        with routing_context(layer, attention_mask=torch.tensor([[1] * 10 + [0] * 5])):
            y_padded = layer(torch.cat([x, pad], 1))
        got = layer.last_routing.load_balancing_loss()
        layer(torch.cat([x, pad], 1))  # without the mask, padding counts
        unmasked = layer.last_routing.load_balancing_loss()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(y_padded[:, :10], y)
    assert not torch.allclose(unmasked, want)


def test_each_token_runs_only_through_its_top_k_experts(pretrained, inputs):
    moe = fresh(pretrained[0], num_experts=8, top_k=2)
    mlp = moe.model.language_model.layers[0].mlp
    rows = [0] * 8
    hooks = [e.register_forward_hook(lambda mod, args, out, i=i: rows.__setitem__(i, rows[i] + len(args[0])))
             for i, e in enumerate(mlp.experts)]
    with torch.no_grad():
        moe(**inputs)
    for h in hooks:
        h.remove()
    N = inputs["input_ids"].numel()
    assert sum(rows) == N * 2  # a dense dispatch would be N * 8
    assert rows == torch.bincount(routing(moe)[0].experts.flatten(), minlength=8).tolist()


@pytest.mark.parametrize("variant", ["dynamic", "static_dynamic"])
def test_generate_with_kv_cache(pretrained, board, variant):
    model, proc = pretrained
    moe = fresh(model, variant=variant).eval()
    prompt = build_inputs(proc, [board], "What is written on the whiteboard?")
    kw = {"min_new_tokens": 3, "max_new_tokens": 3, "do_sample": False, "use_cache": True,
          "pad_token_id": proc.tokenizer.pad_token_id}
    with torch.no_grad(), routing_context(moe, prompt["attention_mask"], data_type=torch.tensor([0])):
        out = moe.generate(**prompt, **kw)
    assert torch.equal(out, model.generate(**prompt, **kw))  # identical experts, same greedy tokens
    assert routing(moe)[0].experts.shape == (1, 1, 2)  # the last forward was a cached step over one new token


def test_static_variant_routes_by_data_type(pretrained, inputs):
    model = pretrained[0]
    moe = fresh(model, variant="static")
    with pytest.raises(ValueError, match="routes each sample by its data type.*routing_context"):
        moe(**inputs)
    with pytest.raises(ValueError, match=r"data_type has shape \(2,\), expected \(1,\)"):
        with routing_context(moe, data_type=[0, 1]):
            moe(**inputs)
    with pytest.raises(ValueError, match="0 = image-text / 1 = robot"):
        with routing_context(moe, data_type=[2]):
            pass
    with torch.no_grad():
        for layer in moe.model.language_model.layers:
            layer.mlp.static_experts[1].down_proj.weight.mul_(2)  # the robot expert now differs
        want = model(**inputs).logits
        with routing_context(moe, data_type=[0]):
            image_text = moe(**inputs).logits
        with routing_context(moe, data_type=[1]):
            robot = moe(**inputs).logits
    assert torch.equal(image_text, want) and not torch.allclose(robot, want)
    assert routing(moe)[0].static.eq(1).all() and routing(moe)[0].logits is None


def test_upcycling_twice_is_refused(pretrained):
    moe = fresh(pretrained[0], num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle(moe, MoEConfig())


def test_count_moe_parameters(pretrained):
    dense_total = count_moe_parameters(pretrained[0])["total"]
    n = count_moe_parameters(fresh(pretrained[0], num_experts=8, top_k=2))
    assert n["total"] - n["active"] == LAYERS * 6 * EXPERT  # 6 idle experts per layer
    assert n["active"] == dense_total + LAYERS * (8 * HIDDEN + EXPERT)  # + router + a second active expert


def test_save_and_rebuild(pretrained, inputs, tmp_path):
    model = pretrained[0]
    cfg = MoEConfig(variant="shared_dynamic", num_experts=4, top_k=2)
    moe = fresh(model, **cfg.to_dict())
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(0.01 * torch.randn_like(p))  # experts no longer identical
    save_model(moe, tmp_path / "moe.safetensors")
    moe.config.save_pretrained(tmp_path)
    rebuilt = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(tmp_path))
    assert moe_config_of(rebuilt) == cfg and moe_config_of(model) is None
    load_model(upcycle(rebuilt, moe_config_of(rebuilt)), tmp_path / "moe.safetensors")  # strict: names match
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs).logits, moe(**inputs).logits)


def test_2b_preset_upcycles_on_the_meta_device():
    """Qwen2-VL-2B's sizes, built without memory (meta tensors), upcycled to 8 experts / top-2: parameter counts and
    the memory a bf16 AdamW step would need (what workbench/configs/accelerate_8gpu_zero2.yaml plans for)."""
    from workbench.vla.moe import MoEConfig, count_moe_parameters, upcycle
    from workbench.vlm.modeling import build_config, training_memory_gib
    from workbench.vlm.processing import build_processor, tokenizer_texts

    proc = build_processor(tokenizer_texts(50), vocab_size=400)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(build_config(proc.tokenizer, "2b", vocab_size=151_936))
    dense = sum(p.numel() for p in model.parameters())
    assert 2.0e9 < dense < 2.5e9 and next(model.parameters()).is_meta  # Qwen2-VL-2B: 2.2 B
    upcycle(model, MoEConfig(num_experts=8, top_k=2))
    n = count_moe_parameters(model)
    mlp = 3 * 1536 * 8960  # gate, up, down of one decoder MLP
    assert n["total"] == dense + 28 * (7 * mlp + 8 * 1536)  # 7 more experts and a router per layer
    assert n["active"] == n["total"] - 28 * 6 * mlp  # 6 idle experts per token and layer
    mem = training_memory_gib(n["total"])
    assert 140 < mem["total"] < 170  # 10.3 B parameters x 16 bytes: a ZeRO-2 job across 8 GPUs, not one


def test_dispatch_of_one_token_calls_only_its_experts_and_matches_the_batched_path():
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
    called = []
    for e, expert in enumerate(experts):
        expert.register_forward_hook(lambda *_, e=e: called.append(e))
    x = torch.randn(3, 8)
    idx = torch.tensor([[2, 0], [1, 3], [3, 2]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    batched = dispatch(experts, x, idx, weights)
    for n in range(3):
        called.clear()
        one = dispatch(experts, x[n:n + 1], idx[n:n + 1], weights[n:n + 1])
        assert sorted(called) == sorted(idx[n].tolist())
        torch.testing.assert_close(one, batched[n:n + 1])
