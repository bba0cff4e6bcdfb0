"""The fast paths every bundle's inference.json turns on by default (``fast: true``): BatchNorm
folding, channels-last and bf16 autocast where the CPU computes bf16 natively (AMP on CUDA).

Each bundle's tiny network runs on a phantom of its own kind (common.synthetic) through the
bundle's own inferer, once with the defaults and once with ``fast: false``:

* regression outputs (F-net, SpotLight, the distance map of isl_cell_instance): Pearson r >= 0.999
  with eager fp32 and max |difference| <= 3 % of the reference output's range (max - min);
* segmentation (the bundle's own discretisation: threshold, mask logit > 0, argmax), with the
  shipped trained weights on the real samples: identical labels for >= 99.9 % of the voxels. An
  untrained tiny network puts many voxels right at its decision boundary, where any rounding
  flips a label; for those the test asks >= 99.9 % identical away from the boundary (reference
  margin > 0.02: probability - threshold, logit, or gap between the two largest class logits)
  and >= 99 % overall;
* ``fast: false`` gives MONAI's own SlidingWindowInferer on the untouched fp32 network, bitwise.
"""

import os

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from torch import nn

from common.fastpath import FastSimpleInferer, FastSlidingWindowInferer, native_bf16_cpu
from zoo_testing import BUNDLES, SHIPPED, TINY, shipped_sample_or_skip

torch.set_num_threads(1)

BUNDLE_NAMES = ("fnet_baseline", "spotlight_dna", "isl_nucleus_seg", "isl_cell_instance", "unet3d_fucci")
PEARSON_MIN = 0.999
MAX_ABS_OF_RANGE = 0.03  # max |fast - fp32| as a fraction of the fp32 output's range
LABELS_SAME_MIN = 0.999
BOUNDARY_MARGIN = 0.02


def _z(a):
    a = np.asarray(a, np.float32)
    return (a - a.mean()) / (a.std() + 1e-8)


def _phantom(bundle: str) -> torch.Tensor:
    """A realistic input ``(1, C, *spatial)`` for the bundle's network, normalised as its preprocessing does."""
    from common import synthetic

    if bundle in ("fnet_baseline", "spotlight_dna"):
        x = _z(synthetic.make_cell_field_3d(shape=(24, 80, 72), n_cells=4, seed=1)["signal"])[None]
    elif bundle == "isl_nucleus_seg":
        d = synthetic.make_isl_2d(shape=(128, 112), n_cells=6, seed=1)
        x = np.stack([_z(d["brightfield"][0]), _z(d["brightfield"][1]), _z(d["phase"])])
    elif bundle == "isl_cell_instance":
        x = _z(synthetic.make_dic_membrane_2d(shape=(128, 112), n_cells=6, seed=1)["dic"][0])[None]
    else:  # unet3d_fucci: the Hoechst channel of a FUCCI spheroid
        x = _z(synthetic.make_fucci_spheroid(shape=(12, 80, 72), n_nuclei=10, seed=1)["image"][2])[None]
    return torch.from_numpy(np.ascontiguousarray(x))[None]


def _parse(bundle: str, tiny: bool = True, **overrides) -> ConfigParser:
    """The bundle's inference.json on CPU; ``tiny``: its tiny network (random weights) instead of a record's."""
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLES, bundle, "configs", "inference.json"))
    tiny_keys = dict({"ckpt_path": "/nonexistent/model.pt"}, **TINY[bundle]) if tiny else {}
    parser.update(dict({"bundle_root": os.path.join(BUNDLES, bundle), "device": "$torch.device('cpu')"},
                       **tiny_keys, **overrides))
    return parser


def _network(parser: ConfigParser, seed: int = 0) -> nn.Module:
    """The bundle's tiny network, He-initialised (outputs that vary) with BatchNorm statistics and
    affine parameters away from the identity (as after training), in eval mode."""
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return net.eval()


def _labels(bundle: str, parser: ConfigParser, out: torch.Tensor) -> torch.Tensor | None:
    """The bundle's own discretisation of the network output (None for regression bundles)."""
    if bundle == "isl_nucleus_seg":
        return out >= float(parser["threshold"])
    if bundle == "isl_cell_instance":
        return out[:, 1] > 0  # mask logit (DistanceMaskToInstances, logits=True, mask_threshold 0.5)
    if bundle == "unet3d_fucci":
        return out.argmax(1)
    return None


def _margin(bundle: str, parser: ConfigParser, out: torch.Tensor) -> torch.Tensor | None:
    """How far each voxel of the fp32 output is from the bundle's decision boundary."""
    if bundle == "isl_nucleus_seg":
        return (out - float(parser["threshold"])).abs()
    if bundle == "isl_cell_instance":
        return out[:, 1].abs()
    if bundle == "unet3d_fucci":
        top2 = out.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    return None


