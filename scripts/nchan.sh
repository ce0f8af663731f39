#!/usr/bin/env bash
# The Nchan peer of the benchmark (bench/run --only nchan): Debian's nginx and its Nchan module.
#
#   scripts/nchan.sh path      # prints "NGINX MODULE" if both are present; exit 1 if not
#   scripts/nchan.sh install   # installs nginx + libnginx-mod-nchan with apt-get where
#                              # missing (as root), then prints as `path` does
#
# bench/run starts its own nginx from these (private prefix and configuration in a temporary
# directory, loopback port); the system's nginx service is neither configured nor started.
set -euo pipefail

nginx_bin=/usr/sbin/nginx
module=/usr/lib/nginx/modules/ngx_nchan_module.so

present() { [[ -x $nginx_bin && -f $module ]]; }

case ${1:-path} in
  path)
    present || exit 1
    ;;
  install)
    if ! present; then
      if ((EUID != 0)); then
        echo "scripts/nchan.sh: nginx or its Nchan module is missing; as root: apt-get install nginx libnginx-mod-nchan" >&2
        exit 1
      fi
      echo "scripts/nchan.sh: installing Debian's nginx and libnginx-mod-nchan" >&2
      export DEBIAN_FRONTEND=noninteractive
      if ! apt-cache show libnginx-mod-nchan >/dev/null 2>&1; then
        apt-get update -q >&2
      fi
      # policy-rc.d keeps the package scripts from starting the system's nginx on port 80.
      policy=/usr/sbin/policy-rc.d
      made_policy=
      if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=yes
      fi
      apt-get install -y -q --no-install-recommends nginx libnginx-mod-nchan >&2 || status=$?
      [[ -n $made_policy ]] && rm -f "$policy"
      ((${status:-0} == 0)) || exit "$status"
      present || { echo "scripts/nchan.sh: installed, but $nginx_bin or $module is still missing" >&2; exit 1; }
    fi
    ;;
  *)
    echo "usage: scripts/nchan.sh path|install" >&2
    exit 2
    ;;
esac
echo "$nginx_bin $module"
