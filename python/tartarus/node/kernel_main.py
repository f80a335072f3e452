"""The code interpreter that runs *inside* a sandbox (`sb.run_code`), with only the
standard library: one Python process per sandbox that keeps its globals between cells.

It reads one JSON request per line on stdin ({"code": ...}) and answers on stdout with
lines that start with a marker (RS + a nonce from argv) followed by a JSON event:
`stream` (stdout/stderr text), `result` (a value in every format it can render),
`error`, and finally `done`. Anything else on stdout (a subprocess writing to fd 1)
is plain output. This file is sent as `python3 -c` source; it never runs on the host.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import os
import signal
import sys
import traceback
from typing import Any

MARK = "\x1e" + sys.argv[1] + " "
REAL_OUT = sys.stdout
REAL_ERR = sys.stderr
FORMATS = (
    ("_repr_html_", "html"),
    ("_repr_markdown_", "markdown"),
    ("_repr_svg_", "svg"),
    ("_repr_png_", "png"),
    ("_repr_jpeg_", "jpeg"),
    ("_repr_json_", "json"),
    ("_repr_latex_", "latex"),
    ("_repr_javascript_", "javascript"),
    ("_repr_pdf_", "pdf"),
)
# A DataFrame's values as data, up to this many cells (E2B's `Result.data`).
MAX_DATA_CELLS = 10_000


def emit(event: dict[str, Any]) -> None:
    REAL_OUT.write(MARK + json.dumps(event) + "\n")
    REAL_OUT.flush()


class Stream(io.TextIOBase):
    def __init__(self, name: str) -> None:
        self.stream_name = name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            emit({"type": "stream", "name": self.stream_name, "text": text})
        return len(text)


def figure_png(figure: Any) -> str:
    buf = io.BytesIO()
    figure.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def render(value: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for attr, key in FORMATS:
        method = getattr(value, attr, None)
        if not callable(method):
            continue
        try:
            data = method()
        except Exception:  # a broken _repr_ must not break the cell
            continue
        if isinstance(data, tuple):
            data = data[0]
        if data is None:
            continue
        if isinstance(data, bytes):
            data = base64.b64encode(data).decode()
        elif key == "json":
            data = json.dumps(data)
        out[key] = data
    if hasattr(value, "savefig") and "png" not in out:
        with contextlib.suppress(Exception):
            out["png"] = figure_png(value)
    frame = dataframe_data(value)
    if frame is not None:
        out["data"] = frame
    out["text"] = repr(value)
    return out


def dataframe_data(value: Any) -> str | None:
    """A pandas DataFrame as JSON (`{"columns", "index", "data"}`), if it is small."""
    if type(value).__name__ != "DataFrame" or not hasattr(value, "to_json"):
        return None
    if getattr(value, "size", MAX_DATA_CELLS + 1) > MAX_DATA_CELLS:
        return None
    with contextlib.suppress(Exception):
        return str(value.to_json(orient="split", date_format="iso"))
    return None


def display(value: Any) -> None:
    emit({"type": "result", "data": render(value), "main": False})


def flush_figures() -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        data = {"png": figure_png(figure), "text": repr(figure)}
        emit({"type": "result", "data": data, "main": False})
    pyplot.close("all")


def run_cell(namespace: dict[str, Any], code: str, count: int) -> None:
    tree = ast.parse(code, "<cell>", "exec")
    last: ast.Expression | None = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body[-1].value)
        tree.body.pop()
    exec(compile(tree, f"<cell {count}>", "exec"), namespace)
    value = eval(compile(last, f"<cell {count}>", "eval"), namespace) if last else None
    flush_figures()
    if value is not None:
        namespace["_"] = value
        emit({"type": "result", "data": render(value), "main": True})


def cell_traceback(error: BaseException) -> str:
    """The traceback from the cell's own frames on (the kernel's are noise)."""
    tb = error.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell"):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


def main() -> None:
    # A process started in the background may inherit SIGINT ignored; the server's
    # interrupt (a cell past its timeout) must raise KeyboardInterrupt in the cell.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    namespace: dict[str, Any] = {"__name__": "__main__", "display": display}
    count = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        count += 1
        request = json.loads(line)
        code, env = request["code"], request.get("env") or {}
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        sys.stdout, sys.stderr = Stream("stdout"), Stream("stderr")
        try:
            run_cell(namespace, code, count)
        except BaseException as e:  # the cell's failure is the answer, the kernel goes on
            emit(
                {
                    "type": "error",
                    "name": type(e).__name__,
                    "value": str(e),
                    "traceback": cell_traceback(e),
                }
            )
        finally:
            sys.stdout, sys.stderr = REAL_OUT, REAL_ERR
            # The cell's own variables end with it.
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            emit({"type": "done", "count": count})


main()
