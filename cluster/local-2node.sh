#!/usr/bin/env bash
# A 2-node Ray cluster on ONE machine, for tests and demos of cross-node placement.
#
#   cluster/local-2node.sh [start]   start both nodes (idempotent), print the address to use
#   cluster/local-2node.sh stop      stop both nodes (only the processes this script started)
#   cluster/local-2node.sh status    print whether each node is running
#
# Node "a" is the head (custom resource node_a=1), node "b" joins it (node_b=1). Each node runs
# `ray start --block` in its own session and we keep its pid: `stop` signals exactly those two
# process groups. We do not use `ray stop`, which kills every Ray process of the machine
# (including an unrelated emulator run or another user's cluster).
#
# Exposure: no dashboard, usage stats off, token authentication on (the token lives in the
# state dir, mode 0600; `source <state dir>/env` before connecting). Connect through
# 127.0.0.1:PORT. Ray 2.60 cannot keep a multi-node cluster on loopback: `ray start` rewrites
# 127.0.0.1 to the host's routable IP (ray/_private/services.py, resolve_ip_for_localhost) and
# its GCS/raylet gRPC servers listen on all interfaces. The token is what refuses other users
# and hosts; firewall the port range too on a machine reachable from untrusted networks.
#
# Environment (all optional):
#   EMULATOR_RAY_PORT            GCS port of the head (default 6390); every other port is this
#                                base plus a fixed offset, so two instances need bases >= 1000 apart
#   EMULATOR_NODE_CPUS           logical CPUs advertised by each node (default 4; emulator actors
#                                mostly sleep, so more than the physical cores is fine)
#   EMULATOR_OBJECT_STORE_BYTES  object store size per node (default 268435456 = 256 MiB)
#   EMULATOR_START_TIMEOUT_S     seconds to wait for each node (default 60)
#   EMULATOR_2NODE_DIR           state dir: pids, logs, Ray temp dir
#                                (default ${TMPDIR:-/tmp}/emu2n-<uid>-<port>)
#
# Exit codes: 0 ok, 1 a node failed to start, 2 bad usage, 3 a needed port is already in use.
set -euo pipefail

