"""Replication: Raft as published (`raft`, a core without I/O), one replica's log and
state machine in SQLite (`store`), the Twisted driver around them (`replica`) and the
doors every replica has (`routes`). docs/replication.md states the protocol."""
