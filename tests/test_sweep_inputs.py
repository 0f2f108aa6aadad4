"""Bad sweep input is refused with a message naming it, before Ray starts or anything is written."""

from __future__ import annotations

import argparse

import pytest

from cxrtune.errors import ConfigError, CxrtuneError
from cxrtune.sweep.fewshot import backbones_to_evaluate
from cxrtune.sweep.runner import SweepSpec, run_sweep


def _noop(config):
    return None


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "a/b"}, "SweepSpec.name = 'a/b'"),
    ({"mode": "best"}, "SweepSpec.mode = 'best'"),
    ({"num_samples": 0}, "SweepSpec.num_samples = 0"),
    ({"resources": {"tpu": 1}}, "SweepSpec.resources\\['tpu'\\]"),
    ({"search": "random"}, "SweepSpec.search = 'random'"),
])
def test_spec_fields_are_validated(kwargs, message):
    base = {"name": "s", "trainable": _noop, "param_space": {}, "metric": "m"}
    with pytest.raises(ConfigError, match=message):
        SweepSpec(**{**base, **kwargs})


def test_resuming_a_sweep_that_never_ran_is_refused(tmp_path):
    spec = SweepSpec(name="never", trainable=_noop, param_space={}, metric="m")
    with pytest.raises(CxrtuneError, match="nothing to resume in .*never; run it without --resume"):
        run_sweep(spec, resume=True, storage=tmp_path)
    assert not (tmp_path / "never").exists()


def _args(tmp_path, **overrides):
    values = {"checkpoint": [], "from_sweeps": None, "baselines": "random", "imagenet_weights": [],
              "storage": str(tmp_path)}
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("overrides, message", [
    ({"baselines": "supervised"}, "--baselines names 'supervised'"),
    ({"imagenet_weights": ["resnet18"]}, "--imagenet-weights 'resnet18' is not of the form ARCH=PATH"),
    ({"imagenet_weights": ["resnet18=/no/such.pth"]}, "resnet18=/no/such.pth: the file does not exist"),
    ({"from_sweeps": "ghost"}, "sweep 'ghost' has no export"),
    ({"baselines": ""}, "nothing to evaluate"),
])
def test_fewshot_inputs_are_checked_before_any_trial(tmp_path, overrides, message):
    with pytest.raises(CxrtuneError, match=message):
        backbones_to_evaluate(_args(tmp_path, **overrides))
