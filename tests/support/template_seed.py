"""Built templates that every test server's store starts with.

A test server has a state directory of its own, so its template store starts empty, and
its first sandbox of a template rebuilt that template from the cached packages (the
python template: 35-50 s on 2 cores). Across the suite that was most of the core lane's
time. The seed is a store holding the templates tests use, built once by `make test`'s
artefacts stage with the real CLI (`tartarus template build`, then `tartarus template
gc` so that old builds do not pile up) under ~/.cache/tartarus/test-seed/.

`clone_into(state_dir)` gives a server a store that is a copy of the seed: the trees and
files are hard links (the store never writes a blob after committing it, and sandboxes
mount trees read-only), the databases are copied with SQLite's backup API and the build
records (small JSON files) copied. Cloning takes a fraction of a second. A server whose
state is on another filesystem (a scratch disk) starts empty, as before.

    python -m tests.support.template_seed prepare   # what `make artefacts` runs
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from tartarus.config import load_settings

TEMPLATES = ("base", "python", "node")
SEED = load_settings().cache_dir / "test-seed"
READY = SEED / "ready"
BLOBS_OF = (
    "SELECT DISTINCT b.digest, b.kind FROM refs r JOIN blobs b USING (digest)"
    " WHERE r.owner IN ({marks})"
)
# The clone keeps the rows of the templates it was given (`{marks}`: one placeholder
# per owner, `template:<id>`).
DATABASES = {
    "blobs.sqlite": (
        "DELETE FROM refs WHERE owner NOT IN ({marks})",
        "DELETE FROM blobs WHERE digest NOT IN (SELECT digest FROM refs)",
    ),
    "templates.sqlite": ("DELETE FROM manifests WHERE 'template:' || id NOT IN ({marks})",),
}


def _seed_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TARTARUS_STATE_DIR"}
    env["TARTARUS_STATE_DIR"] = str(SEED / "state")
    return env


def prepare() -> None:
    """Builds (or finds built) the seed's templates, then drops builds they no longer use."""
    READY.unlink(missing_ok=True)
    tartarus = [sys.executable, "-m", "tartarus"]
    for template in TEMPLATES:
        subprocess.run([*tartarus, "template", "build", template], env=_seed_env(), check=True)
    subprocess.run([*tartarus, "template", "gc"], env=_seed_env(), check=True)
    READY.write_text(" ".join(TEMPLATES) + "\n")


def clone_into(state_dir: Path, templates: tuple[str, ...] = ("base", "python")) -> bool:
    """Gives the store under `state_dir` the seed's builds of `templates` (node's 34,000
    files take a second to link: only the tests that use it ask for it). False, and an
    empty store, when there is no seed or it cannot be linked from there."""
    source = SEED / "state" / "images"
    target = state_dir / "images"
    if not READY.exists() or target.exists():
        return False
    owners = [f"template:{t}" for t in templates]
    marks = ",".join("?" * len(owners))
    with contextlib.closing(sqlite3.connect(source / "blobs.sqlite")) as db:
        blobs = db.execute(BLOBS_OF.format(marks=marks), owners).fetchall()
    try:
        for digest, kind in blobs:
            folder = ("blobs" if kind == "file" else "trees") + "/sha256"
            (target / folder).mkdir(parents=True, exist_ok=True)
            hexdigest = digest.removeprefix("sha256:")
            subprocess.run(
                ["cp", "-a", "--link", str(source / folder / hexdigest), str(target / folder)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
    except subprocess.CalledProcessError:
        # Another filesystem (no hard links across): the server builds what it uses.
        shutil.rmtree(target)
        return False
    # The build records (which blobs each build made): a store without them rebuilds.
    if (source / "builds").is_dir():
        shutil.copytree(source / "builds", target / "builds")
    for name, prune in DATABASES.items():
        with (
            contextlib.closing(sqlite3.connect(source / name)) as src,
            contextlib.closing(sqlite3.connect(target / name)) as dst,
        ):
            src.backup(dst)
            for statement in prune:
                sql = statement.format(marks=marks)
                dst.execute(sql, owners if "?" in sql else ())
            dst.commit()
    return True


def main() -> int:
    if sys.argv[1:] != ["prepare"]:
        print("usage: python -m tests.support.template_seed prepare", file=sys.stderr)
        return 2
    prepare()
    return 0


if __name__ == "__main__":
    sys.exit(main())
