"""The committed guest-kernel config fragments and the checks made against them."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tartarus.guest import kernel_config
from tartarus.guest.kernel_config import ConfigOption, KernelConfigError


def test_fragments_parse_and_every_option_says_why() -> None:
    for name in kernel_config.FRAGMENTS:
        options = kernel_config.load_fragment(name)
        assert options, name
        for option in options:
            assert len(option.why) > 10, option


def test_base_fragment_has_what_a_microvm_needs() -> None:
    base = {o.name: o.value for o in kernel_config.load_fragment("base.config")}
    for needed in (
        "CONFIG_VIRTIO_MMIO",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_EXT4_FS",
        "CONFIG_OVERLAY_FS",
        "CONFIG_SERIAL_8250_CONSOLE",
    ):
        assert base[needed] == "y", needed
    assert base["CONFIG_MODULES"] == "n"
    assert base["CONFIG_PCI"] == "n"


def test_hardening_list_is_kspp_style() -> None:
    hardening = {o.name: o.value for o in kernel_config.load_fragment("hardening.config")}
    assert hardening["CONFIG_STRICT_KERNEL_RWX"] == "y"
    assert hardening["CONFIG_RANDOMIZE_BASE"] == "y"
    assert hardening["CONFIG_DEVMEM"] == "n"
    assert len(hardening) >= 30


def test_fragments_do_not_contradict_each_other() -> None:
    names = [o.name for o in kernel_config.required_options()]
    assert len(names) == len(set(names))


def test_lines_without_a_reason_are_refused() -> None:
    with pytest.raises(KernelConfigError, match="expected"):
        kernel_config.parse_fragment("CONFIG_FOO=y\n")
    with pytest.raises(KernelConfigError, match="twice"):
        kernel_config.parse_fragment("CONFIG_A=y  # one\nCONFIG_A=n  # two\n")


def test_check_reports_missing_and_wrong_values() -> None:
    options = [
        ConfigOption("CONFIG_A", "y", "a"),
        ConfigOption("CONFIG_B", "n", "b"),
        ConfigOption("CONFIG_C", "-1", "c"),
        ConfigOption("CONFIG_D", "y", "d"),
    ]
    dotconfig = kernel_config.parse_dotconfig(
        "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=-1\n# CONFIG_D is not set\n"
    )
    bad = kernel_config.check(dotconfig, options)
    assert [(m.option.name, m.actual) for m in bad] == [("CONFIG_B", "y"), ("CONFIG_D", "n")]
    # An absent option is "not set".
    assert kernel_config.check({}, [ConfigOption("CONFIG_X", "n", "x")]) == []


_names = st.from_regex(r"CONFIG_[A-Z][A-Z0-9_]{0,20}", fullmatch=True)
_values = st.sampled_from(["y", "n", "-1", "0", "4096", '"ttyS0"'])


@given(st.dictionaries(_names, _values, max_size=30))
def test_rendered_fragments_read_back_identically(wanted: dict[str, str]) -> None:
    options = [ConfigOption(n, v, "why") for n, v in wanted.items()]
    parsed = kernel_config.parse_dotconfig(kernel_config.render_kconfig(options))
    assert kernel_config.check(parsed, options) == []


@given(st.text(max_size=200))
def test_fragment_parser_fails_only_with_its_own_error(text: str) -> None:
    with contextlib.suppress(KernelConfigError):
        kernel_config.parse_fragment(text)
