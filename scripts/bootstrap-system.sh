#!/usr/bin/env bash
# Installs the Debian packages listed in scripts/system-packages.txt that are missing,
# and checks for a Rust toolchain. Idempotent: a second run installs nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# A line is `package`, or `package >=VERSION from backports` for one whose Debian 12
# version is too old: it is installed from this release's backports suite, which the
# script adds to apt's sources (the standard Debian archive) when it is missing.
mapfile -t lines < <(sed -e 's/#.*//' -e '/^\s*$/d' "$here/system-packages.txt")
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"

missing=()
backported=()
for line in "${lines[@]}"; do
    read -r pkg want from suite <<<"$line"
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    if [[ "$status" != "install ok installed" ]]; then
        [[ -n "${suite:-}" ]] && backported+=("$pkg") || missing+=("$pkg")
    elif [[ -n "${want:-}" ]]; then
        have="$(dpkg-query -W -f='${Version}' "$pkg")"
        dpkg --compare-versions "$have" ge "${want#>=}" || backported+=("$pkg")
    fi
    [[ -z "${want:-}" || ( "$from" == from && "$suite" == backports ) ]] || {
        echo "bootstrap: cannot read '$line' in system-packages.txt" >&2
        exit 1
    }
done

if ((${#missing[@]} + ${#backported[@]})); then
    if [[ $EUID -eq 0 ]]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
        echo "bootstrap: not root and no sudo; please install: ${missing[*]} ${backported[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ((${#backported[@]})) && ! grep -rqs -- "$codename-backports" /etc/apt/sources.list /etc/apt/sources.list.d; then
        echo "bootstrap: adding Debian's $codename-backports suite to apt's sources"
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$codename" | "${sudo[@]}" tee /etc/apt/sources.list.d/tartarus-backports.sources >/dev/null
    fi
    "${sudo[@]}" apt-get update -qq
    if ((${#missing[@]})); then
        echo "bootstrap: installing Debian packages: ${missing[*]}"
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    if ((${#backported[@]})); then
        echo "bootstrap: installing from $codename-backports: ${backported[*]}"
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends -t "$codename-backports" \
            "${backported[@]}"
    fi
fi

if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    echo "bootstrap: cargo is in ~/.cargo/bin but not on PATH; add it: export PATH=\$HOME/.cargo/bin:\$PATH" >&2
    exit 1
fi
if ! command -v cargo >/dev/null; then
    echo "bootstrap: no Rust toolchain; installing stable with rustup (https://rustup.rs)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \
        --component clippy,rustfmt
    # make puts ~/.cargo/bin on PATH; a shell outside make needs `source ~/.cargo/env`.
    export PATH="$HOME/.cargo/bin:$PATH"
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null; then rustup component add "$component"; else
            echo "bootstrap: cargo $component missing and no rustup to add it" >&2
            exit 1
        fi
    fi
done
echo "bootstrap: system ready"
