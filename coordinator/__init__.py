"""The blocktxn coordinator: two-phase commit across agents, state in etcd."""
