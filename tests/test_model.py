"""The model library: adapter equations, unified token interface, factory, weights in/out."""
import math

import pytest
import torch
import torch.nn.functional as F

from cladapter_core import CLAdapter, ModelError, build_model, load_model, save_model
from cladapter_core.param_models import ADAPTER_FIELDS

TINY_VIT = dict(img_size=32, patch_size=8, backbone_kwargs={"depth": 2}, pretrained=False)


def reference_adapter(adapter: CLAdapter, h: torch.Tensor) -> torch.Tensor:
    """DESIGN.md's equations written out independently, with the reference code's
    (B, K, r, r) repeat-multiply-sum formulation of M."""
    def ln(mod, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias

    x = ln(adapter.norm_in, h)
    for blk in adapter.blocks:
        at = blk.attn
        y = ln(blk.norm1, x)
        q = y.mean(dim=1)
        cos = torch.stack([(q * c).sum(-1) / (q.norm(dim=-1) * c.norm()) for c in at.centers], dim=1)
        a = torch.exp(cos / at.temperature)
        a = a / a.sum(dim=1, keepdim=True)
        b, k = a.shape
        t = at.transforms.unsqueeze(0).repeat(b, 1, 1, 1)           # (B, K, r, r)
        m = (a[:, :, None, None] * t).sum(dim=1)
        z = (y @ at.down.weight.t() + at.down.bias) @ m @ at.up.weight.t() + at.up.bias
        hidden = F.gelu(ln(blk.norm2, z) @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias)
        x = z + hidden @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias
    return ln(adapter.norm_out, x)


def test_adapter_matches_design_equations():
    torch.manual_seed(0)
    adapter = CLAdapter(48, num_centers=5, rank=12, depth=2, temperature=0.7)
    h = torch.randn(3, 10, 48, dtype=torch.float64)
    adapter = adapter.double()
    assert torch.allclose(adapter(h), reference_adapter(adapter, h), atol=1e-10)


def test_adapter_public_structure_and_assignments():
    adapter = CLAdapter(32, num_centers=7, rank=8)
    assert adapter.norm_in and adapter.norm_out and len(adapter.blocks) == 1
    blk = adapter.blocks[0]
    assert {"norm1", "attn", "norm2", "mlp"} <= set(dict(blk.named_children()))
    assert blk.attn.centers.shape == (7, 32) and blk.attn.transforms.shape == (7, 8, 8)
    assert (blk.attn.down.in_features, blk.attn.down.out_features) == (32, 8)
    assert (blk.attn.up.in_features, blk.attn.up.out_features) == (8, 32)
    a = blk.attn.assignments(torch.randn(4, 9, 32))
    assert a.shape == (4, 7) and torch.allclose(a.sum(1), torch.ones(4))
    # every parameter takes part in forward: none is dead
    adapter(torch.randn(2, 5, 32)).sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())


def test_identity_init_and_checkpointing_give_same_numbers():
    torch.manual_seed(1)
    a = CLAdapter(16, num_centers=3, rank=16, init="identity")
    assert torch.equal(a.blocks[0].attn.transforms[2], torch.eye(16))
    b = CLAdapter(16, num_centers=3, rank=16, init="identity", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 16, requires_grad=True)
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb)
    ga = torch.autograd.grad(ya.square().sum(), a.blocks[0].attn.transforms)[0]
    gb = torch.autograd.grad(yb.square().sum(), b.blocks[0].attn.transforms)[0]
    assert torch.allclose(ga, gb, atol=1e-6)


