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
#   FIRECRACKER_TARGET  musl (default: static, with its real seccomp filters, as
#                    Firecracker's releases ship it) or gnu (dynamic; its seccomp policy
#                    allows everything)
#
# Needs git, cargo (rustup fetches the toolchain and the musl target that
# rust-toolchain.toml names), a C compiler, Debian's libclang-dev (bindgen, for
# userfaultfd-sys), and musl-tools for musl or libseccomp-dev for gnu.
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

TARGET=x86_64-unknown-linux-${FIRECRACKER_TARGET:-musl}
case $TARGET in
*-musl)
    # musl-gcc sees only musl's headers; userfaultfd-sys's C needs the kernel's too.
    HDRS=$WORK/musl-kernel-headers
    mkdir -p "$HDRS"
    for d in linux asm-generic; do ln -sfn "/usr/include/$d" "$HDRS/$d"; done
    ln -sfn /usr/include/x86_64-linux-gnu/asm "$HDRS/asm"
    export CFLAGS_x86_64_unknown_linux_musl="-isystem $HDRS"
    ;;
*-gnu) ;;
*) echo "FIRECRACKER_TARGET is musl or gnu, not ${FIRECRACKER_TARGET}" >&2; exit 2 ;;
esac

cd "$SRC"
start=$(date +%s)
nice -n 10 cargo build --release -p firecracker --target "$TARGET" \
    --config "patch.\"$MICRO_HTTP_URL\".micro_http.path=\"$MH\""
echo "built in $(( $(date +%s) - start )) s"

# .cargo/config.toml sets the target directory (build/cargo_target).
BIN=$(find "$SRC/build/cargo_target" "$SRC/target" -path "*/$TARGET/release/firecracker" -type f 2>/dev/null | head -n 1)
[ -n "$BIN" ] || { echo "no firecracker binary under $SRC" >&2; exit 1; }
mkdir -p "$DEST"
install -m 0755 "$BIN" "$DEST/firecracker"
"$DEST/firecracker" --version | head -n 1
echo "$DEST/firecracker"
