"""Numerics presets: one YAML file each inside the package, read by both Hydra and Numerics.preset."""
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from intrain_core import Numerics, available_presets
from intrain_core.numerics import PRESET_DIR

ROOT = Path(__file__).resolve().parent.parent


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


def test_integer_presets_inherit_from_int8_and_state_only_what_differs():
    int8 = yaml.safe_load((PRESET_DIR / "int8.yaml").read_text())
    for name in set(available_presets()) - {"fp32", "int8"}:
        own = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
        assert own.pop("defaults") == ["int8", "_self_"], name
        assert {"name", "description"} < set(own), name
        assert all(int8[key] != value for key, value in own.items()), name


def test_hydra_composes_the_same_presets_as_numerics_preset(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    for name in available_presets():
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=[f"numerics={name}", f"runs_dir={tmp_path}"])
        composed = Numerics.from_dict(OmegaConf.to_container(cfg.numerics, resolve=True))
        assert composed.to_dict() == Numerics.preset(name).to_dict()


def test_a_preset_that_inherits_from_itself_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("intrain_core.numerics.PRESET_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("defaults: [b]\nname: a\n")
    (tmp_path / "b.yaml").write_text("defaults: [a]\nname: b\n")
    with pytest.raises(ValueError, match="a -> b -> a"):
        Numerics.preset("a")


def test_an_installed_package_has_its_presets_from_any_directory(tmp_path):
    # What a clone holds of the package (tracked and new files, nothing ignored), installed as pip does.
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "pyproject.toml", "README.md",
                             "intrain_core", "tasks"], cwd=ROOT, capture_output=True, text=True, check=True)
    clone = tmp_path / "clone"
    for name in listed.stdout.split():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, clone / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(clone)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = "import intrain_core as ic; print(ic.__file__); print(ic.Numerics.preset('int16').forward_bits)"
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(target / "intrain_core" / "__init__.py"), "16"]
    assert (target / "intrain_core" / "csrc" / "int_sgd.cpp").is_file()  # IntSGD's C++ step, built on first use
