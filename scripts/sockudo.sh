#!/usr/bin/env bash
# The Sockudo peer of the benchmark (bench/run --only sockudo): Sockudo 5.2.0 from crates.io,
# built once with `cargo install --locked` and cached outside the work tree, so repeated runs
# do not rebuild it.
#
#   scripts/sockudo.sh path      # prints the cached binary's path; exit 1 if it is not built
#   scripts/sockudo.sh install   # builds it where missing (Debian's protobuf-compiler first,
#                                # as root), then prints its path. Takes a long while on 2
#                                # cores: start it early, e.g. `scripts/sockudo.sh install &`
#
# Cache: $TAILCAST_PEERS_CACHE (default ~/.cache/tailcast-peers)/sockudo-5.2.0/bin/sockudo.
# Features: `local` only (the in-memory local adapter the benchmark uses), without the
# default OpenTelemetry exporter and the protocol-v2 extras (delta compression, tag
# filtering, connection recovery), which the Pusher-protocol clients of the benchmark do not
# use; SOCKUDO_FEATURES overrides (e.g. SOCKUDO_FEATURES=default for the stock build, which
# installs into a separate cache directory).
set -euo pipefail

version=5.2.0
features=${SOCKUDO_FEATURES:-local}
cache=${TAILCAST_PEERS_CACHE:-$HOME/.cache/tailcast-peers}
root=$cache/sockudo-$version
[[ $features == local ]] || root=$root-${features//[^a-z0-9-]/_}
bin=$root/bin/sockudo

case ${1:-path} in
  path)
    [[ -x $bin ]] || exit 1
    ;;
  install)
    if [[ ! -x $bin ]]; then
      # protoc, and the well-known types its build imports (google/protobuf/timestamp.proto,
      # in libprotobuf-dev: protobuf-compiler alone, without recommends, lacks them).
      if ! command -v protoc >/dev/null 2>&1 || [[ ! -f /usr/include/google/protobuf/timestamp.proto ]]; then
        if ((EUID != 0)); then
          echo "scripts/sockudo.sh: protoc or the protobuf well-known types are missing; as root: apt-get install protobuf-compiler libprotobuf-dev" >&2
          exit 1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-cache show libprotobuf-dev >/dev/null 2>&1 || apt-get update -q >&2
        apt-get install -y -q --no-install-recommends protobuf-compiler libprotobuf-dev >&2
      fi
      echo "scripts/sockudo.sh: building sockudo $version (features: $features) into $root; this takes long" >&2
      mkdir -p "$cache"
      feature_args=(--no-default-features --features "$features")
      [[ $features == default ]] && feature_args=()
      # Its own target directory, kept until the install succeeds, so an interrupted build
      # resumes where it stopped.
      CARGO_TARGET_DIR=$root-target cargo install sockudo --version "$version" --locked \
        ${feature_args[@]+"${feature_args[@]}"} --root "$root" >&2
      rm -rf "$root-target"
    fi
    ;;
  *)
    echo "usage: scripts/sockudo.sh path|install" >&2
    exit 2
    ;;
esac
echo "$bin"
