import pytest
import torch
from torch import nn

torch.set_num_threads(2)


def make_trained_bn_model(seed: int = 0, in_ch: int = 1, widths=(4, 8), depth: int = 1) -> nn.Module:
    """A tiny PreActResNet whose BN running statistics differ from fresh ones (eval mode)."""
    from bnadapt.models import PreActResNet

    torch.manual_seed(seed)
    m = PreActResNet(in_channels=in_ch, num_classes=3, widths=widths, depth=depth)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, in_ch, 12, 12) * 0.5)
    return m.eval()


@pytest.fixture
def bn_model():
    return make_trained_bn_model()
