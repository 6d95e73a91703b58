import pytest
from pydantic import ValidationError

from emulator.errors import UserError
from emulator.specs.hardware import HARDWARE_PRESETS, HardwareSpec, get_hardware


def test_preset_ids():
    assert list(HARDWARE_PRESETS) == ["a100-80g", "h100", "h200", "b200", "mi300x"]


@pytest.mark.parametrize("name, flops, hbm, bw, scale_up", [
    ("a100-80g", 312e12, 80e9, 2.039e12, 300e9),
    ("h100", 989e12, 80e9, 3.35e12, 450e9),
    ("h200", 989e12, 141e9, 4.8e12, 450e9),
    ("b200", 2.25e15, 180e9, 8e12, 900e9),
    ("mi300x", 1307.4e12, 192e9, 5.3e12, 448e9),
])
def test_datasheet_values(name, flops, hbm, bw, scale_up):
    hw = get_hardware(name.upper())
    assert (hw.name, hw.peak_flops_per_s, hw.hbm_bytes, hw.hbm_bytes_per_s,
            hw.scale_up_bytes_per_s) == (name, flops, hbm, bw, scale_up)
    assert hw.scale_out_bytes_per_s == 50e9  # 400 Gb/s NIC per GPU
    assert (hw.mfu, hw.mbu, hw.gpus_per_node) == (0.5, 0.8, 8)


def test_unknown_hardware_lists_presets():
    with pytest.raises(UserError, match="unknown hardware 'tpu'; use one of a100-80g, h100"):
        get_hardware("tpu")


def test_efficiencies_must_be_fractions():
    fields = HARDWARE_PRESETS["h100"].model_dump() | {"mfu": 1.5}
    with pytest.raises(ValidationError, match="mfu"):
        HardwareSpec(**fields)
