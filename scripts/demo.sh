#!/usr/bin/env bash
# The main job on the local stack, start to finish: installs the test bed (Debian
# packages, buildkitd/buildctl built from the Go module proxy and cached outside git,
# the Python venv), starts rootless buildkitd and the authenticating registry, builds
# tests/fixtures/sample-app into an image, pushes it with credentials that only the
# client holds, then pulls that exact digest back and runs the app's self-test and
# HTTP endpoint inside a build step. Prints the image reference and digest, and stops
# the daemons on exit.
#
# Our Python BuildKit client (build_runner/, via scripts/demo_build.py) drives the
# build and push; buildctl, an independent client, pulls the digest back to run it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$SECONDS
step() { printf '\n=== %s (%ss)\n' "$*" "$((SECONDS - t0))"; }

# LUCITY_DEMO_SKIP_INSTALL=1 is for the test that runs this script from inside pytest:
# scripts/test.sh has installed everything, and reinstalling into the venv that is
# running the tests would be asking for trouble.
if [[ "${LUCITY_DEMO_SKIP_INSTALL:-}" != 1 ]]; then
  step "install test bed (apt packages, buildkit $(grep ^BUILDKIT_VERSION scripts/versions.env | cut -d= -f2))"
  scripts/install-testbed.sh apt buildkit
  step "python environment"
  scripts/bootstrap-python.sh
fi

work="$(mktemp -d /tmp/lucity-demo-XXXXXX)"
up_pid=""
cleanup() {
  local rc=$?
  if [[ -n "$up_pid" ]] && kill -0 "$up_pid" 2>/dev/null; then
    kill -TERM "$up_pid"
    wait "$up_pid" || true
  fi
  if [[ $rc -ne 0 ]]; then
    echo "demo FAILED (exit $rc); test bed output:" >&2
    cat "$work/testbed.out" >&2 || true
    echo "work dir kept: $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

step "start buildkitd + registry"
.venv/bin/python -m tests.testbed up --env-file "$work/testbed.env" >"$work/testbed.out" 2>&1 &
up_pid=$!
# Start-up takes about a second; the bound turns a hang into a failure with the log.
for _ in $(seq 600); do
  [[ -f "$work/testbed.env" ]] && break
  kill -0 "$up_pid" 2>/dev/null || { echo "test bed exited during start-up" >&2; exit 1; }
  sleep 0.1
done
[[ -f "$work/testbed.env" ]] || { echo "test bed not ready after 60s" >&2; exit 1; }
cat "$work/testbed.out"
# shellcheck disable=SC1091
source "$work/testbed.env"
buildctl() { DOCKER_CONFIG="$LUCITY_REGISTRY_DOCKER_CONFIG" "$LUCITY_BUILDCTL" --addr "$LUCITY_BUILDKIT_ADDR" "$@"; }

app=tests/fixtures/sample-app
ref="$LUCITY_REGISTRY/demo/sample-app:$(date -u +%Y%m%d-%H%M%S)"
step "build $app and push $ref"
# Our Python client (build_runner) builds the app's Dockerfile steps as LLB; the
# credentials come from the client-side docker config through its session.
.venv/bin/python scripts/demo_build.py --addr "$LUCITY_BUILDKIT_ADDR" \
  --base "$LUCITY_BASE_IMAGE" --context "$app" --ref "$ref" \
  --docker-config "$LUCITY_REGISTRY_DOCKER_CONFIG" --metadata-file "$work/metadata.json"
digest="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["containerimage.digest"])' "$work/metadata.json")"

step "pull $ref@$digest back and run it inside a build step"
mkdir -p "$work/verify"
port="$(.venv/bin/python -c 'from tests.testbed.process import free_port; print(free_port())')"
cat >"$work/verify/Dockerfile" <<EOF
FROM $ref@$digest AS app
RUN /srv/bin/sample-app selftest > /tmp/selftest.txt
# Serve for real on the host loopback (the rootless worker uses the host network),
# fetch a page, then stop the server: no process sandbox means nobody else would.
RUN PORT=$port /srv/bin/sample-app serve & pid=\$!; sleep 0.5; \
    wget -q -O /tmp/index.html http://127.0.0.1:$port/; rc=\$?; kill \$pid; exit \$rc
FROM scratch
COPY --from=app /tmp/selftest.txt /tmp/index.html /
EOF
buildctl build --progress=plain \
  --frontend dockerfile.v0 --local context="$work/verify" --local dockerfile="$work/verify" \
  --output "type=local,dest=$work/verify/out"
grep -q "Hello from the Lucity sample app" "$work/verify/out/index.html"

step "done"
cat "$work/verify/out/selftest.txt"
echo "served: $(grep -o '<h1>.*</h1>' "$work/verify/out/index.html")"
echo "image:  $ref"
echo "digest: $digest"
