"""Policy store (Themis): the versioned store of policy documents (SQLite, `STATE_DIR/policy.db`).

Every apply writes a new version; nothing is overwritten, so any version can be looked
at, compared (`diff`) or made current again (`rollback` writes a new version with the
old content). Writers say which version they started from (`if_version`) and lose with
a conflict if someone applied in between (optimistic concurrency). The effective policy
of a tenant (the global document with the tenant's merged over it) is cached until
any document changes, in this process or another.
"""

from __future__ import annotations

import difflib
import time
from pathlib import Path

import msgspec

from tartarus.policy.documents import (
    PolicyDocument,
    PolicyError,
    PolicySpec,
    canonical_yaml,
    merge,
    parse_document,
    to_spec,
)
from tartarus.sqlite_wal import open_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS policy_versions (
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    tenant     TEXT,
    document   TEXT NOT NULL,
    deleted    INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    comment    TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
"""


class VersionConflictError(PolicyError):
    """Someone changed the policy since the version the writer started from."""


class PolicyNotFoundError(PolicyError):
    """No such policy document, or no such version of it."""


class Version(msgspec.Struct, kw_only=True):
    name: str
    version: int
    tenant: str | None
    document: str
    deleted: bool
    created_at: float
    created_by: str
    comment: str

    def parsed(self) -> PolicyDocument:
        return parse_document(self.document)


class Effective(msgspec.Struct, kw_only=True):
    tenant: str
    spec: PolicySpec
    raw: dict[str, object]
    # Which documents (name → version) made it.
    versions: dict[str, int]


_COLUMNS = "name, version, tenant, document, deleted, created_at, created_by, comment"


def _version(row: tuple[object, ...]) -> Version:
    name, version, tenant, document, deleted, created_at, created_by, comment = row
    return Version(
        name=str(name),
        version=int(str(version)),
        tenant=None if tenant is None else str(tenant),
        document=str(document),
        deleted=bool(deleted),
        created_at=float(str(created_at)),
        created_by=str(created_by),
        comment=str(comment),
    )


class PolicyStore:
    def __init__(self, path: Path) -> None:
        self._db = open_db(path)
        self._db.executescript(SCHEMA)
        self._cache: dict[str, Effective] = {}
        self._cache_mark: int | None = None

    def close(self) -> None:
        self._db.close()

    # --- reading ------------------------------------------------------------------------

    def current(self, name: str) -> Version | None:
        """The newest version of `name` (a deleted one included)."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM policy_versions WHERE name = ?"  # noqa: S608
            " ORDER BY version DESC LIMIT 1",
            (name,),
        ).fetchone()
        return None if row is None else _version(row)

    def version(self, name: str, version: int) -> Version | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM policy_versions WHERE name = ? AND version = ?",  # noqa: S608
            (name, version),
        ).fetchone()
        return None if row is None else _version(row)

    def history(self, name: str) -> list[Version]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM policy_versions WHERE name = ?"  # noqa: S608
            " ORDER BY version",
            (name,),
        ).fetchall()
        return [_version(r) for r in rows]

    def documents(self) -> list[Version]:
        """The current version of every policy that is not deleted."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM policy_versions p WHERE version ="  # noqa: S608
            " (SELECT MAX(version) FROM policy_versions q WHERE q.name = p.name)"
            " ORDER BY name"
        ).fetchall()
        return [v for v in map(_version, rows) if not v.deleted]

    def _mark(self) -> int:
        # Changes when another connection commits; our own writes clear the cache.
        (mark,) = self._db.execute("PRAGMA data_version").fetchone()
        return int(mark)

    def effective(self, tenant: str) -> Effective:
        """The policy the judges apply to `tenant`."""
        mark = self._mark()
        if mark != self._cache_mark:
            self._cache.clear()
            self._cache_mark = mark
        cached = self._cache.get(tenant)
        if cached is not None:
            return cached
        raw: dict[str, object] = {}
        versions: dict[str, int] = {}
        current = self.documents()
        for doc in sorted(current, key=lambda v: v.tenant is not None):
            if doc.tenant is None or doc.tenant == tenant:
                raw = merge(raw, doc.parsed().spec)
                versions[doc.name] = doc.version
        effective = Effective(
            tenant=tenant, spec=to_spec(raw, f"tenant {tenant}"), raw=raw, versions=versions
        )
        self._cache[tenant] = effective
        return effective

    # --- writing -------------------------------------------------------------------------

    def _write(
        self,
        name: str,
        tenant: str | None,
        text: str,
        *,
        deleted: bool,
        if_version: int | None,
        author: str,
        comment: str,
    ) -> Version:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            at = self._check_write(name, tenant, deleted=deleted, if_version=if_version)
            version = Version(
                name=name,
                version=at + 1,
                tenant=tenant,
                document=text,
                deleted=deleted,
                created_at=time.time(),
                created_by=author,
                comment=comment,
            )
            self._db.execute(
                f"INSERT INTO policy_versions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    version.name,
                    version.version,
                    version.tenant,
                    version.document,
                    int(version.deleted),
                    version.created_at,
                    version.created_by,
                    version.comment,
                ),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._cache.clear()
        return version

    def _check_write(
        self, name: str, tenant: str | None, *, deleted: bool, if_version: int | None
    ) -> int:
        """The current version number, after checking the writer's expectation and that
        no other document covers the same tenant."""
        current = self.current(name)
        at = 0 if current is None else current.version
        if if_version is not None and if_version != at:
            raise VersionConflictError(
                f"policy {name!r} is at version {at}, not {if_version}: someone changed "
                "it since you read it; look at the difference and apply again"
            )
        if not deleted:
            for other in self.documents():
                if other.name != name and other.tenant == tenant:
                    raise PolicyError(
                        f"policy {other.name!r} already covers "
                        + (f"tenant {tenant!r}" if tenant else "all tenants (global)")
                        + f"; change it instead of adding {name!r}"
                    )
        return at

    def apply(
        self, text: str, *, author: str, if_version: int | None = None, comment: str = ""
    ) -> Version:
        """Validates `text` and makes it the next version of the document it names."""
        doc = parse_document(text)
        if doc.tenant is not None:
            # The tenant's overrides must still make a valid policy with the global one.
            global_raw: dict[str, object] = {}
            for other in self.documents():
                if other.tenant is None:
                    global_raw = other.parsed().spec
            to_spec(merge(global_raw, doc.spec), f"policy {doc.name!r} over the global one")
        return self._write(
            doc.name,
            doc.tenant,
            text,
            deleted=False,
            if_version=if_version,
            author=author,
            comment=comment,
        )

    def rollback(
        self, name: str, version: int, *, author: str, if_version: int | None = None
    ) -> Version:
        """Makes `version`'s content current again, as a new version."""
        old = self.version(name, version)
        if old is None:
            raise PolicyNotFoundError(f"policy {name!r} has no version {version}")
        return self._write(
            name,
            old.tenant,
            old.document,
            deleted=old.deleted,
            if_version=if_version,
            author=author,
            comment=f"rollback to version {version}",
        )

    def delete(self, name: str, *, author: str, if_version: int | None = None) -> Version:
        current = self.current(name)
        if current is None or current.deleted:
            raise PolicyNotFoundError(f"no policy {name!r}")
        return self._write(
            name,
            current.tenant,
            current.document,
            deleted=True,
            if_version=if_version,
            author=author,
            comment="deleted",
        )

    def diff(self, name: str, from_version: int, to_version: int) -> str:
        texts = []
        for number in (from_version, to_version):
            v = self.version(name, number)
            if v is None:
                raise PolicyNotFoundError(f"policy {name!r} has no version {number}")
            texts.append("" if v.deleted else canonical_yaml(v.parsed()))
        return "".join(
            difflib.unified_diff(
                texts[0].splitlines(keepends=True),
                texts[1].splitlines(keepends=True),
                fromfile=f"{name}@{from_version}",
                tofile=f"{name}@{to_version}",
            )
        )
