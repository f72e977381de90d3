"""tools.export_weights: checkpoint -> bare weights file that load_weights and the inference config accept."""

import pytest
import torch

from scripts.engines import load_weights
from tools.export_weights import export_weights
from scripts.networks.pvcnn2 import PVCNN2Denoiser


def test_exported_ema_weights_load_into_the_network(tmp_path):
    torch.manual_seed(0)
    net, ema = PVCNN2Denoiser("tiny"), PVCNN2Denoiser("tiny")
    ckpt = tmp_path / "final.pt"
    torch.save({"network": net.state_dict(), "ema_network": ema.state_dict(), "trainer": {"iteration": 7}}, ckpt)
    out = export_weights(ckpt, tmp_path / "models" / "denoiser_tiny.pt", key="ema_network")
    loaded = load_weights(PVCNN2Denoiser("tiny"), out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.state_dict().items())
    assert not all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    assert set(torch.load(out, weights_only=True)) == set(ema.state_dict())  # bare state dict

    with pytest.raises(FileExistsError, match="denoiser_tiny.pt"):
        export_weights(ckpt, out)
    with pytest.raises(KeyError, match=r"final.pt: no state dict under 'ema' \(has \['ema_network', 'network', 'trainer'\]\)"):
        export_weights(ckpt, tmp_path / "x.pt", key="ema")
