"""recipes.checkpoints: state_dicts read with weights_only=True, refused when they do not fit or are not finite."""
import pickle

import pytest
import torch

from recipes import checkpoints, config


def test_load_checkpoint_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    other = torch.nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("bare.pt", "wrapped.pt"):
        torch.nn.init.zeros_(other.weight)
        checkpoints.load_checkpoint(other, tmp_path / name)
        assert torch.equal(other.weight, model.weight)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):   # weights_only=True refuses arbitrary objects
        checkpoints.load_checkpoint(other, tmp_path / "evil.pt")
    with pytest.raises(config.ConfigError, match="not found"):
        checkpoints.load_checkpoint(other, tmp_path / "missing.pt")


def test_load_checkpoint_refuses_misfits_and_non_finite_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "shape.pt")
    torch.save({"weight": model.weight.detach()}, tmp_path / "missing.pt")
    nan = {k: v.clone() for k, v in model.state_dict().items()}
    nan["bias"][0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(config.ConfigError, match=r"checkpoint .*shape\.pt' does not fit the model built from "
                                                 r"model\.width: 1 shape mismatch.*weight \(2, 4\) vs \(2, 3\)"):
        checkpoints.load_checkpoint(model, tmp_path / "shape.pt", describe="built from model.width")
    with pytest.raises(config.ConfigError, match=r"does not fit the model: 1 missing key\(s\), e\.g\. bias"):
        checkpoints.load_checkpoint(model, tmp_path / "missing.pt")
    with pytest.raises(config.ConfigError, match=r"checkpoint .*nan\.pt' holds non-finite values .* bias"):
        checkpoints.load_checkpoint(model, tmp_path / "nan.pt")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # left unchanged
