"""Parsers of untrusted OCI input: image references, WWW-Authenticate challenges,
manifests, indexes and configs. Property tests: valid input round-trips, anything else
fails with the module's own error, never a crash."""

from __future__ import annotations

import contextlib
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tartarus.images.errors import ImageError, ImageReferenceError, RegistryError
from tartarus.images.oci import manifest as m
from tartarus.images.oci.auth import is_loopback, parse_challenge
from tartarus.images.oci.reference import parse_reference

_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_sep = st.sampled_from([".", "_", "__", "-", "--"])
_component = st.builds(
    lambda first, rest: first + "".join(s + a for s, a in rest),
    _alnum,
    st.lists(st.tuples(_sep, _alnum), max_size=2),
)
_registry = st.one_of(
    st.builds(lambda a, b: f"{a}.{b}", _alnum, _alnum),
    st.builds(lambda a, p: f"{a}.io:{p}", _alnum, st.integers(1, 65535)),
    st.just("localhost:5000"),
    st.builds(lambda p: f"127.0.0.1:{p}", st.integers(1, 65535)),
)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: f"sha256:{h}")


@given(
    _registry,
    st.lists(_component, min_size=1, max_size=3),
    st.none() | _tag,
    st.none() | _digest,
)
def test_references_round_trip(
    registry: str, path: list[str], tag: str | None, digest: str | None
) -> None:
    text = f"{registry}/{'/'.join(path)}"
    if tag:
        text += f":{tag}"
    if digest:
        text += f"@{digest}"
    ref = parse_reference(text)
    assert ref.registry == registry
    assert ref.repository == "/".join(path)
    assert ref.digest == digest
    assert ref.tag == (tag if tag or digest else "latest")
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "registry", "repository", "reference"),
    [
        ("busybox", "docker.io", "library/busybox", "latest"),
        ("debian:bookworm", "docker.io", "library/debian", "bookworm"),
        ("user/app:1.0", "docker.io", "user/app", "1.0"),
        ("ghcr.io/org/app@sha256:" + "a" * 64, "ghcr.io", "org/app", "sha256:" + "a" * 64),
        ("localhost:5000/x", "localhost:5000", "x", "latest"),
        ("localhost/x:y", "localhost", "x", "y"),
    ],
)
def test_reference_normalisation(text: str, registry: str, repository: str, reference: str) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.reference) == (registry, repository, reference)


@pytest.mark.parametrize(
    "text",
    ["", " x", "lower/CASE", "x:", "x@sha256:short", "a//b", "-x", "x:-bad", "ex.com/A", "a" * 300],
)
def test_bad_references(text: str) -> None:
    with pytest.raises(ImageReferenceError):
        parse_reference(text)


@given(st.text(max_size=80))
@settings(max_examples=500)
def test_reference_parser_fails_cleanly(text: str) -> None:
    with contextlib.suppress(ImageReferenceError):
        parse_reference(text)


def test_challenge_parsing() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="Registry Realm"').params == {"realm": "Registry Realm"}
    escaped = parse_challenge(r'Bearer realm="a\"b"')
    assert escaped.params["realm"] == 'a"b'


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True),
        st.text(st.characters(codec="ascii", exclude_characters='"\\\r\n'), max_size=30),
        max_size=4,
    )
)
def test_challenges_round_trip(params: dict[str, str]) -> None:
    header = "Bearer " + ",".join(f'{k}="{v}"' for k, v in params.items())
    assert parse_challenge(header).params == params


@given(st.text(max_size=120))
@settings(max_examples=500)
def test_challenge_parser_fails_cleanly(header: str) -> None:
    with contextlib.suppress(RegistryError):
        parse_challenge(header)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:80", True),
        ("127.9.9.9", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("registry.example", False),
        ("localhost.evil.example", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


_descriptor = st.fixed_dictionaries(
    {
        "mediaType": st.sampled_from([*m.LAYER_TYPES, "text/plain"]),
        "digest": _digest | st.text(max_size=10),
        "size": st.integers(-5, 1 << 40),
    }
)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.fixed_dictionaries(
        {
            "schemaVersion": st.integers(0, 3),
            "config": _descriptor,
            "layers": st.lists(_descriptor),
        },
        optional={"mediaType": st.text(max_size=20), "extra": _json_value},
    )
)
def test_manifest_parser_fails_cleanly(document: dict[str, object]) -> None:
    data = json.dumps(document).encode()
    try:
        manifest = m.parse_manifest(data)
    except ImageError:
        return
    assert manifest.schema_version == 2
    assert all(layer.media_type in m.LAYER_TYPES for layer in manifest.layers)


@given(st.binary(max_size=200) | _json_value.map(lambda v: json.dumps(v).encode()))
@settings(max_examples=300)
def test_any_bytes_fail_cleanly(data: bytes) -> None:
    for parse in (m.parse_manifest, m.parse_index, m.parse_config):
        with contextlib.suppress(ImageError):
            parse(data)
    with contextlib.suppress(ImageError):
        m.media_type_of(data, None)


def test_oversized_manifest_is_refused() -> None:
    big = json.dumps({"schemaVersion": 2, "pad": "x" * (m.MAX_MANIFEST_BYTES + 1)}).encode()
    with pytest.raises(ImageError, match="limit"):
        m.parse_manifest(big)


def test_platform_selection_prefers_exact_variant() -> None:
    def desc(arch: str, variant: str | None, digit: str) -> dict[str, object]:
        platform = {"os": "linux", "architecture": arch}
        if variant:
            platform["variant"] = variant
        return {"mediaType": m.OCI_MANIFEST, "digest": "sha256:" + digit * 64, "size": 1,
                "platform": platform}  # fmt: skip

    index = m.parse_index(
        msgspec.json.encode(
            {"schemaVersion": 2, "manifests": [desc("arm64", None, "1"), desc("arm64", "v8", "2")]}
        )
    )
    chosen = m.select_platform(index, m.parse_platform("linux/arm64/v8"))
    assert chosen.digest == "sha256:" + "2" * 64
    fallback = m.select_platform(index, m.parse_platform("linux/arm64/v9"))
    assert fallback.digest == "sha256:" + "1" * 64
