# shellcheck shell=bash
# Sourced: `podman_` runs podman as this machine allows: as root, with runc (crun's rlimit calls
# are refused here) and the storage driver in MAIL_RELAY_PODMAN_STORAGE (default overlay; vfs
# works everywhere but copies every layer whole). `limits` holds the --ulimit flags for `run` and
# `build`: podman's defaults raise nofile and nproc above this machine's hard limits, which even
# root may not do here, so containers get the host's open-files limit and at most 32768 processes
# (more is refused here even under the hard limit; the relay needs a few dozen threads).
podman_() {
    podman --storage-driver "${MAIL_RELAY_PODMAN_STORAGE:-overlay}" --runtime runc "$@"
}
nproc=$(ulimit -Hu)
[ "$nproc" != unlimited ] && [ "$nproc" -lt 32768 ] || nproc=32768
# shellcheck disable=SC2034 # used by the scripts that source this
limits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=$nproc:$nproc")
