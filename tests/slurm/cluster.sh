#!/usr/bin/env bash
# The test suite's throwaway Slurm cluster on one Debian host (slurmctld, slurmd, munge from
# Debian's packages; Slurm 22.05 on Debian 12), run as root. .ci/run starts it before the tests
# and stops it after; tests/test_slurm.py submits real jobs to it.
#   cluster.sh start                    # 2 fake nodes n1, n2 (one slurmd each) on this host
#   SLURM_CI_NODES=1 cluster.sh start   # 1 node named $(hostname -s)
#   cluster.sh stop                     # daemons stopped by PID
set -euo pipefail
RUN=${SLURM_CI_DIR:-/tmp/slurm-ci}
N=${SLURM_CI_NODES:-2}

install_pkgs() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
     || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      slurmctld slurmd slurm-client munge
  fi
}

start() {
  install_pkgs
  rm -rf "$RUN"; mkdir -p "$RUN"/state "$RUN"/spool "$RUN"/log
  echo "$N" > "$RUN/nodes"
  # --- munge: key is made by the package's postinst; /run/munge is not (no systemd here)
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n | unmunge >/dev/null 2>&1 && break; sleep 0.1; done

  # --- slurm.conf
  local H MEM HW
  H=$(hostname -s)
  MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
  # "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1"
  HW=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//')
  if [ "$N" -le 1 ]; then
    NODES="NodeName=$H NodeAddr=127.0.0.1 $HW RealMemory=$MEM State=UNKNOWN"
  else
    NODES="NodeName=n[1-$N] NodeHostname=$H NodeAddr=127.0.0.1 Port=[17001-$((17000+N))] $HW RealMemory=$((MEM/N)) State=UNKNOWN"
    # make fake node names resolvable (MASTER_ADDR=$(scontrol show hostnames ...|head -n1))
    sed -i '/# slurm-ci$/d' /etc/hosts
    echo "127.0.0.1 $(seq -f 'n%g' -s ' ' 1 "$N") # slurm-ci" >> /etc/hosts
  fi
  mkdir -p /etc/slurm
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=ci
SlurmctldHost=$H
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$RUN/log/slurmctld.log
SlurmdLogFile=$RUN/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
KillWait=5
MinJobAge=300
$NODES
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

  # --- daemons (they fork into the background and write their pid files)
  /usr/sbin/slurmctld -i
  if [ "$N" -le 1 ]; then /usr/sbin/slurmd; else
    for i in $(seq 1 "$N"); do /usr/sbin/slurmd -N "n$i"; done
  fi
  for _ in $(seq 120); do
    [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle$')" = "$N" ] && { sinfo -N; return 0; }
    sleep 0.5
  done
  echo "slurm nodes not idle after 60s" >&2; sinfo -N -l >&2 || true
  tail -n 30 "$RUN"/log/*.log >&2; return 1
}

stop_pid() {  # by pid, from a pid file; wait until gone (or a zombie)
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    { [ -d "/proc/$pid" ] && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ]; } || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
  for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
  stop_pid "$RUN/slurmctld.pid"
  stop_pid /run/munge/munged.pid
  sed -i '/# slurm-ci$/d' /etc/hosts
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
