"""Every registered model: shapes, gradients, DP validity and exact per-sample gradients under Opacus, determinism,
weights round trips; plus the registry's errors and the architectures' documented figures."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import typer
from torch import nn

from client.cli.runner import run_cli

from models import (
    ModelInfo,
    complexity,
    count_params,
    create_model,
    list_models,
    load_state_dict_file,
    model_info,
    model_options,
    register_variant,
)
from models.backbones import resnet50_backbone, vgg16_backbone
from models.cnn_am import cnn_am
from models.layers import batch_norm
from models.reference import list_references, read_reference_info

from tests.model_builds import SMALL_CFG

NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are small: a second intra-op thread only adds contention on the shared 2-core CI machine.
    Restored afterwards for other modules' tests. oneDNN stays as production runs it (on): the models are tested
    on the backend that trains them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.backends.mkldnn.enabled, "the production CPU backend (oneDNN) is what these tests must exercise"
    yield
    torch.set_num_threads(threads)


def _make_model(name: str, *, dp: bool = True, seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=NUM_CLASSES, dp=dp, **{**SMALL_CFG[name], **cfg})


def _make_images(batch: int = 4, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 1, 48, 48, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_registry_lists_the_paper_models_sorted():
    """list_models() is sorted and holds the four models the issue asks for, each with a small test build."""
    names = list_models()
    assert names == sorted(names)
    assert {"cnn_am", "dmsnet_heavy", "dmsnet_light", "dmsnet_iot"} <= set(names)
    assert set(SMALL_CFG) == set(names)


def test_a_variant_is_its_base_with_fixed_options():
    """cnn_am_deep is cnn_am(depth=5): the same parameters and values from one seed, and depth is not its option."""
    # Execute
    torch.manual_seed(0)
    variant = create_model("cnn_am_deep", dp=True).state_dict()
    torch.manual_seed(0)
    base = create_model("cnn_am", dp=True, depth=5).state_dict()
    # Assert
    assert list(variant) == list(base) and all(torch.equal(variant[k], base[k]) for k in base)
    assert "depth" not in model_options("cnn_am_deep") and model_options("cnn_am")["depth"] == 2
    with pytest.raises(TypeError, match="has no option 'depht'"):
        register_variant("cnn_am_typo", base=cnn_am, depht=5,
                         info=ModelInfo(paper="", summary="", input_size=(1, 48, 48)))


def test_unknown_model_name_lists_the_known_ones():
    """An unknown name is a ValueError whose message names every registered model."""
    with pytest.raises(ValueError, match="unknown model 'resnet9000'") as err:
        create_model("resnet9000")
    assert all(name in str(err.value) for name in list_models())


@pytest.mark.parametrize("name", list_models())
def test_unknown_option_is_named(name):
    """An option the model does not have is a TypeError naming it and listing the valid ones."""
    with pytest.raises(TypeError, match="no option 'colour'") as err:
        create_model(name, colour="blue")
    assert all(option in str(err.value) for option in model_options(name))


@pytest.mark.parametrize("name", list_models())
def test_output_shape_finite_and_every_parameter_gets_a_gradient(name):
    """(B, 1, 48, 48) → finite (B, num_classes) logits; the loss reaches every parameter, and after one step (DMSNet's
    fusion gates start at zero, so its coarse branches learn from the second step on) every gradient is non-zero."""
    # Prepare
    model = _make_model(name).train()
    images, labels = _make_images(), torch.arange(4) % NUM_CLASSES
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Execute
    logits = model(images)
    nn.functional.cross_entropy(logits, labels).backward()
    connected = [n for n, p in model.named_parameters() if p.grad is not None]
    optimizer.step()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(images), labels).backward()
    # Assert
    assert logits.shape == (4, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    assert connected == [n for n, _ in model.named_parameters()]
    assert [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_forward_features_then_head_is_forward(name):
    """forward_features and forward_head compose to forward, and pre_logits is the classifier's input."""
    # Prepare
    model = _make_model(name).eval()
    images = _make_images(2)
    # Execute
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model.forward_head(features)
        embedding = model.forward_head(features, pre_logits=True)
        full = model(images)
    # Assert
    assert torch.equal(logits, full)
    assert embedding.shape[0] == 2 and embedding.shape[1] == model.classifier.in_features


