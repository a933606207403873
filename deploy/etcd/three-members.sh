#!/usr/bin/env bash
# A three-member etcd cluster for the coordinators (Debian etcd-server 3.4).
# Run on each of the three machines with NAME=etcd1|etcd2|etcd3 and its IP.
#
# Unattended for a year (deploy/CONFIGURATION.md, "etcd upkeep"):
# - auto-compaction keeps one hour of history and compacts it once an hour; without
#   it etcd keeps every revision until the quota is used up and refuses writes
#   (NOSPACE). blocktxn only reads current values, so one hour is a margin for
#   operators (etcdctl get --rev) and for watchers that reconnect.
# - --snapshot-count 10000: etcd holds its raft log in memory until a snapshot; 3.4's
#   default (100,000 entries, ~10,000 transactions) let its memory double in a soak run
# - the quota is etcd's default (2 GiB), written out: blocktxn's live data is a few MiB
#   (agents, open and last --keep-finished days of transactions, backup sets).
# - compaction frees pages for reuse; the file shrinks only on `etcdctl defrag`, one
#   member at a time (it blocks that member while it runs): after a burst, or when
#   `etcdctl endpoint status -w json` shows dbSize far above dbSizeInUse.
set -euo pipefail
: "${NAME:?etcd1, etcd2 or etcd3}" "${IP:?the address of this member}"
CLUSTER=etcd1=http://10.0.0.11:2380,etcd2=http://10.0.0.12:2380,etcd3=http://10.0.0.13:2380
exec etcd --name "$NAME" --data-dir "/var/lib/etcd/$NAME" \
  --listen-client-urls "http://$IP:2379" --advertise-client-urls "http://$IP:2379" \
  --listen-peer-urls "http://$IP:2380" --initial-advertise-peer-urls "http://$IP:2380" \
  --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token blocktxn \
  --auto-compaction-mode periodic --auto-compaction-retention 1h --snapshot-count 10000 \
  --quota-backend-bytes $((2 * 1024 * 1024 * 1024))
