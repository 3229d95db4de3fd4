#!/usr/bin/env bash
# The main job on the embedded default: sets up and builds, makes a small random NOSA model, and
# generates text from a prompt on the CPU backend.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
nosa=build/launcher/nosa
model=build/models/tiny-nosa
[ -f "$model/config.json" ] || $nosa make-model --shape tiny --attention nosa --seed 1 --out "$model"
$nosa generate --model "$model" --device cpu --prompt "The lighthouse keeper climbed the stairs" \
  --max-tokens 32
