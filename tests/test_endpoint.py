"""Server URLs (`TARTARUS_URL`): parsing and printing round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tartarus.endpoint import Endpoint
from tartarus.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("unix:/run/t.sock", Endpoint.unix(Path("/run/t.sock"))),
        ("unix:///run/t.sock", Endpoint.unix(Path("/run/t.sock"))),
        ("http://127.0.0.1:8700", Endpoint.tcp("127.0.0.1", 8700)),
        ("http://[::1]:9", Endpoint.tcp("::1", 9)),
        ("https://api.example.test", Endpoint.tcp("api.example.test", 443, tls=True)),
    ],
)
def test_parse(url: str, expected: Endpoint) -> None:
    assert Endpoint.parse(url) == expected


@pytest.mark.parametrize("url", ["unix:relative.sock", "ftp://x", "localhost:80", "http://"])
def test_bad_urls_say_what_is_expected(url: str) -> None:
    with pytest.raises(ConfigError, match="TARTARUS_URL"):
        Endpoint.parse(url)


@given(
    st.one_of(
        st.builds(
            Endpoint.tcp,
            st.sampled_from(["127.0.0.1", "::1", "example.test", "10.0.0.2"]),
            st.integers(1, 65535),
        ),
        st.builds(
            lambda parts: Endpoint.unix(Path("/" + "/".join(parts))),
            st.lists(st.text("abcxyz019._-", min_size=1, max_size=8), min_size=1, max_size=4),
        ),
    )
)
def test_url_round_trip(endpoint: Endpoint) -> None:
    assert Endpoint.parse(endpoint.url) == endpoint