def _regression(bundle: str, out: torch.Tensor) -> torch.Tensor | None:
    if bundle in ("fnet_baseline", "spotlight_dna"):
        return out
    if bundle == "isl_cell_instance":
        return out[:, 0]  # distance map
    return None


def _pearson(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def compare_fast_with_eager(bundle: str, seed: int = 0) -> dict:
    """Run the bundle's inferer with its defaults and with ``fast: false``; the tolerance measures."""
    fast_p, off_p = _parse(bundle), _parse(bundle, fast=False)
    net = _network(fast_p, seed)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = _phantom(bundle)
    with torch.no_grad():
        ref = off_p.get_parsed_content("inferer")(x, net)
        out = fast_p.get_parsed_content("inferer")(x, net)
    for k, v in net.state_dict().items():  # the network itself is never modified
        assert torch.equal(v, state[k]) and v.is_contiguous(), k
    res = {"shape": tuple(out.shape), "dtype": out.dtype}
    reg_ref, reg_out = _regression(bundle, ref), _regression(bundle, out)
    if reg_ref is not None:
        res["pearson"] = _pearson(reg_out, reg_ref)
        res["max_abs_of_range"] = float((reg_out - reg_ref).abs().max() / (reg_ref.max() - reg_ref.min()))
    lab_ref, lab_out = _labels(bundle, fast_p, ref), _labels(bundle, fast_p, out)
    if lab_ref is not None:
        same = lab_ref == lab_out
        decided = _margin(bundle, fast_p, ref) > BOUNDARY_MARGIN
        res["labels_same"] = float(same.float().mean())
        res["labels_same_off_boundary"] = float(same[decided].float().mean())
        res["near_boundary_fraction"] = 1.0 - float(decided.float().mean())
        res["foreground_fraction"] = float((lab_ref > 0).float().mean())
    return res


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_fast_paths_on_by_default(bundle):
    parser = _parse(bundle)
    assert parser["fast"] is True
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, FastSlidingWindowInferer)
    assert inferer.fuse_bn and inferer.channels_last and not inferer.compile
    if bundle == "unet3d_fucci":  # its watershed instances move with bf16 rounding (mAP by up to 0.1): fp32
        assert parser["fast_bf16"] is False and not inferer.bf16_cpu and not inferer.bf16_cuda
        assert _parse(bundle, fast_bf16="true").get_parsed_content("inferer").bf16_cpu == native_bf16_cpu()
        return
    assert inferer.bf16_cuda
    assert inferer.bf16_cpu == native_bf16_cpu()  # bf16 on CPU only where the CPU computes it natively


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_default_fast_paths_within_tolerance_of_fp32_eager(bundle):
    res = compare_fast_with_eager(bundle)
    assert res["dtype"] == torch.float32
    if "pearson" in res:
        assert res["pearson"] >= PEARSON_MIN, res
        assert res["max_abs_of_range"] <= MAX_ABS_OF_RANGE, res
    if "labels_same" in res:
        assert 0.005 < res["foreground_fraction"] < 0.995, res  # a decision that is not trivially all one label
        assert res["near_boundary_fraction"] < 0.05, res
        assert res["labels_same_off_boundary"] >= LABELS_SAME_MIN and res["labels_same"] >= 0.99, res


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_bf16_tolerance_holds_with_bf16_forced_on(bundle, monkeypatch):
    """The bf16 part of the tolerance, measured also where this CPU's rule leaves it off."""
    monkeypatch.setattr("common.fastpath.native_bf16_cpu", lambda: True)
    res = compare_fast_with_eager(bundle, seed=1)
    if "pearson" in res:
        assert res["pearson"] >= PEARSON_MIN and res["max_abs_of_range"] <= MAX_ABS_OF_RANGE, res
    if "labels_same" in res:
        assert res["labels_same_off_boundary"] >= LABELS_SAME_MIN and res["labels_same"] >= 0.99, res


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_fast_false_is_eager_fp32_bitwise(bundle):
    parser = _parse(bundle, fast="false")  # the string a command line gives
    inferer = parser.get_parsed_content("inferer")
    assert not (inferer.bf16_cpu or inferer.bf16_cuda or inferer.channels_last or inferer.fuse_bn or inferer.compile)
    net = _network(parser)
    x = _phantom(bundle)
    assert inferer.fast_network(net, x) is net  # the network itself, not a prepared copy
    plain = SlidingWindowInferer(roi_size=inferer.roi_size, sw_batch_size=inferer.sw_batch_size,
                                 overlap=inferer.overlap, mode=inferer.mode)
    plain.roi_weight_map = inferer.roi_weight_map  # the margin blending of the F-net bundles, if any
    with torch.no_grad():
        a, b = inferer(x, net), plain(x, net)
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_native_bf16_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cases = {"flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n": True,
             "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n": True,
             "flags\t\t: fpu avx2 avx512f avx512bw avx512vl\n": False,  # bf16 only emulated: slower than fp32
             "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n": True,
             "Features\t: fp asimd\n": False}
    for i, (text, expected) in enumerate(cases.items()):
        f = tmp_path / f"cpuinfo{i}"
        f.write_text(text)
        assert native_bf16_cpu(str(f)) is expected, text
    assert native_bf16_cpu(str(tmp_path / "missing")) is False
    f = tmp_path / "cpuinfo0"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # oneDNN capped below its bf16 instructions
    assert native_bf16_cpu(str(f)) is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert native_bf16_cpu(str(f)) is True


