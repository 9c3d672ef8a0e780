#!/usr/bin/env bash
# Cross-tests the `empf-simd` crate (NEON kernels included) and the inference runtime's tests
# (tests/deploy.rs, minus the whole-MNIST-split comparison, too slow under emulation) on aarch64
# under qemu-user.
#
# Installs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user (apt), then the Rust target
# (rustup target add; falling back to nightly -Zbuild-std with rust-src). When the toolchain cannot be
# installed it prints `SKIPPED: <reason>` and exits 0; test failures fail the script.
set -uo pipefail
cd "$(dirname "$0")/.."

T=aarch64-unknown-linux-gnu
skip() {
    echo "SKIPPED: $*"
    exit 0
}

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi

if ! command -v qemu-aarch64 >/dev/null 2>&1 || ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 \
    || [ ! -d /usr/aarch64-linux-gnu/lib ]; then
    command -v apt-get >/dev/null 2>&1 || skip "qemu-aarch64/aarch64-linux-gnu-gcc missing and no apt-get to install them"
    $SUDO apt-get update -qq || skip "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user \
        || skip "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user failed"
fi
command -v qemu-aarch64 >/dev/null 2>&1 || skip "qemu-aarch64 not found after installing qemu-user"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"

if rustup target list --installed 2>/dev/null | grep -qx "$T" || rustup target add "$T"; then
    echo "== cargo test -p empf-simd --release --target $T (under qemu)"
    cargo test -p empf-simd --release --target "$T" || exit 1
    echo "== cargo test -p empf --release --target $T --test deploy (runtime, under qemu)"
    exec cargo test -p empf --release --target "$T" --test deploy -- --skip whole_mnist_test_set
fi

echo "rustup target add $T failed; trying nightly -Zbuild-std"
if rustup component add rust-src --toolchain nightly 2>/dev/null \
    || { rustup toolchain install nightly --profile minimal && rustup component add rust-src --toolchain nightly; }; then
    echo "== cargo +nightly test -Zbuild-std -p empf-simd --release --target $T (under qemu)"
    cargo +nightly test -Zbuild-std -p empf-simd --release --target "$T" || exit 1
    echo "== cargo +nightly test -Zbuild-std -p empf --release --target $T --test deploy (under qemu)"
    exec cargo +nightly test -Zbuild-std -p empf --release --target "$T" --test deploy -- --skip whole_mnist_test_set
fi
skip "could not install the $T Rust target (rustup target add and nightly rust-src both failed)"