@pytest.mark.parametrize("name", list_models())
def test_three_input_channels(name):
    """in_chans=3 builds a model that takes colour input."""
    model = _make_model(name, in_chans=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", list_models())
def test_dp_build_passes_opacus_validation_and_plain_build_does_not(name):
    """dp=True swaps every BatchNorm for GroupNorm and Opacus accepts it (strict); the plain build is rejected."""
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import UnsupportedModuleError

    # Prepare
    dp_model, plain_model = _make_model(name, dp=True), _make_model(name, dp=False)
    # Execute / Assert
    ModuleValidator.validate(dp_model, strict=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dp_model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in dp_model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain_model.modules())  # every paper model uses BatchNorm
    with pytest.raises(UnsupportedModuleError):
        ModuleValidator.validate(plain_model, strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("name", list_models())
def test_opacus_per_sample_gradients_equal_microbatch_gradients(name, mode):
    """Opacus's per-sample gradients equal one-sample-at-a-time gradients for every parameter (float64, so the
    comparison is about the algorithm, not rounding; dropout off, since micro-batches draw other masks)."""
    from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

    # Prepare
    model = _make_model(name, drop_rate=0.0).double().train()
    images = _make_images(3, dtype=torch.float64)
    # Execute / Assert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check_per_sample_gradients_are_correct(images, model, grad_sample_mode=mode, atol=1e-10, rtol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn_am", "dmsnet_iot"])
def test_ghost_clipping_norms_equal_microbatch_norms(name):
    """Ghost clipping's per-sample gradient norms (the federation's small models) equal the true per-sample norms."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.utils.per_sample_gradients_utils import compute_microbatch_grad_sample

    # Prepare
    model = _make_model(name, drop_rate=0.0).double().train()
    images = _make_images(3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_sample = compute_microbatch_grad_sample(images, model, loss_reduction="sum")
        expected = torch.cat([g.reshape(3, -1) for g in per_sample.values()], dim=1).norm(dim=1)
        ghost = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", use_ghost_clipping=True)
        # Execute: the same loss as the micro-batch reference (L1 against zeros, summed)
        ghost(images).abs().sum().backward()
        norms = ghost.get_norm_sample()
    # Assert
    torch.testing.assert_close(norms, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list_models())
def test_eval_forward_is_deterministic_and_independent_of_batch_mates(name):
    """In eval mode the same input gives the same logits twice, and a face's logits do not depend on its batch."""
    # Prepare
    model = _make_model(name, dp=False).eval()
    images = _make_images(3)
    # Execute
    with torch.no_grad():
        first, second = model(images), model(images)
        alone = torch.cat([model(images[i : i + 1]) for i in range(3)])
    # Assert
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_state_dict_file_round_trip(name, tmp_path):
    """Weights saved with torch.save load into a freshly built model, which then computes the same logits."""
    # Prepare
    source, target = _make_model(name, seed=1).eval(), _make_model(name, seed=2).eval()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    images = _make_images(2)
    # Execute
    load_state_dict_file(target, path)
    # Assert
    with torch.no_grad():
        assert torch.equal(target(images), source(images))


def test_state_dict_file_accepts_wrapped_and_prefixed_checkpoints(tmp_path):
    """A {"state_dict": ...} checkpoint with DataParallel's "module." prefix loads like the bare state_dict."""
    # Prepare
    source, target = _make_model("cnn_am", seed=1), _make_model("cnn_am", seed=2)
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    # Execute
    load_state_dict_file(target, path)
    # Assert
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_backbone_weights_load_into_the_backbone_without_the_classifier(tmp_path):
    """A backbone checkpoint that also carries an ImageNet classifier ("fc.*") loads into model.backbone with
    strict=False, the way a user's own ResNet-50 weights would."""
    # Prepare
    source, target = _make_model("dmsnet_heavy", seed=1), _make_model("dmsnet_heavy", seed=2)
    state = {**source.backbone.state_dict(), "fc.weight": torch.zeros(1000, 8), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    # Execute
    load_state_dict_file(target.backbone, path, strict=False)
    # Assert
    assert all(torch.equal(a, b) for a, b in zip(source.backbone.state_dict().values(),
                                                 target.backbone.state_dict().values()))


def test_state_dict_file_errors_name_the_problem(tmp_path):
    """A missing file, a file that is not a state_dict, and a mismatched one each fail with a message that says so."""
    # Prepare
    model = _make_model("cnn_am")
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save(_make_model("cnn_am", width=0.5).state_dict(), other)
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict_file(model, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a torch state_dict file"):
        load_state_dict_file(model, not_weights)
    with pytest.raises(ValueError, match=r"shape mismatch: features\.0\.weight"):
        load_state_dict_file(model, other)


def test_cnn_am_matches_the_papers_layer_table():
    """Default CNN-AM: 12×12×64 map, 9216-wide flatten, FC 128, dropout 0.5, and the hand-counted parameters."""
    # Prepare
    model = create_model("cnn_am")
    # Execute
    features = model.forward_features(torch.zeros(1, 1, 48, 48))
    # Assert
    expected_params = (
        (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64)  # two 3×3 convs
        + 2 * (64 * 8 + 8) + 2 * 64  # query/key projections, norm
        + (9216 * 128 + 128) + (128 * 7 + 7)  # FC 128, classifier
    )
    assert features.shape == (1, 64, 12, 12)
    assert model.fc.in_features == 9216 and model.fc.out_features == 128
    assert model.drop.p == 0.5
    assert count_params(model) == expected_params == 1_200_663


def test_cnn_am_depth_five_adds_conv_layers_and_keeps_the_flatten():
    """depth=5 (the table's "CNN layers: 5") builds five convs and keeps the 9216-wide classifier input."""
    model = create_model("cnn_am", depth=5)
    assert sum(isinstance(m, nn.Conv2d) for m in model.features) == 5
    assert model.fc.in_features == 9216


def test_cnn_am_exposes_its_attention_map():
    """The attention map is (B, 12, 12), a distribution over positions, and both access paths give the same map."""
    # Prepare
    model = create_model("cnn_am").eval()
    images = _make_images(2)
    # Execute
    with torch.no_grad():
        logits, attention = model(images, return_attention=True)
    # Assert
    assert logits.shape == (2, 7) and attention.shape == (2, 12, 12)
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(2))
    assert (attention >= 0).all()
    assert torch.equal(model.last_attention, attention)


@pytest.mark.parametrize(("name", "paper_params"), [("dmsnet_heavy", 24.0e6), ("dmsnet_light", 5.6e6)])
def test_dmsnet_default_builds_have_the_papers_parameter_counts(name, paper_params):
    """Default DMSNet-heavy and -light are within 1% of the parameter counts the paper reports."""
    params = complexity(name, input_size=(1, 48, 48))["params"]
    assert params == pytest.approx(paper_params, rel=0.01)
    assert model_info(name)["paper_params"] == paper_params


def test_backbones_have_torchvisions_parameter_counts():
    """At width 1 and 3 channels the backbones are torchvision's resnet50 minus its 2,049,000-parameter fc
    (25,557,032 in all) and vgg16_bn's `features` (138,365,992 minus a 123,642,856-parameter classifier)."""
    with torch.device("meta"):
        resnet = resnet50_backbone(in_chans=3, norm_layer=batch_norm)
        vgg = vgg16_backbone(in_chans=3, norm_layer=batch_norm)
    assert count_params(resnet) == 25_557_032 - 2_049_000
    assert count_params(vgg) == 138_365_992 - 123_642_856
    assert tuple(vgg.features[40].weight.shape) == (512, 512, 3, 3)  # vgg16_bn's last conv is features.40
    assert resnet.stage_channels == [256, 512, 1024, 2048]


@pytest.mark.parametrize("name", list_models())
def test_model_info_describes_the_input_and_paper(name):
    """model_info gives the built-for input size, the paper, and the default options."""
    info = model_info(name)
    channels, height, width = info["input_size"]
    assert channels in (1, 3) and height == width >= 48
    assert info["paper"] and info["summary"]
    assert info["default_cfg"] == model_options(name)


def test_macs_count_convolutions_by_hand():
    """The multiply-accumulates counted for CNN-AM equal a hand count of its convs and matrix products."""
    expected = (
        48 * 48 * 32 * 9 + 24 * 24 * 64 * 32 * 9  # conv1, conv2 (per output pixel: in·k·k MACs)
        + 64 * 8 + 144 * 64 * 8 + 144 * 8  # global query, per-position keys, their dot products
        + 9216 * 128 + 128 * 7  # FC, classifier
    )
    assert complexity("cnn_am", input_size=(1, 48, 48))["macs"] == expected


def _models_cli() -> typer.Typer:
    from simulation.cli import models_cmd

    app = typer.Typer()
    app.command("models")(models_cmd.models)
    app.command("other")(lambda: None)  # two commands, so Typer keeps `models` as a sub-command like fer-sim does
    return app


def test_models_command_json_reports_each_models_figures(capsys):
    """`fer-sim models --json` is one JSON object with every model's counts at 48×48 and the paper's figures."""
    # Execute
    code = run_cli(_models_cli(), "fer-sim", ["models", "--json"])
    report = json.loads(capsys.readouterr().out)
    # Assert
    assert code == 0
    rows = {row["name"]: row for row in report["models"]}
    assert sorted(rows) == list_models()
    assert rows["cnn_am"]["at_48x48"] == {"input_size": [1, 48, 48], "params": 1_200_663,
                                         "macs": complexity("cnn_am", input_size=(1, 48, 48))["macs"]}
    assert rows["dmsnet_light"]["paper_figures"] == {"params": 5.6e6, "flops": 100.8e6, "fps": 30.0}
    assert rows["dmsnet_heavy"]["at_built_for"]["input_size"] == [3, 224, 224]
    assert all(row["deviation"] for row in rows.values())
    shipped = {ref["name"]: ref for row in rows.values() for ref in row["references"]}
    assert set(shipped) == set(list_references())
    assert all(ref["public_test"] == read_reference_info(name).public_test.to_json() for name, ref in shipped.items())


def test_models_command_table_and_unknown_model(capsys):
    """The table names the model with its figures; an unknown --model is one line on stderr and exit code 1."""
    # Execute
    shown = run_cli(_models_cli(), "fer-sim", ["models", "--model", "dmsnet_heavy"])
    table = capsys.readouterr().out
    unknown = run_cli(_models_cli(), "fer-sim", ["models", "--model", "vgg19"])
    err = capsys.readouterr().err
    # Assert
    assert shown == 0 and "dmsnet_heavy" in table and "140.2" in table and "cnn_am" not in table
    assert unknown == 1
    assert err.strip().splitlines() == ["fer-sim: error: --model: unknown model 'vgg19'; known models: "
                                        + ", ".join(list_models())]
