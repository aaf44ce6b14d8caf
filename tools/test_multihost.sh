#!/usr/bin/env bash
# Runs moonshard on two "hosts": network namespaces joined only by a veth pair, 2 ranks each,
# OpenMPI over TCP on that link (no shared memory). Checks HYBRID_SHARD's mesh placement,
# training with DCP saves into a shared folder, a SIGKILLed rank on the second host (the job
# ends with the rank named, nothing left running), a resume on 1 host x 2 ranks, and a
# hostfile naming an unreachable host. Ends with "N passed, N failed"; prints why it skips
# (not root, no `ip netns`, no mpirun, a library without MPI).
# Usage (repository root): bash tools/test_multihost.sh
set -uo pipefail
cd "$(dirname "$0")/.."

skip() {
  echo "test_multihost: skipped: $*"
  echo "0 passed, 0 failed"
  exit 0
}
[ "$(id -u)" -eq 0 ] || skip "network namespaces need root"
command -v ip >/dev/null && ip netns list >/dev/null 2>&1 || skip "ip netns is not available (iproute2)"
command -v unshare >/dev/null || skip "unshare is not available (util-linux)"
command -v mpirun >/dev/null || skip "mpirun is not installed (openmpi-bin)"
export MOONSHARD_LIB=${MOONSHARD_LIB:-$PWD/build/libmoonshard.so}
export LUA_PATH='lua/?.lua;lua/?/init.lua;;'
config=$(luajit -e 'local C = require "moonshard.ffi"; print(require("ffi").string(C.lib.ms_build_config()))' 2>&1) ||
  skip "the library does not load: $config"
case "$config" in *mpi*) ;; *) skip "$MOONSHARD_LIB was built without MPI ($config)" ;; esac

# Two hosts on 192.0.2.0/24 (TEST-NET-1, reserved for documentation: nothing real there),
# and a third in a namespace with no link and no route to them (unreachable).
tag="ms$$"
hosts=("${tag}a" "${tag}b" "${tag}c")
addresses=(192.0.2.1 192.0.2.2 192.0.2.3)
names=(host-a host-b host-c)
work=$(mktemp -d)
passed=0
failed=0

cleanup() {
  for ns in "${hosts[@]}"; do
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
      ip netns del "$ns" 2>/dev/null
    fi
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for i in 0 1 2; do
  ip netns add "${hosts[$i]}" || skip "cannot create network namespaces"
  ip -n "${hosts[$i]}" link set lo up
done
ip link add "${tag}x" type veth peer name "${tag}y"
ip link set "${tag}x" netns "${hosts[0]}"
ip link set "${tag}y" netns "${hosts[1]}"
ip -n "${hosts[0]}" link set "${tag}x" name ms0
ip -n "${hosts[1]}" link set "${tag}y" name ms0
ip -n "${hosts[2]}" link add ms0 type veth peer name ms0peer # a link to nowhere
ip -n "${hosts[0]}" addr add "${addresses[0]}/24" dev ms0
ip -n "${hosts[1]}" addr add "${addresses[1]}/24" dev ms0
ip -n "${hosts[2]}" addr add "${addresses[2]}/32" dev ms0 # no route to the others
for ns in "${hosts[@]}"; do ip -n "$ns" link set ms0 up; done

# mpirun's remote shell: runs the daemon in the namespace that owns the address, under the
# host's own hostname (as ssh would on another machine).
cat >"$work/rsh" <<EOF
#!/bin/sh
host=\$1
shift
case "\$host" in
  ${addresses[0]}) ns=${hosts[0]} name=${names[0]} ;;
  ${addresses[1]}) ns=${hosts[1]} name=${names[1]} ;;
  ${addresses[2]}) ns=${hosts[2]} name=${names[2]} ;;
  *) echo "rsh: unknown host \$host" >&2; exit 255 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$name; \$*"
EOF
chmod +x "$work/rsh"
printf '%s slots=2\n%s slots=2\n' "${addresses[0]}" "${addresses[1]}" >"$work/two_hosts"
printf '%s slots=2\n' "${addresses[0]}" >"$work/one_host"
printf '%s slots=2\n%s slots=2\n' "${addresses[0]}" "${addresses[2]}" >"$work/unreachable"

# mpirun on host-a: TCP on the hosts' network only (btl tcp,self: no shared memory, even between the ranks
# of one host), the namespaces' daemons through the remote shell above.
mpirun_on_host_a() { # hostfile, ranks, seconds, command...
  local hostfile=$1 ranks=$2 seconds=$3
  shift 3
  timeout --kill-after=5 "$seconds" ip netns exec "${hosts[0]}" unshare --uts sh -c \
    'hostname host-a; exec "$@"' sh \
    mpirun --allow-run-as-root --oversubscribe --hostfile "$hostfile" -n "$ranks" \
    --mca plm_rsh_agent "$work/rsh" --mca pml ob1 --mca btl tcp,self \
    --mca btl_tcp_if_include 192.0.2.0/24 --mca oob_tcp_if_include 192.0.2.0/24 \
    -x MOONSHARD_LIB -x LUA_PATH --wdir "$PWD" "$@"
}

