#!/usr/bin/env bash
# Wheels that the GPU session (benchmarks/gpu_session.sh) needs and its machine lacks, fetched
# where there is network, for the machine's Python (CPython 3.12, x86-64 Linux by default):
# the peers that `pplfast bench` times (liger-kernel, cut-cross-entropy) and pytest-xdist (with
# execnet) for the parallel GPU tests. Pure-Python wheels, installed there --no-deps: the machine
# has torch and triton.
#
#   bash benchmarks/fetch_peer_wheels.sh                  # into .whl/ (git-ignored)
#   bash benchmarks/fetch_peer_wheels.sh --with-quack     # also quack-kernels and its CUTLASS DSL
#   WHEEL_DIR=dir PYTHON_VERSION=3.12 bash benchmarks/fetch_peer_wheels.sh
#
# The folder replaces any wheels it held (two versions of one package stop the install). A device
# run carries at most 64 MiB with the working tree, so the folder's size is printed and checked:
# quack-kernels needs nvidia-cutlass-dsl, whose CUDA 13 library wheel alone is about 92 MB, so it
# is left out unless asked for (and `pplfast bench` does not time it).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${WHEEL_DIR:-.whl}
PYV=${PYTHON_VERSION:-3.12}
PY=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-56}  # what may travel beside the working tree (64 MiB in all)

PACKAGES=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 pytest-xdist==3.8.0 execnet==2.1.2)
case "${1:-}" in
  --with-quack)
    PACKAGES+=(quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
               nvidia-cutlass-dsl-libs-cu13==4.8.1 "apache-tvm-ffi>=0.1.6,<0.2"
               torch-c-dlpack-ext)
    ;;
  "") ;;
  *) echo "usage: $0 [--with-quack]" >&2; exit 2 ;;
esac

mkdir -p "$DEST"
if [ "$DEST" = .whl ] && ! git check-ignore -q .whl/x.whl 2>/dev/null; then
  echo "fetch_peer_wheels.sh: .whl/ is not git-ignored; wheels must not be committed" >&2
  exit 1
fi
rm -f "$DEST"/*.whl
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"

ls -l "$DEST"
size_kib=$(du -sk "$DEST" | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB in $DEST"
if ((size_kib > LIMIT_MIB * 1024)); then
  echo "fetch_peer_wheels.sh: $DEST holds more than ${LIMIT_MIB} MiB: too much for a device run" >&2
  exit 1
fi