@pytest.mark.parametrize("name,kwargs,x,n_tokens,dim", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, backbone_kwargs={"depth": 1}), (2, 3, 32, 32), 16, 192),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, backbone_kwargs={"depth": 1}), (2, 3, 32, 32), 4, 192),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, backbone_kwargs={"depth": 1}), (2, 3, 28, 28), 4, 384),
    ("resnet18", {}, (2, 3, 64, 64), 4, 512),
    ("swin_tiny_patch4_window7_224", dict(backbone_kwargs={"depths": (1, 1, 1, 1)}), (1, 3, 224, 224), 49, 768),
    ("r3d_18", {}, (1, 3, 8, 32, 32), 1 * 2 * 2, 512),
])
def test_token_shapes(name, kwargs, x, n_tokens, dim):
    model = build_model(name, 3, num_centers=4, rank=8, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        tokens = model.backbone.forward_tokens(torch.randn(*x))
        assert tokens.shape == (x[0], n_tokens, dim)
        assert model(torch.randn(*x)).shape == (x[0], 3)


def test_vit_tokens_drop_every_prefix_token():
    model = build_model("vit_small_patch14_reg4_dinov2", 2, rank=8, num_centers=2, img_size=28,
                        backbone_kwargs={"depth": 1}, pretrained=False).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        full = model.backbone.model.forward_features(x)   # 1 class + 4 registers + 4 patches
        assert full.shape[1] == 9
        assert torch.equal(model.backbone.forward_tokens(x), full[:, 5:])


def test_stage1_gradients_reach_only_adapter_and_head():
    model = build_model("resnet18", 4, num_centers=3, rank=8, pretrained=False).set_stage(1).train()
    assert not model.backbone.training  # BatchNorm statistics frozen
    bn = model.backbone.model.bn1
    before = bn.running_mean.clone()
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32) * 3 + 1), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.equal(bn.running_mean, before)
    model.set_stage(2).train()
    assert model.backbone.training and all(p.requires_grad for p in model.parameters())


def test_linear_mode_uses_class_token_and_has_no_adapter():
    model = build_model("vit_tiny_patch16_224", 3, mode="linear", **TINY_VIT).eval()
    assert model.adapter is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls = model.backbone.model.forward_features(x)[:, 0]
        cls = model.backbone.model.fc_norm(cls)
        assert torch.allclose(model.features(x), cls, atol=1e-6)


def test_param_report_vit_base_in_paper_range():
    report = build_model("vit_base_patch16_224", 100, num_centers=20, pretrained=False).param_report()
    assert 7.0 <= report["adapter_overhead_pct"] <= 10.4
    assert report["total"] == report["backbone"] + report["adapter"] + report["head"]
    assert report["head"] == 768 * 100 + 100
    assert report["adapter"] == pytest.approx(6.45e6, rel=0.01)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", 3, num_centers=4, rank=8,
                        class_names=["a", "b", "c"], **TINY_VIT).eval()
    save_model(model, tmp_path / "m")
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"backbone", "adapter", "head"}
    again = load_model(tmp_path / "m")
    assert again.class_names == ["a", "b", "c"] and again.backbone.data_config["input_size"] == [3, 32, 32]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert not list(tmp_path.glob(".m.tmp-*"))


def _backbone_state(**kw):
    torch.manual_seed(123)
    return build_model("resnet18", 2, num_centers=2, rank=4, pretrained=False, **kw).backbone.model.state_dict()


def test_weights_from_a_local_file_in_both_formats(tmp_path):
    from safetensors.torch import save_file
    state = _backbone_state()
    state_with_head = {**state, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state_with_head}, tmp_path / "w.pth")
    for uri in (tmp_path / "w.safetensors", f"file://{tmp_path / 'w.pth'}"):
        model = build_model("resnet18", 2, num_centers=2, rank=4, weights=str(uri), pretrained=False)
        got = model.backbone.model.state_dict()
        assert all(torch.equal(got[k], state[k]) for k in state)


