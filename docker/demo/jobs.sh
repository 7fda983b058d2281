#!/bin/sh
# The compose demo: submit jobs to the running stack with `synapse-bridge submit`, then
# wait for every one to finish and print a summary (docker/demo/wait_jobs.py).
#
#   docker compose -f docker/compose.yaml run --rm demo-jobs [JOBS] [BATCH_ITEMS]
#
# JOBS single jobs round-robin over the four demo models (two tenants, one user each),
# plus one batch job of BATCH_ITEMS items on model 1 (0: none).
set -eu
jobs=${1:-40}
batch_items=${2:-100}
plugin=/app/examples/classifier
ids=$(mktemp)
items=$(mktemp)
trap 'rm -f "$ids" "$items"' EXIT

submit_one() {  # MODEL TENANT TOKEN BODY
  SYNAPSE_ACCESS_TOKEN="$3" synapse-bridge submit --model "$1" --tenant "$2" \
    --plugin-dir "$plugin" --json "$4" >> "$ids"
}

echo "submitting $jobs jobs and a batch job of $batch_items items"
i=0
while [ "$i" -lt "$jobs" ]; do
  model=$((i % 4 + 1))
  if [ "$model" -le 2 ]; then
    tenant=acme token=demo-alice-token-0001
  else
    tenant=globex token=demo-gina-token-0003
  fi
  case $((i % 3)) in
    0) row='[5.0, 3.4, 1.5, 0.2]' ;;
    1) row='[6.6, 3.0, 5.6, 2.0]' ;;
    *) row='[5.9, 2.8, 4.3, 1.3]' ;;
  esac
  submit_one "$model" "$tenant" "$token" "{\"inputs\": [$row]}" &
  i=$((i + 1))
  if [ $((i % 8)) -eq 0 ]; then wait; fi
done
wait

if [ "$batch_items" -gt 0 ]; then
  n=0
  while [ "$n" -lt "$batch_items" ]; do
    echo '{"inputs": [[6.6, 3.0, 5.6, 2.0]]}' >> "$items"
    n=$((n + 1))
  done
  SYNAPSE_ACCESS_TOKEN=demo-alice-token-0001 synapse-bridge submit --model 1 --tenant acme \
    --plugin-dir "$plugin" --file "$items" >> "$ids"
fi

expected=$((jobs + (batch_items > 0 ? 1 : 0)))
submitted=$(wc -l < "$ids")
if [ "$submitted" -ne "$expected" ]; then
  echo "only $submitted of $expected submissions succeeded (see the errors above)" >&2
  python /demo/wait_jobs.py "$ids" || true
  exit 1
fi
exec python /demo/wait_jobs.py "$ids"
