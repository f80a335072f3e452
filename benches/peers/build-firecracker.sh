#!/bin/sh
# Builds Firecracker from source as the peer of benches/bench_microvm_nested.py and puts
# it where the bench looks: ~/.cache/tartarus/peers/firecracker/<tag>/firecracker.
#
#   benches/peers/build-firecracker.sh [TAG] [GIT_URL]    (default v1.16.1, GitHub)
#
# Environment:
#   FIRECRACKER_SRC  an existing checkout of TAG to build instead of cloning
#   MICRO_HTTP_SRC   an existing copy of micro-http at the commit Firecracker's Cargo.lock
#                    names, instead of cloning it
#   TARTARUS_CACHE_DIR  instead of ~/.cache/tartarus
#
# Needs git, cargo (rustup fetches the toolchain rust-toolchain.toml names), a C
# compiler, Debian's libseccomp-dev and libclang-dev (bindgen, for userfaultfd-sys).
# This is the gnu target: a dynamic binary whose seccomp policy allows everything. The
# released binaries are musl builds with their real seccomp filters (see docs/benchmarks.md).
# Firecracker's micro_http is a git dependency on a separate repository; it is given to
# cargo as a local path (`[patch]`), so the build itself needs no git access from cargo.
set -eu

TAG=${1:-v1.16.1}
URL=${2:-https://github.com/firecracker-microvm/firecracker}
MICRO_HTTP_URL=https://github.com/firecracker-microvm/micro-http
CACHE=${TARTARUS_CACHE_DIR:-$HOME/.cache/tartarus}
WORK=$CACHE/peers/build
DEST=$CACHE/peers/firecracker/$TAG

mkdir -p "$WORK"
SRC=${FIRECRACKER_SRC:-$WORK/firecracker-$TAG}
if [ ! -f "$SRC/Cargo.lock" ]; then
    git clone --quiet --depth 1 --branch "$TAG" "$URL" "$SRC"
fi

if [ -n "${MICRO_HTTP_SRC:-}" ]; then
    MH=$MICRO_HTTP_SRC
else
    # The micro_http commit the lock file pins: source = "git+<url>#<commit>" (read from
    # git: building with the patch rewrites the checked-out Cargo.lock without it).
    COMMIT=$({ git -C "$SRC" show HEAD:Cargo.lock 2>/dev/null || cat "$SRC/Cargo.lock"; } |
        sed -n 's|^source = "git+'"$MICRO_HTTP_URL"'[^#]*#\([0-9a-f]*\)"$|\1|p' | head -n 1)
    [ -n "$COMMIT" ] || { echo "no micro_http git source in $SRC/Cargo.lock" >&2; exit 1; }
    MH=$WORK/micro-http-$COMMIT
    if [ ! -f "$MH/Cargo.toml" ]; then
        git init --quiet "$MH"
        git -C "$MH" fetch --quiet --depth 1 "$MICRO_HTTP_URL" "$COMMIT"
        git -C "$MH" checkout --quiet FETCH_HEAD
    fi
fi

cd "$SRC"
start=$(date +%s)
nice -n 10 cargo build --release -p firecracker \
    --config "patch.\"$MICRO_HTTP_URL\".micro_http.path=\"$MH\""
echo "built in $(( $(date +%s) - start )) s"

# .cargo/config.toml sets the target directory (build/cargo_target).
BIN=$(find "$SRC/build/cargo_target" "$SRC/target" -path '*/release/firecracker' -type f 2>/dev/null | head -n 1)
[ -n "$BIN" ] || { echo "no firecracker binary under $SRC" >&2; exit 1; }
mkdir -p "$DEST"
install -m 0755 "$BIN" "$DEST/firecracker"
"$DEST/firecracker" --version | head -n 1
echo "$DEST/firecracker"
