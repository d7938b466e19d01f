"""Hardware presets: every figure present and sane, lookup by name, validated overrides."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from overlap.cost import HARDWARE, Hardware, get_hardware
from overlap.errors import ConfigError

PRESETS = ("910b2", "910b3", "910c", "h100", "h800", "h20")
MAY_BE_ZERO = {"int8_tops", "fp8_tflops", "comm_compute_share", "launch_overhead_s",
               "matrix_half_flops", "matrix_half_k"}  # 0: a flat GEMM efficiency


def test_every_preset_is_registered():
    """The registry holds exactly the documented presets, keyed by their own names."""
    assert tuple(HARDWARE) == PRESETS
    assert all(HARDWARE[name].name == name for name in PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_numeric_field_is_positive(name):
    """Each preset's rates, latencies, counts and efficiencies are > 0 (zero only where allowed)."""
    hw = HARDWARE[name]
    for field in attrs.fields(Hardware):
        value = getattr(hw, field.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if field.name in MAY_BE_ZERO:
            assert value >= 0, field.name
        else:
            assert value > 0, field.name


@pytest.mark.parametrize("name", PRESETS)
def test_shares_and_efficiencies_are_fractions(name):
    """Efficiencies lie in (0, 1] and the comm kernel's compute share in [0, 1]."""
    hw = HARDWARE[name]
    for field in attrs.fields(Hardware):
        if field.name.endswith("efficiency") or field.name == "low_latency_bw_factor":
            assert 0 < getattr(hw, field.name) <= 1, field.name
    assert 0 <= hw.comm_compute_share <= 1


def test_vendor_decides_separate_vector_units():
    """Ascend presets run cube and vector cores at once; GPU presets share the SMs."""
    for hw in HARDWARE.values():
        assert hw.separate_vector_units == (hw.vendor == "ascend"), hw.name


def test_gpu_comm_kernels_occupy_sms():
    """On GPUs a normal-mode DeepEP/NCCL kernel takes about 20 SMs; Ascend's DMA path takes none."""
    assert HARDWARE["h800"].comm_compute_share == pytest.approx(20 / 132)
    assert HARDWARE["910b2"].comm_compute_share == 0.0


def test_published_figures():
    """A few datasheet figures are pinned so an edit that changes one is deliberate."""
    assert HARDWARE["h100"].bf16_tflops == 989.4
    assert HARDWARE["h100"].intra_link_gbps == 450.0
    assert HARDWARE["h800"].intra_link_gbps == 200.0
    assert HARDWARE["h20"].hbm_gbps == 4000.0
    assert HARDWARE["910c"].bf16_tflops == 376.0
    assert HARDWARE["910b2"].compute_units == 24
    assert HARDWARE["910b3"].compute_units == 20


def test_matrix_rates_list_supported_dtypes_only():
    """Ascend 910B/C have no fp8 matrix path, so only bf16 and int8 are listed."""
    assert dict(HARDWARE["910b2"].matrix_tflops) == {"bf16": 376.0, "int8": 752.0}
    assert set(HARDWARE["h800"].matrix_tflops) == {"bf16", "int8", "fp8"}


def test_missing_dtype_is_an_error_naming_the_supported_ones():
    """Asking for fp8 on an Ascend preset says which dtypes it has."""
    message = r"^hardware '910c' has no 'fp8' matrix rate; supported: bf16, int8$"
    with pytest.raises(ConfigError, match=message):
        HARDWARE["910c"].matrix_peak_tflops("fp8")


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("H800", "h800"),
        ("NVIDIA H100", "h100"),
        ("h100-sxm5", "h100"),
        ("Ascend-910B2", "910b2"),
        ("ascend910b3", "910b3"),
        ("910B", "910b3"),
        ("A3", "910c"),
    ],
)
def test_get_hardware_accepts_case_and_aliases(alias, name):
    """Lookup ignores case, vendor prefixes and separators, and knows the documented aliases."""
    assert get_hardware(alias) is HARDWARE[name]


def test_get_hardware_passes_a_hardware_through():
    """A Hardware value (for example an evolved preset) is accepted as is."""
    custom = HARDWARE["h20"].evolve(devices_per_node=4)
    assert get_hardware(custom) is custom


def test_unknown_hardware_lists_valid_names():
    """An unknown name is a ValueError that lists every preset."""
    message = "unknown hardware 'tpu-v5'; valid: 910b2, 910b3, 910c, h100, h800, h20"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_hardware("tpu-v5")


def test_evolve_validates_fractions():
    """An override outside its range is rejected with the field name and the value."""
    message = "'comm_compute_share' must be in [0, 1] (got 1.5)"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        HARDWARE["h800"].evolve(comm_compute_share=1.5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hbm_gbps", 0, "'hbm_gbps' must be > 0 (got 0)"),
        ("devices_per_node", 0, "'devices_per_node' must be an integer >= 1 (got 0)"),
        ("matrix_efficiency", 0.0, "'matrix_efficiency' must be in (0, 1] (got 0.0)"),
        ("vendor", "amd", "'vendor' must be one of ascend, nvidia (got 'amd')"),
        ("fp8_tflops", -1.0, "'fp8_tflops' must be >= 0 (got -1.0)"),
    ],
)
def test_evolve_rejects_bad_values(field, value, message):
    """Every field is validated when a variant is derived."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        HARDWARE["910b2"].evolve(**{field: value})


def test_with_overrides_rejects_unknown_fields():
    """A misspelt override names itself and the valid fields instead of being ignored."""
    message = r"^unknown hardware field\(s\) 'hbm_gb'; valid: name, vendor, bf16_tflops, "
    with pytest.raises(ConfigError, match=message):
        HARDWARE["h100"].with_overrides({"hbm_gb": 1.0})


def test_evolve_returns_a_new_value():
    """Deriving a variant leaves the preset untouched."""
    variant = HARDWARE["910c"].evolve(devices_per_node=16)
    assert variant.devices_per_node == 16
    assert HARDWARE["910c"].devices_per_node == 768


def test_presets_are_immutable():
    """Neither a preset nor the registry can be changed in place."""
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        HARDWARE["h100"].hbm_gbps = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        HARDWARE["x"] = HARDWARE["h100"]  # type: ignore[index]


def test_hardware_is_hashable_and_comparable():
    """Presets can key a cache: equal values hash equal."""
    assert hash(HARDWARE["h800"]) == hash(HARDWARE["h800"].evolve())
    assert HARDWARE["h800"] != HARDWARE["h100"]


def test_importing_the_cost_model_does_not_import_torch_or_numpy():
    """The cost model stays plain Python so planning works on a laptop."""
    code = "import sys, overlap.cost; print('torch' in sys.modules, 'numpy' in sys.modules)"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "False"]
