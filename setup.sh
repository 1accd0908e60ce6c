#!/usr/bin/env bash
# One-time set-up: install the pinned requirements and link the data sets when they lie in ../shared/data.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
mkdir -p data
for name in biked cars; do
  if [ ! -e "data/$name" ] && [ -d "../shared/data/$name" ]; then
    ln -s "$(cd "../shared/data/$name" && pwd)" "data/$name"
    echo "linked data/$name → ../shared/data/$name"
  fi
done
for file in data/biked/df_parameters_final.csv data/cars/cars.csv; do
  [ -e "$file" ] || echo "note: $file is missing; see README.md, Data, for where to get it"
done
echo "set-up done"