def test_inferer_switches_follow_fast_and_explicit_values_win(monkeypatch):
    monkeypatch.setattr("common.fastpath.native_bf16_cpu", lambda: False)
    off = FastSimpleInferer()
    assert not (off.bf16_cpu or off.channels_last or off.fuse_bn or off.compile or off.bf16_cuda)
    on = FastSimpleInferer(fast="true")
    assert (on.bf16_cpu, on.channels_last, on.fuse_bn, on.bf16_cuda, on.compile) == (False, True, True, True, False)
    mixed = FastSimpleInferer(fast=True, bf16_cpu=True, fuse_bn="false")
    assert mixed.bf16_cpu and not mixed.fuse_bn and mixed.channels_last
    monkeypatch.setattr("common.fastpath.native_bf16_cpu", lambda: True)
    assert FastSimpleInferer(fast=True).bf16_cpu and FastSimpleInferer(bf16_cpu="auto").bf16_cpu


@pytest.mark.parametrize("bundle", SHIPPED)
def test_shipped_weights_give_the_same_labels_with_the_fast_defaults(bundle, tmp_path):
    """The trained networks on real images: the default fast paths keep >= 99.9 % of the labels
    (measured: isl_nucleus_seg 99.997 %, isl_cell_instance 100 %, unet3d_fucci 99.93 %)."""
    path = shipped_sample_or_skip(bundle, tmp_path)
    outs = {}
    for fast in (False, True):
        parser = _parse(bundle, tiny=False, fast=fast)  # the shipped models/model.pt and its record
        net = parser.get_parsed_content("network")
        net.load_state_dict(torch.load(parser.get_parsed_content("ckpt_path"), map_location="cpu", weights_only=True))
        x = parser.get_parsed_content("preprocessing")({"image": path})["image"][None]
        with torch.no_grad():
            outs[fast] = parser.get_parsed_content("inferer")(x, net.eval())
    same = (_labels(bundle, parser, outs[True]) == _labels(bundle, parser, outs[False])).float().mean()
    assert float(same) >= LABELS_SAME_MIN, float(same)


# ----------------------------------------------------------------------------- training defaults

def _parse_train(bundle: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLES, bundle, "configs", "train.json"))
    parser.update(dict({"bundle_root": os.path.join(BUNDLES, bundle), "device": "$torch.device('cpu')"},
                       **TINY[bundle], **overrides))
    return parser


