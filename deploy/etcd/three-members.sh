#!/usr/bin/env bash
# A three-member etcd cluster for the coordinators (Debian etcd-server 3.4).
# Run on each of the three machines with NAME=etcd1|etcd2|etcd3 and its IP.
set -euo pipefail
: "${NAME:?etcd1, etcd2 or etcd3}" "${IP:?this member's address}"
CLUSTER=etcd1=http://10.0.0.11:2380,etcd2=http://10.0.0.12:2380,etcd3=http://10.0.0.13:2380
exec etcd --name "$NAME" --data-dir "/var/lib/etcd/$NAME" \
  --listen-client-urls "http://$IP:2379" --advertise-client-urls "http://$IP:2379" \
  --listen-peer-urls "http://$IP:2380" --initial-advertise-peer-urls "http://$IP:2380" \
  --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token blocktxn
