import torch

from twa_cli.commands.swa import SwaRequest, swa
from twa_cli.core.averaging import mean_of
from twa_cli.core.selection import Selection
from twa_cli.io.checkpoints import list_folder, load_tensors, read_checkpoint


def test_swa_without_bn_update_is_the_arithmetic_mean(cnn_run, tmp_path):
    ckpts = list_folder(cnn_run)
    result = swa(cnn_run, tmp_path / "swa.safetensors", SwaRequest(bn_update=False, device="cpu"))
    assert result.bn == "averaged"
    got = load_tensors(result.path)
    every = [load_tensors(c.path) for c in ckpts]
    for name, value in got.items():
        if value.is_floating_point():
            expected = torch.stack([t[name].double() for t in every]).mean(0)
            assert torch.allclose(value.double(), expected, atol=1e-6), name
        else:
            assert torch.equal(value, every[-1][name])


def test_swa_recomputes_batchnorm_and_records_how_it_was_made(cnn_run, tmp_path):
    ckpts = list_folder(cnn_run)[2:]
    result = swa(cnn_run, tmp_path / "swa.safetensors", SwaRequest(selection=Selection(start=2), device="cpu"))
    assert result.bn == "recomputed"
    assert result.test is not None and result.test.accuracy > 50
    meta = read_checkpoint(result.path)
    assert meta.kind == "average"
    assert meta.json_field("coefficients") == [1 / len(ckpts)] * len(ckpts)
    averaged = mean_of(ckpts)
    got = load_tensors(result.path)
    bn_mean = next(k for k in got if k.endswith("running_mean"))
    assert not torch.allclose(got[bn_mean], averaged[bn_mean])  # recomputed, not averaged
    weight = next(k for k in got if k.endswith(("conv.weight", "0.weight")))
    assert torch.allclose(got[weight], averaged[weight])
