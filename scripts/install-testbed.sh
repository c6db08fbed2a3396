#!/usr/bin/env bash
# Installs everything the test bed needs: Debian packages, and the Go-built daemons
# (buildkitd/buildctl, etcd, kube-apiserver, kube-controller-manager, helm) compiled
# from the Go module proxy. Binaries are cached by version OUTSIDE the git tree
# (default ~/.cache/lucity-builder/bin/<name>/<version>/), so warm runs take seconds.
#
# Usage: scripts/install-testbed.sh [apt|buildkit|etcd|k8s|helm|all]...
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"
CACHE="${LUCITY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lucity-builder}"
BIN="$CACHE/bin"
WRAP="$CACHE/wrappers"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
mkdir -p "$BIN" "$WRAP"

log() { printf '[install-testbed %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

APT_PACKAGES=(runc rootlesskit uidmap docker-registry apache2-utils busybox-static git)

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The docker-registry package starts a system service on :5000; we run our own.
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
    pkill -f '^/usr/bin/docker-registry serve /etc/docker/registry' 2>/dev/null || true
  else
    log "apt: all present"
  fi
  ensure_buildkit_user
}

# buildkitd runs rootless as its own unprivileged account (tests/testbed/buildkit.py),
# which rootlesskit maps through a subordinate id range. Idempotent.
BUILDKIT_USER=lucity-buildkit
SUBID_COUNT=65536
ensure_buildkit_user() {
  if [[ $EUID -ne 0 ]]; then
    log "not root: skipping the $BUILDKIT_USER account (buildkitd will run rootless as $(id -un))"
    return
  fi
  if ! id -u "$BUILDKIT_USER" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$BUILDKIT_USER"
    log "created system user $BUILDKIT_USER (uid $(id -u "$BUILDKIT_USER"))"
  fi
  local file start
  touch /etc/subuid /etc/subgid
  # Start after every range already handed out (in either file), never below 100000,
  # so ours overlaps no other user's (uid 1000 may already own 100000-165535).
  start="$(awk -F: -v min=100000 '{e=$2+$3; if (e>min) min=e} END{print min}' /etc/subuid /etc/subgid)"
  for file in /etc/subuid /etc/subgid; do
    grep -q "^$BUILDKIT_USER:" "$file" && continue
    printf '%s:%s:%s\n' "$BUILDKIT_USER" "$start" "$SUBID_COUNT" >> "$file"
    log "gave $BUILDKIT_USER $file range $start+$SUBID_COUNT"
  done
}

# build_wrapper NAME VERSION WRAPDIR PKG... : build each package path's main into $BIN/NAME/VERSION
build_go() {
  local dir="$1" out="$2" ldflags="$3"; shift 3
  local pkg
  for pkg in "$@"; do
    log "go build $pkg"
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$out/$(basename "$pkg")" "$pkg")
  done
}

install_buildkit() {
  local out="$BIN/buildkit/$BUILDKIT_VERSION"
  if [[ -x "$out/buildkitd" && -x "$out/buildctl" ]]; then log "buildkit $BUILDKIT_VERSION cached"; return; fi
  local t0=$SECONDS w="$WRAP/buildkit-$BUILDKIT_VERSION"
  rm -rf "$w"; mkdir -p "$w"
  # BuildKit's go.mod carries `exclude` lines, so `go install ...@version` is refused.
  # A throwaway main module that repeats those excludes selects the same versions.
  local gomod
  gomod="$(go mod download -json "github.com/moby/buildkit@$BUILDKIT_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  local gover
  gover="$(awk '$1=="go"{print $2; exit}' "$gomod")"
  {
    printf 'module local/buildkitbin\n\ngo %s\n\n' "$gover"
    awk '/^exclude \(/{p=1} p{print} p&&/^\)/{p=0}' "$gomod"
    awk '/^exclude [^(]/{print}' "$gomod"
  } > "$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "github.com/moby/buildkit/cmd/buildctl"\n\t_ "github.com/moby/buildkit/cmd/buildkitd"\n)\n' > "$w/tools.go"
  (cd "$w" && go get "github.com/moby/buildkit@$BUILDKIT_VERSION" >/dev/null 2>&1 && go mod tidy >/dev/null 2>&1)
  mkdir -p "$out.tmp"
  build_go "$w" "$out.tmp" "-s -w -X github.com/moby/buildkit/version.Version=$BUILDKIT_VERSION" \
    github.com/moby/buildkit/cmd/buildkitd github.com/moby/buildkit/cmd/buildctl
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "buildkit $BUILDKIT_VERSION built in $((SECONDS - t0))s"
}

install_etcd() {
  local out="$BIN/etcd/$ETCD_VERSION"
  if [[ -x "$out/etcd" ]]; then log "etcd $ETCD_VERSION cached"; return; fi
  local t0=$SECONDS w="$WRAP/etcd-$ETCD_VERSION"
  rm -rf "$w"; mkdir -p "$w"
  # etcd's server module has relative replace lines (go install refuses it); its
  # requires are real versions, so a wrapper needs no replaces of its own.
  printf 'module local/etcdbin\n\ngo 1.26\n' > "$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$w/tools.go"
  (cd "$w" && go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy >/dev/null 2>&1)
  mkdir -p "$out.tmp"
  (cd "$w" && go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "etcd $ETCD_VERSION built in $((SECONDS - t0))s"
}

install_k8s() {
  local out="$BIN/kubernetes/$K8S_VERSION"
  if [[ -x "$out/kube-apiserver" && -x "$out/kube-controller-manager" ]]; then log "kubernetes $K8S_VERSION cached"; return; fi
  local t0=$SECONDS w="$WRAP/kubernetes-$K8S_VERSION"
  rm -rf "$w"; mkdir -p "$w"
  local staging="v0.${K8S_VERSION#v1.}" minor
  minor="$(echo "$K8S_VERSION" | cut -d. -f2)"
  printf 'module local/k8sbin\n\ngo 1.26\n' > "$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kube-apiserver"\n\t_ "k8s.io/kubernetes/cmd/kube-controller-manager"\n)\n' > "$w/tools.go"
  # k8s.io/kubernetes requires every staging module at v0.0.0 and maps them with
  # relative replaces; a main module must pin each to its published v0.Y.Z. The
  # list is read from that exact release's go.mod because it changes per minor.
  local gomod m
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  for m in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod"); do
    (cd "$w" && go mod edit -replace="$m=$m@$staging")
  done
  (cd "$w" && go mod edit -require="k8s.io/kubernetes@$K8S_VERSION" && go mod tidy >/dev/null)
  local ldf="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  mkdir -p "$out.tmp"
  build_go "$w" "$out.tmp" "$ldf" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "kubernetes $K8S_VERSION built in $((SECONDS - t0))s"
}

install_helm() {
  local out="$BIN/helm/$HELM_VERSION"
  if [[ -x "$out/helm" ]]; then log "helm $HELM_VERSION cached"; return; fi
  local t0=$SECONDS
  mkdir -p "$out.tmp"
  GOBIN="$out.tmp" go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "helm $HELM_VERSION built in $((SECONDS - t0))s"
}

targets=("$@")
((${#targets[@]})) || targets=(all)
for t in "${targets[@]}"; do
  case "$t" in
    apt) install_apt ;;
    buildkit) install_buildkit ;;
    etcd) install_etcd ;;
    k8s) install_k8s ;;
    helm) install_helm ;;
    all) install_apt; install_buildkit; install_etcd; install_helm; install_k8s ;;
    *) echo "unknown target: $t" >&2; exit 2 ;;
  esac
done
