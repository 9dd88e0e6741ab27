"""The guard against torch's CPU channels_last bug (fastrobust/memory_format.py).

The reproducer runs in a subprocess (it can corrupt the heap): if the installed torch still
computes wrong weight gradients for a 1x1 stride-2 conv on channels_last input, every channel
count it gets wrong must be refused by the guard, so removing the guard fails here loudly."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fastrobust.memory_format import choose, cpu_channels_last_hazard
from fastrobust.models import oat_resnet18

PROBE = textwrap.dedent("""
    import json, torch
    torch.manual_seed(0)
    torch.set_num_threads(2)
    bad = []
    for cin in range(1, 10):
        x0 = torch.randn(64, cin, 8, 8)
        conv = torch.nn.Conv2d(cin, 8, 1, stride=2, bias=False)
        grads = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            c = torch.nn.Conv2d(cin, 8, 1, stride=2, bias=False)
            c.load_state_dict(conv.state_dict())
            c = c.to(memory_format=fmt)
            x = x0.contiguous(memory_format=fmt).requires_grad_()
            c(x).sum().backward()
            grads.append(c.weight.grad.double())
        err = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()
        if not err < 1e-4:
            bad.append(cin)
    print(json.dumps(bad))
""")


def _buggy_channel_counts():
    """The input-channel counts whose channels_last weight gradient is wrong in this torch
    (all of 1..9 when the probe crashed)."""
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        return list(range(1, 10)), f"probe crashed (rc {p.returncode})"
    return json.loads(p.stdout.strip().splitlines()[-1]), "probe ran"


def test_guard_covers_every_channel_count_the_installed_torch_gets_wrong():
    bad, how = _buggy_channel_counts()
    for cin in bad:
        model = nn.Sequential(nn.Conv2d(cin, 8, 1, stride=2, bias=False))
        assert cpu_channels_last_hazard(model) is not None, (
            f"torch {torch.__version__} gets channels_last weight gradients of a 1x1 stride-2 "
            f"conv with {cin} input channels wrong ({how}), but the guard lets it through")
        assert choose(model, torch.device("cpu"), "auto") == torch.contiguous_format


def test_guard_rule():
    def conv(cin, k=1, stride=2, groups=1):
        return nn.Sequential(nn.Conv2d(cin, 8 * groups, k, stride=stride, groups=groups))

    assert cpu_channels_last_hazard(conv(4)) is not None
    assert "1x1 stride-2" in cpu_channels_last_hazard(conv(4))
    assert cpu_channels_last_hazard(conv(8)) is None
    assert cpu_channels_last_hazard(conv(4, stride=1)) is None
    assert cpu_channels_last_hazard(conv(4, k=3)) is None
    assert cpu_channels_last_hazard(conv(16, groups=4)) is not None  # 4 channels per group


@pytest.mark.parametrize("width, expected", [(4, torch.contiguous_format),
                                             (16, torch.channels_last)])
def test_auto_format_of_the_oat_model(width, expected):
    model = oat_resnet18(num_classes=10, width=width)
    assert choose(model, torch.device("cpu"), "auto") == expected
    assert choose(model, torch.device("cpu"), "contiguous") == torch.contiguous_format


def test_oats_counts_its_narrowest_width():
    model = oat_resnet18(num_classes=10, width=12, width_mults=(0.5, 1.0))  # 6 channels at 0.5
    assert cpu_channels_last_hazard(model) is not None
    assert cpu_channels_last_hazard(oat_resnet18(num_classes=10, width=12)) is None


def test_explicit_channels_last_on_a_hazard_is_refused():
    model = oat_resnet18(num_classes=10, width=4)
    with pytest.raises(ValueError, match="channels_last.*unsafe.*1x1 stride-2"):
        choose(model, torch.device("cpu"), "channels_last")
    assert choose(model, torch.device("meta"), "channels_last") == torch.channels_last
    with pytest.raises(ValueError, match="memory_format must be one of"):
        choose(model, torch.device("cpu"), "nhwc")


def test_trainer_places_a_narrow_model_in_nchw(tmp_path):
    from fastrobust.trainers.oat import OATConfig, OATTrainer
    cfg = OATConfig(width=4, epochs=1, batch_size=16, steps=1, max_train_batches=1,
                    out=str(tmp_path), eval_steps=1)
    trainer = OATTrainer(cfg)
    assert trainer.memory_format == torch.contiguous_format
    conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous()
