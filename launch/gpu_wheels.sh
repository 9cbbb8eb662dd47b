#!/usr/bin/env bash
# Fetches launch/gpu_requirements.txt as wheels for an offline GPU machine (Python 3.12,
# x86-64 Linux) into DIR: `launch/gpu_wheels.sh DIR`. Run it where pip reaches a package index;
# copy DIR over and install there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
# promise ships no wheel, so it is built here (pure Python, the same on any platform).
set -euo pipefail
if (($# != 1)) || [[ "$1" == -h || "$1" == --help ]]; then
  sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2
fi
dir="$1"
requirements="$(dirname -- "${BASH_SOURCE[0]}")/gpu_requirements.txt"
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^#' "$requirements" | grep -v '^promise==' | grep . > "$dir/.binary.txt"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dir" -r "$dir/.binary.txt"
python3 -m pip wheel --quiet --no-deps -w "$dir" "$(grep '^promise==' "$requirements")"
rm "$dir/.binary.txt"
ls "$dir"
