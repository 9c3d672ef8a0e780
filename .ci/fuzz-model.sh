#!/usr/bin/env bash
# Fuzzes the deployable-model loader (fuzz/fuzz_targets/model.rs) for ~30 s with cargo-fuzz on
# nightly. Installs nightly and cargo-fuzz when missing; prints `SKIPPED: <reason>` and exits 0 when
# that fails. A crash (panic, huge allocation, timeout) fails the script.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
skip() {
    echo "SKIPPED: $*"
    exit 0
}
command -v rustup >/dev/null 2>&1 || skip "rustup not found (cargo-fuzz needs a nightly toolchain)"
rustup run nightly rustc --version >/dev/null 2>&1 \
    || rustup toolchain install nightly --profile minimal >/dev/null 2>&1 \
    || skip "could not install the nightly toolchain"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked >/dev/null 2>&1 || skip "cargo install cargo-fuzz --locked failed"
fi
mkdir -p corpus/model
echo "== cargo +nightly fuzz run -O model (30 s)"
cargo +nightly fuzz run -O model corpus/model seeds/model -- -max_total_time=30 -malloc_limit_mb=512 -rss_limit_mb=1024