def test_vit_weights_at_another_size_are_resampled_as_timm_does(tmp_path):
    """224 px ViT weights on disk, the model built at 64 px on purpose (model.input_size):
    the position embeddings are resampled by timm's own conversion, as `pretrained=True`
    would, and every other weight is the file's. The same from a saved CLAdapter
    model's keys (`backbone.model.` prefix)."""
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()
    save_file(state, str(tmp_path / "vit.safetensors"))
    save_file({f"backbone.model.{k}": v for k, v in state.items()}, str(tmp_path / "prefixed.safetensors"))
    want = resample_abs_pos_embed(state["pos_embed"], new_size=[4, 4], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=True)
    for name in ("vit.safetensors", "prefixed.safetensors"):
        model = build_model("vit_tiny_patch16_224", 3, weights=str(tmp_path / name),
                            backbone_kwargs={"img_size": 64}, input_size=64, pretrained=False)
        got = model.backbone.model.state_dict()
        assert got["pos_embed"].shape == (1, 17, 192) and torch.equal(got["pos_embed"], want)
        assert all(torch.equal(got[k], state[k]) for k in state if k != "pos_embed")
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_weights_from_s3(tmp_path, bucket):
    import boto3
    from safetensors.torch import save_file
    state = _backbone_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    boto3.client("s3").upload_file(str(tmp_path / "w.safetensors"), bucket, "ckpt/w.safetensors")
    model = build_model("resnet18", 2, num_centers=2, rank=4, weights=f"s3://{bucket}/ckpt/w.safetensors", pretrained=False)
    assert torch.equal(model.backbone.model.conv1.weight, state["conv1.weight"])
    with pytest.raises(ModelError, match="cannot download"):
        build_model("resnet18", 2, weights=f"s3://{bucket}/ckpt/missing.safetensors", pretrained=False)


def test_weights_of_wrong_shapes_list_the_keys(tmp_path):
    from safetensors.torch import save_file
    state = _backbone_state()
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    del state["layer4.1.bn2.bias"]
    state["extra.thing"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelError) as err:
        build_model("resnet18", 2, weights=str(tmp_path / "bad.safetensors"), pretrained=False)
    msg = str(err.value)
    assert "conv1.weight: weights (8, 3, 7, 7) vs model (64, 3, 7, 7)" in msg
    assert "layer4.1.bn2.bias" in msg and "extra.thing" in msg and "bad.safetensors" in msg


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="refused or unreadable"):
        build_model("resnet18", 2, weights=str(tmp_path / "evil.pt"), pretrained=False)


def test_bad_model_options_are_refused_naming_the_option_and_the_value():
    with pytest.raises(ModelError, match="vit_base_patch16_224"):
        build_model("vit_base_patch16_244", 2, pretrained=False)
    with pytest.raises(ModelError, match="model.num_centers: must be an integer >= 1, got 0"):
        build_model("resnet18", 2, num_centers=0, pretrained=False)
    with pytest.raises(ModelError, match="model.rank: must be an integer >= 1, got 0"):
        build_model("resnet18", 2, rank=0, pretrained=False)
    with pytest.raises(ModelError, match="model.rank: must be an integer >= 1, got 0"):
        CLAdapter(8, rank=0)
    with pytest.raises(ModelError, match="invalid adapter options: ranks"):
        CLAdapter(8, ranks=4)
    with pytest.raises(ModelError, match="no such file"):
        build_model("resnet18", 2, weights="/nonexistent/w.safetensors", pretrained=False)
    with pytest.raises(ModelError, match="mode must be one of"):
        build_model("resnet18", 2, mode="lora", pretrained=False)


def test_overhead_formula_scales_with_k():
    small = CLAdapter(64, num_centers=2, rank=8)
    big = CLAdapter(64, num_centers=12, rank=8)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(big) - n(small) == 10 * (64 + 8 * 8)
    assert math.isclose(n(small), 2 * 64 + (2 * 64 + 2 * 64 + 2 * 8 * 8 + 64 * 8 + 8 + 8 * 64 + 64
                                            + 2 * 64 + 64 * 256 + 256 + 256 * 64 + 64) + 2 * 64)


def test_build_model_defaults_are_the_params_defaults():
    """A model built with nothing but a backbone and classes has the config of one built
    from the default params: the options' defaults are declared once (param_models)."""
    from cladapter_core.params import defaults, model_kwargs
    d = defaults()
    assert d["model"]["pretrained"]  # the paper's recipe; no download here, on both sides
    d["model"]["pretrained"] = False
    plain = build_model(d["model"]["backbone"], 3, img_size=32, pretrained=False)
    from_params = build_model(num_classes=3, **{**model_kwargs(d), "backbone_kwargs": {"img_size": 32}})
    assert plain.config_dict() == from_params.config_dict()
    assert {k: plain.config_dict()[k] for k in ADAPTER_FIELDS} == {k: d["model"][k] for k in ADAPTER_FIELDS}
    assert plain.mode == d["train"]["mode"] and plain.config_dict()["rank"] == 256  # the paper's r