readonly PORT="${EMULATOR_RAY_PORT:-6390}"
readonly NUM_CPUS="${EMULATOR_NODE_CPUS:-4}"
readonly OBJECT_STORE_BYTES="${EMULATOR_OBJECT_STORE_BYTES:-268435456}"
readonly TIMEOUT_S="${EMULATOR_START_TIMEOUT_S:-60}"
# Short on purpose: Ray puts Unix sockets under the temp dir (path limit ~107 bytes).
# Absolute: Ray's --temp-dir must be, and the env file must work from any directory.
state_dir="${EMULATOR_2NODE_DIR:-${TMPDIR:-/tmp}/emu2n-$(id -u)-${PORT}}"
[[ "$state_dir" == /* ]] || state_dir="$PWD/$state_dir"
readonly STATE_DIR="$state_dir"
readonly HOST=127.0.0.1
readonly ADDRESS="${HOST}:${PORT}"

for value in "$PORT" "$NUM_CPUS" "$OBJECT_STORE_BYTES" "$TIMEOUT_S"; do
    if ! [[ "$value" =~ ^[0-9]+$ ]]; then
        echo "local-2node: '$value' is not a whole number; fix EMULATOR_RAY_PORT," \
            "EMULATOR_NODE_CPUS, EMULATOR_OBJECT_STORE_BYTES or EMULATOR_START_TIMEOUT_S" >&2
        exit 2
    fi
done
if (( PORT < 1024 || PORT + 999 > 65535 )); then
    echo "local-2node: EMULATOR_RAY_PORT=$PORT must be in 1024..64536 (ports up to +999 are used)" >&2
    exit 2
fi

# The project's venv if there is one (cluster/ sits next to .venv), else ray on PATH.
readonly REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$REPO_DIR/.venv/bin/ray" ]]; then
    readonly RAY="$REPO_DIR/.venv/bin/ray"
elif command -v ray >/dev/null 2>&1; then
    readonly RAY="$(command -v ray)"
else
    echo "local-2node: no ray found: run 'make test' (creates .venv) or pip install -e '.[dev]'" >&2
    exit 1
fi

# Port offsets per node. Worker processes get a range of 200 ports each.
#            gcs/nm  om   agent-http agent-grpc runtime-env metrics  workers
# head  a:   +0/+1   +2   +3         +4         +5          +6       +100..+299
# node  b:   -/+11   +12  +13        +14        +15         +16      +300..+499
node_ports() {  # prints the fixed (non-range) ports of node $1
    local o
    if [[ "$1" == a ]]; then o=0; echo $((PORT)); else o=10; fi
    echo $((PORT + o + 1)) $((PORT + o + 2)) $((PORT + o + 3)) $((PORT + o + 4)) \
        $((PORT + o + 5)) $((PORT + o + 6))
}

port_in_use() {  # true if something accepts connections on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

pid_alive() {  # true if the pid in file $1 is a running process
    [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_args() {  # sets ARGS to the ray start arguments shared by both nodes; $1 = node
    local o=0 w=100
    if [[ "$1" == b ]]; then o=10; w=300; fi
    ARGS=(
        --num-cpus="$NUM_CPUS" --num-gpus=0
        --resources="{\"node_$1\": 1}"
        --object-store-memory="$OBJECT_STORE_BYTES"
        --node-manager-port=$((PORT + o + 1)) --object-manager-port=$((PORT + o + 2))
        --dashboard-agent-listen-port=$((PORT + o + 3))
        --dashboard-agent-grpc-port=$((PORT + o + 4))
        --runtime-env-agent-port=$((PORT + o + 5)) --metrics-export-port=$((PORT + o + 6))
        --min-worker-port=$((PORT + w)) --max-worker-port=$((PORT + w + 199))
        --temp-dir="$STATE_DIR/ray" --disable-usage-stats --block
    )
}

launch() {  # start node $1 in its own session; extra ray start args follow
    local node="$1"; shift
    # setsid: the node's processes form one process group that `stop` can signal as a whole.
    # RAY_USAGE_STATS_ENABLED=0: no network calls from a test cluster.
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM tear down at once (no Serve drain).
    local ARGS
    node_args "$node"
    # RAY_AUTH_MODE=token: Ray 2.60's gRPC servers listen on all interfaces (see the header),
    # so the token, readable by this user only, is what keeps other users and hosts out.
    # env -u RAY_AUTH_TOKEN: Ray prefers that variable to the token file; a token exported
    # for another cluster must not become this one's.
    env -u RAY_AUTH_TOKEN RAY_AUTH_MODE=token \
        RAY_AUTH_TOKEN_PATH="$STATE_DIR/auth_token" RAY_USAGE_STATS_ENABLED=0 \
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
        setsid "$RAY" start "$@" "${ARGS[@]}" \
        >"$STATE_DIR/$node.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/$node.pid"
}

wait_listening() {  # wait until node $1 accepts connections on port $2
    local deadline=$((SECONDS + TIMEOUT_S))
    until port_in_use "$2"; do
        if ! pid_alive "$STATE_DIR/$1.pid"; then
            echo "local-2node: node $1 exited during start; last lines of $STATE_DIR/$1.log:" >&2
            tail -n 20 "$STATE_DIR/$1.log" >&2 || true
            return 1
        fi
        if (( SECONDS >= deadline )); then
            echo "local-2node: node $1 not up after ${TIMEOUT_S}s; see $STATE_DIR/$1.log" >&2
            return 1
        fi
        sleep 0.5
    done
}

stop_node() {  # signal node $1's process group, then make sure it is gone
    local pid_file="$STATE_DIR/$1.pid" pid i
    if ! pid_alive "$pid_file"; then
        rm -f "$pid_file"
        return 0
    fi
    pid="$(cat "$pid_file")"
    # SIGTERM to `ray start --block` only: its handler stops the node's processes in order
    # (signalling the whole group at once kills the agents first and the raylet then hits a
    # failed check). The SIGKILL to the group afterwards catches any straggling worker.
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pid_file"
    echo "local-2node: stopped node $1 (process group $pid)"
}

print_address() {
    echo "Ray 2-node cluster at $ADDRESS (nodes: node_a head, node_b; logs in $STATE_DIR)"
    echo "  source $STATE_DIR/env   # the cluster's auth token, needed to connect"
    echo "  emulator emulate --address $ADDRESS ..."
    echo "  stop with: $0 stop"
}

cmd_start() {
    if pid_alive "$STATE_DIR/a.pid" && pid_alive "$STATE_DIR/b.pid"; then
        echo "local-2node: already running"
        print_address
        return 0
    fi
    # A half-started cluster from an earlier run: clear it and start fresh.
    stop_node b >/dev/null
    stop_node a >/dev/null
    local p
    for p in $(node_ports a) $(node_ports b); do
        if port_in_use "$p"; then
            echo "local-2node: port $p on $HOST is in use; set EMULATOR_RAY_PORT to another" \
                "base (now $PORT)" >&2
            exit 3
        fi
    done
    mkdir -p "$STATE_DIR"
    chmod 700 "$STATE_DIR"
    # A fresh random token per state dir (256 bits, as `ray get-auth-token --generate`).
    if [[ ! -s "$STATE_DIR/auth_token" ]]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$STATE_DIR/auth_token")
    fi
    printf 'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=%q\n' "$STATE_DIR/auth_token" \
        >"$STATE_DIR/env"
    launch a --head --port="$PORT" --include-dashboard=false
    if ! wait_listening a $((PORT + 1)); then
        stop_node a >/dev/null
        exit 1
    fi
    launch b --address="$ADDRESS"
    if ! wait_listening b $((PORT + 11)); then
        stop_node b >/dev/null
        stop_node a >/dev/null
        exit 1
    fi
    print_address
}

cmd_stop() {
    if ! pid_alive "$STATE_DIR/a.pid" && ! pid_alive "$STATE_DIR/b.pid"; then
        rm -f "$STATE_DIR/a.pid" "$STATE_DIR/b.pid"
        echo "local-2node: not running (state dir $STATE_DIR)"
        return 0
    fi
    stop_node b
    stop_node a
}

cmd_status() {
    local node
    for node in a b; do
        if pid_alive "$STATE_DIR/$node.pid"; then
            echo "node_$node: running (pid $(cat "$STATE_DIR/$node.pid"))"
        else
            echo "node_$node: stopped"
        fi
    done
}

case "${1:-start}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 [start|stop|status]" >&2
        exit 2
        ;;
esac
