#!/usr/bin/env bash
# monojax.main on every worker of a Cloud TPU VM pod slice: one process per worker (host), all
# forming one jax job over the slice's chips.
#
#   TPU=<tpu name> ZONE=<zone> [PROJECT=<project>] launch/tpu_pod.sh [options] -- <monojax.main args>
#
#   --install        pip install this package and jax[tpu] on each worker (first run on a new slice)
#   --git URL[@REF]  clone URL into ~/monojax on each worker and check out REF (a commit, tag or
#                    origin/<branch>; default origin/HEAD); default without --git: copy this working tree
#                    (git's tracked + untracked-not-ignored files) there with tpu-vm scp
#   --prebuild       build the packed data (data.format=packed) once, on worker 0 on its CPU, before the
#                    job; without it every worker packs the whole corpus itself at start-up
#   --dir DIR        checkout directory on the workers (default ~/monojax)
#
# The workdir must be ONE directory that every worker sees at the same path: orbax writes each
# host's array shards and the grain iterator state of each process (data/process_<i>-of-<n>.json)
# into the same step folder, and process 0 writes config.json and metrics.jsonl. Use a Cloud
# Storage bucket mounted with gcsfuse (e.g. /gcs/<bucket>, the same mount on all workers) or an
# NFS/Filestore share. A bare gs:// URL does not work yet for --workdir (main.py runs it through
# os.path.abspath) nor for data.packed_dir/index_dir (local-file renames); data.path may be gs://.
#
# The job joins the slice through the MONOJAX_* variables (coordinator = worker 0's internal IP,
# process id = the worker number from the metadata server), the path tested with launch/local.sh:
# monojax/distributed.py's bare jax.distributed.initialize() only fires when TPU_WORKER_HOSTNAMES
# is set, which GKE does and plain TPU VMs may not.
#
# Paper scale, models A and B (seeds 0 and 1; 100 B tokens = 1,525,879 steps of 256 x 256 tokens):
#   export TPU=monojax-v4-32 ZONE=us-central2-b
#   launch/tpu_pod.sh --install --prebuild -- --config=configs/transformer.py --config.seed=0 \
#     --config.data.path=/gcs/BUCKET/pile --config.data.train_files='train/*.jsonl.zst' \
#     --config.data.val_files='val.jsonl.zst' --config.data.packed_dir=/gcs/BUCKET/packed \
#     --config.data.index_dir=/gcs/BUCKET/index --config.train.steps=1525879 \
#     --config.train.ckpt_every=2000 --config.train.eval_every=2000 --config.train.log_every=100 \
#     --workdir=/gcs/BUCKET/runs/model_A
#   launch/tpu_pod.sh -- <the same args> --config.seed=1 --workdir=/gcs/BUCKET/runs/model_B
# Both models read the same data order (data.seed); a relaunch of the same command resumes from the
# newest checkpoint in the workdir.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }

install=0
prebuild=0
git_src=""
dir='~/monojax'  # expanded on the workers, not here
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install) install=1; shift ;;
    --prebuild) prebuild=1; shift ;;
    --git) git_src="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (monojax args go after --)" >&2; usage ;;
  esac
done
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no monojax.main args given (e.g. -- --config=configs/transformer.py)" >&2; exit 2; }

gc=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project "$PROJECT")
on_workers() {  # which ("all" or a number), remote command
  "${gc[@]}" ssh "$TPU" "${where[@]}" --worker="$1" --command "$2"
}

# Coordinator and process count from the slice itself; the process id is read on each worker.
mapfile -t ips < <("${gc[@]}" describe "$TPU" "${where[@]}" --flatten=networkEndpoints \
                   --format='value(networkEndpoints.ipAddress)')
((${#ips[@]} > 0)) || { echo "tpu_pod.sh: no workers found for $TPU in $ZONE" >&2; exit 1; }
echo "tpu_pod.sh: $TPU has ${#ips[@]} worker(s); coordinator ${ips[0]}:8476" >&2

# 1. The code on every worker.
if [[ -n "$git_src" ]]; then
  url="${git_src%@*}"
  ref=""
  [[ "$git_src" == *@* ]] && ref="${git_src##*@}"
  on_workers all "set -e; if [ -d $dir/.git ]; then git -C $dir fetch -q origin; else git clone -q $(printf %q "$url") $dir; fi;
                  git -C $dir checkout -q --detach $(printf %q "${ref:-origin/HEAD}")"
else
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  tarball="$(mktemp -t monojax-XXXXXX.tgz)"
  trap 'rm -f "$tarball"' EXIT
  # The working tree as it is (uncommitted edits included), without ignored files (runs/, caches).
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar czf "$tarball" --)
  "${gc[@]}" scp "$tarball" "$TPU:/tmp/monojax.tgz" "${where[@]}" --worker=all
  on_workers all "set -e; mkdir -p $dir; tar xzf /tmp/monojax.tgz -C $dir"
fi

# 2. Optional install (jax[tpu] pulls libtpu; the version range is pyproject.toml's).
if ((install)); then
  on_workers all "set -e; cd $dir; python3 -m pip install -q -U pip; python3 -m pip install -q -e . 'jax[tpu]>=0.10.2,<0.11'"
fi

args="$(printf '%q ' "$@")"

# 3. Optional: pack the corpus once (CPU only on worker 0, no distributed job, throwaway workdir),
#    so the pod's workers find DONE.json in the shared data.packed_dir instead of each packing it.
if ((prebuild)); then
  on_workers 0 "set -e; cd $dir; JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES= python3 -m monojax.main $args \
                --config.train.steps=0 --config.preview_batches=2 --workdir=/tmp/monojax-prebuild"
fi

# 4. The job: the same command on every worker; metadata gives each its process id.
md='http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number'
on_workers all "set -eo pipefail; cd $dir; \
  export MONOJAX_COORDINATOR=${ips[0]}:8476 MONOJAX_NUM_PROCESSES=${#ips[@]}; \
  export MONOJAX_PROCESS_ID=\$(curl -sf -H 'Metadata-Flavor: Google' $md); \
  python3 -u -m monojax.main $args 2>&1 | sed -u \"s/^/[w\$MONOJAX_PROCESS_ID] /\""
