"""check_parallelizable: every refusal of parallelize from the model and the tp degree alone
(no mesh, no process group, meta device), and the parallelize steps used one by one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ucfvit.models import build_model
from ucfvit.parallel import apply_ac, apply_compile, check_parallelizable, resolve_wrap


def meta(family: str = "vit", **kwargs):
    with torch.device("meta"):
        return build_model(family, "debug", **kwargs)


def test_a_good_configuration_passes_without_a_process_group():
    for tp in (1, 2, 4, 8):
        options = dict(sequence_parallel=True, activation_checkpointing="selective", compile=True)
        check_parallelizable(meta("mae"), tp, **options)
    assert not dist.is_initialized()


HEADS_12 = (
    r"^blocks\.0\.attn has 12 heads: num_heads=12 is not divisible by tp=8; choose tp among \[1, 2, 3, 4, 6, 12\] "
)
DECODER = dict(decoder_embed_dim=48, decoder_num_heads=6)
REFUSALS = [
    ("vit", dict(embed_dim=96, num_heads=12), 8, {}, HEADS_12 + r"or another num_heads$"),
    ("mae", DECODER, 4, {}, r"^decoder_blocks\.0\.attn has 6 heads: num_heads=6 is not divisible by tp=4"),
    ("vit", {}, 2, dict(activation_checkpointing="partial"), r"activation_checkpointing='partial' is unknown"),
    ("vit", {}, 2, dict(activation_checkpointing="full", compile=True), r"use activation_checkpointing='selective'"),
    ("vit", {}, 2, dict(plan={"layers.*.wq": "colwise"}), r"'layers\.\*\.wq' matches no module of ViT"),
    ("vit", {}, 1, dict(blocks=["layers.*"]), r"'layers\.\*' matches no module"),
    # An unknown style is refused on every mesh, also where tp = 1 applies no style.
    ("vit", {}, 1, dict(plan={"blocks.*.attn.q": "columnwise"}), r"plan\['blocks.*q'\]: .* 'columnwise' is unknown"),
    ("vit", {}, 0, {}, r"tp=0 must be a positive integer"),
]


@pytest.mark.parametrize("family, kwargs, tp, options, match", REFUSALS)
def test_refusals_need_no_mesh(family, kwargs, tp, options, match):
    with pytest.raises(ValueError, match=match):
        check_parallelizable(meta(family, **kwargs), tp, **options)
    assert not dist.is_initialized()


def test_full_checkpointing_with_compile_is_fine_without_tensor_parallelism():
    check_parallelizable(meta(), 1, activation_checkpointing="full", compile=True)


def test_a_model_without_a_registered_plan_needs_one():
    with pytest.raises(ValueError, match=r"no tensor-parallel plan is registered for Linear"):
        check_parallelizable(torch.nn.Linear(4, 4), 1)
    check_parallelizable(torch.nn.Sequential(torch.nn.Linear(4, 8)), 2, plan={"0": "colwise"})
    with pytest.raises(ValueError, match=r"0: dimension 6 of a tensor-parallel Linear is not divisible by tp=4"):
        check_parallelizable(torch.nn.Sequential(torch.nn.Linear(4, 6)), 4, plan={"0": "colwise"})


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_apply_ac_and_compile_alone_keep_values_and_gradients(mode):
    torch.manual_seed(0)
    ref = build_model("vit", "debug", img_size=(16, 16), num_classes=4)
    model = build_model("vit", "debug", img_size=(16, 16), num_classes=4)
    model.load_state_dict(ref.state_dict())
    apply_ac(model.blocks, mode)
    apply_compile(model.blocks, backend="eager")
    x = torch.randn(2, 3, 16, 16)
    ref(x).pow(2).mean().backward()
    model(x).pow(2).mean().backward()
    assert set(model.state_dict()) == set(ref.state_dict())
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_wrap_auto_makes_the_root_the_only_unit_where_the_mesh_shards_nothing():
    assert resolve_wrap("auto", fsdp=1, tp=1) == "model"  # 1x1x1 and pure replication Nx1x1
    assert resolve_wrap("auto", fsdp=2, tp=1) == "blocks"
    assert resolve_wrap("auto", fsdp=1, tp=2) == "blocks"
    assert resolve_wrap("blocks", fsdp=1, tp=1) == "blocks" and resolve_wrap("model", fsdp=8, tp=1) == "model"
    with pytest.raises(ValueError, match=r"wrap='root' is unknown; choose one of \('auto', 'model', 'blocks'\)"):
        check_parallelizable(meta(), 1, wrap="root")


def test_compile_keeps_module_names():
    from ucfvit.models import build_model
    from ucfvit.parallel import apply_compile

    model = build_model("vit", "debug")
    names = sorted(model.state_dict())
    apply_compile(model.blocks)  # what parallelize(compile=True, wrap="blocks") does; compilation is lazy
    apply_compile([model])  # and wrap="model"
    assert sorted(model.state_dict()) == names
    modules = sorted(n for n, _ in build_model("vit", "debug").named_modules())
    assert sorted(n for n, _ in model.named_modules()) == modules
