#!/usr/bin/env bash
# N processes of monojax.main on this machine, forming one multi-host job over 127.0.0.1.
#
#   launch/local.sh [-n PROCS] [-d DEVICES_PER_PROC] [-p PORT] [-g GRACE_S] -- <monojax.main args>
#   launch/local.sh -n 2 -d 4 -- --config=configs/quickstart.py --workdir=runs/x
#
# Each process gets JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES=<d> and the MONOJAX_COORDINATOR /
# MONOJAX_NUM_PROCESSES / MONOJAX_PROCESS_ID variables that monojax/distributed.py reads, so the
# N x d CPU devices form one global mesh (gloo collectives). Output lines are prefixed "[pK] ".
# Exits 0 only if every process does; when one fails, the others get SIGTERM and, after GRACE_S
# seconds (default 10), SIGKILL: a peer blocked in a collective with a dead process never returns.
# SIGINT/SIGTERM to this script are forwarded to all processes (SIGTERM = save and stop).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }

procs=2
devices=4
port=""
grace=10
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) procs="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    -g) grace="$2"; shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (monojax args go after --)" >&2; usage ;;
  esac
done
[[ "$procs" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: -n and -d need positive integers" >&2; exit 2; }

python="${PYTHON:-python}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"  # configs/*.py paths in the args are relative to the repo

if [[ -z "$port" ]]; then
  # Ask the kernel for a free port; the tiny window before the coordinator binds it is acceptable here.
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

# docs/cpu-notes.md §1: without these malloc settings every large XLA buffer is page-faulted in
# again and steps run slower (measured: BUILD_NOTES.md, "Allocator tunables"). Only settable before
# the process starts, hence here. Export GLIBC_TUNABLES (even empty) to keep your own value.
if [[ -z "${GLIBC_TUNABLES+x}" ]]; then
  export GLIBC_TUNABLES="glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
  echo "local.sh: GLIBC_TUNABLES=$GLIBC_TUNABLES (freed memory is kept by each process)" >&2
fi
echo "local.sh: $procs process(es) x $devices CPU device(s), coordinator 127.0.0.1:$port" >&2

pids=()
for ((i = 0; i < procs; i++)); do
  # Process substitution keeps $! the python pid (not sed's), so its exit status is the one waited on.
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$devices" \
  MONOJAX_COORDINATOR="127.0.0.1:$port" MONOJAX_NUM_PROCESSES="$procs" MONOJAX_PROCESS_ID="$i" \
    "$python" -u -m monojax.main "$@" > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=("$!")
done

forward() {  # signal name
  for p in "${pids[@]}"; do kill "-$1" "$p" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

stop_others() {  # after a failure: TERM, then KILL whoever is still there after the grace period
  forward TERM
  local deadline=$((SECONDS + grace))
  while ((SECONDS < deadline)); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.2
  done
  forward KILL
}

status=0
declare -A rank  # pid -> process id, for the ones still running
for ((i = 0; i < procs; i++)); do rank[${pids[$i]}]=$i; done
while ((${#rank[@]} > 0)); do
  done_pid=""
  rc=0
  # 2>/dev/null: bash's own "Killed ..." job notices; the status is reported below instead.
  wait -n -p done_pid "${!rank[@]}" 2>/dev/null || rc=$?
  if [[ -z "${done_pid:-}" ]]; then
    # A trapped signal woke us, or bash had already reaped a process (after stop_others): collect
    # the dead ones by pid, keep waiting for the rest.
    for p in "${!rank[@]}"; do
      if ! kill -0 "$p" 2>/dev/null; then
        done_pid=$p
        rc=0
        wait "$p" 2>/dev/null || rc=$?
        break
      fi
    done
    [[ -n "${done_pid:-}" ]] || continue
  fi
  k=${rank[$done_pid]}
  unset "rank[$done_pid]"
  if ((rc != 0)); then
    echo "local.sh: process $k (pid $done_pid) exited with status $rc" >&2
    if ((status == 0)); then
      status=$rc
      echo "local.sh: stopping the other processes" >&2
      stop_others
    fi
  fi
done
wait  # let the output filters drain
exit "$status"
