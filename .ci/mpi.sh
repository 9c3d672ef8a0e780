#!/usr/bin/env bash
# Data parallelism over MPI: builds with `--features mpi` and runs tests/mpi.rs, whose tests start
# `mpirun --oversubscribe -np 2` themselves (2 ranks x B/2 == 1 rank x B, resume, abort on failure).
#
# Installs libopenmpi-dev, openmpi-bin and libclang-dev (apt) when missing. When they cannot be
# installed it prints `SKIPPED: <reason>` and exits 0; a build or test failure fails the script.
set -uo pipefail
cd "$(dirname "$0")/.."

skip() {
    echo "SKIPPED: $*"
    exit 0
}

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi

have_toolchain() {
    command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 \
        && ldconfig -p 2>/dev/null | grep -q 'libclang'
}

if ! have_toolchain; then
    command -v apt-get >/dev/null 2>&1 || skip "OpenMPI/libclang missing and no apt-get to install them"
    $SUDO apt-get update -qq || skip "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev \
        || skip "apt-get install libopenmpi-dev openmpi-bin libclang-dev failed"
fi
have_toolchain || skip "mpirun, mpicc or libclang not found after installing them"

# OpenMPI refuses to run as root without these (CI runs as root)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

set -e
echo "== cargo build --release --features mpi"
cargo build --release --features mpi
echo "== cargo test --release --features mpi --test mpi (mpirun --oversubscribe -np 2)"
cargo test --release --features mpi --test mpi
