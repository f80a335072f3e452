"""Dockerfile-like input for `tartarus init template --from dockerfile:PATH`: the
subset a template expresses (one FROM, RUN, ENV, WORKDIR, COPY/ADD of local files)
becomes a template; anything else is an error naming its line."""

from __future__ import annotations

import json
import os
import posixpath
import shlex
from pathlib import Path

from tartarus.images.errors import TemplateDefinitionError
from tartarus.images.template import FileCopy, OciImageBase, Template

# No meaning for a template: each sandbox's caller picks its command, ports, volumes.
IGNORED = {"LABEL", "EXPOSE", "VOLUME", "CMD", "ENTRYPOINT", "MAINTAINER", "HEALTHCHECK"}


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments); continued lines joined, comments dropped."""
    out: list[tuple[int, str, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).strip().partition(" ")
        pending = ""
        out.append((start, instruction.upper(), args.strip()))
    if pending:
        raise TemplateDefinitionError(f"Dockerfile ends inside a continued line (line {start})")
    return out


def words(args: str) -> list[str]:
    """The exec (JSON) form or the shell form of an instruction's arguments."""
    if args.startswith("["):
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(w, str) for w in parsed):
            return parsed
    return shlex.split(args)


class _Translation:
    def __init__(self, where: str, context: Path, output_dir: Path) -> None:
        self.where = where
        self.context = context
        self.output_dir = output_dir
        self.image: str | None = None
        self.runs: list[str] = []
        self.env: dict[str, str] = {}
        self.files: list[FileCopy] = []
        self.workdir = "/"
        self.line = 0

    def fail(self, why: str) -> TemplateDefinitionError:
        return TemplateDefinitionError(f"{self.where}:{self.line}: {why}")

    def from_(self, args: str) -> None:
        if self.image is not None:
            raise self.fail("multi-stage builds are not supported")
        self.image = args.split(maxsplit=1)[0] if args else ""
        if self.image in ("", "scratch"):
            raise self.fail("FROM needs an image with a shell (not scratch)")

    def run(self, args: str) -> None:
        self.runs.append(shlex.join(words(args)) if args.startswith("[") else args)

    def set_env(self, args: str) -> None:
        if "=" in args.split(maxsplit=1)[0]:
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                self.env[key] = value
        else:
            key, _, value = args.partition(" ")
            self.env[key] = value.strip()

    def set_workdir(self, args: str) -> None:
        self.workdir = args if args.startswith("/") else f"{self.workdir.rstrip('/')}/{args}"

    def copy(self, args: str) -> None:
        parts = [w for w in words(args) if not w.startswith(("--chown", "--chmod"))]
        if any(w.startswith("--") for w in parts) or len(parts) < 2:
            raise self.fail("only `COPY SRC... DEST` (local files) is supported")
        *sources, dest = parts
        for src in sources:
            if "://" in src:
                raise self.fail("copying from a URL is not supported")
            # As docker does: a directory's contents go into DEST; a file into DEST/ keeps
            # its name.
            into_dir = dest.endswith("/") or dest in (".", "..")
            is_dir = (self.context / src).is_dir()
            target = posixpath.join(dest, Path(src).name) if into_dir and not is_dir else dest
            target = posixpath.normpath(posixpath.join(self.workdir, target))
            relative = os.path.relpath(self.context / src, self.output_dir)
            self.files.append(FileCopy(src=relative, dest=target))

    def template(self, name: str) -> Template:
        if self.image is None:
            raise TemplateDefinitionError(f"{self.where}: no FROM line")
        script = "".join(f"{r}\n" for r in self.runs)
        if self.workdir != "/":
            script += f"mkdir -p {shlex.quote(self.workdir)}\n"
        return Template(
            id=name,
            base=OciImageBase(image=self.image),
            files=self.files,
            env=self.env,
            workdir=self.workdir,
            build=f"set -e\n{script}" if script else None,
        )


def from_dockerfile(name: str, dockerfile: Path, output_dir: Path) -> Template:
    """A template equivalent to `dockerfile`; COPY sources become paths relative to
    `output_dir` (where the template file will live)."""
    try:
        text = dockerfile.read_text()
    except OSError as e:
        raise TemplateDefinitionError(f"cannot read {dockerfile}: {e}") from e
    translation = _Translation(str(dockerfile), dockerfile.resolve().parent, output_dir)
    handlers = {
        "FROM": translation.from_,
        "RUN": translation.run,
        "ENV": translation.set_env,
        "WORKDIR": translation.set_workdir,
        "COPY": translation.copy,
        "ADD": translation.copy,
    }
    for number, instruction, args in instructions(text):
        translation.line = number
        if instruction in IGNORED:
            continue
        if instruction not in handlers:
            raise translation.fail(f"{instruction} has no template equivalent")
        handlers[instruction](args)
    return translation.template(name)
