"""`tartarus init template` and `tartarus template ...`: files people can edit, JSON
scripts can parse, exit codes scripts can trust."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tartarus.cli.main import cli
from tartarus.images.template import OciImageBase, builtin_templates, load_template
from tests.conftest import require_root


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("TARTARUS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TARTARUS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return CliRunner()


@pytest.mark.parametrize(
    "origin",
    [
        *sorted(builtin_templates()),
        "debian:trixie",
        "oci:registry.example:5000/team/app:1.2",
        "oci-layout:./layout:v1",
        "docker-archive:./image.tar",
    ],
)
def test_init_template_writes_a_loadable_commented_file(runner: CliRunner, origin: str) -> None:
    result = runner.invoke(cli, ["init", "template", "mine", "--from", origin])
    assert result.exit_code == 0, result.output
    path = Path("mine.yaml")
    text = path.read_text()
    assert text.startswith("# Tartarus template 'mine'")
    assert text.count("\n# ") > 10  # every field says what it does
    loaded = load_template(path)
    assert loaded.template.id == "mine"
    if origin in builtin_templates():
        original = builtin_templates()[origin].template
        assert loaded.template.base == original.base
        assert loaded.template.packages == original.packages
        assert loaded.template.build == original.build


def test_init_template_from_a_dockerfile(runner: CliRunner, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "src").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(
        '# comment\nFROM debian:bookworm\nENV A=1 B="two words"\nWORKDIR /app\n'
        'RUN apt-get update && \\\n    apt-get install -y curl\nCOPY src/ ./\nCMD ["x"]\n'
    )
    result = runner.invoke(
        cli, ["init", "template", "fromdf", "--from", "dockerfile:ctx/Dockerfile"]
    )
    assert result.exit_code == 0, result.output
    t = load_template(Path("fromdf.yaml")).template
    assert t.base == OciImageBase(image="debian:bookworm")
    assert t.env == {"A": "1", "B": "two words"}
    assert t.workdir == "/app"
    assert t.build is not None and "apt-get update &&" in t.build and "install -y curl" in t.build
    assert [(f.src, f.dest) for f in t.files] == [("ctx/src", "/app")]


@pytest.mark.parametrize(
    ("dockerfile", "message"),
    [
        ("RUN true\n", "no FROM"),
        ("FROM a\nFROM b\n", "multi-stage"),
        ("FROM a\nUSER nobody\n", "USER has no template equivalent"),
        ("FROM a\nADD https://x/y /y\n", "URL"),
        ("FROM scratch\n", "scratch"),
    ],
)
def test_unsupported_dockerfiles_name_the_line(
    runner: CliRunner, dockerfile: str, message: str
) -> None:
    Path("Dockerfile").write_text(dockerfile)
    result = runner.invoke(cli, ["init", "template", "x", "--from", "dockerfile:Dockerfile"])
    assert result.exit_code != 0
    assert message in str(result.exception) or message in result.output


def test_init_template_refuses_to_overwrite(runner: CliRunner) -> None:
    assert runner.invoke(cli, ["init", "template", "x"]).exit_code == 0
    result = runner.invoke(cli, ["init", "template", "x"])
    assert result.exit_code != 0
    assert "exists" in result.output
    assert runner.invoke(cli, ["init", "template", "x", "--force"]).exit_code == 0


def test_init_template_rejects_bad_names_and_origins(runner: CliRunner) -> None:
    bad_name = runner.invoke(cli, ["init", "template", "Bad Name"])
    assert bad_name.exit_code != 0
    bad_origin = runner.invoke(cli, ["init", "template", "ok", "--from", "nosuch"])
    assert bad_origin.exit_code != 0
    assert not Path("ok.yaml").exists()


def test_template_list_json(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["template", "list", "--json"])
    assert result.exit_code == 0, result.output
    ids = {t["id"] for t in json.loads(result.output)}
    assert {"base", "python", "python-ds", "node"} <= ids


def test_unknown_template_is_an_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["template", "inspect", "nosuch"])
    assert result.exit_code == 3  # like an unknown sandbox
    assert "no template named 'nosuch'" in result.output


@pytest.mark.timeout(600)
def test_build_inspect_rm_cycle(runner: CliRunner, tmp_path: Path) -> None:
    require_root()
    Path("tiny.yaml").write_text(
        "id: tiny\nbase: {kind: debian, variant: none}\npackages: [busybox-static]\n"
        "shell: [/bin/busybox, sh, -c]\nbuild: /bin/busybox --install -s /bin\n"
    )
    built = runner.invoke(cli, ["template", "build", "tiny.yaml", "--json"])
    assert built.exit_code == 0, built.output
    resolved = json.loads(built.output)
    rootfs = Path(resolved["rootfs"])
    assert (rootfs / "bin/sh").exists()
    assert Path(resolved["ext4"]).is_file()

    inspected = runner.invoke(cli, ["template", "inspect", "tiny", "--json"])
    assert inspected.exit_code == 0, inspected.output
    info = json.loads(inspected.output)
    assert info["info"]["built"] and info["definition"]["id"] == "tiny"

    removed = runner.invoke(cli, ["template", "rm", "tiny", "--json"])
    assert removed.exit_code == 0, removed.output
    report = json.loads(removed.output)
    assert report["unregistered"] and len(report["gc"]["removed"]) >= 3
    assert not rootfs.exists()
    assert runner.invoke(cli, ["template", "inspect", "tiny"]).exit_code == 3
