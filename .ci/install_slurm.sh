#!/usr/bin/env bash
# Install a one-node Slurm (Debian's slurmctld, slurmd, munge and the client commands) for the Slurm tests.
# Idempotent: does nothing when the binaries are already there. Needs root (or sudo) and the Debian archive.
set -euo pipefail
need=(slurmctld slurmd munged sbatch scontrol)
missing=0
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing=1
done
if [ "$missing" = 0 ]; then
    echo "slurm: already installed ($(sbatch --version))"
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurmctld slurmd munge slurm-client
echo "slurm: installed ($(sbatch --version))"
