#!/usr/bin/env bash
# One-time set-up: install the pinned requirements, then the data sets. Where they lie in ../shared/data (this
# project's workspace and CI) they are linked and nothing touches the network; a file still missing is fetched
# by `python -m modules.datasets fetch` (pinned commit of the authors' repository, size and SHA-256 checked).
#   SETUP_SKIP_PIP=1       skip the requirements (already installed)
#   MCVAE_DATA_URL=SOURCE  fetch from a base URL or a folder with the authors' data/ tree instead of GitHub (--from)
set -euo pipefail
cd "$(dirname "$0")"
if [ "${SETUP_SKIP_PIP:-0}" != 1 ]; then
  python -m pip install -q -r requirements.txt
fi
mkdir -p data
for name in biked cars; do
  if [ ! -e "data/$name" ] && [ -d "../shared/data/$name" ]; then
    ln -s "$(cd "../shared/data/$name" && pwd)" "data/$name"
    echo "linked data/$name → ../shared/data/$name"
  fi
done
missing=()
[ -e data/biked/df_parameters_final.csv ] || missing+=(biked)
[ -e data/cars/cars.csv ] || missing+=(cars)
if [ ${#missing[@]} -gt 0 ]; then
  echo "fetching ${missing[*]} into data/"
  python -m modules.datasets fetch "${missing[@]}" --dir data ${MCVAE_DATA_URL:+--from "$MCVAE_DATA_URL"} || {
    echo "set-up incomplete: the data sets above could not be fetched (see the error; README.md, Data)" >&2
    exit 2
  }
fi
echo "set-up done"
