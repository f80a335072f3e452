"""Request and response bodies of the `/v1` API (msgspec Structs).

Requests forbid unknown fields, so a typo is a 422 instead of a silently ignored
option. Output from sandboxed commands travels as text (UTF-8, invalid bytes replaced);
byte-exact transfers go through the file endpoints, which stream raw bytes.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from tartarus.api.placement import PlacementRules
from tartarus.api.sandbox import (
    Backend,
    Ending,
    FileInfo,
    OnTimeout,
    Resources,
    SandboxState,
    Stream,
    TrustLevel,
)

API_VERSION = "v1"
# What a tenant name may look like (it appears in paths, keys and audit entries).
TENANT_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"

# Limits a client can rely on; the server enforces them and documents them in the schema.
MAX_TIMEOUT_S = 24 * 3600.0
DEFAULT_TIMEOUT_S = 300.0
MAX_EXEC_TIMEOUT_S = 3600.0
MAX_LIST_LIMIT = 500
# Sequence numbers and versions: SQLite and the agent keep them in 64 bits, so a larger
# one is a 422, not an overflow deep inside.
MAX_SEQ = 2**63 - 1

SandboxId = Annotated[str, Meta(pattern=r"^sb-[0-9a-f]{16}$", examples=["sb-0123456789abcdef"])]
SnapshotId = Annotated[
    str, Meta(pattern=r"^snap-[0-9a-f]{16}$", examples=["snap-0123456789abcdef"])
]
TemplateName = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
]
EnvMap = Annotated[
    dict[
        Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^=\x00]+$")],
        Annotated[str, Meta(max_length=32768)],
    ],
    Meta(max_length=256),
]
MetadataMap = Annotated[
    dict[
        Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")],
        Annotated[str, Meta(max_length=1024)],
    ],
    Meta(max_length=64),
]
TenantName = Annotated[str, Meta(pattern=TENANT_PATTERN, examples=["acme"])]
# Environment variable → secret reference, `provider:name` (docs/auth.md, "Secrets").
SecretMap = Annotated[
    dict[
        Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")],
        Annotated[str, Meta(min_length=3, max_length=512, pattern=r"^[a-z]+:[^\x00]+$")],
    ],
    Meta(max_length=64),
]
TimeoutSeconds = Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)]
MAX_GRACE_S = 300.0
GraceSeconds = Annotated[float, Meta(ge=0, le=MAX_GRACE_S)]
ExecTimeoutSeconds = Annotated[float, Meta(gt=0, le=MAX_EXEC_TIMEOUT_S)]
# A path inside the sandbox: absolute, no NUL; `..` components are refused by the server.
SandboxPath = Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]
Signal = Annotated[int, Meta(ge=1, le=64)]
Pid = Annotated[int, Meta(ge=1, le=1 << 22)]
Port = Annotated[int, Meta(ge=1, le=65535)]
# An opaque position in a listing (`next_cursor`).
Cursor = Annotated[str, Meta(pattern=r"^[0-9]{1,18}$")]


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class _Response(msgspec.Struct, kw_only=True):
    pass


# --- sandboxes ---------------------------------------------------------------------


class ResourcesBody(_Request, kw_only=True, omit_defaults=True):
    """Limits of one sandbox (at most the template's `max_resources`). A field left
    out (or null) is unset: the server fills it from the tenant's policy, else the
    template, else its own default (docs/policy.md, "Defaults")."""

    vcpus: Annotated[float, Meta(ge=0.05, le=64)] | None = None
    memory_mib: Annotated[int, Meta(ge=16, le=256 * 1024)] | None = None
    disk_mib: Annotated[int, Meta(ge=16, le=1024 * 1024)] | None = None
    pids: Annotated[int, Meta(ge=8, le=65536)] | None = None

    def to_runtime(self) -> Resources:
        """The limits, once every field is set (`tartarus.node.defaults.resolve`)."""
        if self.vcpus is None or self.memory_mib is None or self.disk_mib is None:
            raise ValueError(f"unresolved resources: {self}")
        if self.pids is None:
            raise ValueError(f"unresolved resources: {self}")
        return Resources(
            vcpus=self.vcpus, memory_mib=self.memory_mib, disk_mib=self.disk_mib, pids=self.pids
        )


class CreateSandboxRequest(_Request, kw_only=True, omit_defaults=True):
    template: TemplateName = "base"
    backend: Backend = Backend.AUTO
    resources: ResourcesBody = msgspec.field(default_factory=ResourcesBody)
    env: EnvMap = msgspec.field(default_factory=dict)
    # Seconds until the sandbox is stopped; `POST .../timeout` moves the deadline.
    # Unset: the tenant's policy, else the template, else the server decides.
    timeout_s: TimeoutSeconds | None = None
    metadata: MetadataMap = msgspec.field(default_factory=dict)
    network: bool = False
    trust: TrustLevel = TrustLevel.UNTRUSTED
    # Secrets the sandbox's commands get as environment variables, resolved at exec time.
    secrets: SecretMap = msgspec.field(default_factory=dict)
    # Where it may run when a fleet of node agents serves this API (ignored on one host).
    placement: PlacementRules | None = None
    # Restore this snapshot instead of starting the template (its template, backend,
    # resources, network and trust apply; `template` and `backend` are ignored).
    from_snapshot: SnapshotId | None = None
    # Take a snapshot of the sandbox when it is stopped (deleted, timed out, or the
    # server shuts down), before it is torn down.
    checkpoint_on_stop: bool = False
    # What its timeout does: end it, or pause it (docs/lifecycle.md); unset: what its
    # template says, else `kill`.
    on_timeout: OnTimeout | None = None
    # Pause it after this long with no API call that needs it running; unset: what its
    # template says, else never.
    auto_pause_after_s: TimeoutSeconds | None = None
    # Seconds of SIGTERM a stop gives its processes before the kill when the stop does
    # not say (a DELETE without `grace_s`); unset: what its template says, else 0.
    stop_grace_s: GraceSeconds | None = None

    def resolved_timeout_s(self) -> float:
        """The timeout, once it is set (`tartarus.node.defaults.resolve`)."""
        if self.timeout_s is None:
            raise ValueError("unresolved timeout")
        return self.timeout_s


class PortInfo(_Response, kw_only=True):
    """Where a port inside a sandbox is reached through the API server (HTTP and
    WebSocket, with the API's credentials)."""

    sandbox_id: SandboxId
    port: Port
    # The proxy path on the API server, and the URL built from the request's origin.
    path: str
    url: str


class SandboxInfo(_Response, kw_only=True):
    id: SandboxId
    template: str
    backend: Backend
    state: SandboxState
    created_at: dt.datetime
    expires_at: dt.datetime | None
    ended_at: dt.datetime | None = None
    resources: Resources
    metadata: dict[str, str]
    network: bool
    trust: TrustLevel
    # Why the selector picked this backend (`tartarus run --explain`).
    backend_reason: str = ""
    # Why the sandbox stopped or failed, when it did.
    detail: str = ""
    tenant: str = "default"
    TenantName = Annotated[str, Meta(pattern=TENANT_PATTERN, examples=["acme"])]
    # Environment variable → secret reference (the references, never the values).
    secrets: dict[str, str] = msgspec.field(default_factory=dict)
    # The node agent running it (many hosts; empty on a single host).
    node: str = ""
    # Paused: since when, and the timeout it will have left when it resumes.
    paused_at: dt.datetime | None = None
    timeout_left_s: float | None = None
    # What its timeout does (kill or pause), and its idle time before it pauses itself.
    on_timeout: OnTimeout = OnTimeout.KILL
    auto_pause_after_s: float | None = None
    # How it ended, once it has.
    ending: Ending | None = None
    # The SIGTERM grace a stop that does not say gives it.
    stop_grace_s: float = 0.0


class SandboxPage(_Response, kw_only=True):
    items: list[SandboxInfo]
    # Pass as `cursor` to get the next page; null on the last page.
    next_cursor: str | None = None


class SetTimeoutRequest(_Request, kw_only=True):
    timeout_s: TimeoutSeconds


class SandboxStatsInfo(_Response, kw_only=True):
    cpu_seconds: float
    memory_bytes: int
    memory_limit_bytes: int | None = None
    pids: int = 0


# --- exec ----------------------------------------------------------------------------


class PtyBody(_Request, kw_only=True):
    rows: Annotated[int, Meta(ge=1, le=1000)] = 24
    cols: Annotated[int, Meta(ge=1, le=1000)] = 80


class StreamExecBody(_Request, kw_only=True):
    """One command: `cmd` is a shell command line (run by `/bin/sh -c`) or an argv list."""

    cmd: (
        Annotated[str, Meta(min_length=1, max_length=131072)]
        | Annotated[
            list[Annotated[str, Meta(max_length=131072)]], Meta(min_length=1, max_length=4096)
        ]
    )
    env: EnvMap = msgspec.field(default_factory=dict)
    cwd: SandboxPath | None = None
    user: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    # Text written to the command's stdin before it is closed.
    stdin: Annotated[str, Meta(max_length=1 << 20)] | None = None
    pty: PtyBody | None = None
    timeout_s: ExecTimeoutSeconds | None = None


class ExecBody(StreamExecBody, kw_only=True):
    # Return at once with the pid; follow it with `.../processes/{pid}/stream`.
    background: bool = False
    # With background: keep stdin open for `POST .../processes/{pid}/stdin`.
    stdin_open: bool = False


class ExecOutcome(_Response, kw_only=True):
    pid: int
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    duration_s: float = 0.0
    stdout: str
    stderr: str
    # Bytes dropped because the output exceeded the server's bound (or the agent's).
    truncated: bool = False


class ProcessStarted(_Response, kw_only=True):
    pid: int


class ExitInfo(_Response, kw_only=True):
    code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    dropped_chunks: int = 0
    duration_s: float = 0.0


class StartedEvent(msgspec.Struct, kw_only=True, tag="started"):
    pid: int


class OutputEvent(msgspec.Struct, kw_only=True, tag="output"):
    stream: Stream
    data: str


class ExitEvent(msgspec.Struct, kw_only=True, tag="exit"):
    exit: ExitInfo


class ErrorEvent(msgspec.Struct, kw_only=True, tag="error"):
    detail: str


# One line of an `application/x-ndjson` exec or attach stream; the last is exit or error.
StreamEvent = StartedEvent | OutputEvent | ExitEvent | ErrorEvent


class ProcessEntry(_Response, kw_only=True):
    pid: int
    argv: list[str]
    started_at: float
    running: bool
    pty: bool = False
    exit: ExitInfo | None = None


class ProcessList(_Response, kw_only=True):
    items: list[ProcessEntry]


class StdinBody(_Request, kw_only=True):
    data: Annotated[str, Meta(max_length=1 << 20)] = ""
    eof: bool = False


class ResizeBody(_Request, kw_only=True):
    rows: Annotated[int, Meta(ge=1, le=1000)]
    cols: Annotated[int, Meta(ge=1, le=1000)]


# WebSocket control messages (text frames); stdin and output travel as binary frames.
class WsResize(msgspec.Struct, tag="resize", forbid_unknown_fields=True):
    rows: Annotated[int, Meta(ge=1, le=1000)]
    cols: Annotated[int, Meta(ge=1, le=1000)]


class WsEof(msgspec.Struct, tag="eof", forbid_unknown_fields=True):
    pass


class WsSignal(msgspec.Struct, tag="signal", forbid_unknown_fields=True):
    signal: Signal = 15


WsControl = WsResize | WsEof | WsSignal

# First byte of every binary WebSocket frame from the server: which stream it carries.
WS_STDOUT = 1
WS_STDERR = 2


# --- files ---------------------------------------------------------------------------


class FileList(_Response, kw_only=True):
    items: list[FileInfo]


class MakeDirBody(_Request, kw_only=True):
    path: SandboxPath
    parents: bool = True


class RenameBody(_Request, kw_only=True):
    src: SandboxPath
    dst: SandboxPath


class FileWatchEvent(_Response, kw_only=True):
    """One line of `GET .../files/watch`: what changed under the watched directory.
    `overflow`: the sandbox's kernel dropped events (its inotify queue was full)."""

    path: str
    kind: Literal["create", "write", "remove", "rename", "chmod", "overflow"]


class FileWritten(_Response, kw_only=True):
    path: str
    size: int


# --- logs ----------------------------------------------------------------------------


class LogEvent(_Response, kw_only=True):
    seq: int
    ts: float
    pid: int
    stream: Stream
    data: str


class LogPage(_Response, kw_only=True):
    items: list[LogEvent]
    # Pass as `since` to continue after the last entry returned (sequence numbers start at 1).
    next_seq: int


# --- code interpreter ----------------------------------------------------------------


CodeLanguage = Literal["python", "javascript", "bash"]
CodeContextId = Annotated[
    str,
    Meta(
        pattern=r"^(default(-javascript|-bash)?|ctx-[0-9a-f]{12})$",
        examples=["ctx-0123456789ab"],
    ),
]


class RunCodeBody(_Request, kw_only=True):
    code: Annotated[str, Meta(max_length=1 << 20)]
    # The language's default context, unless `context` names one (of that language).
    language: CodeLanguage | None = None
    context: CodeContextId | None = None
    timeout_s: ExecTimeoutSeconds | None = None
    # Environment variables for this cell only (the context's own are back after it).
    envs: EnvMap = msgspec.field(default_factory=dict)


class CreateCodeContextBody(_Request, kw_only=True):
    language: CodeLanguage = "python"
    # Where its cells run (the template's working directory if not given).
    cwd: SandboxPath | None = None


class CodeContextInfo(_Response, kw_only=True):
    """An interpreter of its own in the sandbox: its variables, imports and working
    directory are not shared with other contexts."""

    id: str
    language: str
    cwd: str


class CodeContextList(_Response, kw_only=True):
    items: list[CodeContextInfo]


class RichResult(_Response, kw_only=True):
    """One displayable value, in every format the kernel could render it in."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    # Base64-encoded images.
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    javascript: str | None = None
    json: str | None = None
    # A pandas DataFrame's values: JSON `{"columns": [...], "index": [...], "data":
    # [[...], ...]}` (up to 10 000 cells; `html` has the table).
    data: str | None = None
    # True for the value of the cell's last expression (what a notebook shows as Out[n]).
    is_main_result: bool = False


class CodeError(_Response, kw_only=True):
    name: str
    value: str
    traceback: str


class CodeLogs(msgspec.Struct, frozen=True):
    """What a cell printed, line by line (`execution.logs.stdout`, as E2B's SDK has it)."""

    stdout: list[str]
    stderr: list[str]


class CodeExecution(_Response, kw_only=True):
    results: list[RichResult]
    # What the cell printed, line by line (each line keeps its newline).
    stdout: list[str]
    stderr: list[str]
    error: CodeError | None = None
    execution_count: int

    @property
    def text(self) -> str | None:
        """The text of the cell's main result (its last expression's value), if any."""
        main = next((r for r in self.results if r.is_main_result), None)
        return None if main is None else main.text

    @property
    def logs(self) -> CodeLogs:
        return CodeLogs(stdout=self.stdout, stderr=self.stderr)


class CodeStdoutEvent(msgspec.Struct, kw_only=True, tag="stdout"):
    """A line (or the last, unfinished part) the cell printed."""

    text: str


class CodeStderrEvent(msgspec.Struct, kw_only=True, tag="stderr"):
    text: str


class CodeResultEvent(msgspec.Struct, kw_only=True, tag="result"):
    result: RichResult


class CodeErrorEvent(msgspec.Struct, kw_only=True, tag="error"):
    error: CodeError


class CodeDoneEvent(msgspec.Struct, kw_only=True, tag="done"):
    """The last event: everything the cell left, as `POST .../code` answers it."""

    execution: CodeExecution


# One line of `POST /v1/sandboxes/{id}/code/stream`, as the cell runs; the last is `done`.
CodeStreamEvent = (
    CodeStdoutEvent | CodeStderrEvent | CodeResultEvent | CodeErrorEvent | CodeDoneEvent
)


# --- templates and snapshots ---------------------------------------------------------


class TemplateEntry(_Response, kw_only=True):
    name: str
    description: str = ""
    builtin: bool = False
    # Built: its root filesystem is ready; otherwise the first sandbox builds it.
    built: bool = False
    # Backends the template is meant for (empty: any).
    backends: list[Backend] = msgspec.field(default_factory=list)
    size_bytes: int | None = None
    resources: Resources | None = None
    timeout_s: float | None = None


class TemplateList(_Response, kw_only=True):
    items: list[TemplateEntry]


# --- service -------------------------------------------------------------------------


class Health(_Response, kw_only=True):
    status: Literal["ok"] = "ok"


class Readiness(_Response, kw_only=True):
    ready: bool
    checks: dict[str, str]


class VersionInfo(_Response, kw_only=True):
    version: str
    api: str = API_VERSION
    python: str
    backends: dict[str, str]


PROBLEM_MEDIA = "application/problem+json"


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details, `application/problem+json`."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    # Machine-readable errors for 422s: where (a JSON path) and what.
    errors: list[ProblemField] | None = None


class ProblemField(msgspec.Struct, kw_only=True):
    pointer: str
    detail: str
