#!/usr/bin/env bash
# Start a Ray head on this machine for `raylm submit` (Jobs API on 127.0.0.1:8265 unless DASHBOARD_PORT is set).
#   cluster/local/start_head.sh           then: raylm submit train --address http://127.0.0.1:8265
#   ray stop                               stops it (and every other Ray on this machine)
set -euo pipefail
PORT=${PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
NUM_CPUS=${NUM_CPUS:-$(( $(nproc) < 4 ? 4 : $(nproc) ))}
ray start --head --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --num-cpus="$NUM_CPUS" \
  --system-config='{"idle_worker_killing_time_threshold_ms": 10000, "num_workers_soft_limit": 2, "prestart_worker_first_driver": false}'
# = raylm.runtime.local_system_config(): no idle workers kept beyond 2 (each costs ~0.7% of a core), the rest warm for 10 s
echo "Jobs API and dashboard: http://127.0.0.1:$DASHBOARD_PORT   (export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT)"
