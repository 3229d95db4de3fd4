#!/usr/bin/env bash
# Sets up a Debian 12 machine (as root: installs the packages it needs with apt-get) and builds
# nosa into build/. Idempotent: a second run only rebuilds what changed.
#   scripts/setup.sh           build dependencies + build
#   scripts/setup.sh --test    also the test tools (the openai Python client)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test_tools=0
[ "${1:-}" = "--test" ] && want_test_tools=1

packages=(build-essential cmake ninja-build pkg-config ccache curl python3 python3-pip
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenmpi-dev openmpi-bin libboost-dev libprotobuf-dev protobuf-compiler nlohmann-json3-dev
  libspdlog-dev libfmt-dev libcli11-dev libsentencepiece-dev sentencepiece liburing-dev)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages: ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ $want_test_tools -eq 1 ]; then
  if ! python3 -c "import openai" 2>/dev/null; then
    echo "setup: installing the openai Python client (for the HTTP tests)"
    python3 -m pip install -q openai 2>/dev/null ||
      python3 -m pip install -q --break-system-packages openai
  fi
fi

export CCACHE_DIR="${CCACHE_DIR:-$PWD/.ccache}"
build_type="${NOSA_BUILD_TYPE:-Release}"
if [ ! -f build/build.ninja ]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="$build_type" ${NOSA_CMAKE_ARGS:-}
fi
cmake --build build -j "$(nproc)"
echo "setup: built build/launcher/nosa"
