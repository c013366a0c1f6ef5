#!/usr/bin/env bash
# Install what the real-Slurm tests need (tests/test_slurm_cluster.py): Debian's Slurm controller, compute
# daemon, client commands and munge. Needs root and apt-get; does nothing when they are already installed.
#   bash scripts/setup_slurm.sh
set -euo pipefail

missing=0
for b in slurmctld slurmd sbatch munged; do
    command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_slurm: Slurm is not installed and this is not root on a Debian/Ubuntu machine; install the packages" \
         "slurmctld slurmd slurm-client munge as root, or the tests in tests/test_slurm_cluster.py will fail" >&2
    exit 1
fi
echo "setup_slurm: installing slurmctld slurmd slurm-client munge (apt-get)" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
