"""The guest kernel's configuration: committed Kconfig fragments and checks against them.

Two fragments live beside this module, in `configs/`:

- `base.config`: what a microVM needs on top of `make tinyconfig` (virtio-mmio with
  command-line devices, virtio-blk, virtio-vsock, ext4, 8250 console, no modules);
- `hardening.config`: a KSPP-style hardening list.

Each line is one Kconfig assignment followed by `# why`. The builder feeds the
assignments to the kernel's `merge_config.sh` and then checks that every one of them
survived `olddefconfig` (Kconfig silently drops options whose dependencies are unmet);
`tartarus kernel verify` runs the same check of a built kernel against the hardening list.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import msgspec

from tartarus.errors import TartarusError

FRAGMENTS = ("base.config", "hardening.config")
HARDENING = "hardening.config"

_SET = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(\S+)\s*#\s*(.+)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Z0-9_]+) is not set\s*#\s*(.+)$")
_DOTCONFIG_SET = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(.*)$")
_DOTCONFIG_UNSET = re.compile(r"^# (CONFIG_[A-Z0-9_]+) is not set$")


class KernelConfigError(TartarusError):
    """A config fragment or a kernel .config cannot be read."""


class ConfigOption(msgspec.Struct, frozen=True):
    """One required setting: `value` is `y`, a number or string, or `n` for "not set"."""

    name: str
    value: str
    why: str

    def kconfig_line(self) -> str:
        if self.value == "n":
            return f"# {self.name} is not set"
        return f"{self.name}={self.value}"


class Mismatch(msgspec.Struct, frozen=True):
    option: ConfigOption
    actual: str

    def describe(self) -> str:
        return f"{self.option.name}: want {self.option.value}, have {self.actual}"


def parse_fragment(text: str, source: str = "<fragment>") -> list[ConfigOption]:
    """Parses a fragment; every non-comment line must carry a `# why`."""
    options: list[ConfigOption] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if m := _SET.match(line):
            option = ConfigOption(m.group(1), m.group(2), m.group(3).strip())
        elif m := _UNSET.match(line):
            option = ConfigOption(m.group(1), "n", m.group(2).strip())
        elif line.startswith("#") and "CONFIG_" not in line:
            continue
        else:
            raise KernelConfigError(
                f"{source}:{number}: expected `CONFIG_X=value  # why` or "
                f"`# CONFIG_X is not set  # why`, got {raw!r}"
            )
        if option.name in seen:
            raise KernelConfigError(f"{source}:{number}: {option.name} is set twice")
        seen.add(option.name)
        options.append(option)
    return options


def fragment_text(name: str) -> str:
    return resources.files("tartarus.guest").joinpath("configs", name).read_text()


def load_fragment(name: str) -> list[ConfigOption]:
    return parse_fragment(fragment_text(name), name)


def required_options() -> list[ConfigOption]:
    """Every option of every fragment, in order; a later fragment may not contradict."""
    merged: dict[str, ConfigOption] = {}
    for name in FRAGMENTS:
        for option in load_fragment(name):
            earlier = merged.get(option.name)
            if earlier is not None and earlier.value != option.value:
                raise KernelConfigError(
                    f"{name} sets {option.name}={option.value}, an earlier fragment "
                    f"sets {earlier.value}"
                )
            merged[option.name] = option
    return list(merged.values())


def render_kconfig(options: list[ConfigOption]) -> str:
    """The fragment as merge_config.sh reads it (no trailing comments)."""
    return "".join(option.kconfig_line() + "\n" for option in options)


def parse_dotconfig(text: str) -> dict[str, str]:
    """A kernel `.config` as {option: value}; options that are not set map to `n`."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if m := _DOTCONFIG_SET.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _DOTCONFIG_UNSET.match(line):
            values[m.group(1)] = "n"
    return values


def check(dotconfig: dict[str, str], options: list[ConfigOption]) -> list[Mismatch]:
    """Options whose value in `dotconfig` differs (an absent option counts as `n`)."""
    return [
        Mismatch(option, dotconfig.get(option.name, "n"))
        for option in options
        if dotconfig.get(option.name, "n") != option.value
    ]


def read_dotconfig(path: Path) -> dict[str, str]:
    try:
        return parse_dotconfig(path.read_text())
    except OSError as e:
        raise KernelConfigError(f"cannot read kernel config {path}: {e}") from e