check() { # description, status (0 = passed), output file
  if [ "$2" -eq 0 ]; then
    passed=$((passed + 1))
    echo "ok: $1"
  else
    failed=$((failed + 1))
    echo "FAILED: $1" >&2
    [ -n "${3:-}" ] && tail -25 "$3" >&2
  fi
}

nothing_left() { # no process of the test in any namespace
  local ns
  for ns in "${hosts[@]}"; do
    [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] || return 1
  done
}

echo "== test_multihost: ${names[0]} (${addresses[0]}) and ${names[1]} (${addresses[1]}), 2 ranks each, TCP"

mpirun_on_host_a "$work/two_hosts" 4 120 luajit tools/multihost_mesh.lua >"$work/mesh.log" 2>&1
grep -q "mesh ok" "$work/mesh.log"
check "HYBRID_SHARD mesh: shard within each host, replicate across hosts" $? "$work/mesh.log"

train=(luajit examples/train.lua --strategy HYBRID_SHARD --ac none --layers 1 --dim 16 --heads 2
       --seq 16 --batch 8 --lr 0.01 --sample 0 --log-every 1 --ckpt "$work/ckpt")
mpirun_on_host_a "$work/two_hosts" 4 300 "${train[@]}" --steps 6 --save-every 3 --out "$work/run4" \
  >"$work/train.log" 2>&1
status=$?
[ $status -eq 0 ] && LUA_PATH="$LUA_PATH" bin/moonshard ckpt verify "$work/ckpt" >"$work/verify.log" 2>&1 &&
  grep -q "step 6: ok" "$work/verify.log" && grep -q "step 3: ok" "$work/verify.log"
check "training across hosts saves steps 3 and 6 into the shared folder (mpirun status $status)" $? "$work/train.log"

# A SIGKILL of rank 3 (on host-b) once step 6 is done: the job ends with the rank named.
mpirun_on_host_a "$work/two_hosts" 4 300 "${train[@]}" --resume --steps 100000 --save-every 100000 \
  --out "$work/run_kill" >"$work/kill.log" 2>&1 &
job=$!
victim=""
for _ in $(seq 1 600); do
  for pid in $(ip netns pids "${hosts[1]}" 2>/dev/null); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=3' &&
       grep -aq "step \+8/" "$work/kill.log" 2>/dev/null; then
      victim=$pid
    fi
  done
  [ -n "$victim" ] && break
  sleep 0.1
done
if [ -n "$victim" ]; then
  started=$(date +%s)
  kill -KILL "$victim"
  wait "$job"
  status=$?
  elapsed=$(($(date +%s) - started))
  [ $status -ne 0 ] && [ $elapsed -lt 60 ] && grep -q "rank 3 .*on node ${addresses[1]} exited on signal 9" "$work/kill.log" &&
    nothing_left
  check "SIGKILL of rank 3 on ${names[1]}: every rank ends within the 60 s group timeout (${elapsed} s, status $status), rank 3 named, no process left" $? "$work/kill.log"
else
  wait "$job"
  check "SIGKILL of rank 3 on ${names[1]}: rank 3 never reached step 8" 1 "$work/kill.log"
fi

mpirun_on_host_a "$work/one_host" 2 300 "${train[@]}" --resume --steps 9 --save-every 3 --out "$work/run2" \
  >"$work/resume.log" 2>&1
status=$?
[ $status -eq 0 ] && grep -q "world size 2" "$work/resume.log" && grep -aq "step \+7/9" "$work/resume.log" &&
  LUA_PATH="$LUA_PATH" bin/moonshard ckpt verify "$work/ckpt" --step 9 >/dev/null 2>&1
check "resume of the 2-host save on 1 host x 2 ranks continues at step 7 and saves step 9 (status $status)" $? "$work/resume.log"

started=$(date +%s)
mpirun_on_host_a "$work/unreachable" 4 120 luajit tools/multihost_mesh.lua >"$work/unreachable.log" 2>&1
status=$?
elapsed=$(($(date +%s) - started))
[ $status -ne 0 ] && [ $status -ne 124 ] && [ $elapsed -lt 60 ] &&
  grep -q "unable to complete a TCP connection" "$work/unreachable.log" && nothing_left
check "a hostfile naming the unreachable ${addresses[2]}: mpirun fails in ${elapsed} s (status $status), nothing left" $? "$work/unreachable.log"
grep -E "unable to complete|Local host|Remote host" "$work/unreachable.log" | sed 's/^ */  mpirun: /'

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