def _train_step(net: nn.Module, inferer, x: torch.Tensor) -> list[torch.Tensor]:
    """One SGD step on a fixed target (the network's own first output + 1): the updated parameters."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    out = inferer(x, net)
    loss = (out - torch.ones_like(out)).pow(2).mean()
    loss.backward()
    opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_training_is_channels_last_by_default_with_the_same_mathematics(bundle):
    """train.json: channels-last weights and inputs by default (the same arithmetic in another memory
    order: one training step equals the contiguous one to fp32 rounding); ``channels_last: false``
    gives contiguous weights and the plain inferer."""
    on, off = _parse_train(bundle), _parse_train(bundle, channels_last="false")
    assert on["channels_last"] is True
    net_on, net_off = on.get_parsed_content("network"), off.get_parsed_content("network")
    convs = [m for m in net_on.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    fmt = torch.channels_last_3d if isinstance(convs[0], nn.Conv3d) else torch.channels_last
    assert all(m.weight.is_contiguous(memory_format=fmt) for m in convs)
    assert all(m.weight.is_contiguous() for m in net_off.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    inf_on, inf_off = on.get_parsed_content("train#inferer"), off.get_parsed_content("train#inferer")
    assert isinstance(inf_on, FastSimpleInferer) and inf_on.channels_last and not inf_off.channels_last
    assert on.get_parsed_content("validate#inferer").channels_last
    net_off.load_state_dict(net_on.state_dict())
    x = _phantom(bundle)
    x = x[(...,) + tuple(slice(0, 32 if x.ndim == 5 else 64) for _ in x.shape[2:])]
    x = torch.cat([x, x.flip(-1)])  # batch 2: training-mode BatchNorm needs more than one value per channel
    a, b = _train_step(net_on, inf_on, x), _train_step(net_off, inf_off, x)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.contiguous(), pb, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- benchmark: peer section

def test_benchmark_peer_option_parses_and_skips_with_a_reason_without_a_checkout(tmp_path):
    from scripts import benchmark

    assert benchmark._parse_peer(None) == {}
    assert benchmark._parse_peer(f"pytorch_fnet={tmp_path}") == {"pytorch_fnet": str(tmp_path)}
    for bad in ("viscy=/x", "pytorch_fnet=", "pytorch_fnet"):
        with pytest.raises(ValueError):
            benchmark._parse_peer(bad)
    rows = []
    benchmark.section_peer({}, torch.device("cpu"), 1, rows, 0, {})
    assert len(rows) == 1 and rows[0]["note"].startswith("skipped: no checkout given")
    with pytest.raises(FileNotFoundError):
        benchmark.peer_import(str(tmp_path))  # not a pytorch_fnet checkout
    d = benchmark._bundle_infer_defaults("fnet_baseline")  # what "ours (defaults)" runs
    assert d["fast"] is True and len(d["roi"]) == 3


def test_benchmark_default_run_leaves_the_opt_in_sections_out_and_says_so():
    from scripts import benchmark

    run, left = benchmark.plan_sections(None, None)
    assert "ttq" not in run and left == ["ttq"] and run == [s for s in benchmark.SECTIONS if s != "ttq"]
    assert benchmark.plan_sections("ttq,peer", None) == (["ttq", "peer"], [])  # named: run, nothing left out
    assert benchmark.plan_sections(None, "ttq,ddp") == ([s for s in run if s != "ddp"], [])
    with pytest.raises(ValueError, match="unknown section"):
        benchmark.plan_sections("fnet_train,tqq", None)


def test_benchmark_ttq_rows_by_hand():
    """Rows from a time_to_quality summary: mean time over the seeds that reached the target, x = the
    reference's time / the arm's (mean of the per-seed ratios), a lower bound said in the note."""
    from scripts import benchmark

    setup = {"depth": 4, "mult_chan": 16, "batch": 4, "patch": [32, 64, 64]}
    arm = {"time_to_target_s": [100.0, 300.0], "iterations_to_target": [50, 150], "best": [0.81, 0.83],
           "reached": 2, "seeds": 2, "speedup_vs_pytorch_fnet": [3.0, 1.0]}
    peer = {"time_to_target_s": [300.0, 300.0], "iterations_to_target": [100, 100], "best": [0.8, 0.8],
            "reached": 2, "seeds": 2}
    missed = {"time_to_target_s": [], "iterations_to_target": [], "best": [0.7, 0.75], "reached": 0, "seeds": 2}
    rows = benchmark.ttq_rows("fnet", {"setup": setup, "summary": {"ours": arm, "x": missed, "pytorch_fnet": peer}})
    ours, x, ref = rows
    assert ours["time_s"] == 200.0 and ours["ratio_vs_ref"] == pytest.approx(2.0) and ours["size"] == "F-net d4x16, b4 x 32x64x64"
    assert "val r >= 0.80 in 2/2 seeds, after 100 iterations; best 0.820" in ours["note"]
    assert x["time_s"] is None and x["ratio_vs_ref"] is None and "not reached in 2 seeds" in x["note"]
    assert ref["ratio_vs_ref"] == 1.0 and ref["time_s"] == 300.0
    # the reference missed the target in a seed: its row has no ratio, the arm's is a lower bound
    peer_missed = dict(peer, time_to_target_s=[300.0], reached=1)
    bound = dict(arm, speedup_at_least_vs_pytorch_fnet=[3.0, 2.0])
    del bound["speedup_vs_pytorch_fnet"]
    ours, ref = benchmark.ttq_rows("fnet", {"setup": setup, "summary": {"ours": bound, "pytorch_fnet": peer_missed}})
    assert ours["ratio_vs_ref"] == pytest.approx(2.5) and "at least" in ours["note"] and ref["ratio_vs_ref"] is None
    fucci = {"features": [16, 32, 64], "batch": 2, "patch": [16, 64, 64]}
    (r,) = benchmark.ttq_rows("fucci", {"setup": fucci, "summary": {"eager fp32": peer}})
    assert r["section"] == "ttq fucci" and r["size"] == "U-Net 16/32/64, b2 x 16x64x64" and "nucleus F1 >= 0.85" in r["note"]
