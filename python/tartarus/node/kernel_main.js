// The JavaScript code interpreter that runs *inside* a sandbox
// (`sb.run_code(..., language="javascript")`), with Node's standard library only: one
// node process per code context that keeps its globals between cells (a vm context;
// top-level `let` and `const` persist as a browser's scripts do).
//
// The same protocol as kernel_main.py: one JSON request per line on stdin ({"code": ...});
// events on stdout as lines starting with RS + the nonce (the last argument) + a space:
// `stream`, `result`, `error`, then `done`. This file is sent as `node -e` source; it
// never runs on the host.
"use strict";
const readline = require("readline");
const util = require("util");
const vm = require("vm");

const MARK = "\x1e" + process.argv[process.argv.length - 1] + " ";

function emit(event) {
  process.stdout.write(MARK + JSON.stringify(event) + "\n");
}

function render(value) {
  const out = { text: util.inspect(value) };
  if (value !== null && typeof value === "object") {
    try {
      out.json = JSON.stringify(value);
    } catch (_) {
      // not JSON-able (a cycle, a BigInt): text only
    }
  }
  return out;
}

function writer(name) {
  return (...args) => emit({ type: "stream", name, text: util.format(...args) + "\n" });
}

const context = vm.createContext({
  console: {
    log: writer("stdout"),
    info: writer("stdout"),
    debug: writer("stdout"),
    warn: writer("stderr"),
    error: writer("stderr"),
  },
  display: (value) => emit({ type: "result", data: render(value), main: false }),
  require,
  process,
  Buffer,
  URL,
  TextEncoder,
  TextDecoder,
  setTimeout,
  clearTimeout,
  setInterval,
  clearInterval,
});

// Outside a cell SIGINT is ignored; inside one, `breakOnSigint` turns the server's
// interrupt (a cell past its timeout) into an error in the cell.
process.on("SIGINT", () => {});

let count = 0;
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  if (!line.trim()) {
    return;
  }
  count += 1;
  const saved = {};
  try {
    const { code, env } = JSON.parse(line);
    // The cell's own variables, for it only.
    for (const [name, value] of Object.entries(env || {})) {
      saved[name] = Object.prototype.hasOwnProperty.call(process.env, name)
        ? process.env[name]
        : undefined;
      process.env[name] = value;
    }
    const value = vm.runInContext(code, context, {
      filename: `<cell ${count}>`,
      breakOnSigint: true,
    });
    if (value !== undefined) {
      emit({ type: "result", data: render(value), main: true });
    }
  } catch (error) {
    // Errors from the context are of its own realm: no `instanceof Error` here.
    const name = (error && error.name) || "Error";
    const value = error && error.message !== undefined ? String(error.message) : String(error);
    const traceback = (error && error.stack) || `${name}: ${value}`;
    emit({ type: "error", name, value, traceback: String(traceback) });
  }
  for (const [name, value] of Object.entries(saved)) {
    if (value === undefined) {
      delete process.env[name];
    } else {
      process.env[name] = value;
    }
  }
  emit({ type: "done", count });
});
