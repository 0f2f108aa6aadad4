"""Typed configuration: validation messages and the flat dotted-dict round trip."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cxrtune.config import Config, param, unflatten
from cxrtune.errors import ConfigError


@dataclass
class Inner(Config):
    lr: float = param(0.045, low=0, low_open=True, doc="learning rate")
    optimizer: str = param("sgd", choices=("sgd", "adamw"))


@dataclass
class Outer(Config):
    image_size: int = param(256, low=32, high=4096)
    shots: tuple[int, ...] = param((1, 5, 10), low=1)
    strict: bool = param(False)
    note: str | None = param(None)
    inner: Inner = field(default_factory=Inner)

    def validate(self) -> None:
        if self.image_size % 2:
            raise ConfigError(f"Outer.image_size = {self.image_size} must be even")


def test_flat_round_trip_keeps_every_value():
    cfg = Outer(image_size=128, shots=(1, 20), inner=Inner(lr=0.1, optimizer="adamw"))
    flat = cfg.to_flat()
    assert flat == {
        "image_size": 128, "shots": [1, 20], "strict": False, "note": None,
        "inner.lr": 0.1, "inner.optimizer": "adamw",
    }
    assert Outer.from_flat(flat) == cfg


def test_override_by_dotted_key_as_ray_tune_param_space_does():
    cfg = Outer().override({"inner.lr": 0.3, "image_size": 64})
    assert cfg.inner.lr == 0.3 and cfg.image_size == 64 and cfg.inner.optimizer == "sgd"


def test_values_from_cli_strings_are_coerced():
    cfg = Outer.from_flat({"image_size": "64", "shots": "1,5", "strict": "true", "inner.lr": "1e-3"})
    assert cfg.image_size == 64 and cfg.shots == (1, 5) and cfg.strict is True and cfg.inner.lr == 1e-3


@pytest.mark.parametrize(
    "flat, fragments",
    [
        ({"image_size": 16}, ["Outer.image_size", "16", "[32, 4096]"]),
        ({"inner.lr": 0}, ["Inner.lr", "0", "> 0"]),
        ({"inner.optimizer": "lars"}, ["Inner.optimizer", "'lars'", "'sgd'", "'adamw'"]),
        ({"shots": [1, 0]}, ["Outer.shots", "0", ">= 1"]),
        ({"image_size": "big"}, ["Outer.image_size", "'big'", "integer"]),
        ({"strict": "maybe"}, ["Outer.strict", "'maybe'", "true or false"]),
        ({"image_size": 65}, ["Outer.image_size", "65", "even"]),
        ({"inner.lr": float("nan")}, ["Inner.lr", "nan"]),
    ],
)
def test_errors_name_field_value_and_allowed_range(flat, fragments):
    with pytest.raises(ConfigError) as err:
        Outer.from_flat(flat)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unknown_keys_are_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match="valid keys are .*inner.lr"):
        Outer().override({"inner.learning_rate": 1.0})
    with pytest.raises(ConfigError, match="has no field 'colour'"):
        Outer.from_flat({"colour": "red"})


def test_describe_lists_every_leaf_with_its_range():
    rows = {name: (default, allowed) for name, default, allowed, _ in Outer.describe()}
    assert rows["inner.lr"] == ("0.045", "> 0")
    assert rows["image_size"] == ("256", "in [32, 4096]")


def test_unflatten_rejects_conflicting_keys():
    with pytest.raises(ConfigError):
        unflatten({"a": 1, "a.b": 2})


def test_a_resolved_config_refuses_another_method_and_names_the_layer():
    from cxrtune.resolve import resolve_pretrain

    with pytest.raises(ConfigError, match="--set: method = 'dino' cannot be set here: this is a moco run"):
        resolve_pretrain("smoke", "moco", sets={"method": "dino"})
    with pytest.raises(ConfigError, match="sweep script x: config key 'dino.out_dim' belongs to method dino"):
        resolve_pretrain("smoke", "moco", fixed={"dino.out_dim": 8}, fixed_origin="sweep script x")
    with pytest.raises(ConfigError, match=r"searched: unknown config key 'optim.weight_decy'.*did you mean optim.weight_decay"):
        resolve_pretrain("smoke", "moco", point={"optim.weight_decy": 0.1})
    resolved = resolve_pretrain("smoke", "moco", sets={"method": "moco", "optim.lr": 0.5}, point={"moco.temperature": 0.1})
    assert resolved.origin["optim.lr"] == "--set" and resolved.origin["moco.temperature"] == "searched"
    assert resolved.pretrain.optim.lr == 0.5 and resolved.pretrain.moco.temperature == 0.1


def test_one_value_for_a_list_key_is_a_one_element_list():
    from cxrtune.cli import parse_options
    from cxrtune.resolve import resolve_pretrain

    sets = parse_options(["probe.shots=20", "train.checkpoint_epochs=3"], "--set")
    resolved = resolve_pretrain("smoke", "moco", sets=sets)
    assert tuple(resolved.probe.shots) == (20,) and resolved.pretrain.train.checkpoint_epochs == (3,)
