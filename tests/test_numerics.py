"""Numerics presets: one YAML file each, read by both Hydra and Numerics.preset."""
import dataclasses

import pytest

from intrain_core import Numerics, available_presets
from intrain_core.numerics import PRESET_DIR


def test_every_preset_file_loads_and_is_named_after_its_file():
    names = available_presets()
    assert {"fp32", "int8", "int16", "int8_nearest", "int8_fwd", "int8_floatsgd"} <= set(names)
    for name in names:
        assert Numerics.preset(name).name == name


def test_presets_differ_in_what_their_names_say():
    int8 = Numerics.preset("int8")
    assert not Numerics.preset("fp32").integer
    assert dataclasses.replace(Numerics.preset("int16"), name="int8", description=int8.description, forward_bits=8, backward_bits=8) == int8
    assert Numerics.preset("int8_nearest").rounding == "nearest"
    assert Numerics.preset("int8_fwd").backward == "float"
    int8_floatsgd = Numerics.preset("int8_floatsgd")
    assert (int8_floatsgd.backward, int8_floatsgd.optimizer) == ("integer", "sgd")


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="int8_nearest"):
        Numerics.preset("int7")


def test_unknown_key_and_bad_value_are_named():
    with pytest.raises(ValueError, match="forwrd_bits"):
        Numerics.from_dict({"forwrd_bits": 8})
    with pytest.raises(ValueError, match="rounding"):
        Numerics(rounding="up")
    with pytest.raises(ValueError, match="integer_ops"):
        Numerics(integer_ops=("linear", "softmax"))


def test_round_trip_through_a_dict():
    int8 = Numerics.preset("int8")
    assert Numerics.from_dict(int8.to_dict()) == int8
    assert (PRESET_DIR / "int8.yaml").is_file()
