#!/bin/sh
# Build the demo's four model archives (as `synapse-bridge demo` does: seed = model id),
# then run the given command (the backend). Used by the compose `backend` service.
set -eu
mkdir -p /tmp/synapse-demo/archives
for id in 1 2 3 4; do
  if [ ! -f "/tmp/synapse-demo/archives/model-$id.tar.gz" ]; then
    python -m examples.classifier.make_model "/tmp/synapse-demo/archives/model-$id.tar.gz" --seed "$id" --version 1
  fi
done
exec "$@"
